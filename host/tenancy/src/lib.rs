//! Weft's tenancy layer: everything about tenants that does not depend on how requests arrive.
//!
//! This crate has no HTTP types (no axum, no status codes) and depends on neither wasmtime nor
//! ONNX Runtime: the server decodes a request, calls in here, and encodes the answer, and it
//! plugs the sandbox, the model backends and metrics in through the traits of [`backends`]. So
//! every rule here is unit-tested with fakes, in milliseconds, without starting a process.
//!
//! - [`tenancy`]: tenants and API keys, the single writer of changes, the hot swap of a
//!   tenant's namespace, and following the other replicas of a shared store.
//! - [`scope`]: building one tenant's namespace ([`TenantScope`]) from its store record.
//! - [`lifecycle`]: one lifecycle for plugins, models and graphs (immutability, storage,
//!   signatures, delete integrity).
//! - [`graphs`]: the catalog, the [`NodeRunner`](weft_engine::graph::NodeRunner) of a namespace
//!   and the one graph loader for repository and tenant graphs.
//! - [`quotas`], [`storage`], [`inflight`]: every quota decision (rate and concurrency divided
//!   between replicas, stored bytes and model memory, request bytes held in memory).
//! - [`rollouts`]: rollouts as a tenant's resource and the controller that decides them.
//! - [`jobs`]: batch jobs as a tenant's resource, and the runner that works through them.
//! - [`lazy_plugins`]: tenants' plugins compiled on first use, under the plugin cache budget.
//! - [`challenges`]: single-use signing-key registration challenges.

pub mod backends;
pub mod challenges;
pub mod graphs;
pub mod inflight;
pub mod jobs;
pub mod lazy_plugins;
pub mod lifecycle;
pub mod quotas;
pub mod rollouts;
pub mod scope;
pub mod storage;
pub mod tenancy;

pub use quotas::{Gate, Refusal};
pub use scope::TenantScope;
pub use tenancy::{BOOTSTRAP_TENANT, Tenancy, TenancyConfig, Writer, follow_shared_store};
