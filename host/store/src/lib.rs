//! Weft's durable tenant state and the crypto helpers that guard it.
//!
//! This crate owns what must survive a restart in a multi-tenant server — tenants, their quotas,
//! API key hashes, registered signing keys, and the plugin, model and graph versions they pushed —
//! plus the content-addressed blobs those versions point at. [`Store`] keeps all metadata in one
//! `state.json` rewritten atomically and blobs under `blobs/sha256/<hex>`, so a crash at any point
//! leaves either the old or the new state, never a mix. [`signing`] and [`api_keys`] live here
//! rather than in the server because the CLI client needs the same formats, and neither needs an
//! async runtime or a web framework. With [`Store::open_shared`] the metadata lives in PostgreSQL
//! instead ([`postgres`]), shared by every replica, behind the same snapshot-and-transact API.

pub mod api_keys;
pub mod migrate;
pub mod postgres;
mod records;
pub mod s3;
pub mod signing;
mod store;

pub use records::{
    ApiKey, GraphVersion, JobFile, JobRecord, JobState, MAX_NAME_LEN, MAX_ROLLOUT_EVENTS,
    ModelVersion, PluginVersion, Quotas, RolloutEvent, RolloutPhase, RolloutRecord, ServedModel,
    ServedPlugin, SigningKey, State, Tenant, Usage, check_name, unix_now, unix_now_ms,
};
pub use store::{
    BlobWriter, MAX_COLLECTED_PER_ROUND, SCRATCH_PREFIX, StagedBlob, Store, write_file_durably,
};
