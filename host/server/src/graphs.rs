//! Graphs and plugins of a repository: loading `<repo>/plugins/*.wasm` into the plugin runtime
//! and `<repo>/graphs/*.toml` into served [`GraphModel`]s, the [`Catalog`] that graph validation
//! looks models and plugins up in, the [`NodeRunner`] that runs graph nodes on the backends and
//! the sandbox, and `weft graph check`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use weft_core::{
    BoxFuture, Error, ErrorKind, Model, ModelMetadata, NamedTensor, RequestContext, Result, Spent,
};
use weft_engine::graph::{
    Catalog, GraphModel, GraphObserver, GraphSpec, NodeContext, NodeLimits, NodeRunner, PluginCall,
    PluginReply, PluginRole, validate,
};
use weft_engine::{ModelRegistry, ModelState};
use weft_runtime::{CallContext, CallLimits, Plugin, PluginRuntime, Role};

use crate::metrics::Metrics;

/// Loads every `<repo>/plugins/<name>.wasm`; a plugin that fails to load maps to its error.
pub fn load_plugins(
    repository: &Path,
    runtime: &PluginRuntime,
) -> Result<HashMap<String, Result<Plugin>>> {
    let dir = repository.join("plugins");
    let mut plugins = HashMap::new();
    if !dir.is_dir() {
        return Ok(plugins);
    }
    let entries = std::fs::read_dir(&dir)
        .map_err(|error| Error::invalid(format!("cannot read {}: {error}", dir.display())))?;
    for path in entries.filter_map(|entry| entry.ok().map(|entry| entry.path())) {
        if path.extension().and_then(|e| e.to_str()) != Some("wasm") {
            continue;
        }
        let Some(name) = path.file_stem().and_then(|s| s.to_str()).map(str::to_owned) else {
            continue;
        };
        let plugin = std::fs::read(&path)
            .map_err(|error| Error::invalid(format!("cannot read {}: {error}", path.display())))
            .and_then(|bytes| runtime.load(&name, &bytes));
        if let Err(error) = &plugin {
            tracing::error!(plugin = %name, %error, "plugin unavailable");
        }
        plugins.insert(name, plugin);
    }
    Ok(plugins)
}

/// Models from the registry and plugins from the repository, as graph validation sees them.
pub struct RepositoryCatalog<'a> {
    pub models: &'a ModelRegistry,
    pub plugins: &'a HashMap<String, Result<Plugin>>,
    /// The ceilings for per-node limits; `None` in a dry run that knows no server settings.
    pub limits: Option<NodeLimits>,
}

impl Catalog for RepositoryCatalog<'_> {
    fn model(&self, name: &str, version: Option<&str>) -> Option<ModelMetadata> {
        let (_, model) = self.models.resolve(name, version).ok()?;
        Some(model.metadata().clone())
    }

    fn plugin(&self, name: &str) -> Option<PluginRole> {
        let plugin = self.plugins.get(name)?.as_ref().ok()?;
        Some(match plugin.role() {
            Role::Transformer => PluginRole::Transformer,
            Role::Combiner => PluginRole::Combiner,
            Role::Router => PluginRole::Router,
        })
    }

    fn node_limits(&self) -> Option<NodeLimits> {
        self.limits
    }
}

/// The per-node ceilings a plugin runtime allows.
pub fn runtime_node_limits(runtime: &PluginRuntime) -> NodeLimits {
    let config = runtime.config();
    NodeLimits {
        deadline_ms: u64::try_from(config.limits.deadline.as_millis()).unwrap_or(u64::MAX),
        memory_mb: (config.max_memory_bytes >> 20) as u64,
    }
}

/// Runs graph nodes: model nodes on the repository's models, plugin nodes in the sandbox with
/// the node's params, limits and model grants.
pub struct RepositoryRunner {
    models: Arc<ModelRegistry>,
    plugins: Arc<HashMap<String, Plugin>>,
    defaults: CallLimits,
    metrics: Option<Arc<Metrics>>,
    /// Per plugin name, where it came from (version, digest, signer), noted on each request
    /// that runs it; empty for repository plugins.
    provenance: HashMap<String, serde_json::Value>,
    /// Per plugin name, its `/metrics` label when it is not the name (`tenant/name@version`).
    metric_labels: HashMap<String, String>,
}

impl RepositoryRunner {
    pub fn new(
        models: Arc<ModelRegistry>,
        plugins: &HashMap<String, Result<Plugin>>,
        runtime: &PluginRuntime,
        metrics: Option<Arc<Metrics>>,
    ) -> Self {
        let plugins = plugins
            .iter()
            .filter_map(|(name, plugin)| Some((name.clone(), plugin.as_ref().ok()?.clone())))
            .collect();
        RepositoryRunner {
            models,
            plugins: Arc::new(plugins),
            defaults: runtime.config().limits.clone(),
            metrics,
            provenance: HashMap::new(),
            metric_labels: HashMap::new(),
        }
    }

    /// A tenant's runner: its plugins run under its own ceilings and each call is noted in the
    /// request's provenance.
    pub fn for_tenant(
        mut self,
        limits: CallLimits,
        provenance: HashMap<String, serde_json::Value>,
        metric_labels: HashMap<String, String>,
    ) -> Self {
        self.defaults = limits;
        self.provenance = provenance;
        self.metric_labels = metric_labels;
        self
    }

    /// The loaded plugins, for metrics read at scrape time.
    pub fn plugins(&self) -> &Arc<HashMap<String, Plugin>> {
        &self.plugins
    }

    fn call_context(&self, request: &RequestContext, context: &NodeContext) -> CallContext {
        let grants = context
            .models
            .iter()
            .filter_map(|name| {
                let (_, model) = self.models.resolve(name, None).ok()?;
                Some((name.clone(), model))
            })
            .collect();
        let mut limits = self.defaults.clone();
        if let Some(deadline) = context.deadline {
            limits.deadline = deadline;
        }
        if let Some(memory) = context.memory_bytes {
            limits.memory_bytes = usize::try_from(memory).unwrap_or(usize::MAX);
        }
        CallContext {
            grants: Arc::new(grants),
            params: context.params.clone(),
            limits: Some(limits),
            assets: None,
            // Repository plugins serve every tenant that shares their graph: warm instances
            // stay with the tenant whose call left them.
            request: request.clone(),
        }
    }
}

impl NodeRunner for RepositoryRunner {
    fn model<'a>(
        &'a self,
        request: &'a RequestContext,
        model: &'a str,
        version: Option<&'a str>,
        inputs: Vec<NamedTensor>,
    ) -> BoxFuture<'a, Result<Vec<NamedTensor>>> {
        Box::pin(async move {
            let (number, served) = self.models.resolve(model, version)?;
            let context = |error: Error| error.context(format!("model '{model}' version {number}"));
            served
                .metadata()
                .validate_inputs(&inputs)
                .map_err(context)?;
            served.infer(request, inputs).await.map_err(context)
        })
    }

    fn plugin<'a>(
        &'a self,
        request: &'a RequestContext,
        context: &'a NodeContext,
        call: PluginCall<'a>,
    ) -> BoxFuture<'a, Result<PluginReply>> {
        Box::pin(async move {
            let name = match &call {
                PluginCall::Transform { plugin, .. }
                | PluginCall::Combine { plugin, .. }
                | PluginCall::Route { plugin, .. } => *plugin,
            };
            let plugin = self
                .plugins
                .get(name)
                .ok_or_else(|| Error::unavailable(format!("plugin '{name}' is not loaded")))?;
            let call_context = self.call_context(request, context);
            if let Some(entry) = self.provenance.get(name) {
                request.note_plugin(entry);
            }
            let started = Instant::now();
            let reply = match call {
                PluginCall::Transform { inputs, .. } => plugin
                    .transform(&call_context, inputs)
                    .await
                    .map(PluginReply::Tensors),
                PluginCall::Combine { branches, .. } => plugin
                    .combine(&call_context, branches)
                    .await
                    .map(PluginReply::Tensors),
                PluginCall::Route { inputs, .. } => plugin
                    .route(&call_context, inputs)
                    .await
                    .map(PluginReply::Route),
            };
            let elapsed = started.elapsed();
            request.add(Spent::Plugin, elapsed);
            if let Some(metrics) = &self.metrics {
                let label = self.metric_labels.get(name).map_or(name, String::as_str);
                metrics.plugin_call(label, elapsed);
            }
            reply.map_err(|failure| failure.error)
        })
    }
}

/// Loads every `<repo>/graphs/*.toml`, validates it against `models` and `plugins`, and serves
/// it in `served` under its name and version. A graph that cannot serve (bad file, unknown or
/// unavailable model or plugin) is served as UNAVAILABLE with the reason, so the registry's
/// failures list it. Returns what could not be served at all (a name clash), for `--strict`.
pub fn load_graphs(
    repository: &Path,
    catalog: &RepositoryCatalog<'_>,
    runner: Arc<dyn NodeRunner>,
    observer: Option<Arc<dyn GraphObserver>>,
    served: &mut ModelRegistry,
) -> Result<Vec<String>> {
    let dir = repository.join("graphs");
    let mut failures = Vec::new();
    if !dir.is_dir() {
        return Ok(failures);
    }
    let entries = std::fs::read_dir(&dir)
        .map_err(|error| Error::invalid(format!("cannot read {}: {error}", dir.display())))?;
    let mut files: Vec<PathBuf> = entries
        .filter_map(|entry| entry.ok().map(|entry| entry.path()))
        .filter(|path| path.extension().and_then(|e| e.to_str()) == Some("toml"))
        .collect();
    files.sort();
    for file in files {
        let stem = file
            .file_stem()
            .and_then(|s| s.to_str())
            .unwrap_or_default()
            .to_string();
        let (name, version, state) = match load_graph(&file, catalog, &runner, observer.as_ref()) {
            Ok((name, version, model)) => {
                tracing::info!(graph = %name, version, "graph ready");
                (name, Some(version), ModelState::Ready(model))
            }
            Err((name, version, error)) => {
                let name = name.unwrap_or(stem);
                tracing::error!(graph = %name, %error, "graph unavailable");
                (name, version, ModelState::Unavailable(error.to_string()))
            }
        };
        if let Err(error) = served.add_graph(&name, version, state) {
            tracing::error!(graph = %name, %error, "graph not served");
            failures.push(format!("{}: {error}", file.display()));
        }
    }
    Ok(failures)
}

type GraphFailure = (Option<String>, Option<u64>, Error);

fn load_graph(
    file: &Path,
    catalog: &RepositoryCatalog<'_>,
    runner: &Arc<dyn NodeRunner>,
    observer: Option<&Arc<dyn GraphObserver>>,
) -> std::result::Result<(String, u64, Arc<dyn Model>), GraphFailure> {
    let text = std::fs::read_to_string(file).map_err(|error| {
        let error = Error::invalid(format!("{}: cannot read: {error}", file.display()));
        (None, None, error)
    })?;
    let spec = GraphSpec::parse(file, &text).map_err(|error| (None, None, error))?;
    let (name, version) = (spec.name.clone(), spec.version);
    let fail = |error: Error| (Some(name.clone()), Some(version), error);
    check_nodes_ready(&spec, catalog).map_err(fail)?;
    let plan = validate(file, &text, spec, catalog).map_err(fail)?;
    let mut graph = GraphModel::new(plan, Arc::clone(runner));
    if let Some(observer) = observer {
        graph = graph.with_observer(Arc::clone(observer));
    }
    let model: Arc<dyn Model> = Arc::new(graph);
    Ok((name, version, model))
}

/// A graph is ready only when every node's model and plugin is: a node on an unavailable model
/// or a plugin that failed to load makes the graph unavailable, with that reason.
pub fn check_nodes_ready(spec: &GraphSpec, catalog: &RepositoryCatalog<'_>) -> Result<()> {
    for node in &spec.nodes {
        if let Some(model) = &node.model
            && let Err(error) = catalog.models.resolve(model, node.version.as_deref())
            && error.kind() == ErrorKind::Unavailable
        {
            return Err(Error::unavailable(format!(
                "node '{}': {}",
                node.name,
                error.message()
            )));
        }
        for granted in &node.models {
            if let Err(error) = catalog.models.resolve(granted, None)
                && error.kind() == ErrorKind::Unavailable
            {
                return Err(Error::unavailable(format!(
                    "node '{}': {}",
                    node.name,
                    error.message()
                )));
            }
        }
        if let Some(plugin) = &node.plugin
            && let Some(Err(error)) = catalog.plugins.get(plugin)
        {
            return Err(Error::unavailable(format!(
                "node '{}': plugin '{plugin}' failed to load: {error}",
                node.name
            )));
        }
    }
    Ok(())
}

/// Validates each graph file exactly as loading would; returns one line per file, and whether
/// all were valid.
pub fn check_files(files: &[PathBuf], catalog: &dyn Catalog) -> (Vec<String>, bool) {
    let mut lines = Vec::new();
    let mut all_valid = true;
    for file in files {
        let outcome = std::fs::read_to_string(file)
            .map_err(|error| Error::invalid(format!("{}: cannot read: {error}", file.display())))
            .and_then(|text| {
                let spec = GraphSpec::parse(file, &text)?;
                validate(file, &text, spec, catalog)
            });
        match outcome {
            Ok(plan) => lines.push(format!(
                "ok: {} (graph '{}' version {}, {} nodes)",
                file.display(),
                plan.spec.name,
                plan.spec.version,
                plan.spec.nodes.len()
            )),
            Err(error) => {
                all_valid = false;
                lines.push(format!("error: {error}"));
            }
        }
    }
    (lines, all_valid)
}
