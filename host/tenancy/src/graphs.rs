//! Graphs as a namespace serves them: the [`ScopeCatalog`] graph validation looks models and
//! plugins up in, the [`ScopeRunner`] that runs graph nodes (model nodes on the namespace's
//! models, plugin nodes in the sandbox), and the one graph loader that the repository's
//! `graphs/*.toml` and a tenant's stored graphs both go through ([`load_graph`]).
//!
//! A plugin node's model grants are resolved once, when its graph is built ([`ScopeRunner::for_graph`]),
//! not at every call: a scope is immutable, so what a name means cannot change under a graph.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use weft_core::{
    BoxFuture, Error, ErrorKind, Model, ModelMetadata, NamedTensor, RequestContext, Result, Spent,
};
use weft_engine::graph::{
    Catalog, GraphModel, GraphObserver, GraphPlan, GraphSpec, NodeContext, NodeLimits, NodeRunner,
    PluginCall, PluginReply, PluginRole, validate,
};
use weft_engine::{ModelRegistry, ModelState};

use crate::backends::{Grants, PluginLimits, SandboxCall, SandboxPlugin, TenancyObserver};

/// A namespace's plugins by name; one that failed to load maps to its error.
pub type PluginSet = HashMap<String, Result<Arc<dyn SandboxPlugin>>>;

/// Models from a registry and plugins of a namespace, as graph validation sees them.
pub struct ScopeCatalog<'a> {
    pub models: &'a ModelRegistry,
    pub plugins: &'a PluginSet,
    /// The ceilings for per-node limits; `None` in a dry run that knows no server settings.
    pub limits: Option<NodeLimits>,
}

impl Catalog for ScopeCatalog<'_> {
    fn model(&self, name: &str, version: Option<&str>) -> Option<ModelMetadata> {
        let (_, model) = self.models.resolve(name, version).ok()?;
        Some(model.metadata().clone())
    }

    fn plugin(&self, name: &str) -> Option<PluginRole> {
        Some(self.plugins.get(name)?.as_ref().ok()?.role())
    }

    fn node_limits(&self) -> Option<NodeLimits> {
        self.limits
    }
}

/// A graph is ready only when every node's model and plugin is: a node on an unavailable model
/// or a plugin that failed to load makes the graph unavailable, with that reason.
pub fn check_nodes_ready(spec: &GraphSpec, catalog: &ScopeCatalog<'_>) -> Result<()> {
    for node in &spec.nodes {
        let unavailable =
            |message: &str| Error::unavailable(format!("node '{}': {message}", node.name));
        let uses = node
            .model
            .iter()
            .map(|model| (model, node.version.as_deref()))
            .chain(node.models.iter().map(|granted| (granted, None)));
        for (model, version) in uses {
            if let Err(error) = catalog.models.resolve(model, version)
                && error.kind() == ErrorKind::Unavailable
            {
                return Err(unavailable(error.message()));
            }
        }
        if let Some(plugin) = &node.plugin
            && let Some(Err(error)) = catalog.plugins.get(plugin)
        {
            return Err(unavailable(&format!(
                "plugin '{plugin}' failed to load: {error}"
            )));
        }
    }
    Ok(())
}

/// Where a plugin's calls are noted: its provenance on the request, its label in metrics.
#[derive(Clone, Debug, Default)]
pub struct PluginNotes {
    /// Where it came from (version, digest, signer), noted on each request that runs it;
    /// `None` for repository plugins.
    pub provenance: Option<serde_json::Value>,
    /// Its `/metrics` label when that is not its name (`tenant/name@version`).
    pub label: Option<String>,
}

/// Runs graph nodes of one namespace: model nodes on its models, plugin nodes in the sandbox
/// under its limits.
pub struct ScopeRunner {
    models: Arc<ModelRegistry>,
    plugins: HashMap<String, Arc<dyn SandboxPlugin>>,
    notes: HashMap<String, PluginNotes>,
    defaults: PluginLimits,
    observer: Arc<dyn TenancyObserver>,
}

impl ScopeRunner {
    /// A runner over `models` and the plugins of `plugins` that loaded; calls run under
    /// `defaults` unless a node asks for less.
    pub fn new(
        models: Arc<ModelRegistry>,
        plugins: &PluginSet,
        defaults: PluginLimits,
        observer: Arc<dyn TenancyObserver>,
    ) -> Self {
        let plugins = plugins
            .iter()
            .filter_map(|(name, plugin)| Some((name.clone(), Arc::clone(plugin.as_ref().ok()?))))
            .collect();
        ScopeRunner {
            models,
            plugins,
            notes: HashMap::new(),
            defaults,
            observer,
        }
    }

    /// Notes per plugin name (a tenant's provenance and metric labels).
    pub fn with_notes(mut self, notes: HashMap<String, PluginNotes>) -> Self {
        self.notes = notes;
        self
    }

    /// The loaded plugins, by name.
    pub fn plugins(&self) -> &HashMap<String, Arc<dyn SandboxPlugin>> {
        &self.plugins
    }

    /// The runner of one graph: each plugin node's model grants resolved now, once.
    pub fn for_graph(self: &Arc<Self>, plan: &GraphPlan) -> Arc<dyn NodeRunner> {
        let grants = plan
            .spec
            .nodes
            .iter()
            .filter(|node| !node.models.is_empty())
            .map(|node| {
                (
                    node.name.clone(),
                    Arc::new(self.resolve_grants(&node.models)),
                )
            })
            .collect();
        Arc::new(GraphRunner {
            scope: Arc::clone(self),
            grants,
        })
    }

    fn resolve_grants(&self, names: &[String]) -> Grants {
        names
            .iter()
            .filter_map(|name| {
                let (_, model) = self.models.resolve(name, None).ok()?;
                Some((name.clone(), model))
            })
            .collect()
    }

    fn limits(&self, context: &NodeContext) -> PluginLimits {
        let mut limits = self.defaults;
        if let Some(deadline) = context.deadline {
            limits.deadline = deadline;
        }
        if let Some(memory) = context.memory_bytes {
            limits.memory_bytes = usize::try_from(memory).unwrap_or(usize::MAX);
        }
        limits
    }

    async fn run_model(
        &self,
        request: &RequestContext,
        model: &str,
        version: Option<&str>,
        inputs: Vec<NamedTensor>,
    ) -> Result<Vec<NamedTensor>> {
        let (number, served) = self.models.resolve(model, version)?;
        let context = |error: Error| error.context(format!("model '{model}' version {number}"));
        served
            .metadata()
            .validate_inputs(&inputs)
            .map_err(context)?;
        served.infer(request, inputs).await.map_err(context)
    }

    async fn run_plugin(
        &self,
        request: &RequestContext,
        context: &NodeContext,
        grants: Arc<Grants>,
        call: PluginCall<'_>,
    ) -> Result<PluginReply> {
        let name = match &call {
            PluginCall::Transform { plugin, .. }
            | PluginCall::Combine { plugin, .. }
            | PluginCall::Route { plugin, .. } => *plugin,
        };
        let plugin = self
            .plugins
            .get(name)
            .ok_or_else(|| Error::unavailable(format!("plugin '{name}' is not loaded")))?;
        let notes = self.notes.get(name);
        if let Some(entry) = notes.and_then(|notes| notes.provenance.as_ref()) {
            request.note_plugin(entry);
        }
        let sandbox = SandboxCall {
            request: request.clone(),
            grants,
            params: context.params.clone(),
            limits: self.limits(context),
        };
        let started = Instant::now();
        let reply = plugin.call(sandbox, call).await;
        let elapsed = started.elapsed();
        request.add(Spent::Plugin, elapsed);
        let label = notes
            .and_then(|notes| notes.label.as_deref())
            .unwrap_or(name);
        self.observer.plugin_call(label, elapsed);
        reply
    }
}

/// One graph's runner: the scope's, with the graph's grants resolved.
struct GraphRunner {
    scope: Arc<ScopeRunner>,
    /// Per node name, the models it may call.
    grants: HashMap<String, Arc<Grants>>,
}

impl NodeRunner for GraphRunner {
    fn model<'a>(
        &'a self,
        request: &'a RequestContext,
        model: &'a str,
        version: Option<&'a str>,
        inputs: Vec<NamedTensor>,
    ) -> BoxFuture<'a, Result<Vec<NamedTensor>>> {
        Box::pin(self.scope.run_model(request, model, version, inputs))
    }

    fn plugin<'a>(
        &'a self,
        request: &'a RequestContext,
        context: &'a NodeContext,
        call: PluginCall<'a>,
    ) -> BoxFuture<'a, Result<PluginReply>> {
        let grants = match self.grants.get(&context.node) {
            Some(grants) => Arc::clone(grants),
            // A node this graph did not declare (a plan built elsewhere): resolved now.
            None => Arc::new(self.scope.resolve_grants(&context.models)),
        };
        Box::pin(self.scope.run_plugin(request, context, grants, call))
    }
}

/// Why a graph could not be loaded, with as much of its identity as was read.
#[derive(Debug)]
pub struct GraphFailure {
    pub name: Option<String>,
    pub version: Option<u64>,
    pub error: Error,
}

/// A served graph built from its text: parsed, its nodes checked ready, validated against the
/// catalog, and run by `runner` with the plugin grants resolved for it. The repository's files
/// and a tenant's stored graphs both load through here.
pub fn load_graph(
    file: &Path,
    text: &str,
    catalog: &ScopeCatalog<'_>,
    runner: &Arc<ScopeRunner>,
    observer: Option<Arc<dyn GraphObserver>>,
) -> std::result::Result<(String, u64, Arc<dyn Model>), GraphFailure> {
    let spec = GraphSpec::parse(file, text).map_err(|error| GraphFailure {
        name: None,
        version: None,
        error,
    })?;
    let (name, version) = (spec.name.clone(), spec.version);
    let fail = |error: Error| GraphFailure {
        name: Some(name.clone()),
        version: Some(version),
        error,
    };
    check_nodes_ready(&spec, catalog).map_err(fail)?;
    let plan = validate(file, text, spec, catalog).map_err(fail)?;
    let graph_runner = runner.for_graph(&plan);
    let mut graph = GraphModel::new(plan, graph_runner);
    if let Some(observer) = observer {
        graph = graph.with_observer(observer);
    }
    Ok((name, version, Arc::new(graph)))
}

/// Loads every `<repository>/graphs/*.toml` through [`load_graph`] and serves it in `served`
/// under its name and version. A graph that cannot serve (bad file, unknown or unavailable
/// model or plugin) is served as UNAVAILABLE with the reason, so the registry's failures list
/// it. Returns what could not be served at all (a name clash), for `--strict`.
pub fn load_repository_graphs(
    repository: &Path,
    catalog: &ScopeCatalog<'_>,
    runner: &Arc<ScopeRunner>,
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
        let loaded = std::fs::read_to_string(&file)
            .map_err(|error| GraphFailure {
                name: None,
                version: None,
                error: Error::invalid(format!("{}: cannot read: {error}", file.display())),
            })
            .and_then(|text| load_graph(&file, &text, catalog, runner, observer.clone()));
        let (name, version, state) = match loaded {
            Ok((name, version, model)) => {
                tracing::info!(graph = %name, version, "graph ready");
                (name, Some(version), ModelState::Ready(model))
            }
            Err(failure) => {
                let name = failure.name.unwrap_or(stem);
                tracing::error!(graph = %name, error = %failure.error, "graph unavailable");
                let reason = failure.error.to_string();
                (name, failure.version, ModelState::Unavailable(reason))
            }
        };
        if let Err(error) = served.add_graph(&name, version, state) {
            tracing::error!(graph = %name, %error, "graph not served");
            failures.push(format!("{}: {error}", file.display()));
        }
    }
    Ok(failures)
}
