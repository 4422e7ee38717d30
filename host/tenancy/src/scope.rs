//! One tenant's namespace, built from its store record: its models (loaded into its model
//! worker, or reused from the cache when their bytes did not change), the repository names
//! shared with it, its current plugin versions (signatures verified against its current keys at
//! every build), and its graphs (validated again, through the same loader as the repository's).
//! Anything that fails to build is served as UNAVAILABLE with the reason; nothing else fails.

use std::collections::HashMap;
use std::sync::Arc;

use tokio::sync::OwnedSemaphorePermit;
use weft_core::{Error, Model, Result};
use weft_engine::graph::NodeLimits;
use weft_engine::{ModelConfig, ModelRegistry, ModelState};
use weft_store::{Quotas, Tenant};

use crate::backends::{PluginLimits, SandboxPlugin};
use crate::graphs::{PluginNotes, PluginSet, ScopeCatalog, ScopeRunner, load_graph};
use crate::lifecycle::{graph_path, model_budget, model_config_path, model_label, signing_key};
use crate::tenancy::{LoadedPluginKey, Tenancy, lock};
use crate::{Gate, Refusal};

/// One tenant's namespace and door, immutable once built.
pub struct TenantScope {
    pub name: String,
    pub quotas: Quotas,
    /// Every name the tenant can call: its models and graphs and the shared repository names.
    pub registry: ModelRegistry,
    /// The models alone (no graphs): what the tenant's graphs and plugins may call.
    pub models: Arc<ModelRegistry>,
    /// The tenant's current plugin versions, by name, as graph validation sees them.
    pub plugins: PluginSet,
    pub gate: Arc<Gate>,
    /// The ceilings of this tenant's plugin calls.
    pub limits: PluginLimits,
    pub runner: Arc<ScopeRunner>,
    /// The loaded plugins labelled `tenant/name@version`, for `/metrics` (rollouts' pinned
    /// versions included).
    pub plugin_labels: Vec<(String, Arc<dyn SandboxPlugin>)>,
    /// The compiled plugin versions this scope's rollouts pin (not the current ones), kept
    /// in the cache while the scope serves them.
    pub(crate) pinned_plugins: Vec<LoadedPluginKey>,
}

impl TenantScope {
    /// The catalog graph validation checks this tenant's graphs against.
    pub fn catalog(&self) -> ScopeCatalog<'_> {
        ScopeCatalog {
            models: &self.models,
            plugins: &self.plugins,
            limits: Some(NodeLimits {
                deadline_ms: u64::try_from(self.limits.deadline.as_millis()).unwrap_or(u64::MAX),
                memory_mb: (self.limits.memory_bytes >> 20) as u64,
            }),
        }
    }

    /// Charges one request to the rate quota (every authenticated request, data or control
    /// plane, pays one token), or a refusal that says when to retry.
    pub fn charge(&self) -> std::result::Result<(), Refusal> {
        self.gate.charge(&self.name)
    }

    /// Takes a concurrency slot for a request that does work (inference, uploads), or a
    /// refusal. The permit is held until the response is built.
    pub fn admit(&self) -> std::result::Result<OwnedSemaphorePermit, Refusal> {
        self.gate.hold(&self.name)
    }
}

impl Tenancy {
    pub(crate) fn gate(&self, tenant: &Tenant) -> Result<Arc<Gate>> {
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

    /// The per-call limits of a tenant's plugins: the sandbox's, lowered to the tenant's quotas.
    pub(crate) fn tenant_limits(&self, quotas: &Quotas) -> PluginLimits {
        tenant_plugin_limits(self.plugins.defaults(), self.plugins.ceiling(), quotas)
    }

    /// Loads the models and compiles the plugins `tenant` stores that are not loaded yet (into
    /// the same caches [`Tenancy::build_scope`] reads), without building a scope: the slow part
    /// of a rebuild, done before the writer lock is taken so that following other replicas does
    /// not hold up this replica's own changes. Failures are left to the build that follows,
    /// which reports them.
    pub(crate) fn preload(&self, tenant: &Tenant) {
        for (name, versions) in &tenant.models {
            for record in versions.values() {
                let _ = self.tenant_model(tenant, name, record);
            }
        }
        for (name, versions) in &tenant.plugins {
            if let Some(record) = versions.last() {
                let _ = self.tenant_plugin(tenant, name, record);
            }
        }
        self.preload_pinned(tenant, &Tenancy::pinned_plugins(tenant));
    }

    /// Builds one tenant's scope: its models (loaded or taken from the cache), the shared
    /// repository names, its current plugins (signature verified again), and its graphs
    /// (validated again). Anything that fails is served as UNAVAILABLE with the reason.
    pub(crate) fn build_scope(&self, tenant: &Tenant) -> Result<TenantScope> {
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
        let mut notes = HashMap::new();
        let mut plugin_labels = Vec::new();
        for (name, versions) in &tenant.plugins {
            let Some(record) = versions.last() else {
                continue;
            };
            let plugin = self.tenant_plugin(tenant, name, record);
            let noted = plugin_notes(&tenant.name, name, record);
            match &plugin {
                Ok(loaded) => plugin_labels
                    .push((noted.label.clone().unwrap_or_default(), Arc::clone(loaded))),
                Err(error) => {
                    tracing::error!(tenant = %tenant.name, plugin = %name, %error, "tenant plugin unavailable")
                }
            }
            notes.insert(name.clone(), noted);
            plugins.insert(name.clone(), plugin);
        }
        let limits = self.tenant_limits(&tenant.quotas);
        let models = Arc::new(models);
        let runner = Arc::new(
            ScopeRunner::new(
                Arc::clone(&models),
                &plugins,
                limits,
                Arc::clone(&self.observer),
            )
            .with_notes(notes),
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
            pinned_plugins: Vec::new(),
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
        for pinned in self.serve_rollouts(tenant, &scope, &mut registry) {
            scope.plugin_labels.push((pinned.label, pinned.plugin));
            scope.pinned_plugins.push(pinned.key);
        }
        self.observer.declare_models(&tenant.name, &registry);
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
        self.models.load(
            tenant,
            &model_label(tenant, name),
            onnx,
            config,
            model_budget(quotas),
        )
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
        if let Some(lazy) = self.lazy_registration(&tenant.name, name, record) {
            let model: Arc<dyn Model> = lazy;
            lock(&self.loaded_models)?.insert(key, Arc::clone(&model));
            return Ok(model);
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

    /// The on-demand registration of one of `tenant`'s stored model versions, when models load
    /// on demand and its record says what it serves (versions pushed before that load at
    /// build). Nothing is read: the loader reads, checks and loads the blobs on first use,
    /// under the tenant's quotas as they are then.
    pub(crate) fn lazy_registration(
        &self,
        tenant: &str,
        name: &str,
        version: &weft_store::ModelVersion,
    ) -> Option<Arc<weft_engine::lazy::LazyModel>> {
        let residency = self.residency.as_ref()?;
        let served = version.served.as_ref()?;
        let (onnx_digest, config_digest) = (&version.onnx_digest, &version.config_digest);
        let loader: weft_engine::lazy::LoadFn = {
            let store = Arc::clone(&self.store);
            let models = Arc::clone(&self.models);
            let (tenant, name) = (tenant.to_string(), name.to_string());
            let (onnx_digest, config_digest) = (onnx_digest.to_string(), config_digest.to_string());
            Arc::new(move || {
                let quotas = store
                    .state()
                    .tenants
                    .get(&tenant)
                    .map(|record| record.quotas.clone())
                    .ok_or_else(|| Error::not_found(format!("tenant '{tenant}' is gone")))?;
                let config_text = String::from_utf8(store.read_blob(&config_digest)?)
                    .map_err(|_| Error::invalid("the stored model.toml is not UTF-8"))?;
                let config = ModelConfig::parse(&model_config_path(&name), &config_text)?;
                let onnx = bytes::Bytes::from(store.read_blob(&onnx_digest)?);
                models.load(
                    &tenant,
                    &model_label(&tenant, &name),
                    onnx,
                    &config,
                    model_budget(&quotas),
                )
            })
        };
        let spec = weft_engine::lazy::LazySpec {
            label: format!("model '{name}'"),
            metadata: served.metadata.clone(),
            serving: served.serving.clone(),
            cost: version
                .size
                .saturating_mul(served.serving.instances.max(1) as u64),
            pinned: served.pinned,
            // Tenant models run in their tenant's model worker, which lives while any of them
            // is loaded.
            group: Some(tenant.to_string()),
            loader,
        };
        Some(weft_engine::lazy::LazyModel::new(
            spec,
            Arc::clone(residency),
        ))
    }

    /// A tenant's plugin version: its signature is checked against the tenant's current keys
    /// every time (a revoked key stops it), and its bytes re-hashed whenever they are read.
    pub(crate) fn tenant_plugin(
        &self,
        tenant: &Tenant,
        name: &str,
        record: &weft_store::PluginVersion,
    ) -> Result<Arc<dyn SandboxPlugin>> {
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
            return Ok(Arc::clone(plugin));
        }
        if let Some(lazy) = self.lazy_plugin(name, record) {
            let plugin: Arc<dyn SandboxPlugin> = lazy;
            lock(&self.loaded_plugins)?.insert(cache_key, Arc::clone(&plugin));
            return Ok(plugin);
        }
        let bytes = self.store.read_blob(&record.digest)?;
        let plugin = self.plugins.compile(name, &bytes)?;
        lock(&self.loaded_plugins)?.insert(cache_key, Arc::clone(&plugin));
        Ok(plugin)
    }

    /// The on-demand registration of a stored plugin version, when plugins compile on demand
    /// and its record says what role it has (versions pushed before that compile at build).
    /// Nothing is read: the first call reads the blob (re-hashing it) and compiles it, or
    /// takes it from the compile cache.
    pub(crate) fn lazy_plugin(
        &self,
        name: &str,
        record: &weft_store::PluginVersion,
    ) -> Option<Arc<crate::lazy_plugins::LazyPlugin>> {
        let residency = self.plugin_residency.as_ref()?;
        let served = record.served.as_ref()?;
        let role = weft_engine::graph::PluginRole::parse(&served.role)?;
        let compile = {
            let (store, compiler) = (Arc::clone(&self.store), Arc::clone(&self.plugins));
            let (name, digest) = (name.to_string(), record.digest.clone());
            Arc::new(move || compiler.compile(&name, &store.read_blob(&digest)?))
        };
        Some(crate::lazy_plugins::LazyPlugin::new(
            name,
            role,
            served.compiled_bytes,
            compile,
            Arc::clone(residency),
        ))
    }

    /// A tenant's stored graph, through the one graph loader.
    fn tenant_graph(
        &self,
        scope: &TenantScope,
        name: &str,
        toml_digest: &str,
    ) -> Result<Arc<dyn Model>> {
        let text = String::from_utf8(self.store.read_blob(toml_digest)?)
            .map_err(|_| Error::invalid("the stored graph is not UTF-8"))?;
        let observer = self.observer.graph_observer(Some(&scope.name));
        let (_, _, graph) = load_graph(
            &graph_path(name),
            &text,
            &scope.catalog(),
            &scope.runner,
            observer,
        )
        .map_err(|failure| failure.error)?;
        Ok(graph)
    }
}

/// Where a tenant's plugin version is noted: its provenance (name, version, digest, signer) on
/// each request that runs it, its `tenant/name@version` label in metrics.
pub(crate) fn plugin_notes(
    tenant: &str,
    name: &str,
    record: &weft_store::PluginVersion,
) -> PluginNotes {
    PluginNotes {
        provenance: Some(serde_json::json!({
            "plugin": name,
            "version": record.version,
            "digest": format!("sha256:{}", record.digest),
            "key_id": record.key_id,
        })),
        label: Some(format!("{tenant}/{name}@{}", record.version)),
    }
}

/// A tenant's plugin limits: the sandbox's defaults, its deadline and memory lowered to the
/// tenant's quotas and never above the sandbox's ceilings.
pub fn tenant_plugin_limits(
    defaults: PluginLimits,
    ceiling: NodeLimits,
    quotas: &Quotas,
) -> PluginLimits {
    let deadline_ms = quotas.plugin_deadline_ms.min(ceiling.deadline_ms);
    let memory_mb = quotas.plugin_memory_mb.min(ceiling.memory_mb);
    PluginLimits {
        deadline: std::time::Duration::from_millis(deadline_ms),
        memory_bytes: usize::try_from(memory_mb << 20).unwrap_or(defaults.memory_bytes),
    }
}
