//! Weft's engine: what is served, independent of how it runs.
//!
//! It owns inference graphs (TOML schema, validation, the in-process executor), the dynamic
//! batcher that merges concurrent requests to a model (and shares a model's queue and instances
//! fairly between tenants), models loaded on first use under a memory budget (`lazy`), the model
//! repository (Triton's layout, in TOML: `models/<name>/model.toml` plus numeric version folders)
//! and the registry that maps a name and version to a loaded model or to the reason it is
//! unavailable. It never depends on wasmtime or ONNX Runtime: models load through the
//! [`registry::ModelLoader`] trait and graph nodes run through [`graph::NodeRunner`], which the
//! server wires to the backends and the plugin runtime, so everything here is tested with fakes.

pub mod batcher;
pub mod config;
pub mod graph;
pub mod jobs;
pub mod lazy;
pub mod precise_timer;
pub mod registry;
pub mod repository;
pub mod rollout;
pub mod shared;
pub mod sticky;

pub use batcher::{BatchObserver, BatchStats, BatchedModel, BatchingConfig, Staging};
pub use config::{
    DynamicBatching, ExecutionKind, Isolation, ModelConfig, OrtOptions, VersionPolicy,
};
pub use registry::{ModelLoader, ModelRegistry, ModelState, ModelVersion, check_declared};
pub use repository::{DiscoveredModel, discover};
pub use shared::FairShared;
