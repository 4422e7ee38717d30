//! The records persisted in `state.json`: tenants, their quotas, keys and pushed versions, and
//! the naming rule every stored name obeys.
//!
//! These types are the on-disk schema, so they change only compatibly. [`Quotas`] is also read
//! straight from operators' requests, so it rejects unknown fields (a typo such as `"brust"` must
//! be an error, not a silently ignored limit) and fills omitted ones with the defaults. Names are
//! restricted to a path- and URL-safe charset ([`check_name`]) because they appear in routes,
//! metric labels and log lines.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use weft_core::{Error, ErrorKind, Result};

use crate::api_keys;
use crate::signing::SignatureScheme;

/// Longest allowed name (tenant, plugin, model, graph, plugin version).
pub const MAX_NAME_LEN: usize = 64;

/// Checks `name` against `^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$`; `kind` ("tenant", "plugin",
/// "plugin version", ...) names what it is in the error.
pub fn check_name(kind: &str, name: &str) -> Result<()> {
    let mut bytes = name.bytes();
    let first_ok = bytes.next().is_some_and(|b| b.is_ascii_alphanumeric());
    let rest_ok = bytes.all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'));
    if first_ok && rest_ok && name.len() <= MAX_NAME_LEN {
        Ok(())
    } else {
        Err(Error::invalid(format!(
            "invalid {kind} name {name:?}: must be 1 to {MAX_NAME_LEN} characters of letters, \
             digits, '_', '.' and '-', starting with a letter or digit"
        )))
    }
}

/// Seconds since the Unix epoch now (0 if the clock is before 1970).
pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// A tenant's limits. Every field may be omitted in JSON input; omitted fields take the defaults.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Quotas {
    /// Token bucket refill rate for requests.
    pub requests_per_second: f64,
    /// Token bucket capacity.
    pub burst: u32,
    /// Requests of this tenant in flight at once.
    pub max_concurrent_requests: u32,
    /// Ceiling on the memory limit of this tenant's plugin nodes.
    pub plugin_memory_mb: u64,
    /// Ceiling on the deadline of this tenant's plugin nodes.
    pub plugin_deadline_ms: u64,
    /// Largest request body.
    pub max_request_bytes: u64,
    /// Plugin versions stored (all names together).
    pub max_plugins: u32,
    /// Model versions stored.
    pub max_models: u32,
    /// Graph versions stored.
    pub max_graphs: u32,
    /// Sum of the sizes of everything the tenant stored.
    pub max_stored_bytes: u64,
    /// Memory of the tenant's model worker: its address-space limit, and the budget that
    /// `instance_count` × model size of every stored model version counts against.
    pub model_memory_mb: u64,
    /// Signing keys registered, revoked ones included (a revoked key is kept so that it can
    /// never be registered again, and it still takes room in `state.json`).
    pub max_signing_keys: u32,
    /// Batch jobs queued or running at once.
    pub max_active_jobs: u32,
    /// Batch job records kept (finished ones included, until deleted).
    pub max_jobs: u32,
    /// Rows (non-blank input lines) of one batch job.
    pub max_job_rows: u64,
    /// Longest deadline a batch job may ask for, in seconds (also its default).
    pub max_job_seconds: u64,
    /// GPU memory the tenant's models may take (instances × size of every stored version with
    /// `execution = "cuda"`); 0, the default, means the tenant may not push GPU models.
    pub gpu_memory_mb: u64,
}

impl Default for Quotas {
    fn default() -> Self {
        Quotas {
            requests_per_second: 1000.0,
            burst: 2000,
            max_concurrent_requests: 256,
            plugin_memory_mb: 256,
            plugin_deadline_ms: 10_000,
            max_request_bytes: 64 << 20,
            max_plugins: 100,
            max_models: 50,
            max_graphs: 100,
            max_stored_bytes: 4 << 30,
            model_memory_mb: 2048,
            max_signing_keys: 16,
            max_active_jobs: 2,
            max_jobs: 64,
            max_job_rows: 10_000_000,
            max_job_seconds: 24 * 3600,
            gpu_memory_mb: 0,
        }
    }
}

impl Quotas {
    /// Rejects limits that would make the tenant unusable or the arithmetic meaningless:
    /// a non-finite or non-positive rate, and zero burst, concurrency, memory, deadline or
    /// request size. (Zero storage counts are allowed: a tenant that may only use shared models.)
    pub fn validate(&self) -> Result<()> {
        if !(self.requests_per_second.is_finite() && self.requests_per_second > 0.0) {
            return Err(Error::invalid(format!(
                "quota requests_per_second must be a positive number, got {}",
                self.requests_per_second
            )));
        }
        for (field, value) in [
            ("burst", u64::from(self.burst)),
            (
                "max_concurrent_requests",
                u64::from(self.max_concurrent_requests),
            ),
            ("plugin_memory_mb", self.plugin_memory_mb),
            ("plugin_deadline_ms", self.plugin_deadline_ms),
            ("max_request_bytes", self.max_request_bytes),
            ("model_memory_mb", self.model_memory_mb),
            ("max_job_seconds", self.max_job_seconds),
        ] {
            if value == 0 {
                return Err(Error::invalid(format!("quota {field} must be at least 1")));
            }
        }
        Ok(())
    }

    /// Parses partial quotas from JSON (omitted fields take the defaults) and validates them.
    pub fn from_json(value: &serde_json::Value) -> Result<Quotas> {
        Quotas::default().patched(value)
    }

    /// These quotas with the fields present in `patch` (a JSON object) replaced, validated.
    /// Unknown fields and wrongly typed values are errors.
    pub fn patched(&self, patch: &serde_json::Value) -> Result<Quotas> {
        let patch = patch
            .as_object()
            .ok_or_else(|| Error::invalid("quotas must be a JSON object"))?;
        let mut merged = match serde_json::to_value(self) {
            Ok(serde_json::Value::Object(map)) => map,
            _ => return Err(Error::internal("quotas did not serialize to a JSON object")),
        };
        for (field, value) in patch {
            merged.insert(field.clone(), value.clone());
        }
        let quotas: Quotas = serde_json::from_value(serde_json::Value::Object(merged))
            .map_err(|e| Error::invalid(format!("invalid quotas: {e}")))?;
        quotas.validate()?;
        Ok(quotas)
    }
}

/// Everything the store persists. `revision` increases by one with every committed change.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct State {
    /// Number of committed transactions.
    pub revision: u64,
    /// Tenants by name.
    #[serde(default)]
    pub tenants: BTreeMap<String, Tenant>,
}

impl State {
    /// The tenant holding a non-revoked API key equal to `key`, with that key's id.
    pub fn tenant_for_key(&self, key: &str) -> Option<(&Tenant, &ApiKey)> {
        let id = api_keys::id_of(key)?;
        self.tenants.values().find_map(|tenant| {
            tenant
                .api_keys
                .iter()
                .find(|k| !k.revoked && k.id == id && api_keys::matches(key, &k.hash))
                .map(|k| (tenant, k))
        })
    }

    /// Registers a signing key for `tenant`, checking, in the same change that adds it, that
    /// no tenant holds this public key yet (revoked keys included) and that the tenant stays
    /// within [`Quotas::max_signing_keys`]. Call it inside [`crate::Store::transact`], so the
    /// checks and the insert happen under the store's one writer. The refusal for a key another
    /// tenant holds names no tenant: it says only that the key is taken.
    pub fn register_signing_key(&mut self, tenant: &str, key: SigningKey) -> Result<()> {
        let record = self
            .tenants
            .get(tenant)
            .ok_or_else(|| Error::not_found(format!("unknown tenant '{tenant}'")))?;
        if let Some(existing) = record.signing_keys.iter().find(|k| k.id == key.id) {
            return Err(Error::conflict(if existing.revoked {
                format!(
                    "signing key '{}' was revoked and cannot be registered again; generate a new \
                     key (`weft key gen`)",
                    key.id
                )
            } else {
                format!("signing key '{}' is already registered", key.id)
            }));
        }
        let taken = self.tenants.values().any(|other| {
            other
                .signing_keys
                .iter()
                .any(|k| k.id == key.id || k.public_key == key.public_key)
        });
        if taken {
            return Err(Error::conflict(
                "this public key is already registered; a signing key belongs to one tenant \
                 only: generate a new key (`weft key gen`)",
            ));
        }
        record.check_room_for_signing_key()?;
        if let Some(record) = self.tenants.get_mut(tenant) {
            record.signing_keys.push(key);
        }
        Ok(())
    }

    /// Every blob digest some record refers to.
    pub fn referenced_digests(&self) -> BTreeSet<&str> {
        self.tenants
            .values()
            .flat_map(Tenant::referenced_digests)
            .collect()
    }
}

/// One tenant: its limits, credentials and what it stored.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Tenant {
    /// The tenant's name ([`check_name`]).
    pub name: String,
    /// When it was created.
    pub created_unix: u64,
    /// Its limits.
    #[serde(default)]
    pub quotas: Quotas,
    /// Platform (repository) model and graph names this tenant may use; `"*"` means all.
    #[serde(default)]
    pub shared_models: Vec<String>,
    /// Its API keys (hashes only), revoked ones included.
    #[serde(default)]
    pub api_keys: Vec<ApiKey>,
    /// Public keys it registered for plugin signatures, revoked ones included.
    #[serde(default)]
    pub signing_keys: Vec<SigningKey>,
    /// Plugin versions by plugin name, in push order; the last is current.
    #[serde(default)]
    pub plugins: BTreeMap<String, Vec<PluginVersion>>,
    /// Model versions by model name.
    #[serde(default)]
    pub models: BTreeMap<String, BTreeMap<u64, ModelVersion>>,
    /// Graph versions by graph name.
    #[serde(default)]
    pub graphs: BTreeMap<String, BTreeMap<u64, GraphVersion>>,
    /// Rollouts by name: their TOML, where each stands, and what was decided.
    #[serde(default)]
    pub rollouts: BTreeMap<String, RolloutRecord>,
    /// Batch jobs by id: what they run, where they stand, their files.
    #[serde(default)]
    pub jobs: BTreeMap<String, JobRecord>,
    /// Grows by one with every committed change to this tenant (its own count, so it says
    /// nothing about other tenants' activity).
    #[serde(default)]
    pub revision: u64,
}

/// A tenant's usage, as counted against [`Quotas`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Usage {
    /// Plugin versions stored.
    pub plugins: u64,
    /// Model versions stored.
    pub models: u64,
    /// Graph versions stored.
    pub graphs: u64,
    /// Sum of the sizes of all stored versions.
    pub stored_bytes: u64,
}

impl Tenant {
    /// A tenant with nothing stored and no keys yet.
    pub fn new(name: impl Into<String>, created_unix: u64, quotas: Quotas) -> Tenant {
        Tenant {
            name: name.into(),
            created_unix,
            quotas,
            shared_models: Vec::new(),
            api_keys: Vec::new(),
            signing_keys: Vec::new(),
            plugins: BTreeMap::new(),
            models: BTreeMap::new(),
            graphs: BTreeMap::new(),
            rollouts: BTreeMap::new(),
            jobs: BTreeMap::new(),
            revision: 0,
        }
    }

    /// Sum of the sizes of every stored plugin, model and graph version (saturating).
    pub fn stored_bytes(&self) -> u64 {
        let plugins = self.plugins.values().flatten().map(|v| v.size);
        let models = self
            .models
            .values()
            .flat_map(BTreeMap::values)
            .map(|v| v.size);
        let graphs = self
            .graphs
            .values()
            .flat_map(BTreeMap::values)
            .map(|v| v.size);
        let jobs = self
            .jobs
            .values()
            .flat_map(JobRecord::files)
            .map(|file| file.bytes);
        plugins
            .chain(models)
            .chain(graphs)
            .chain(jobs)
            .fold(0u64, u64::saturating_add)
    }

    /// Numbers of stored `(plugin, model, graph)` versions.
    pub fn counts(&self) -> (u64, u64, u64) {
        let count = |n: usize| u64::try_from(n).unwrap_or(u64::MAX);
        (
            count(self.plugins.values().map(Vec::len).sum()),
            count(self.models.values().map(BTreeMap::len).sum()),
            count(self.graphs.values().map(BTreeMap::len).sum()),
        )
    }

    /// [`Tenant::counts`] and [`Tenant::stored_bytes`] together.
    pub fn usage(&self) -> Usage {
        let (plugins, models, graphs) = self.counts();
        Usage {
            plugins,
            models,
            graphs,
            stored_bytes: self.stored_bytes(),
        }
    }

    /// Whether this tenant may use the platform model or graph `name`.
    pub fn may_use_shared(&self, name: &str) -> bool {
        self.shared_models.iter().any(|s| s == "*" || s == name)
    }

    /// Refuses (403) one more signing key past [`Quotas::max_signing_keys`]; revoked keys count.
    pub fn check_room_for_signing_key(&self) -> Result<()> {
        let limit = self.quotas.max_signing_keys;
        if self.signing_keys.len() >= usize::try_from(limit).unwrap_or(usize::MAX) {
            return Err(Error::new(
                ErrorKind::PermissionDenied,
                format!(
                    "tenant '{}' would exceed its quota of {limit} signing keys \
                     (max_signing_keys; revoked keys count too, since they are kept so that they \
                     can never be registered again): the operator can raise the quota",
                    self.name
                ),
            ));
        }
        Ok(())
    }

    /// The registered, non-revoked signing key with this id.
    pub fn active_signing_key(&self, key_id: &str) -> Option<&SigningKey> {
        self.signing_keys
            .iter()
            .find(|k| !k.revoked && k.id == key_id)
    }

    /// Every blob digest this tenant's versions refer to.
    pub fn referenced_digests(&self) -> impl Iterator<Item = &str> {
        let plugins = self.plugins.values().flatten().map(|v| v.digest.as_str());
        let models = self
            .models
            .values()
            .flat_map(BTreeMap::values)
            .flat_map(|v| [v.onnx_digest.as_str(), v.config_digest.as_str()]);
        let graphs = self
            .graphs
            .values()
            .flat_map(BTreeMap::values)
            .map(|v| v.toml_digest.as_str());
        let jobs = self
            .jobs
            .values()
            .flat_map(JobRecord::files)
            .map(|file| file.digest.as_str());
        plugins.chain(models).chain(graphs).chain(jobs)
    }
}

/// An issued API key; only the hash of the key text is kept.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApiKey {
    /// The id embedded in the key text ([`api_keys::id_of`]).
    pub id: String,
    /// [`api_keys::hash`] of the key text.
    pub hash: String,
    /// When it was issued.
    pub created_unix: u64,
    /// Revoked keys are kept so listings show them, but never authenticate.
    #[serde(default)]
    pub revoked: bool,
}

/// A public key a tenant registered for verifying its plugins' signatures.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SigningKey {
    /// [`crate::signing::PublicKey::key_id`].
    pub id: String,
    /// [`crate::signing::PublicKey::to_base64`].
    pub public_key: String,
    /// When it was registered.
    pub created_unix: u64,
    /// Plugins signed by a revoked key no longer load.
    #[serde(default)]
    pub revoked: bool,
}

/// One pushed plugin version.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PluginVersion {
    /// The version ([`check_name`] charset).
    pub version: String,
    /// sha256 hex of the component, also its blob name.
    pub digest: String,
    /// Component size in bytes.
    pub size: u64,
    /// The signature (base64) over [`crate::signing::plugin_message`].
    pub signature: String,
    /// The message the signature covers: v2 (tenant-bound) for every version pushed since
    /// tenant binding; versions stored before it have no field and are v1.
    #[serde(default)]
    pub signature_scheme: SignatureScheme,
    /// Id of the signing key.
    pub key_id: String,
    /// When it was pushed.
    pub created_unix: u64,
    /// What its push found it to be, so a replica can register it without compiling it
    /// (versions pushed before this was recorded have none and compile when their scope is
    /// built).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub served: Option<ServedPlugin>,
}

/// A plugin version's role and compiled size, as its push found them.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServedPlugin {
    /// `transformer`, `combiner` or `router`.
    pub role: String,
    /// Bytes of its compiled image on the pushing replica.
    pub compiled_bytes: u64,
}

/// One pushed model version: its ONNX file and its `model.toml`, both blobs.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelVersion {
    /// sha256 hex of the ONNX bytes.
    pub onnx_digest: String,
    /// sha256 hex of the `model.toml` bytes.
    pub config_digest: String,
    /// Total size (ONNX + config) in bytes.
    pub size: u64,
    /// When it was pushed.
    pub created_unix: u64,
    /// What it reports before it is loaded, recorded when the push loaded it: a replica
    /// registers the version from this and loads it on its first request. Versions pushed
    /// before lazy loading have none and load at start-up.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub served: Option<ServedModel>,
}

/// A model version's metadata and serving config, as its push found them.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServedModel {
    pub metadata: weft_core::ModelMetadata,
    pub serving: weft_core::ServingConfig,
    /// `pin = true` in its model.toml: never unloaded once loaded.
    #[serde(default)]
    pub pinned: bool,
}

/// Where a rollout stands. A canary is `Progressing` until it is promoted, rolled back or
/// aborted; an experiment is `Running` until a winner concludes it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RolloutPhase {
    Progressing,
    Promoted,
    RolledBack,
    Aborted,
    Running,
    Concluded,
}

impl RolloutPhase {
    /// Whether decisions are still being made (the controller watches it).
    pub fn is_active(self) -> bool {
        matches!(self, RolloutPhase::Progressing | RolloutPhase::Running)
    }
}

/// Most decisions kept per rollout; the oldest go first.
pub const MAX_ROLLOUT_EVENTS: usize = 64;

/// One decision about a rollout, with the numbers that caused it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RolloutEvent {
    /// When it was decided, in milliseconds since the Unix epoch.
    pub unix_ms: u64,
    /// `applied`, `advanced`, `promoted`, `rolled_back`, `aborted`, `concluded`.
    pub action: String,
    /// The step it moved to (or was at).
    pub step: usize,
    /// Why, in words: the failed rules, or who asked.
    pub reason: String,
    /// The window's numbers behind an automatic decision.
    #[serde(default)]
    pub evidence: serde_json::Value,
    /// The replica that decided.
    #[serde(default)]
    pub replica: String,
}

/// One rollout of a tenant: its TOML (parsed by the engine, which the store does not know)
/// and its state. `generation` changes whenever a new TOML is applied, so every replica
/// starts the new one with fresh windows.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RolloutRecord {
    pub toml: String,
    pub generation: u64,
    pub phase: RolloutPhase,
    /// The canary's current step (index into its steps).
    #[serde(default)]
    pub step: usize,
    /// When the current step began, in milliseconds since the Unix epoch.
    pub step_started_unix_ms: u64,
    /// The arm that takes all traffic once an experiment concluded.
    #[serde(default)]
    pub winner: Option<String>,
    pub created_unix: u64,
    /// Decisions, oldest first, at most [`MAX_ROLLOUT_EVENTS`].
    #[serde(default)]
    pub events: Vec<RolloutEvent>,
}

impl RolloutRecord {
    /// Appends a decision, dropping the oldest past [`MAX_ROLLOUT_EVENTS`].
    pub fn record(&mut self, event: RolloutEvent) {
        self.events.push(event);
        let excess = self.events.len().saturating_sub(MAX_ROLLOUT_EVENTS);
        self.events.drain(..excess);
    }
}

/// Where a batch job stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobState {
    /// Waiting for a runner.
    Queued,
    /// A runner is working through it (or was, before a crash: it is taken up again).
    Running,
    /// Every row ran; failed rows are in the error file.
    Succeeded,
    /// Stopped by its tenant; the rows done by then are in the files.
    Cancelled,
    /// Its deadline passed; the rows done by then are in the files.
    Expired,
    /// It could not run (its target is gone, its output outgrew the storage quota).
    Failed,
}

impl JobState {
    /// Whether the job still holds (or waits for) a runner.
    pub fn is_active(self) -> bool {
        matches!(self, JobState::Queued | JobState::Running)
    }
}

/// A file of a batch job in the blob store.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobFile {
    pub digest: String,
    pub bytes: u64,
}

/// One batch job: a JSON Lines file of V2 requests run through a model or graph of the tenant.
/// Its progress between chunks lives in the runner's chunk files, not here, so a chunk commit
/// does not rewrite the tenant's record; the record changes when the job is submitted,
/// started, cancelled and ended.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobRecord {
    pub id: String,
    /// The model or graph name, and the version asked for (none: the current one).
    pub target: String,
    #[serde(default)]
    pub version: Option<u64>,
    pub input: JobFile,
    /// Non-blank input lines: the rows the job will run.
    pub rows_total: u64,
    /// Rows per committed chunk.
    pub chunk_rows: u64,
    pub state: JobState,
    /// Set by a cancel; the runner stops at its next row.
    #[serde(default)]
    pub cancel_requested: bool,
    pub created_unix_ms: u64,
    pub deadline_unix_ms: u64,
    #[serde(default)]
    pub started_unix_ms: Option<u64>,
    #[serde(default)]
    pub finished_unix_ms: Option<u64>,
    /// The replica running it, while it runs.
    #[serde(default)]
    pub runner: Option<String>,
    /// Rows run and rows failed, once it ended.
    #[serde(default)]
    pub rows_done: u64,
    #[serde(default)]
    pub rows_failed: u64,
    /// The output and error files (JSON Lines keyed by input line), once it ended.
    #[serde(default)]
    pub output: Option<JobFile>,
    #[serde(default)]
    pub errors: Option<JobFile>,
    /// Why it failed, when it did.
    #[serde(default)]
    pub error: Option<String>,
}

impl JobRecord {
    /// The blobs this job holds: its input, and its output and error files once written.
    pub fn files(&self) -> impl Iterator<Item = &JobFile> {
        std::iter::once(&self.input)
            .chain(self.output.as_ref())
            .chain(self.errors.as_ref())
    }
}

/// Milliseconds since the Unix epoch now (0 if the clock is before 1970).
pub fn unix_now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// One pushed graph version: its TOML, a blob.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GraphVersion {
    /// sha256 hex of the graph TOML.
    pub toml_digest: String,
    /// Size of the TOML in bytes.
    pub size: u64,
    /// When it was pushed.
    pub created_unix: u64,
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;
    use serde_json::json;
    use weft_core::ErrorKind;

    #[test]
    fn names() {
        for ok in ["a", "A", "0", "acme", "my-model_v2.onnx", &"x".repeat(64)] {
            check_name("model", ok).unwrap();
        }
        for bad in [
            "",
            "-a",
            "_a",
            ".a",
            ".",
            "..",
            "a/b",
            "a b",
            "a\n",
            "é",
            "a:b",
            &"x".repeat(65),
        ] {
            let err = check_name("plugin", bad).unwrap_err();
            assert_eq!(err.kind(), ErrorKind::InvalidArgument);
            assert!(err.message().starts_with("invalid plugin name"), "{err}");
        }
    }

    #[test]
    fn quotas_defaults() {
        let q = Quotas::default();
        assert_eq!(q.requests_per_second, 1000.0);
        assert_eq!(q.burst, 2000);
        assert_eq!(q.max_concurrent_requests, 256);
        assert_eq!(q.plugin_memory_mb, 256);
        assert_eq!(q.plugin_deadline_ms, 10_000);
        assert_eq!(q.max_request_bytes, 64 * 1024 * 1024);
        assert_eq!(q.max_plugins, 100);
        assert_eq!(q.max_models, 50);
        assert_eq!(q.max_graphs, 100);
        assert_eq!(q.max_stored_bytes, 4 * 1024 * 1024 * 1024);
        assert_eq!(q.max_signing_keys, 16);
        q.validate().unwrap();
    }

    #[test]
    fn quotas_partial_json() {
        let q: Quotas = serde_json::from_value(json!({"burst": 5, "max_models": 1})).unwrap();
        assert_eq!(q.burst, 5);
        assert_eq!(q.max_models, 1);
        assert_eq!(q.max_plugins, 100);
        let q: Quotas = serde_json::from_value(json!({})).unwrap();
        assert_eq!(q, Quotas::default());
        assert!(serde_json::from_value::<Quotas>(json!({"brust": 5})).is_err());
        assert!(serde_json::from_value::<Quotas>(json!({"burst": -1})).is_err());
        assert!(serde_json::from_value::<Quotas>(json!({"burst": "5"})).is_err());
    }

    #[test]
    fn quotas_patched_and_validated() {
        let base = Quotas::from_json(&json!({"burst": 7})).unwrap();
        let patched = base.patched(&json!({"max_graphs": 3})).unwrap();
        assert_eq!(patched.burst, 7, "fields not in the patch keep their value");
        assert_eq!(patched.max_graphs, 3);
        let err = base.patched(&json!({"nope": 1})).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::InvalidArgument);
        assert!(err.message().contains("nope"), "{err}");
        assert!(base.patched(&json!([1])).is_err());
        assert!(base.patched(&json!({"burst": 0})).is_err());
        assert!(base.patched(&json!({"requests_per_second": 0})).is_err());
        assert!(base.patched(&json!({"requests_per_second": -1.5})).is_err());
        assert!(
            base.patched(&json!({"max_concurrent_requests": 0}))
                .is_err()
        );
        base.patched(&json!({"max_plugins": 0, "requests_per_second": 0.5}))
            .unwrap();
        let nan = Quotas {
            requests_per_second: f64::NAN,
            ..Quotas::default()
        };
        assert!(nan.validate().is_err());
    }

    fn sample_tenant() -> Tenant {
        let mut t = Tenant::new("acme", 1, Quotas::default());
        t.plugins.insert(
            "resize".into(),
            vec![
                PluginVersion {
                    version: "1.0".into(),
                    digest: "p1".into(),
                    size: 10,
                    signature: "s".into(),
                    signature_scheme: SignatureScheme::V2,
                    key_id: "k".into(),
                    created_unix: 1,
                    served: None,
                },
                PluginVersion {
                    version: "1.1".into(),
                    digest: "p2".into(),
                    size: 20,
                    signature: "s".into(),
                    signature_scheme: SignatureScheme::V2,
                    key_id: "k".into(),
                    created_unix: 2,
                    served: None,
                },
            ],
        );
        t.models.entry("mlp".into()).or_default().insert(
            1,
            ModelVersion {
                onnx_digest: "m1".into(),
                config_digest: "c1".into(),
                size: 300,
                created_unix: 1,
                served: None,
            },
        );
        t.graphs.entry("g".into()).or_default().insert(
            2,
            GraphVersion {
                toml_digest: "g2".into(),
                size: 4000,
                created_unix: 1,
            },
        );
        t
    }

    #[test]
    fn tenant_usage() {
        let t = sample_tenant();
        assert_eq!(t.counts(), (2, 1, 1));
        assert_eq!(t.stored_bytes(), 4330);
        assert_eq!(
            t.usage(),
            Usage {
                plugins: 2,
                models: 1,
                graphs: 1,
                stored_bytes: 4330
            }
        );
        let empty = Tenant::new("e", 0, Quotas::default());
        assert_eq!(empty.usage(), Usage::default());
        let mut digests: Vec<_> = t.referenced_digests().collect();
        digests.sort_unstable();
        assert_eq!(digests, ["c1", "g2", "m1", "p1", "p2"]);
    }

    #[test]
    fn shared_models_and_signing_keys() {
        let mut t = Tenant::new("acme", 0, Quotas::default());
        assert!(!t.may_use_shared("mlp"));
        t.shared_models = vec!["mlp".into()];
        assert!(t.may_use_shared("mlp"));
        assert!(!t.may_use_shared("other"));
        t.shared_models = vec!["*".into()];
        assert!(t.may_use_shared("other"));

        t.signing_keys.push(SigningKey {
            id: "k1".into(),
            public_key: "pk".into(),
            created_unix: 0,
            revoked: true,
        });
        assert!(t.active_signing_key("k1").is_none());
        t.signing_keys[0].revoked = false;
        assert_eq!(t.active_signing_key("k1").unwrap().public_key, "pk");
        assert!(t.active_signing_key("k2").is_none());
    }

    fn key(id: &str, public_key: &str) -> SigningKey {
        SigningKey {
            id: id.into(),
            public_key: public_key.into(),
            created_unix: 0,
            revoked: false,
        }
    }

    #[test]
    fn signing_keys_are_unique_across_tenants_and_counted() {
        let mut state = State::default();
        for name in ["a", "b"] {
            state.tenants.insert(
                name.into(),
                Tenant::new(
                    name,
                    0,
                    Quotas::from_json(&json!({"max_signing_keys": 2})).unwrap(),
                ),
            );
        }
        state.register_signing_key("a", key("k1", "pk1")).unwrap();
        // Same key, same tenant: already registered (and once revoked, never again).
        let err = state
            .register_signing_key("a", key("k1", "pk1"))
            .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Conflict);
        assert!(err.message().contains("already registered"), "{err}");
        // Same key, another tenant: refused without naming the holder.
        let err = state
            .register_signing_key("b", key("k1", "pk1"))
            .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Conflict);
        assert!(
            err.message()
                .starts_with("this public key is already registered"),
            "{err}"
        );
        assert!(!err.message().contains("'a'"), "{err}");
        assert!(state.tenants["b"].signing_keys.is_empty());
        // Revoked keys stay taken, for their tenant and for everyone else.
        state.tenants.get_mut("a").unwrap().signing_keys[0].revoked = true;
        let err = state
            .register_signing_key("a", key("k1", "pk1"))
            .unwrap_err();
        assert!(err.message().contains("was revoked"), "{err}");
        assert!(state.register_signing_key("b", key("k1", "pk1")).is_err());
        // The quota counts revoked keys too.
        state.register_signing_key("a", key("k2", "pk2")).unwrap();
        let err = state
            .register_signing_key("a", key("k3", "pk3"))
            .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::PermissionDenied);
        assert!(err.message().contains("quota of 2 signing keys"), "{err}");
        assert!(err.message().contains("max_signing_keys"), "{err}");
        assert_eq!(state.tenants["a"].signing_keys.len(), 2);
        state.register_signing_key("b", key("k3", "pk3")).unwrap();
        let err = state
            .register_signing_key("nobody", key("k4", "pk4"))
            .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::NotFound);
        // Quota zero: no keys at all.
        let mut none = State::default();
        none.tenants.insert(
            "z".into(),
            Tenant::new(
                "z",
                0,
                Quotas::from_json(&json!({"max_signing_keys": 0})).unwrap(),
            ),
        );
        assert!(none.register_signing_key("z", key("k", "pk")).is_err());
    }

    #[test]
    fn plugin_versions_without_a_scheme_are_v1() {
        let old: PluginVersion = serde_json::from_value(json!({
            "version": "1", "digest": "d", "size": 1, "signature": "s", "key_id": "k",
            "created_unix": 0,
        }))
        .unwrap();
        assert_eq!(old.signature_scheme, SignatureScheme::V1);
        let mut new = old.clone();
        new.signature_scheme = SignatureScheme::V2;
        let text = serde_json::to_value(&new).unwrap();
        assert_eq!(text["signature_scheme"], "v2");
        assert_eq!(serde_json::from_value::<PluginVersion>(text).unwrap(), new);
    }

    #[test]
    fn tenant_for_key() {
        let (id_a, key_a) = api_keys::generate().unwrap();
        let (id_b, key_b) = api_keys::generate().unwrap();
        let mut state = State::default();
        for (name, id, key) in [("a", &id_a, &key_a), ("b", &id_b, &key_b)] {
            let mut t = Tenant::new(name, 0, Quotas::default());
            t.api_keys.push(ApiKey {
                id: id.clone(),
                hash: api_keys::hash(key),
                created_unix: 0,
                revoked: false,
            });
            state.tenants.insert(name.into(), t);
        }
        let (tenant, key) = state.tenant_for_key(&key_b).unwrap();
        assert_eq!(tenant.name, "b");
        assert_eq!(key.id, id_b);
        assert_eq!(state.tenant_for_key(&key_a).unwrap().0.name, "a");
        // Right id, wrong secret.
        let forged = format!("{}{}", &key_a[..22], "A".repeat(43));
        assert!(state.tenant_for_key(&forged).is_none());
        assert!(state.tenant_for_key("garbage").is_none());
        state.tenants.get_mut("a").unwrap().api_keys[0].revoked = true;
        assert!(state.tenant_for_key(&key_a).is_none());
    }

    #[test]
    fn state_json_round_trip() {
        let mut state = State {
            revision: 3,
            ..State::default()
        };
        state.tenants.insert("acme".into(), sample_tenant());
        let text = serde_json::to_string(&state).unwrap();
        let back: State = serde_json::from_str(&text).unwrap();
        assert_eq!(back, state);
        let digests: Vec<_> = back.referenced_digests().into_iter().collect();
        assert_eq!(digests, ["c1", "g2", "m1", "p1", "p2"]);
        // Minimal tenants (older files) still load.
        let minimal: State = serde_json::from_value(
            json!({"revision": 1, "tenants": {"x": {"name": "x", "created_unix": 5}}}),
        )
        .unwrap();
        assert_eq!(minimal.tenants["x"].quotas, Quotas::default());
    }
}
