//! Inference backends: the code that actually runs models.
//!
//! Today that is ONNX Runtime through `ort` ([`onnx`]), in the server's process or in a
//! sandboxed model worker process ([`worker`]). A backend turns a model plus its `model.toml`
//! into a [`weft_core::Model`]; it validates nothing the core validation already covers and
//! never runs inference on the async runtime's worker threads.

pub mod onnx;
pub mod worker;

pub use onnx::{GraphOptimization, OnnxModel, OnnxOptions, init_onnxruntime};
