//! Triton's gRPC inference protocol, compiled from `proto/grpc_service.proto` and
//! `proto/model_config.proto` (copied unchanged from triton-inference-server/common, BSD-3).
//!
//! Triton's service is a wire-compatible superset of the Open Inference Protocol's gRPC
//! service (same package `inference`, service name and field numbers), so one server built
//! from it answers `tritonclient.grpc`, KServe's clients and stubs generated from either proto.
//! This crate holds only the generated messages and stubs; the server lives in `weft-server`
//! (`grpc.rs`) and the benchmark client in `weft-cli`.

#![allow(clippy::all, clippy::pedantic, missing_docs)]

/// The `inference` package: messages, `grpc_inference_service_server` and
/// `grpc_inference_service_client`.
pub mod inference {
    tonic::include_proto!("inference");
}

pub use inference::*;

pub mod convert;
