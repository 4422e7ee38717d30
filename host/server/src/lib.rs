//! The `weft` server: the Open Inference Protocol (KServe V2) HTTP API over axum.
//!
//! It owns the process edge — flags, logging, HTTP routes, error-to-status mapping, graceful
//! shutdown, tenants and their control plane — and wires the engine's registry to the backends. Everything below the HTTP edge
//! lives in the other crates, so `app(state)` is the whole server and tests serve exactly it.

pub mod app;
pub mod bench;
pub mod body_timeout;
pub mod cli;
pub mod control;
pub mod error;
pub mod graphs;
pub mod loader;
pub mod metrics;
pub mod stats;
pub mod tenants;
pub mod uploads;

pub use app::{AppState, app};
