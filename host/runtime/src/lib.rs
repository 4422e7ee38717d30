//! Weft's WebAssembly plugin sandbox.
//!
//! It owns everything between a graph node and a tenant's component: the wasmtime engine (pooling
//! allocator, epoch interruption with async yield, optional fuel), the one place `bindgen!`
//! runs, the host side of `weft:plugin/types` and `weft:plugin/host`, Weft's own asynchronous
//! `wasi:nn` host that lends the server's models to plugins, the compile cache, and per-call
//! limits (deadline, memory, host-side bytes, output size, fuel, log lines), and the fair
//! shares of instances, warm instances, CPU turns and compile slots between tenants. It depends
//! on `weft-core` only: models arrive as `Arc<dyn Model>` grants, so runtime tests run with fake
//! models.

mod bindings;
mod nn;
mod runtime;
mod state;
mod tensors;

pub use runtime::{
    CallContext, CallLimits, FailureCause, Plugin, PluginFailure, PluginRuntime, PluginStats, Role,
    RuntimeConfig, RuntimeStats,
};
pub use weft_core::fair::{FairGate, FairPermit, ShareKey};
