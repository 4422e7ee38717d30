//! Graphs and plugins of a repository: loading `<repo>/plugins/*.wasm` into the plugin runtime,
//! the [`Catalog`] that graph validation looks models and plugins up in, and `weft graph check`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use weft_core::{Error, ModelMetadata, Result};
use weft_engine::ModelRegistry;
use weft_engine::graph::{Catalog, GraphSpec, PluginRole, validate};
use weft_runtime::{Plugin, PluginRuntime, Role};

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
