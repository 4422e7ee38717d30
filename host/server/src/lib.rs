//! The `weft` server: the Open Inference Protocol (KServe V2) HTTP API over axum.
//!
//! It owns the process edge — the serve flags, HTTP routes, error-to-status mapping, graceful
//! shutdown, the control plane's HTTP face — and wires the engine's registry, the tenancy layer
//! and the backends together. The `weft` command line lives in `host/cli`. Everything below the HTTP edge
//! lives in the other crates, so `app(state)` is the whole server and tests serve exactly it.

pub mod app;
pub mod body_timeout;
pub mod busy_poll;
pub mod commands;
pub mod control;
pub mod error;
pub mod graphs;
pub mod grpc;
pub mod jobs;
pub mod listen;
pub mod load;
pub mod loader;
pub mod metrics;
pub mod shared_memory;
pub mod stats;
pub mod tenants;
pub mod thread_priority;
pub mod tls;
pub mod uploads;

pub use app::{AppState, app};
