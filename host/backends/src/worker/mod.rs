//! Tenant models out of the server's address space: the model worker.
//!
//! ONNX Runtime parses and runs whatever a tenant uploads, and a parser bug, a constant-folding
//! step that asks for tens of GB, or an external-data path would otherwise hit every tenant at
//! once. So each tenant's models run in a worker process of their own ([`process`]), sandboxed
//! ([`sandbox`]: no filesystem, no network, an address-space limit from the tenant's
//! `model_memory_mb`), supervised and restarted by the server ([`client`]). Tensors cross
//! through shared memory ([`shm`]) with small control frames on a socket ([`wire`]), so a call
//! costs a few microseconds more than in process, not a serialisation of its tensors.
//!
//! [`WorkerModel`] implements [`weft_core::Model`], so the dynamic batcher, graph model nodes
//! and plugins' `wasi:nn` calls use a worker-backed model exactly like an in-process one.

pub mod client;
pub mod process;
pub mod sandbox;
pub mod shm;
pub mod wire;

pub use client::{
    ModelWorker, WeakModelWorker, WorkerConfig, WorkerModel, WorkerObserver, trial_load,
};
pub use process::{ProbeReport, WorkerArgs};
pub use sandbox::SandboxPolicy;
