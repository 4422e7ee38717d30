//! Weft's shared vocabulary: the words every other crate speaks.
//!
//! This crate owns the types that cross crate boundaries — [`DataType`] (every Open Inference
//! Protocol datatype), [`Tensor`] (datatype + shape + little-endian bytes), [`TensorSpec`]
//! (what a model declares), [`Error`] with its [`ErrorKind`], and the [`Model`] trait that a
//! backend implements and the server calls, the [`RequestContext`] every call carries — and [`fair::FairGate`], the fair share of a bounded
//! pool between tenants that the plugin runtime, the batcher and shared models all use. It has no I/O and no heavy dependency so that the
//! protocol codecs, the engine and the backends can all depend on it without depending on each
//! other.

mod datatype;
mod error;
pub mod fair;
mod model;
pub mod request;
mod tensor;

pub use datatype::DataType;
pub use error::{Error, ErrorKind, Result};
pub use model::{
    BoxFuture, DynamicBatchingConfig, Model, ModelMetadata, OnDemand, Parameters, Residence,
    ServingConfig, TensorSpec,
};
pub use request::{Cost, RequestContext, Spent};
pub use tensor::{NamedTensor, Tensor, bytes_elements, element_count, encode_bytes_elements};
