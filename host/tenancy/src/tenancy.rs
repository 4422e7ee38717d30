//! The tenants a replica serves: which tenant an API key belongs to, the namespace each tenant
//! sees (its own models, plugins and graphs, plus the repository's names the operator shares
//! with it), the single writer of control-plane changes, and keeping in step with the other
//! replicas of a shared store.
//!
//! A tenant's namespace is an immutable [`TenantScope`] behind an `Arc`, rebuilt from the store
//! and swapped whole after every change (see `scope.rs`). A request keeps the scope it started
//! with, so in-flight requests finish on the versions they began with while new requests see the
//! new ones, and old models and plugins are freed when the last request holding them ends (hot
//! swap).
//!
//! Names resolve only inside the caller's scope, so another tenant's model, graph or plugin
//! is "unknown" (404) exactly like a name that does not exist: nothing says it exists.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use weft_core::{Error, ErrorKind, Model, Result};
use weft_engine::ModelRegistry;
use weft_store::{Quotas, State, Store, api_keys};

use crate::Gate;
use crate::backends::{ModelBackend, PluginCompiler, SandboxPlugin, TenancyObserver};
use crate::lifecycle::{bootstrap_quotas, new_tenant};
use crate::scope::TenantScope;

/// The tenant `--bootstrap-key` opens: it owns nothing and shares every repository name.
pub const BOOTSTRAP_TENANT: &str = "default";

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
    pub(crate) store: Arc<Store>,
    /// The repository's models and graphs: the operator's names, shared per tenant.
    pub(crate) platform: ModelRegistry,
    pub(crate) plugins: Arc<dyn PluginCompiler>,
    pub(crate) models: Arc<dyn ModelBackend>,
    pub(crate) observer: Arc<dyn TenancyObserver>,
    admin_key_hash: Option<String>,
    bootstrap_key_hash: Option<String>,
    view: RwLock<Arc<View>>,
    /// Gates outlive rebuilds (a push must not refill a tenant's bucket); replaced when quotas change.
    pub(crate) gates: Mutex<HashMap<String, (Quotas, Arc<Gate>)>>,
    /// Loaded tenant models by (tenant, model, onnx digest, config digest), so rebuilding a scope
    /// does not reload what did not change.
    pub(crate) loaded_models: Mutex<HashMap<LoadedModelKey, Arc<dyn Model>>>,
    /// Where tenant models load on demand (`weft_engine::lazy`); `None`: they load when their
    /// scope is built, as before.
    pub(crate) residency: Option<Arc<weft_engine::lazy::Residency>>,
    /// Loaded tenant plugins by (tenant, name, digest). Keyed by tenant too: a plugin keeps warm
    /// instances, and instances never cross tenants.
    pub(crate) loaded_plugins: Mutex<HashMap<LoadedPluginKey, Arc<dyn SandboxPlugin>>>,
    /// Where tenant plugins compile on demand (`crate::lazy_plugins`); `None`: they compile
    /// when their scope is built.
    pub(crate) plugin_residency: Option<Arc<weft_engine::lazy::Residency>>,
    /// The live routing state of every rollout generation this replica serves; it outlives
    /// scope rebuilds so windows and weights carry across them.
    pub(crate) rollouts:
        Mutex<HashMap<crate::rollouts::RolloutKey, Arc<crate::rollouts::LiveRollout>>>,
    /// The batch jobs this replica is running, with their progress.
    pub(crate) jobs: crate::jobs::LiveJobs,
    /// Each tenant's shadow pool, shared by all its rollouts.
    pub(crate) shadow_slots: Mutex<HashMap<String, Arc<tokio::sync::Semaphore>>>,
    /// Serialises control-plane changes (store transaction + rebuild).
    writer: Mutex<()>,
    /// Outstanding signing-key registration challenges (in memory, or in a shared store).
    challenges: crate::challenges::Challenges,
    /// Live replicas sharing the store (1 for the embedded store): every gate takes its share.
    pub(crate) replicas: Arc<AtomicUsize>,
    /// This replica's name in the shared store's `weft_replicas` (random per process).
    pub(crate) replica_id: String,
    /// The live replicas at the last heartbeat (shared store only; `None` before the first):
    /// a running job whose runner is not among them was orphaned by a crash.
    pub(crate) live_replicas: Mutex<Option<Vec<String>>>,
}

/// (tenant, plugin, digest): what makes a compiled tenant plugin reusable.
pub(crate) type LoadedPluginKey = (String, String, String);

/// (tenant, model, ONNX digest, model.toml digest): what makes a loaded tenant model reusable.
pub(crate) type LoadedModelKey = (String, String, String, String);

/// What the tenancy is built from.
pub struct TenancyConfig {
    pub store: Arc<Store>,
    pub platform: ModelRegistry,
    /// Compiles tenants' plugins into the sandbox.
    pub plugins: Arc<dyn PluginCompiler>,
    /// Checks and loads tenants' models.
    pub models: Arc<dyn ModelBackend>,
    /// Where metrics go.
    pub observer: Arc<dyn TenancyObserver>,
    /// The operator's key for `/api/v1/tenants`; `None` disables the admin API.
    pub admin_key: Option<String>,
    /// A key for [`BOOTSTRAP_TENANT`], kept in memory only (quickstart, tests).
    pub bootstrap_key: Option<String>,
    /// Load tenant models on their first request under this budget instead of when their
    /// scope is built (versions pushed before this existed still load at build).
    pub residency: Option<Arc<weft_engine::lazy::Residency>>,
    /// Compile tenant plugins on their first call under this budget instead of when their
    /// scope is built (versions pushed before their role was recorded still compile at build).
    pub plugin_residency: Option<Arc<weft_engine::lazy::Residency>>,
}

/// Locks, recovering from poisoning: every structure behind these locks is replaced whole, so
/// one that a panic interrupted is still consistent, and one failure must not stop the
/// control plane until a restart.
pub(crate) fn lock<T>(mutex: &Mutex<T>) -> Result<std::sync::MutexGuard<'_, T>> {
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
            plugins: config.plugins,
            models: config.models,
            observer: config.observer,
            admin_key_hash: config.admin_key.as_deref().map(api_keys::hash),
            bootstrap_key_hash: config.bootstrap_key.as_deref().map(api_keys::hash),
            view: RwLock::default(),
            gates: Mutex::default(),
            loaded_models: Mutex::default(),
            residency: config.residency,
            loaded_plugins: Mutex::default(),
            plugin_residency: config.plugin_residency,
            rollouts: Mutex::default(),
            shadow_slots: Mutex::default(),
            jobs: Mutex::default(),
            writer: Mutex::default(),
            challenges,
            replicas: Arc::new(AtomicUsize::new(1)),
            live_replicas: Mutex::default(),
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

    /// The plugin sandbox's compiler.
    pub fn compiler(&self) -> &dyn PluginCompiler {
        self.plugins.as_ref()
    }

    /// The tenant model backend.
    pub fn models(&self) -> &dyn ModelBackend {
        self.models.as_ref()
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

    /// The scope of the tenant whose API key `key` is: 401 unless it is a valid key.
    pub fn authenticate(&self, key: &str) -> Result<Arc<TenantScope>> {
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
    pub fn authenticate_admin(&self, key: &str) -> Result<()> {
        let Some(hash) = &self.admin_key_hash else {
            return Err(Error::new(
                ErrorKind::Unauthenticated,
                "the admin API is disabled: start the server with --admin-key (WEFT_ADMIN_KEY)",
            ));
        };
        if api_keys::matches(key, hash) {
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

    /// Keeps a plugin the control plane already compiled (to check an upload), so the rebuild
    /// that follows its commit does not compile it again; on demand it stays compiled if the
    /// plugin cache budget has room.
    pub(crate) fn remember_plugin(
        &self,
        tenant: &str,
        name: &str,
        record: &weft_store::PluginVersion,
        plugin: Arc<dyn SandboxPlugin>,
    ) -> Result<()> {
        let plugin = match self.lazy_plugin(name, record) {
            Some(lazy) => {
                lazy.adopt(plugin);
                lazy as Arc<dyn SandboxPlugin>
            }
            None => plugin,
        };
        let key = (tenant.to_string(), name.to_string(), record.digest.clone());
        lock(&self.loaded_plugins)?.insert(key, plugin);
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
        version: &weft_store::ModelVersion,
    ) -> Result<()> {
        // On demand, the version the push just loaded stays loaded if the budget has room.
        let model = match self.lazy_registration(tenant, name, version) {
            Some(lazy) => {
                lazy.adopt(model);
                lazy as Arc<dyn Model>
            }
            None => model,
        };
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
    ///
    /// The new models and plugins are loaded before the writer lock is taken, so this
    /// replica's own pushes wait only for the swap. Reading the database outside the lock is
    /// safe: another replica can commit at any moment anyway, so every change re-checks on the
    /// latest state inside its transaction; and a local commit that picks up the same delta
    /// first only means the rebuild below finds its tenants already current.
    pub fn follow(&self) -> Result<bool> {
        let Some(shared) = self.store.shared() else {
            return Ok(false);
        };
        let before = self.store.state();
        if !shared.refresh()? {
            return Ok(false);
        }
        let fetched = self.store.state();
        for (name, tenant) in &fetched.tenants {
            if before.tenants.get(name) != Some(tenant) {
                self.preload(tenant);
            }
        }
        let _writer = lock(&self.writer)?;
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
        let live = shared.heartbeat(&self.replica_id)?;
        let replicas = live.len().max(1);
        self.replicas.store(replicas, Ordering::Relaxed);
        *lock(&self.live_replicas)? = Some(live);
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
        // The versions rollouts pin, as the scopes just built found them (no file parsed here).
        for scope in tenants.values() {
            live_plugins.extend(scope.pinned_plugins.iter().cloned());
        }
        self.forget_rollouts(state)?;
        lock(&self.gates)?.retain(|name, _| state.tenants.contains_key(name));
        lock(&self.shadow_slots)?.retain(|name, _| state.tenants.contains_key(name));
        lock(&self.loaded_models)?.retain(|key, _| live_models.contains(key));
        lock(&self.loaded_plugins)?.retain(|key, _| live_plugins.contains(key));
        let view = Arc::new(View { tenants, keys });
        match self.view.write() {
            Ok(mut current) => *current = view,
            Err(poisoned) => *poisoned.into_inner() = view,
        }
        Ok(())
    }
}

/// How often a replica on a shared store checks for changes it was not notified of
/// (notifications are lost while its database connection is down).
pub const RECONCILE_INTERVAL: std::time::Duration = std::time::Duration::from_secs(2);

/// How long an object-store blob that no version references is kept before it is deleted, by
/// default: far longer than any upload takes from its first byte to its commit.
pub const DEFAULT_BLOB_GRACE: std::time::Duration = std::time::Duration::from_secs(3600);

/// How often a replica looks for object-store blobs to delete, given their grace: half the
/// grace, within [`RECONCILE_INTERVAL`] and ten minutes (a listing of the bucket per round).
pub fn blob_collection_interval(grace: std::time::Duration) -> std::time::Duration {
    (grace / 2).clamp(RECONCILE_INTERVAL, std::time::Duration::from_secs(600))
}

/// Keeps `tenancy` in step with other replicas of a shared store: applies their changes as
/// soon as a notification arrives, and every [`RECONCILE_INTERVAL`] in any case, when it also
/// announces this replica (so the quota shares follow the number of live replicas). Every
/// [`blob_collection_interval`] it also deletes the object-store blobs of deleted versions that
/// have been unreferenced for `blob_grace` ([`Store::collect_shared_blobs`]), so a tenant that
/// deletes and pushes again does not grow the bucket without end. Runs until the process ends;
/// a failed round (database down) is logged and retried.
pub fn follow_shared_store(tenancy: Arc<Tenancy>, blob_grace: std::time::Duration) -> Result<()> {
    let Some(shared) = tenancy.store().shared() else {
        return Ok(());
    };
    let mut notifications = shared.listen()?;
    tenancy.heartbeat()?;
    let collect_every = blob_collection_interval(blob_grace);
    tokio::spawn(async move {
        let mut timer = tokio::time::interval(RECONCILE_INTERVAL);
        timer.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut listening = true;
        let mut collected = std::time::Instant::now();
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
            let collect = collected.elapsed() >= collect_every;
            if collect {
                collected = std::time::Instant::now();
            }
            let tenancy = Arc::clone(&tenancy);
            let round = move || {
                if let Err(error) = tenancy.heartbeat() {
                    tracing::warn!(%error, "cannot announce this replica yet");
                }
                if collect {
                    match tenancy.store().collect_shared_blobs(blob_grace) {
                        Ok(0) => {}
                        Ok(removed) => tracing::info!(
                            removed,
                            "deleted the object-store blobs of deleted versions"
                        ),
                        Err(error) => tracing::warn!(
                            %error,
                            "cannot delete the object-store blobs of deleted versions yet"
                        ),
                    }
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
