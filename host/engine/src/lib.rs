//! Weft's engine: what is served, independent of how it runs.
//!
//! Today it owns the model repository (Triton's layout, in TOML: `models/<name>/model.toml` plus
//! numeric version folders) and the registry that maps a name and version to a loaded model or
//! to the reason it is unavailable. Graph execution joins it later. It never depends on wasmtime
//! or ONNX Runtime: loading goes through the [`registry::ModelLoader`] trait that the server
//! wires to the backends, so everything here is unit-tested with fakes.

pub mod config;
pub mod registry;
pub mod repository;

pub use config::{ModelConfig, OrtOptions, VersionPolicy};
pub use registry::{ModelLoader, ModelRegistry, ModelState, ModelVersion};
pub use repository::{DiscoveredModel, discover};
