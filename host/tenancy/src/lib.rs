//! Weft's tenancy layer: the rules about tenants that do not depend on how requests arrive.
//!
//! This crate has no HTTP types (no axum, no status codes): the server decodes a request,
//! calls in here, and encodes the answer, and everything here is unit-tested without starting a
//! process. It starts with [`quotas`], the door every request of a tenant passes (rate and
//! concurrency, divided between the replicas that share a store) and [`storage`], the storage
//! quota reserved by uploads in progress, and [`inflight`], the budget of request bytes a tenant
//! may hold in memory; the artifact lifecycles,
//! scope building and the explicit request context move here next (issue 15).

pub mod inflight;
pub mod quotas;
pub mod storage;

pub use quotas::{Gate, Refusal};
