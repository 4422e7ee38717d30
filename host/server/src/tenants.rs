//! Tenants as the server serves them: which tenant a bearer key belongs to, the namespace each
//! tenant sees (its own models, plugins and graphs, plus the repository's names the operator
//! shares with it), and its rate and concurrency quotas at the door.
//!
//! A tenant's namespace is an immutable [`TenantScope`] behind an `Arc`, rebuilt from the store
//! and swapped whole after every change. A request keeps the scope it started with, so in-flight
//! requests finish on the versions they began with while new requests see the new ones, and
//! old models and plugins are freed when the last request holding them ends (hot swap).
//!
//! Names resolve only inside the caller's scope, so another tenant's model, graph or plugin
//! is "unknown" (404) exactly like a name that does not exist: nothing says it exists.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use axum::http::{HeaderMap, header};
use tokio::sync::OwnedSemaphorePermit;
use weft_core::{Error, ErrorKind, Model, Result};
use weft_engine::graph::{GraphModel, GraphSpec, NodeLimits, validate};
use weft_engine::{ModelConfig, ModelRegistry, ModelState};
use weft_runtime::{CallLimits, Plugin, PluginRuntime};
use weft_store::signing::PublicKey;
use weft_store::{Quotas, State, Store, Tenant, api_keys};
use weft_tenancy::Gate;

use crate::error::ApiError;
use crate::graphs::{RepositoryCatalog, RepositoryRunner, runtime_node_limits};
use crate::loader::RepositoryLoader;
use crate::metrics::Metrics;

/// The tenant `--bootstrap-key` opens: it owns nothing and shares every repository name.
pub const BOOTSTRAP_TENANT: &str = "default";

/// One tenant's namespace and door, immutable once built.
pub struct TenantScope {
    pub name: String,
    pub quotas: Quotas,
    /// Every name the tenant can call: its models and graphs and the shared repository names.
    pub registry: ModelRegistry,
    /// The models alone (no graphs): what the tenant's graphs and plugins may call.
    pub models: Arc<ModelRegistry>,
    /// The tenant's current plugin versions, by name, as graph validation sees them.
    pub plugins: HashMap<String, Result<Plugin>>,
    pub gate: Arc<Gate>,
    /// The ceilings of this tenant's plugin nodes.
    pub limits: CallLimits,
    pub runner: Arc<RepositoryRunner>,
    /// The loaded plugins labelled `tenant/name@version`, for `/metrics`.
    pub plugin_labels: Vec<(String, Plugin)>,
}

impl TenantScope {
    /// The catalog graph validation checks this tenant's graphs against.
    pub fn catalog(&self) -> RepositoryCatalog<'_> {
        RepositoryCatalog {
            models: &self.models,
            plugins: &self.plugins,
            limits: Some(NodeLimits {
                deadline_ms: u64::try_from(self.limits.deadline.as_millis()).unwrap_or(u64::MAX),
                memory_mb: (self.limits.memory_bytes >> 20) as u64,
            }),
        }
    }

    /// Charges one request to the rate quota (every authenticated request, data or control
    /// plane, pays one token), or a 429 that says when to retry.
    pub fn charge(&self) -> std::result::Result<(), ApiError> {
        self.gate.charge(&self.name).map_err(refused)
    }

    /// Takes a concurrency slot for a request that does work (inference, uploads), or a 429.
    /// The permit is held until the response is built.
    pub fn admit(&self) -> std::result::Result<OwnedSemaphorePermit, ApiError> {
        self.gate.hold(&self.name).map_err(refused)
    }
}

/// A quota's refusal as the HTTP answer: its status, with `Retry-After` when retrying helps.
pub fn refused(refusal: weft_tenancy::Refusal) -> ApiError {
    match refusal.retry_after_seconds {
        Some(seconds) => ApiError::retry_after(refusal.error, seconds),
        None => ApiError::from(refusal.error),
    }
}

/// Who API keys belong to and what each tenant sees, swapped whole.
#[derive(Default)]
struct View {
    tenants: HashMap<String, Arc<TenantScope>>,
    /// API key id -> (tenant, hash of the key), revoked keys left out.
    keys: HashMap<String, (String, String)>,
}

/// What the server knows about tenants: the store, the shared repository, and every tenant's
/// built scope. Control-plane changes go through [`Tenancy::change`], one at a time.
pub struct Tenancy {
    store: Arc<Store>,
    /// The repository's models and graphs: the operator's names, shared per tenant.
    platform: ModelRegistry,
    runtime: PluginRuntime,
    loader: RepositoryLoader,
    metrics: Option<Arc<Metrics>>,
    admin_key_hash: Option<String>,
    bootstrap_key_hash: Option<String>,
    view: RwLock<Arc<View>>,
    /// Gates outlive rebuilds (a push must not refill a tenant's bucket); replaced when quotas change.
    gates: Mutex<HashMap<String, (Quotas, Arc<Gate>)>>,
    /// Loaded tenant models by (tenant, model, onnx digest, config digest), so rebuilding a scope
    /// does not reload what did not change.
    loaded_models: Mutex<HashMap<LoadedModelKey, Arc<dyn Model>>>,
    /// Loaded tenant plugins by (tenant, name, digest). Keyed by tenant too: a plugin keeps warm
    /// instances, and instances never cross tenants.
    loaded_plugins: Mutex<HashMap<(String, String, String), Plugin>>,
    /// Serialises control-plane changes (store transaction + rebuild).
    writer: Mutex<()>,
    /// Outstanding signing-key registration challenges (in memory, or in a shared store).
    challenges: crate::challenges::Challenges,
    /// Live replicas sharing the store (1 for the embedded store): every gate takes its share.
    replicas: Arc<AtomicUsize>,
    /// This replica's name in the shared store's `weft_replicas` (random per process).
    replica_id: String,
}

/// (tenant, model, ONNX digest, model.toml digest): what makes a loaded tenant model reusable.
type LoadedModelKey = (String, String, String, String);

/// What the tenancy is built from.
pub struct TenancyConfig {
    pub store: Arc<Store>,
    pub platform: ModelRegistry,
    pub runtime: PluginRuntime,
    pub loader: RepositoryLoader,
    pub metrics: Option<Arc<Metrics>>,
    /// The operator's key for `/api/v1/tenants`; `None` disables the admin API.
    pub admin_key: Option<String>,
    /// A key for [`BOOTSTRAP_TENANT`], kept in memory only (quickstart, tests).
    pub bootstrap_key: Option<String>,
}

/// Locks, recovering from poisoning: every structure behind these locks is replaced whole, so
/// one that a panic interrupted is still consistent, and one failure must not stop the
/// control plane until a restart.
fn lock<T>(mutex: &Mutex<T>) -> Result<std::sync::MutexGuard<'_, T>> {
    Ok(mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner()))
}

/// The control plane's single writer: while it is held no other change can commit, so checks
/// made on [`Writer::state`] still hold when [`Writer::commit`] runs.
pub struct Writer<'a> {
    tenancy: &'a Tenancy,
    _guard: std::sync::MutexGuard<'a, ()>,
}

impl Writer<'_> {
    /// The committed state, which no one else can change while this writer lives.
    pub fn state(&self) -> Arc<State> {
        self.tenancy.store.state()
    }

    /// The current scope of a tenant.
    pub fn scope(&self, tenant: &str) -> Option<Arc<TenantScope>> {
        self.tenancy.scope(tenant)
    }

    /// Commits `change` (all or nothing, durable before it returns), then rebuilds and swaps in
    /// the scopes of `tenant` (or all when `None`).
    pub fn commit<T>(
        &self,
        tenant: Option<&str>,
        change: impl FnOnce(&mut State) -> Result<T>,
    ) -> Result<T> {
        let before = self.tenancy.store.state();
        let result = self.tenancy.store.transact(|state| {
            let result = change(state)?;
            if let Some(record) = tenant.and_then(|name| state.tenants.get_mut(name)) {
                record.revision += 1;
            }
            Ok(result)
        })?;
        // A shared store's commit also brings in what other replicas committed: rebuild every
        // tenant that changed, not only this one.
        let after = self.tenancy.store.state();
        self.tenancy.rebuild(&after, &|name: &str| {
            tenant.is_none_or(|only| only == name)
                || before.tenants.get(name) != after.tenants.get(name)
        })?;
        // The new scopes are built from the committed state, so a deleted version's bytes are
        // no longer needed: free them now (a tenant's storage quota counts only live versions,
        // so waiting for a restart would let delete-and-push fill the disk). The change is
        // already durable; a failure here only leaves garbage for the next start.
        if let Err(error) = self.tenancy.store.collect_unreferenced_blobs() {
            tracing::warn!(%error, "cannot remove the blobs of deleted versions yet");
        }
        Ok(result)
    }
}

impl Tenancy {
    /// Builds every tenant's scope from the store; creates the bootstrap tenant if a bootstrap
    /// key is given and the tenant does not exist. Blocking (loads models and plugins).
    pub fn new(config: TenancyConfig) -> Result<Self> {
        let challenges = crate::challenges::Challenges::default().in_store(&config.store);
        let tenancy = Tenancy {
            store: config.store,
            platform: config.platform,
            runtime: config.runtime,
            loader: config.loader,
            metrics: config.metrics,
            admin_key_hash: config.admin_key.as_deref().map(api_keys::hash),
            bootstrap_key_hash: config.bootstrap_key.as_deref().map(api_keys::hash),
            view: RwLock::default(),
            gates: Mutex::default(),
            loaded_models: Mutex::default(),
            loaded_plugins: Mutex::default(),
            writer: Mutex::default(),
            challenges,
            replicas: Arc::new(AtomicUsize::new(1)),
            replica_id: format!(
                "{}-{}",
                std::process::id(),
                weft_store::signing::challenge_nonce()?
            ),
        };
        if tenancy.bootstrap_key_hash.is_some()
            && !tenancy.store.state().tenants.contains_key(BOOTSTRAP_TENANT)
        {
            // Checked again inside the change: replicas starting together create it once.
            tenancy.store.transact(|state| {
                state
                    .tenants
                    .entry(BOOTSTRAP_TENANT.to_string())
                    .or_insert_with(|| {
                        new_tenant(BOOTSTRAP_TENANT, bootstrap_quotas(), vec!["*".to_string()])
                    });
                Ok(())
            })?;
        }
        tenancy.rebuild(&tenancy.store.state(), &|_: &str| true)?;
        Ok(tenancy)
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    pub fn runtime(&self) -> &PluginRuntime {
        &self.runtime
    }

    /// The signing-key registration challenges issued and not yet spent.
    pub fn challenges(&self) -> &crate::challenges::Challenges {
        &self.challenges
    }

    /// The repository's models and graphs.
    pub fn platform(&self) -> &ModelRegistry {
        &self.platform
    }

    fn current(&self) -> Arc<View> {
        match self.view.read() {
            Ok(view) => Arc::clone(&view),
            Err(poisoned) => Arc::clone(&poisoned.into_inner()),
        }
    }

    /// The current scope of a tenant.
    pub fn scope(&self, tenant: &str) -> Option<Arc<TenantScope>> {
        self.current().tenants.get(tenant).cloned()
    }

    /// Every tenant's scope, for metrics and statistics.
    pub fn scopes(&self) -> Vec<Arc<TenantScope>> {
        self.current().tenants.values().cloned().collect()
    }

    /// The scope of the tenant whose API key the request carries: 401 without a valid key.
    pub fn authenticate(&self, headers: &HeaderMap) -> Result<Arc<TenantScope>> {
        let key = bearer(headers)?;
        let view = self.current();
        let tenant = if self
            .bootstrap_key_hash
            .as_deref()
            .is_some_and(|hash| api_keys::matches(key, hash))
        {
            Some(BOOTSTRAP_TENANT)
        } else {
            api_keys::id_of(key)
                .and_then(|id| view.keys.get(id))
                .filter(|(_, hash)| api_keys::matches(key, hash))
                .map(|(tenant, _)| tenant.as_str())
        };
        tenant
            .and_then(|tenant| view.tenants.get(tenant))
            .cloned()
            .ok_or_else(|| {
                Error::new(
                    ErrorKind::Unauthenticated,
                    "invalid API key: it was never issued, or it was revoked",
                )
            })
    }

    /// Checks the operator's admin key.
    pub fn authenticate_admin(&self, headers: &HeaderMap) -> Result<()> {
        let Some(hash) = &self.admin_key_hash else {
            return Err(Error::new(
                ErrorKind::Unauthenticated,
                "the admin API is disabled: start the server with --admin-key (WEFT_ADMIN_KEY)",
            ));
        };
        if api_keys::matches(bearer(headers)?, hash) {
            Ok(())
        } else {
            Err(Error::new(ErrorKind::Unauthenticated, "invalid admin key"))
        }
    }

    /// Runs one control-plane change: `change` edits a copy of the state (all or nothing, made
    /// durable before it is published), then the scopes of `tenant` (or all when `None`) are
    /// rebuilt and swapped in. Blocking.
    pub fn change<T>(
        &self,
        tenant: Option<&str>,
        change: impl FnOnce(&mut State) -> Result<T>,
    ) -> Result<T> {
        self.writer()?.commit(tenant, change)
    }

    /// Takes the control plane's writer lock, for a change whose checks must see no
    /// concurrent change (check, write blobs, commit).
    pub fn writer(&self) -> Result<Writer<'_>> {
        Ok(Writer {
            tenancy: self,
            _guard: lock(&self.writer)?,
        })
    }

    /// Forgets a model [`Tenancy::remember_model`] kept for an upload that did not commit.
    pub fn forget_model(
        &self,
        tenant: &str,
        name: &str,
        onnx_digest: &str,
        config_digest: &str,
    ) -> Result<()> {
        let key = (
            tenant.to_string(),
            name.to_string(),
            onnx_digest.to_string(),
            config_digest.to_string(),
        );
        lock(&self.loaded_models)?.remove(&key);
        Ok(())
    }

    /// Keeps a model the control plane already loaded (to check an upload), so the rebuild
    /// that follows its commit does not load it again.
    pub fn remember_model(
        &self,
        tenant: &str,
        name: &str,
        onnx_digest: &str,
        config_digest: &str,
        model: Arc<dyn Model>,
    ) -> Result<()> {
        let key = (
            tenant.to_string(),
            name.to_string(),
            onnx_digest.to_string(),
            config_digest.to_string(),
        );
        lock(&self.loaded_models)?.insert(key, model);
        Ok(())
    }

    /// Applies what other replicas committed to a shared store: brings the snapshot up to date
    /// and rebuilds the scopes of the tenants that changed (with the same hot swap as a local
    /// change). Returns whether anything changed. Blocking (loads models and plugins).
    pub fn follow(&self) -> Result<bool> {
        let Some(shared) = self.store.shared() else {
            return Ok(false);
        };
        let _writer = lock(&self.writer)?;
        let before = self.store.state();
        if !shared.refresh()? {
            return Ok(false);
        }
        let after = self.store.state();
        self.rebuild(&after, &|name: &str| {
            before.tenants.get(name) != after.tenants.get(name)
        })?;
        if let Err(error) = self.store.collect_unreferenced_blobs() {
            tracing::warn!(%error, "cannot remove the cached blobs of deleted versions yet");
        }
        Ok(true)
    }

    /// Announces this replica to the shared store and takes the live replica count as the
    /// divisor of every tenant's quotas. Blocking.
    pub fn heartbeat(&self) -> Result<usize> {
        let Some(shared) = self.store.shared() else {
            return Ok(1);
        };
        let replicas = shared.heartbeat(&self.replica_id)?;
        self.replicas.store(replicas, Ordering::Relaxed);
        Ok(replicas)
    }

    /// Signs this replica off the shared store (a clean shutdown): the others take over its
    /// share of the quotas at their next heartbeat.
    pub fn leave(&self) {
        if let Some(shared) = self.store.shared()
            && let Err(error) = shared.leave(&self.replica_id)
        {
            tracing::warn!(%error, "cannot sign this replica off the shared store");
        }
    }

    /// Live replicas this one counts (1 without a shared store).
    pub fn replicas(&self) -> usize {
        self.replicas.load(Ordering::Relaxed)
    }

    /// Rebuilds the scopes of the tenants `needs` names from `state` (keeping the others'),
    /// and publishes a new view.
    fn rebuild(&self, state: &State, needs: &dyn Fn(&str) -> bool) -> Result<()> {
        let previous = self.current();
        let mut tenants = HashMap::new();
        for (name, tenant) in &state.tenants {
            let scope = match previous.tenants.get(name) {
                Some(scope) if !needs(name) => Arc::clone(scope),
                _ => Arc::new(self.build_scope(tenant)?),
            };
            tenants.insert(name.clone(), scope);
        }
        let mut keys = HashMap::new();
        for (name, tenant) in &state.tenants {
            for key in tenant.api_keys.iter().filter(|key| !key.revoked) {
                keys.insert(key.id.clone(), (name.clone(), key.hash.clone()));
            }
        }
        // Forget what is no longer stored (deleted tenants, versions, replaced plugins), so a
        // released version is freed once the last request holding it ends.
        let mut live_models = std::collections::HashSet::new();
        let mut live_plugins = std::collections::HashSet::new();
        for (name, tenant) in &state.tenants {
            for (model, versions) in &tenant.models {
                for record in versions.values() {
                    live_models.insert((
                        name.clone(),
                        model.clone(),
                        record.onnx_digest.clone(),
                        record.config_digest.clone(),
                    ));
                }
            }
            for (plugin, versions) in &tenant.plugins {
                if let Some(record) = versions.last() {
                    live_plugins.insert((name.clone(), plugin.clone(), record.digest.clone()));
                }
            }
        }
        lock(&self.gates)?.retain(|name, _| state.tenants.contains_key(name));
        lock(&self.loaded_models)?.retain(|key, _| live_models.contains(key));
        lock(&self.loaded_plugins)?.retain(|key, _| live_plugins.contains(key));
        let view = Arc::new(View { tenants, keys });
        match self.view.write() {
            Ok(mut current) => *current = view,
            Err(poisoned) => *poisoned.into_inner() = view,
        }
        Ok(())
    }

    fn gate(&self, tenant: &Tenant) -> Result<Arc<Gate>> {
        let mut gates = lock(&self.gates)?;
        if let Some((quotas, gate)) = gates.get(&tenant.name)
            && *quotas == tenant.quotas
        {
            return Ok(Arc::clone(gate));
        }
        let gate = Arc::new(Gate::shared(&tenant.quotas, Arc::clone(&self.replicas)));
        gates.insert(
            tenant.name.clone(),
            (tenant.quotas.clone(), Arc::clone(&gate)),
        );
        Ok(gate)
    }

    /// The per-call limits of a tenant's plugins: the runtime's, lowered to the tenant's quotas.
    fn tenant_limits(&self, quotas: &Quotas) -> CallLimits {
        let mut limits = self.runtime.config().limits.clone();
        let ceiling = runtime_node_limits(&self.runtime);
        let deadline_ms = quotas.plugin_deadline_ms.min(ceiling.deadline_ms);
        limits.deadline = std::time::Duration::from_millis(deadline_ms);
        let memory_mb = quotas.plugin_memory_mb.min(ceiling.memory_mb);
        limits.memory_bytes = usize::try_from(memory_mb << 20).unwrap_or(usize::MAX);
        limits
    }

    /// Builds one tenant's scope: its models (loaded or taken from the cache), the shared
    /// repository names, its current plugins (signature verified again), and its graphs
    /// (validated again). Anything that fails is served as UNAVAILABLE with the reason.
    fn build_scope(&self, tenant: &Tenant) -> Result<TenantScope> {
        let mut models = ModelRegistry::default();
        for (name, versions) in &tenant.models {
            for (version, record) in versions {
                let state = match self.tenant_model(tenant, name, record) {
                    Ok(model) => ModelState::Ready(model),
                    Err(error) => {
                        tracing::error!(tenant = %tenant.name, model = %name, version, %error, "tenant model unavailable");
                        ModelState::Unavailable(error.to_string())
                    }
                };
                models.add_model_version(name, *version, state)?;
            }
        }
        let shares_all = tenant.shared_models.iter().any(|name| name == "*");
        let platform_names: Vec<String> = self.platform.names().map(str::to_owned).collect();
        for name in platform_names {
            if shares_all || tenant.shared_models.contains(&name) {
                models.share_from(&self.platform, &name);
            }
        }
        let mut plugins = HashMap::new();
        let mut provenance = HashMap::new();
        let mut plugin_labels = Vec::new();
        for (name, versions) in &tenant.plugins {
            let Some(record) = versions.last() else {
                continue;
            };
            let plugin = self.tenant_plugin(tenant, name, record);
            match &plugin {
                Ok(loaded) => plugin_labels.push((
                    format!("{}/{name}@{}", tenant.name, record.version),
                    loaded.clone(),
                )),
                Err(error) => {
                    tracing::error!(tenant = %tenant.name, plugin = %name, %error, "tenant plugin unavailable")
                }
            }
            provenance.insert(
                name.clone(),
                serde_json::json!({
                    "plugin": name,
                    "version": record.version,
                    "digest": format!("sha256:{}", record.digest),
                    "key_id": record.key_id,
                }),
            );
            plugins.insert(name.clone(), plugin);
        }
        let limits = self.tenant_limits(&tenant.quotas);
        let models = Arc::new(models);
        let runner = Arc::new(
            RepositoryRunner::new(
                Arc::clone(&models),
                &plugins,
                &self.runtime,
                self.metrics.clone(),
            )
            .for_tenant(
                limits.clone(),
                provenance,
                plugin_labels
                    .iter()
                    .map(|(label, plugin)| (plugin.name().to_string(), label.clone()))
                    .collect(),
            ),
        );
        let mut scope = TenantScope {
            name: tenant.name.clone(),
            quotas: tenant.quotas.clone(),
            registry: (*models).clone(),
            models,
            plugins,
            gate: self.gate(tenant)?,
            limits,
            runner,
            plugin_labels,
        };
        let mut registry = scope.registry.clone();
        for (name, versions) in &tenant.graphs {
            for (version, record) in versions {
                let state = match self.tenant_graph(&scope, name, &record.toml_digest) {
                    Ok(model) => ModelState::Ready(model),
                    Err(error) => {
                        tracing::error!(tenant = %tenant.name, graph = %name, version, %error, "tenant graph unavailable");
                        ModelState::Unavailable(error.to_string())
                    }
                };
                if let Err(error) = registry.add_graph(name, Some(*version), state) {
                    tracing::error!(tenant = %tenant.name, graph = %name, %error, "tenant graph not served");
                }
            }
        }
        if let Some(metrics) = &self.metrics {
            metrics.declare_models(&tenant.name, &registry);
        }
        scope.registry = registry;
        Ok(scope)
    }

    /// Loads one of `tenant`'s model versions into the tenant's model worker, after checking
    /// its bytes. Metrics name it `tenant/name`, so a tenant's model never shares series with
    /// the platform's (or another tenant's) model of the same name.
    pub fn load_model(
        &self,
        tenant: &str,
        quotas: &Quotas,
        name: &str,
        onnx: bytes::Bytes,
        config: &ModelConfig,
    ) -> Result<Arc<dyn Model>> {
        self.loader.load_tenant_model(
            tenant,
            &model_label(tenant, name),
            onnx,
            config,
            model_budget(quotas),
        )
    }

    /// The loader of models (tenant and repository).
    pub fn loader(&self) -> &RepositoryLoader {
        &self.loader
    }

    fn tenant_model(
        &self,
        tenant: &Tenant,
        name: &str,
        record: &weft_store::ModelVersion,
    ) -> Result<Arc<dyn Model>> {
        let key = (
            tenant.name.clone(),
            name.to_string(),
            record.onnx_digest.clone(),
            record.config_digest.clone(),
        );
        if let Some(model) = lock(&self.loaded_models)?.get(&key) {
            return Ok(Arc::clone(model));
        }
        let config_text = String::from_utf8(self.store.read_blob(&record.config_digest)?)
            .map_err(|_| Error::invalid("the stored model.toml is not UTF-8"))?;
        let config = ModelConfig::parse(&model_config_path(name), &config_text)?;
        // Read (and so verify) the ONNX blob, and check it again: a model stored before a
        // check existed, or a limit that tightened since, is refused at every load.
        let onnx = bytes::Bytes::from(self.store.read_blob(&record.onnx_digest)?);
        let model = self.load_model(&tenant.name, &tenant.quotas, name, onnx, &config)?;
        lock(&self.loaded_models)?.insert(key, Arc::clone(&model));
        Ok(model)
    }

    /// A tenant's plugin version: its signature is checked against the tenant's current keys
    /// every time (a revoked key stops it), and its bytes re-hashed whenever they are read.
    fn tenant_plugin(
        &self,
        tenant: &Tenant,
        name: &str,
        record: &weft_store::PluginVersion,
    ) -> Result<Plugin> {
        let key = signing_key(tenant, &record.key_id)?;
        // Under the scheme it was pushed with: versions stored before signatures named the
        // tenant are v1 (an upload is refused anything but v2).
        key.verify_stored_plugin(
            record.signature_scheme,
            &record.signature,
            &tenant.name,
            &record.digest,
            name,
            &record.version,
        )
        .map_err(|error| {
            error.context(format!(
                "plugin '{name}' version {} no longer verifies",
                record.version
            ))
        })?;
        let cache_key = (tenant.name.clone(), name.to_string(), record.digest.clone());
        if let Some(plugin) = lock(&self.loaded_plugins)?.get(&cache_key) {
            return Ok(plugin.clone());
        }
        let bytes = self.store.read_blob(&record.digest)?;
        let plugin = self.runtime.load(name, &bytes)?;
        lock(&self.loaded_plugins)?.insert(cache_key, plugin.clone());
        Ok(plugin)
    }

    fn tenant_graph(
        &self,
        scope: &TenantScope,
        name: &str,
        toml_digest: &str,
    ) -> Result<Arc<dyn Model>> {
        let text = String::from_utf8(self.store.read_blob(toml_digest)?)
            .map_err(|_| Error::invalid("the stored graph is not UTF-8"))?;
        // A node on a model or plugin that failed to load (a revoked signer, say) makes the
        // graph unavailable with that reason, rather than "unknown".
        let file = graph_path(name);
        crate::graphs::check_nodes_ready(&GraphSpec::parse(&file, &text)?, &scope.catalog())?;
        let plan = validate_graph(scope, &file, &text)?;
        let mut graph = GraphModel::new(plan, Arc::clone(&scope.runner) as _);
        if let Some(metrics) = &self.metrics {
            graph = graph.with_observer(metrics.tenant_graph_observer(&scope.name));
        }
        Ok(Arc::new(graph))
    }
}

/// How metrics name a tenant's model: `tenant/name`.
pub fn model_label(tenant: &str, name: &str) -> String {
    format!("{tenant}/{name}")
}

/// A tenant's model budget from its quotas.
pub fn model_budget(quotas: &Quotas) -> crate::loader::TenantModelBudget {
    crate::loader::TenantModelBudget {
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

pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
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

/// The bearer token of `Authorization`, or 401 saying how to send one.
fn bearer(headers: &HeaderMap) -> Result<&str> {
    let missing = || {
        Error::new(
            ErrorKind::Unauthenticated,
            "missing API key: send the header 'Authorization: Bearer <key>'",
        )
    };
    let value = headers
        .get(header::AUTHORIZATION)
        .ok_or_else(missing)?
        .to_str()
        .map_err(|_| missing())?;
    let (scheme, token) = value.trim().split_once(' ').ok_or_else(missing)?;
    if !scheme.eq_ignore_ascii_case("bearer") || token.trim().is_empty() {
        return Err(missing());
    }
    Ok(token.trim())
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

/// How often a replica on a shared store checks for changes it was not notified of
/// (notifications are lost while its database connection is down).
pub const RECONCILE_INTERVAL: std::time::Duration = std::time::Duration::from_secs(2);

/// Keeps `tenancy` in step with other replicas of a shared store: applies their changes as
/// soon as a notification arrives, and every [`RECONCILE_INTERVAL`] in any case, when it also
/// announces this replica (so the quota shares follow the number of live replicas). Runs until
/// the process ends; a failed round (database down) is logged and retried.
pub fn follow_shared_store(tenancy: Arc<Tenancy>) -> Result<()> {
    let Some(shared) = tenancy.store().shared() else {
        return Ok(());
    };
    let mut notifications = shared.listen()?;
    tenancy.heartbeat()?;
    tokio::spawn(async move {
        let mut timer = tokio::time::interval(RECONCILE_INTERVAL);
        timer.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut listening = true;
        loop {
            tokio::select! {
                message = notifications.recv(), if listening => {
                    // The listener is gone (the store closed): the timer alone drives it.
                    listening = message.is_some();
                }
                _ = timer.tick() => {}
            }
            // Several notifications in a burst are one refresh.
            while notifications.try_recv().is_ok() {}
            let tenancy = Arc::clone(&tenancy);
            let round = move || {
                if let Err(error) = tenancy.heartbeat() {
                    tracing::warn!(%error, "cannot announce this replica yet");
                }
                tenancy.follow()
            };
            match tokio::task::spawn_blocking(round).await {
                Ok(Ok(_)) => {}
                Ok(Err(error)) => {
                    tracing::warn!(%error, "cannot apply other replicas' changes yet");
                }
                Err(error) => tracing::warn!(%error, "the shared-store follower failed"),
            }
        }
    });
    Ok(())
}
