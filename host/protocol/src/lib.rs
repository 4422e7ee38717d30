//! The Open Inference Protocol (KServe V2) REST wire format, in both encodings.
//!
//! This crate owns the translation between HTTP bodies and [`weft_core::Tensor`]s: JSON inference
//! requests and responses (flat or nested `data`), the binary tensor data extension that stock
//! `tritonclient` uses by default (a JSON header followed by raw tensor bytes, sized by
//! `Inference-Header-Content-Length`), and the small serde types of the other V2 responses.
//! Inputs may also name a region of Triton's system shared memory (`shared_memory.rs`), read
//! through a trait the server implements.
//! It does no I/O and knows nothing of axum or tokio, so it is unit-tested on byte strings.
//! Binary inputs are zero-copy slices of the request body.

mod decode;
mod encode;
mod json_data;
pub mod shared_memory;
mod types;

pub use decode::{
    InferRequest, RequestInput, RequestedOutput, decode_infer_request, decode_infer_request_with,
};
pub use encode::{
    EncodedResponse, InferResponse, JsonTensors, ResponseOutput, encode_infer_request,
    encode_infer_response, tensor_json,
};
pub use types::{
    ErrorResponse, MetadataTensor, ModelMetadataResponse, RepositoryIndexEntry,
    ServerMetadataResponse,
};

/// JSON object of request, input or output `parameters`.
pub use weft_core::Parameters;

#[cfg(test)]
mod tests;
