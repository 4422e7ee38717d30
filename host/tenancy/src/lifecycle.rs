//! The lifecycle of a tenant's versioned artifacts — plugins, models and graphs — in one place:
//! names and versions, immutability (a version is never overwritten), the storage quota
//! projected before anything is written, signature verification of plugins, the model memory
//! budget and trial load of models, validation of graphs against the tenant's namespace, delete
//! integrity (nothing a graph still needs goes), and the hot swap every change ends with.
//!
//! Every change checks what it can before the slow part (compiling a plugin, loading a model)
//! and again under the writer, since another change may have committed meanwhile; then it writes
//! the blobs and commits, all under the writer, so nothing half-done is ever visible.

use std::collections::BTreeMap;
use std::path::PathBuf;

use bytes::Bytes;
use serde::Serialize;
use weft_core::{Error, Result};
use weft_engine::ModelConfig;
use weft_engine::graph::{GraphSpec, PluginRole, validate};
use weft_store::signing::{PublicKey, SignatureScheme, sha256_hex};
use weft_store::{
    GraphVersion, ModelVersion, PluginVersion, Quotas, StagedBlob, State, Tenant, check_name,
    unix_now,
};

use crate::backends::ModelBudget;
use crate::scope::TenantScope;
use crate::storage::{ModelCost, Reservation, check_gpu_memory, check_model_memory, check_stored};
use crate::tenancy::Tenancy;

/// The three kinds of versioned artifact a tenant owns.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ArtifactKind {
    Plugin,
    Model,
    Graph,
}

impl ArtifactKind {
    /// How messages name it.
    pub fn what(self) -> &'static str {
        match self {
            ArtifactKind::Plugin => "plugin",
            ArtifactKind::Model => "model",
            ArtifactKind::Graph => "graph",
        }
    }
}

/// The versions of one artifact, whatever their record: what delete and immutability need.
trait Versions {
    fn has(&self, version: &str) -> bool;
    fn count(&self) -> usize;
    fn remove(&mut self, version: &str);
}

impl Versions for Vec<PluginVersion> {
    fn has(&self, version: &str) -> bool {
        self.iter().any(|v| v.version == version)
    }
    fn count(&self) -> usize {
        self.len()
    }
    fn remove(&mut self, version: &str) {
        self.retain(|v| v.version != version);
    }
}

impl<T> Versions for BTreeMap<u64, T> {
    fn has(&self, version: &str) -> bool {
        version
            .parse()
            .is_ok_and(|number| self.contains_key(&number))
    }
    fn count(&self) -> usize {
        self.len()
    }
    fn remove(&mut self, version: &str) {
        if let Ok(number) = version.parse::<u64>() {
            BTreeMap::remove(self, &number);
        }
    }
}

/// The versions of `name` of `kind` in `tenant`'s record.
fn versions_of<'a>(tenant: &'a Tenant, kind: ArtifactKind, name: &str) -> Option<&'a dyn Versions> {
    match kind {
        ArtifactKind::Plugin => tenant.plugins.get(name).map(|v| v as &dyn Versions),
        ArtifactKind::Model => tenant.models.get(name).map(|v| v as &dyn Versions),
        ArtifactKind::Graph => tenant.graphs.get(name).map(|v| v as &dyn Versions),
    }
}

/// Removes `version` of `name` (every version when `None`), and the name with its last version.
fn remove_version(tenant: &mut Tenant, kind: ArtifactKind, name: &str, version: Option<&str>) {
    fn remove_from<V: Versions>(
        records: &mut BTreeMap<String, V>,
        name: &str,
        version: Option<&str>,
    ) {
        let emptied = match (records.get_mut(name), version) {
            (Some(versions), Some(version)) => {
                versions.remove(version);
                versions.count() == 0
            }
            (Some(_), None) => true,
            (None, _) => false,
        };
        if emptied {
            records.remove(name);
        }
    }
    match kind {
        ArtifactKind::Plugin => remove_from(&mut tenant.plugins, name, version),
        ArtifactKind::Model => remove_from(&mut tenant.models, name, version),
        ArtifactKind::Graph => remove_from(&mut tenant.graphs, name, version),
    }
}

/// A model or graph version from its text: a number >= 1.
pub fn parse_version(text: &str, what: &str) -> Result<u64> {
    text.parse::<u64>().ok().filter(|v| *v >= 1).ok_or_else(|| {
        Error::invalid(format!(
            "{what} version must be a number >= 1, not '{text}'"
        ))
    })
}

/// A tenant's record in `state`; 404 when it is gone.
pub fn tenant_of<'a>(state: &'a State, name: &str) -> Result<&'a Tenant> {
    state
        .tenants
        .get(name)
        .ok_or_else(|| Error::not_found(format!("unknown tenant '{name}'")))
}

/// A tenant's record in `state`, to change; 404 when it is gone.
pub fn tenant_mut<'a>(state: &'a mut State, name: &str) -> Result<&'a mut Tenant> {
    state
        .tenants
        .get_mut(name)
        .ok_or_else(|| Error::not_found(format!("unknown tenant '{name}'")))
}

/// Refuses (409) a version that already exists: versions are immutable.
fn refuse_existing(tenant: &Tenant, kind: ArtifactKind, name: &str, version: &str) -> Result<()> {
    if versions_of(tenant, kind, name).is_some_and(|versions| versions.has(version)) {
        return Err(Error::conflict(format!(
            "{} '{name}' version {version} already exists; versions are immutable, push a new \
             version",
            kind.what()
        )));
    }
    Ok(())
}

/// Refuses (403) a version the tenant's storage quota cannot hold, given what `add` adds.
fn refuse_over_storage(tenant: &Tenant, add: &dyn Fn(&mut Tenant)) -> Result<()> {
    let mut projected = tenant.clone();
    add(&mut projected);
    check_stored(&projected)
}

/// A plugin push, its bytes already staged and its storage reserved.
pub struct PluginUpload {
    pub name: String,
    pub version: String,
    /// Base64 ed25519 signature (scheme v2) by `key_id`.
    pub signature: String,
    pub key_id: String,
    pub staged: StagedBlob,
    pub size: u64,
    /// Held until the commit counts the bytes (or the push fails).
    pub reservation: Reservation,
}

/// A plugin version as pushed.
#[derive(Clone, Debug, Serialize)]
pub struct PushedPlugin {
    pub name: String,
    pub version: String,
    pub digest: String,
    pub key_id: String,
    pub role: &'static str,
}

/// A model push: its model.toml and its ONNX bytes staged, its storage reserved.
pub struct ModelUpload {
    pub name: String,
    pub version: u64,
    pub config_text: String,
    pub staged: StagedBlob,
    pub size: u64,
    pub reservation: Reservation,
}

/// A model version as pushed.
#[derive(Clone, Debug, Serialize)]
pub struct PushedModel {
    pub name: String,
    pub version: String,
    pub onnx_digest: String,
    pub size: u64,
}

/// A graph apply: its TOML staged, its storage reserved.
pub struct GraphUpload {
    pub name: String,
    /// The file name errors cite (the client's, or `graphs/<name>.toml`).
    pub file: PathBuf,
    pub staged: StagedBlob,
    pub reservation: Reservation,
    /// Validate exactly as an apply would, store nothing.
    pub dry_run: bool,
}

/// A graph version as applied.
#[derive(Clone, Debug, Serialize)]
pub struct AppliedGraph {
    pub name: String,
    pub version: String,
    /// The same version with the same text was there already.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub unchanged: bool,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub dry_run: bool,
}

fn role_name(role: PluginRole) -> &'static str {
    match role {
        PluginRole::Transformer => "transformer",
        PluginRole::Combiner => "combiner",
        PluginRole::Router => "router",
    }
}

impl Tenancy {
    /// Pushes a signed plugin version: name, version, signature and storage checked before the
    /// (slow) compile, so a refused upload costs no compile, and again under the writer, since a
    /// key may have been revoked or the same version pushed meanwhile. Blocking.
    pub fn push_plugin(&self, tenant: &str, upload: PluginUpload) -> Result<PushedPlugin> {
        let PluginUpload {
            name,
            version,
            signature,
            key_id,
            staged,
            size,
            reservation,
        } = upload;
        check_name("plugin", &name)?;
        check_name("plugin version", &version)?;
        let _reservation = reservation;
        let digest = staged.digest().to_string();
        // Filled by the compile, which runs after the first check (the record's size checks do
        // not depend on it).
        let served = std::sync::OnceLock::new();
        let version_record = || PluginVersion {
            version: version.clone(),
            digest: digest.clone(),
            size,
            signature: signature.clone(),
            signature_scheme: SignatureScheme::V2,
            key_id: key_id.clone(),
            created_unix: unix_now(),
            served: served.get().cloned(),
        };
        let add = |record: &mut Tenant| {
            record
                .plugins
                .entry(name.clone())
                .or_default()
                .push(version_record());
        };
        let check = |current: &State| -> Result<()> {
            let record = tenant_of(current, tenant)?;
            refuse_existing(record, ArtifactKind::Plugin, &name, &version)?;
            // Over the uploading tenant's name: a signature made for another tenant (which may
            // hold the same key in state from before keys were unique) does not verify here.
            signing_key(record, &key_id)?
                .verify_plugin_upload(&signature, tenant, &digest, &name, &version)
                .map_err(|error| {
                    error.context(format!(
                        "plugin '{name}' version {version} (sha256 {digest}) refused"
                    ))
                })?;
            refuse_over_storage(record, &add)
        };
        check(&self.store.state())?;
        // Compiled without holding the writer: other tenants' changes do not wait for it. The
        // component is read back from its temporary file once, for the compile.
        let plugin = self.plugins.compile(&name, &staged.read()?)?;
        let role = role_name(plugin.role());
        let _ = served.set(weft_store::ServedPlugin {
            role: role.to_string(),
            compiled_bytes: plugin.compiled_bytes(),
        });
        // A shared store's upload of the bytes happens before the writer, outside it.
        self.store.share_staged(&staged)?;
        let writer = self.writer()?;
        check(&writer.state())?;
        self.store.put_staged(staged)?;
        self.remember_plugin(tenant, &name, &version_record(), plugin)?;
        writer.commit(Some(tenant), |store| {
            add(tenant_mut(store, tenant)?);
            Ok(())
        })?;
        Ok(PushedPlugin {
            name,
            version,
            digest: format!("sha256:{digest}"),
            key_id,
            role,
        })
    }

    /// Pushes a model version: its model.toml checked (no backend settings that take the
    /// machine), its bytes checked as a model, its memory budget (instance_count × size of
    /// every stored version within `model_memory_mb`) and a trial load in a worker of its own,
    /// all before the writer; budget and immutability again under it. Blocking.
    pub fn push_model(&self, tenant: &str, upload: ModelUpload) -> Result<PushedModel> {
        let ModelUpload {
            name,
            version: number,
            config_text,
            staged,
            size,
            reservation,
        } = upload;
        check_name("model", &name)?;
        let config = check_model_config(&name, &config_text)?;
        if staged.is_empty() {
            return Err(Error::invalid(
                "the body has no ONNX bytes after model.toml",
            ));
        }
        let _reservation = reservation;
        let onnx_digest = staged.digest().to_string();
        let config_digest = sha256_hex(config_text.as_bytes());
        let version = number.to_string();
        // What the version serves, known once the push has loaded it (storage checks before
        // that do not need it).
        let served = std::sync::OnceLock::new();
        let version_record = || ModelVersion {
            onnx_digest: onnx_digest.clone(),
            config_digest: config_digest.clone(),
            size,
            created_unix: unix_now(),
            served: served.get().cloned(),
        };
        let add = |record: &mut Tenant| {
            record
                .models
                .entry(name.clone())
                .or_default()
                .insert(number, version_record());
        };
        let check = |current: &State| -> Result<()> {
            let record = tenant_of(current, tenant)?;
            refuse_shared_name(self, record, &name, ArtifactKind::Model)?;
            refuse_existing(record, ArtifactKind::Model, &name, &version)?;
            refuse_over_storage(record, &add)
        };
        let current = self.store.state();
        check(&current)?;
        let quotas = tenant_of(&current, tenant)?.quotas.clone();
        let budget = model_budget(&quotas);
        // The ONNX bytes, read back once from the temporary file: the checks and loads below
        // share this one copy.
        let onnx = Bytes::from(staged.read()?);
        let onnx_size = onnx.len() as u64;
        let context = |error: Error| error.context(format!("model '{name}' version {number}"));
        // What the model is, before what it costs: a hostile model is refused as such.
        self.models.check(&onnx, budget).map_err(context)?;
        // Checked before the loads and again under the writer, so concurrent pushes cannot
        // overcommit the budget between them. Returns what is left for this model.
        let on_gpu = config.ort.cuda_device().is_some();
        if on_gpu && quotas.gpu_memory_mb == 0 {
            return Err(Error::new(
                weft_core::ErrorKind::PermissionDenied,
                format!(
                    "model '{name}' version {number} asks for execution = \"cuda\", but this \
                     tenant may not run models on a GPU (its gpu_memory_mb quota is 0; the \
                     operator grants GPU memory with `weft tenant update <tenant> --quotas '{{\"gpu_memory_mb\": N}}'`)"
                ),
            ));
        }
        let fits = |current: &State| -> Result<u64> {
            let (used, gpu_used) = self.model_memory_used(tenant_of(current, tenant)?)?;
            let cost = ModelCost {
                what: format!("model '{name}' version {number}"),
                instances: self.models.instances(&config),
                bytes: onnx_size,
            };
            if on_gpu {
                check_gpu_memory(&cost, gpu_used, quotas.gpu_memory_mb)?;
            }
            check_model_memory(&cost, used, quotas.model_memory_mb, budget.worker_memory)
        };
        let left = fits(&current)?;
        // Prove it loads within what is left, in a worker of its own (a model that blows its
        // memory or the load timeout costs the tenant's serving worker nothing), then load it
        // into the tenant's worker; all before the writer, since loads take seconds.
        self.models
            .trial_load(tenant, onnx.clone(), &config, left)
            .map_err(context)?;
        let model = self
            .models
            .load_checked(tenant, &model_label(tenant, &name), onnx, &config, budget)
            .map_err(context)?;
        let _ = served.set(weft_store::ServedModel {
            metadata: model.metadata().clone(),
            serving: model.serving(),
            pinned: config.pin,
        });
        self.store.share_staged(&staged)?;
        let writer = self.writer()?;
        check(&writer.state())?;
        fits(&writer.state())?;
        self.store.put_staged(staged)?;
        self.store.put_blob(config_text.as_bytes())?;
        let record = version_record();
        self.remember_model(tenant, &name, &onnx_digest, &config_digest, model, &record)?;
        let committed = writer.commit(Some(tenant), |store| {
            add(tenant_mut(store, tenant)?);
            Ok(())
        });
        if committed.is_err() {
            self.forget_model(tenant, &name, &onnx_digest, &config_digest)?;
        }
        committed?;
        Ok(PushedModel {
            name,
            version,
            onnx_digest: format!("sha256:{onnx_digest}"),
            size,
        })
    }

    /// What a tenant's stored model versions take of its model memory: instance_count × size.
    /// What the tenant's stored model versions take: (host bytes, GPU bytes), each version
    /// its instances × its size; GPU versions count in both (ONNX Runtime keeps the weights on
    /// the host while it loads them onto the device).
    fn model_memory_used(&self, tenant: &Tenant) -> Result<(u64, u64)> {
        let (mut host, mut gpu) = (0u64, 0u64);
        for (name, versions) in &tenant.models {
            for record in versions.values() {
                let text = String::from_utf8(self.store.read_blob(&record.config_digest)?)
                    .map_err(|_| Error::invalid("the stored model.toml is not UTF-8"))?;
                let config = ModelConfig::parse(&model_config_path(name), &text)?;
                let bytes = self.models.instances(&config).saturating_mul(record.size);
                host = host.saturating_add(bytes);
                if config.ort.cuda_device().is_some() {
                    gpu = gpu.saturating_add(bytes);
                }
            }
        }
        Ok((host, gpu))
    }

    /// Applies a graph version: validated against the tenant's namespace exactly as `weft
    /// graph check` does, under the writer (so a delete cannot slip in between and leave it
    /// naming something gone), and stored unless it is a dry run. Blocking.
    pub fn apply_graph(&self, tenant: &str, upload: GraphUpload) -> Result<AppliedGraph> {
        let GraphUpload {
            name,
            file,
            staged,
            reservation,
            dry_run,
        } = upload;
        check_name("graph", &name)?;
        let _reservation = reservation;
        let text = String::from_utf8(staged.read()?)
            .map_err(|_| Error::invalid("the graph is not UTF-8 text"))?;
        // (Graphs are at most 1 MiB: their copy to a shared store may as well happen under it.)
        let writer = self.writer()?;
        let scope = writer
            .scope(tenant)
            .ok_or_else(|| Error::not_found(format!("unknown tenant '{tenant}'")))?;
        let current = writer.state();
        let record = tenant_of(&current, tenant)?;
        let plan = validate_graph(&scope, &file, &text)?;
        if plan.spec.name != name {
            return Err(Error::invalid(format!(
                "{}: the graph is named '{}' but was applied as '{name}'",
                file.display(),
                plan.spec.name
            )));
        }
        let number = plan.spec.version;
        let applied = |unchanged: bool, dry_run: bool| AppliedGraph {
            name: name.clone(),
            version: number.to_string(),
            unchanged,
            dry_run,
        };
        // One namespace: the tenant's models and the names shared with it are taken.
        if !record.graphs.contains_key(&name) && scope.registry.versions(&name).is_some() {
            return Err(Error::conflict(format!(
                "'{name}' is already a model or shared name; graphs and models share one namespace"
            )));
        }
        let digest = staged.digest().to_string();
        if let Some(existing) = record.graphs.get(&name).and_then(|v| v.get(&number)) {
            if existing.toml_digest == digest {
                return Ok(applied(true, false));
            }
            return Err(Error::conflict(format!(
                "graph '{name}' version {number} already exists with other content; versions \
                 are immutable, apply it with a new version"
            )));
        }
        let size = text.len() as u64;
        let add = |record: &mut Tenant| {
            record.graphs.entry(name.clone()).or_default().insert(
                number,
                GraphVersion {
                    toml_digest: digest.clone(),
                    size,
                    created_unix: unix_now(),
                },
            );
        };
        refuse_over_storage(record, &add)?;
        if dry_run {
            return Ok(applied(false, true));
        }
        self.store.put_staged(staged)?;
        writer.commit(Some(tenant), |store| {
            add(tenant_mut(store, tenant)?);
            Ok(())
        })?;
        Ok(applied(false, false))
    }

    /// Deletes `version` of an artifact (every version when `None`): 404 for what the tenant
    /// does not have, 409 for a plugin or model version its graphs still need. Its bytes go
    /// once no live version references them. Blocking.
    pub fn delete_artifact(
        &self,
        tenant: &str,
        kind: ArtifactKind,
        name: &str,
        version: Option<&str>,
    ) -> Result<()> {
        let what = kind.what();
        let number = match (kind, version) {
            (ArtifactKind::Model | ArtifactKind::Graph, Some(text)) => {
                Some(parse_version(text, what)?.to_string())
            }
            (_, version) => version.map(str::to_owned),
        };
        let writer = self.writer()?;
        let current = writer.state();
        let record = tenant_of(&current, tenant)?;
        let versions = versions_of(record, kind, name)
            .ok_or_else(|| Error::not_found(format!("unknown {what} '{name}'")))?;
        if let Some(version) = &number
            && !versions.has(version)
        {
            return Err(Error::not_found(format!(
                "unknown version '{version}' of {what} '{name}'"
            )));
        }
        let last = number.is_none() || versions.count() == 1;
        let plugin = kind == ArtifactKind::Plugin;
        if let Some(rollout) = Tenancy::rollout_using(record, name, plugin, number.as_deref()) {
            let which = match &number {
                Some(version) => format!("{what} '{name}' version {version}"),
                None => format!("{what} '{name}'"),
            };
            return Err(Error::conflict(format!(
                "{which} is an arm of rollout '{rollout}'; delete the rollout first"
            )));
        }
        let removal = match kind {
            ArtifactKind::Plugin => Some(Removal::Plugin { name, last }),
            ArtifactKind::Model => Some(Removal::Model {
                name,
                version: number.as_deref().and_then(|v| v.parse().ok()),
                last,
            }),
            ArtifactKind::Graph => None,
        };
        if let Some(removal) = removal {
            refuse_if_needed(record, removal, &|digest| self.store.read_blob(digest))?;
        }
        writer.commit(Some(tenant), |store| {
            remove_version(tenant_mut(store, tenant)?, kind, name, number.as_deref());
            Ok(())
        })
    }

    /// The text of each stored version of one of `tenant`'s graphs, oldest first.
    pub fn graph_texts(&self, tenant: &str, name: &str) -> Result<Vec<(u64, String, u64)>> {
        let store = self.store.state();
        let versions = tenant_of(&store, tenant)?
            .graphs
            .get(name)
            .ok_or_else(|| Error::not_found(format!("unknown graph '{name}'")))?;
        let mut texts = Vec::new();
        for (version, graph) in versions {
            let text =
                String::from_utf8(self.store.read_blob(&graph.toml_digest)?).unwrap_or_default();
            texts.push((*version, text, graph.created_unix));
        }
        Ok(texts)
    }
}

/// Refuses a model whose name is one of the tenant's graphs: one namespace.
fn refuse_shared_name(
    tenancy: &Tenancy,
    record: &Tenant,
    name: &str,
    kind: ArtifactKind,
) -> Result<()> {
    let is_graph = record.graphs.contains_key(name)
        || tenancy
            .scope(&record.name)
            .is_some_and(|scope| scope.registry.is_graph(name));
    if kind == ArtifactKind::Model && is_graph {
        return Err(Error::conflict(format!(
            "'{name}' is a graph; graphs and models share one namespace"
        )));
    }
    Ok(())
}

/// Refuses (409) a delete that graphs of the tenant still need; `read` reads a stored blob.
fn refuse_if_needed(
    tenant: &Tenant,
    removal: Removal<'_>,
    read: &dyn Fn(&str) -> Result<Vec<u8>>,
) -> Result<()> {
    let mut users = Vec::new();
    for (graph, versions) in &tenant.graphs {
        for (version, record) in versions {
            let text = String::from_utf8(read(&record.toml_digest)?).unwrap_or_default();
            if graph_needs(&text, removal) {
                users.push(format!("'{graph}' version {version}"));
            }
        }
    }
    if users.is_empty() {
        return Ok(());
    }
    let what = match removal {
        Removal::Plugin { name, .. } => format!("plugin '{name}'"),
        Removal::Model {
            name,
            version: Some(version),
            ..
        } => format!("model '{name}' version {version}"),
        Removal::Model { name, .. } => format!("model '{name}'"),
    };
    Err(Error::conflict(format!(
        "{what} is used by graph {}; delete or change those first",
        users.join(", ")
    )))
}

/// How metrics name a tenant's model: `tenant/name`.
pub fn model_label(tenant: &str, name: &str) -> String {
    format!("{tenant}/{name}")
}

/// A tenant's model budget from its quotas.
pub fn model_budget(quotas: &Quotas) -> ModelBudget {
    ModelBudget {
        worker_memory: quotas.model_memory_mb.saturating_mul(1 << 20),
    }
}

/// Parses and validates graph text against a tenant's catalog, exactly as `weft graph check`
/// does, with errors naming `file`.
pub fn validate_graph(
    scope: &TenantScope,
    file: &std::path::Path,
    text: &str,
) -> Result<weft_engine::graph::GraphPlan> {
    let spec = GraphSpec::parse(file, text)?;
    validate(file, text, spec, &scope.catalog())
}

/// The quotas the bootstrap tenant starts with: the operator's own tenant (quickstart,
/// benchmarks) is not rate-limited; storage limits stay the defaults. The admin API can change
/// them like any tenant's.
pub fn bootstrap_quotas() -> Quotas {
    Quotas {
        requests_per_second: 1_000_000.0,
        burst: 1_000_000,
        max_concurrent_requests: 65_536,
        ..Quotas::default()
    }
}

/// A fresh tenant record.
pub fn new_tenant(name: &str, quotas: Quotas, shared_models: Vec<String>) -> Tenant {
    let mut tenant = Tenant::new(name, unix_now(), quotas);
    tenant.shared_models = shared_models;
    tenant
}

/// A tenant's registered, unrevoked signing key.
pub fn signing_key(tenant: &Tenant, key_id: &str) -> Result<PublicKey> {
    let record = tenant
        .signing_keys
        .iter()
        .find(|key| key.id == key_id)
        .ok_or_else(|| {
            Error::invalid(format!(
                "unknown signing key '{key_id}': register it first (`weft key register \
                 PREFIX.key`, or POST /api/v1/signing-keys/challenge then POST \
                 /api/v1/signing-keys)"
            ))
        })?;
    if record.revoked {
        return Err(Error::invalid(format!("signing key '{key_id}' is revoked")));
    }
    PublicKey::from_base64(&record.public_key)
}

pub fn graph_path(name: &str) -> PathBuf {
    PathBuf::from(format!("graphs/{name}.toml"))
}

pub fn model_config_path(name: &str) -> PathBuf {
    PathBuf::from(format!("models/{name}/model.toml"))
}

/// What a delete would take away from graphs.
#[derive(Clone, Copy, Debug)]
pub enum Removal<'a> {
    /// A plugin; `last` when no version would remain.
    Plugin { name: &'a str, last: bool },
    /// A model version (`None`: every version); `last` when no version would remain.
    Model {
        name: &'a str,
        version: Option<u64>,
        last: bool,
    },
}

/// Whether a graph's nodes still need what `removal` takes away: a plugin, a model's last
/// version (nodes without a version and `models` grants take the latest), or a model version a
/// node pins.
pub fn graph_needs(text: &str, removal: Removal<'_>) -> bool {
    let Ok(spec) = GraphSpec::parse(std::path::Path::new("graph.toml"), text) else {
        return false;
    };
    spec.nodes.iter().any(|node| match removal {
        Removal::Plugin { name, last } => last && node.plugin.as_deref() == Some(name),
        Removal::Model {
            name,
            version,
            last,
        } => {
            let pinned = |v: &str| version.is_none_or(|version| v == version.to_string());
            let model_node = node.model.as_deref() == Some(name)
                && match node.version.as_deref() {
                    Some(v) => last || pinned(v),
                    None => last,
                };
            model_node || (last && node.models.iter().any(|granted| granted == name))
        }
    })
}

/// Parses a tenant's model.toml, refusing backend settings that would let one tenant take the
/// machine (more sessions or threads than the cores allow).
pub fn check_model_config(name: &str, text: &str) -> Result<ModelConfig> {
    let path = model_config_path(name);
    let config = ModelConfig::parse(&path, text)?;
    let cores = std::thread::available_parallelism().map_or(1, usize::from);
    let ceiling = cores.max(4);
    for (key, value) in [
        ("instance_count", config.ort.instance_count),
        ("intra_op_threads", config.ort.intra_op_threads),
        ("inter_op_threads", config.ort.inter_op_threads),
    ] {
        if value > ceiling {
            return Err(Error::invalid(format!(
                "{}: [ort] {key} = {value} is more than this server allows a tenant ({ceiling})",
                path.display()
            )));
        }
    }
    // A tenant's model always runs in its sandboxed worker, and never reads files.
    if config.isolation == Some(weft_engine::Isolation::InProcess) {
        return Err(Error::invalid(format!(
            "{}: isolation = \"in_process\" is for the operator's repository models; a tenant's \
             models always run in its sandboxed model worker (isolation = \"process\")",
            path.display()
        )));
    }
    if config.allow_external_data {
        return Err(Error::invalid(format!(
            "{}: allow_external_data is for the operator's repository models; a tenant's model \
             must embed its weights",
            path.display()
        )));
    }
    Ok(config)
}
