//! The plugin sandbox as the tenancy layer sees it — [`WasmPlugin`] and [`WasmCompiler`] wrap
//! `weft-runtime` in `weft-tenancy`'s [`SandboxPlugin`] and [`PluginCompiler`] — plus loading
//! the repository's `<repo>/plugins/*.wasm` and `weft graph check`. Graph loading itself lives
//! in `weft_tenancy::graphs`, one loader for repository and tenant graphs.

use std::any::Any;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use weft_core::{BoxFuture, Error, Result};
use weft_engine::graph::{
    Catalog, GraphSpec, NodeLimits, PluginCall, PluginReply, PluginRole, validate,
};
use weft_runtime::{CallContext, Plugin, PluginRuntime, Role};
use weft_tenancy::backends::{PluginCompiler, PluginLimits, SandboxCall, SandboxPlugin};
use weft_tenancy::graphs::PluginSet;
use weft_tenancy::lazy_plugins::LazyPlugin;

/// A compiled wasm component behind the tenancy layer's plugin seam.
pub struct WasmPlugin(pub Plugin);

impl WasmPlugin {
    /// The runtime plugin behind a sandbox plugin: itself, or what a tenant plugin compiled
    /// on demand holds now (`None` while it is not loaded).
    pub fn of(plugin: &dyn SandboxPlugin) -> Option<Plugin> {
        let any = plugin.as_any();
        if let Some(wasm) = any.downcast_ref::<WasmPlugin>() {
            return Some(wasm.0.clone());
        }
        let resident = any.downcast_ref::<LazyPlugin>()?.resident()?;
        resident
            .as_any()
            .downcast_ref::<WasmPlugin>()
            .map(|wasm| wasm.0.clone())
    }
}

impl SandboxPlugin for WasmPlugin {
    fn name(&self) -> &str {
        self.0.name()
    }

    fn role(&self) -> PluginRole {
        match self.0.role() {
            Role::Transformer => PluginRole::Transformer,
            Role::Combiner => PluginRole::Combiner,
            Role::Router => PluginRole::Router,
        }
    }

    fn call<'a>(
        &'a self,
        call: SandboxCall,
        plugin_call: PluginCall<'a>,
    ) -> BoxFuture<'a, Result<PluginReply>> {
        Box::pin(async move {
            let mut limits = self.0.runtime().config().limits.clone();
            limits.deadline = call.limits.deadline;
            limits.memory_bytes = call.limits.memory_bytes;
            let context = CallContext {
                grants: call.grants,
                params: call.params,
                limits: Some(limits),
                assets: None,
                request: call.request,
            };
            let reply = match plugin_call {
                PluginCall::Transform { inputs, .. } => self
                    .0
                    .transform(&context, inputs)
                    .await
                    .map(PluginReply::Tensors),
                PluginCall::Combine { branches, .. } => self
                    .0
                    .combine(&context, branches)
                    .await
                    .map(PluginReply::Tensors),
                PluginCall::Route { inputs, .. } => {
                    self.0.route(&context, inputs).await.map(PluginReply::Route)
                }
            };
            reply.map_err(|failure| failure.error)
        })
    }

    fn as_any(&self) -> &dyn Any {
        self
    }

    fn compiled_bytes(&self) -> u64 {
        self.0.compiled_bytes()
    }
}

/// The plugin runtime behind the tenancy layer's compiler seam.
pub struct WasmCompiler(pub PluginRuntime);

impl PluginCompiler for WasmCompiler {
    fn compile(&self, name: &str, bytes: &[u8]) -> Result<Arc<dyn SandboxPlugin>> {
        Ok(Arc::new(WasmPlugin(self.0.load(name, bytes)?)))
    }

    fn defaults(&self) -> PluginLimits {
        let limits = &self.0.config().limits;
        PluginLimits {
            deadline: limits.deadline,
            memory_bytes: limits.memory_bytes,
        }
    }

    fn ceiling(&self) -> NodeLimits {
        runtime_node_limits(&self.0)
    }
}

/// Loads every `<repo>/plugins/<name>.wasm`; a plugin that fails to load maps to its error.
pub fn load_plugins(repository: &Path, runtime: &PluginRuntime) -> Result<PluginSet> {
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
            .and_then(|bytes| runtime.load(&name, &bytes))
            .map(|plugin| Arc::new(WasmPlugin(plugin)) as Arc<dyn SandboxPlugin>);
        if let Err(error) = &plugin {
            tracing::error!(plugin = %name, %error, "plugin unavailable");
        }
        plugins.insert(name, plugin);
    }
    Ok(plugins)
}

/// The per-node ceilings a plugin runtime allows.
pub fn runtime_node_limits(runtime: &PluginRuntime) -> NodeLimits {
    let config = runtime.config();
    NodeLimits {
        deadline_ms: u64::try_from(config.limits.deadline.as_millis()).unwrap_or(u64::MAX),
        memory_mb: (config.max_memory_bytes >> 20) as u64,
    }
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
