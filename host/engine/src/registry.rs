//! The registry: every model name and version the server knows, each either ready to serve or
//! unavailable with the reason, and the one place names and versions are resolved.
//!
//! Loading goes through [`ModelLoader`], which the server implements over the backends, so the
//! rules here (version policy, declared-vs-actual checks, 404 vs 503) are tested with fakes.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use weft_core::{Error, Model, ModelMetadata, Result};

use crate::config::{DeclaredTensor, ModelConfig};
use crate::repository::{DiscoveredModel, discover};

/// Turns a model file and its configuration into a servable model. Implemented by the server
/// over the backends; may block (it runs before serving starts or on a blocking thread).
pub trait ModelLoader: Send + Sync {
    fn load(
        &self,
        name: &str,
        version: u64,
        path: &Path,
        config: &ModelConfig,
    ) -> Result<Arc<dyn Model>>;
}

/// Whether a version can serve.
#[derive(Clone)]
pub enum ModelState {
    Ready(Arc<dyn Model>),
    Unavailable(String),
}

impl std::fmt::Debug for ModelState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ModelState::Ready(model) => write!(f, "Ready({})", model.metadata().platform),
            ModelState::Unavailable(reason) => write!(f, "Unavailable({reason})"),
        }
    }
}

/// One version of a model, as reported by the repository index.
#[derive(Clone, Debug)]
pub struct ModelVersion {
    pub name: String,
    /// `None` when the model's configuration itself failed, so no version is known.
    pub version: Option<u64>,
    pub state: ModelState,
}

#[derive(Clone, Debug, Default)]
struct ModelEntry {
    versions: BTreeMap<u64, ModelState>,
    /// Why the whole model is unavailable (its `model.toml` is broken, or it has no versions).
    failure: Option<String>,
    /// A graph, added with [`ModelRegistry::add_graph`], rather than a repository model.
    graph: bool,
    /// A rollout serving the name's unversioned calls, with the version it reports
    /// ([`ModelRegistry::set_route`]); versioned calls still reach their exact version.
    route: Option<(u64, ModelState)>,
}

/// Every model of the repository, keyed by name.
#[derive(Clone, Debug, Default)]
pub struct ModelRegistry {
    models: BTreeMap<String, ModelEntry>,
}

impl ModelRegistry {
    /// Scans `repository` and loads every selected version. A broken model becomes an
    /// unavailable entry with its reason; only an unreadable repository is an error.
    pub fn load(repository: &Path, loader: &dyn ModelLoader) -> Result<Self> {
        let mut registry = ModelRegistry::default();
        for discovered in discover(repository)? {
            let name = discovered.name.clone();
            registry.models.insert(name, load_model(discovered, loader));
        }
        Ok(registry)
    }

    /// Loads one version with `loader` and checks the tensors its configuration declares.
    pub fn load_version(
        loader: &dyn ModelLoader,
        name: &str,
        version: u64,
        path: &Path,
        config: &ModelConfig,
    ) -> Result<Arc<dyn Model>> {
        let model = loader.load(name, version, path, config)?;
        check_declared(config, model.metadata())?;
        Ok(model)
    }

    /// Every version with its state, ordered by name then version, for the repository index.
    pub fn index(&self) -> Vec<ModelVersion> {
        let mut index = Vec::new();
        for (name, entry) in &self.models {
            if let Some(reason) = &entry.failure {
                index.push(ModelVersion {
                    name: name.clone(),
                    version: None,
                    state: ModelState::Unavailable(reason.clone()),
                });
            }
            for (version, state) in &entry.versions {
                index.push(ModelVersion {
                    name: name.clone(),
                    version: Some(*version),
                    state: state.clone(),
                });
            }
            if let (Some((version, state)), true) = (&entry.route, entry.versions.is_empty()) {
                index.push(ModelVersion {
                    name: name.clone(),
                    version: Some(*version),
                    state: state.clone(),
                });
            }
        }
        index
    }

    /// The reasons of every load failure, for `--strict`.
    pub fn failures(&self) -> Vec<String> {
        self.index()
            .into_iter()
            .filter_map(|entry| match entry.state {
                ModelState::Ready(_) => None,
                ModelState::Unavailable(reason) => Some(match entry.version {
                    Some(version) => format!("model '{}' version {version}: {reason}", entry.name),
                    None => format!("model '{}': {reason}", entry.name),
                }),
            })
            .collect()
    }

    /// Resolves a model for serving: unknown name or version is `NotFound`; a known one that
    /// failed to load is `Unavailable` with the reason. Without a version, the highest ready
    /// version serves. Returns the version number with the model.
    pub fn resolve(&self, name: &str, version: Option<&str>) -> Result<(u64, Arc<dyn Model>)> {
        let entry = self.models.get(name).ok_or_else(|| unknown_model(name))?;
        let what = if entry.graph { "graph" } else { "model" };
        let Some(version) = version else {
            match &entry.route {
                Some((version, ModelState::Ready(model))) => {
                    return Ok((*version, Arc::clone(model)));
                }
                Some((_, ModelState::Unavailable(reason))) => {
                    return Err(Error::unavailable(format!(
                        "'{name}' is served by a rollout that is not ready: {reason}"
                    )));
                }
                None => {}
            }
            let ready = entry
                .versions
                .iter()
                .rev()
                .find_map(|(v, state)| match state {
                    ModelState::Ready(model) => Some((*v, Arc::clone(model))),
                    ModelState::Unavailable(_) => None,
                });
            return ready.ok_or_else(|| {
                Error::unavailable(format!(
                    "{what} '{name}' is not ready: {}",
                    entry.unavailable_reasons()
                ))
            });
        };
        let number = version
            .parse::<u64>()
            .ok()
            .filter(|number| entry.versions.contains_key(number))
            .ok_or_else(|| unknown_version(name, version))?;
        match entry.versions.get(&number) {
            Some(ModelState::Ready(model)) => Ok((number, Arc::clone(model))),
            Some(ModelState::Unavailable(reason)) => Err(Error::unavailable(format!(
                "{what} '{name}' version {number} is not ready: {reason}"
            ))),
            None => Err(unknown_version(name, version)),
        }
    }

    /// Serves a graph version under `name`, next to the models. `version: None` records a graph
    /// file that failed before its version was known. Refused when a repository model already
    /// has the name, or the graph already has that version.
    pub fn add_graph(&mut self, name: &str, version: Option<u64>, state: ModelState) -> Result<()> {
        let entry = self
            .models
            .entry(name.to_string())
            .or_insert_with(|| ModelEntry {
                graph: true,
                ..ModelEntry::default()
            });
        if !entry.graph {
            return Err(Error::invalid(format!(
                "graph '{name}' has the name of a repository model; graphs and models share one namespace"
            )));
        }
        match (version, state) {
            (None, ModelState::Unavailable(reason)) => {
                entry.failure = Some(reason);
                Ok(())
            }
            (None, ModelState::Ready(_)) => Err(Error::internal(format!(
                "graph '{name}' is ready but has no version"
            ))),
            (Some(version), _) if entry.versions.contains_key(&version) => Err(Error::invalid(
                format!("graph '{name}' version {version} is defined twice"),
            )),
            (Some(version), state) => {
                entry.versions.insert(version, state);
                Ok(())
            }
        }
    }

    /// Serves a tenant's model version under `name`. Refused when a graph has the name or the
    /// version is already there.
    pub fn add_model_version(&mut self, name: &str, version: u64, state: ModelState) -> Result<()> {
        let entry = self.models.entry(name.to_string()).or_default();
        if entry.graph {
            return Err(Error::invalid(format!(
                "model '{name}' has the name of a graph; graphs and models share one namespace"
            )));
        }
        if entry.versions.contains_key(&version) {
            return Err(Error::invalid(format!(
                "model '{name}' version {version} is defined twice"
            )));
        }
        entry.versions.insert(version, state);
        Ok(())
    }

    /// Makes `name` of `other` (every version, model or graph) visible here too, unless this
    /// registry already has the name. Returns whether it was added.
    pub fn share_from(&mut self, other: &ModelRegistry, name: &str) -> bool {
        match (self.models.contains_key(name), other.models.get(name)) {
            (false, Some(entry)) => {
                self.models.insert(name.to_string(), entry.clone());
                true
            }
            _ => false,
        }
    }

    /// Sends the unversioned calls of `name` to a rollout (`state`), reporting `version`;
    /// calls that name a version still reach it. A name nothing else serves is created.
    pub fn set_route(&mut self, name: &str, version: u64, state: ModelState) {
        let entry = self.models.entry(name.to_string()).or_default();
        entry.route = Some((version, state));
    }

    /// Every model and graph name, ascending.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.models.keys().map(String::as_str)
    }

    /// Whether `name` is a graph rather than a model.
    pub fn is_graph(&self, name: &str) -> bool {
        self.models.get(name).is_some_and(|entry| entry.graph)
    }

    /// The versions of a model, ascending; `None` if the name is unknown.
    pub fn versions(&self, name: &str) -> Option<Vec<u64>> {
        self.models
            .get(name)
            .map(|entry| entry.versions.keys().copied().collect())
    }
}

/// The answer for a model or graph name the caller cannot see (missing, or another
/// tenant's: the same text), in Triton's words: its clients look for the prefix
/// `Request for unknown model`.
pub fn unknown_model(name: &str) -> Error {
    Error::not_found(format!("Request for unknown model: '{name}' is not found"))
}

/// The answer for a version the name does not have, in Triton's words.
pub fn unknown_version(name: &str, version: &str) -> Error {
    Error::not_found(format!(
        "Request for unknown model: '{name}' version {version} is not found"
    ))
}

impl ModelEntry {
    fn unavailable_reasons(&self) -> String {
        if let Some(reason) = &self.failure {
            return reason.clone();
        }
        let reasons: Vec<String> = self
            .versions
            .iter()
            .filter_map(|(version, state)| match state {
                ModelState::Unavailable(reason) => Some(format!("version {version}: {reason}")),
                ModelState::Ready(_) => None,
            })
            .collect();
        reasons.join("; ")
    }
}

fn load_model(discovered: DiscoveredModel, loader: &dyn ModelLoader) -> ModelEntry {
    let name = discovered.name;
    let config = match discovered.config {
        Ok(config) => config,
        Err(error) => {
            tracing::error!(model = %name, %error, "model configuration is invalid");
            return ModelEntry {
                versions: BTreeMap::new(),
                failure: Some(error.to_string()),
                graph: false,
                route: None,
            };
        }
    };
    if discovered.versions.is_empty() {
        let reason = format!(
            "no version folder (e.g. {}/1/model.onnx) matches the version policy",
            discovered.dir.display()
        );
        tracing::error!(model = %name, %reason, "model has no versions");
        return ModelEntry {
            versions: BTreeMap::new(),
            failure: Some(reason),
            graph: false,
            route: None,
        };
    }
    let mut versions = BTreeMap::new();
    for (version, path) in discovered.versions {
        let state = if !path.is_file() {
            ModelState::Unavailable(format!("{} does not exist", path.display()))
        } else {
            match ModelRegistry::load_version(loader, &name, version, &path, &config) {
                Ok(model) => ModelState::Ready(model),
                Err(error) => ModelState::Unavailable(error.to_string()),
            }
        };
        match &state {
            ModelState::Ready(_) => tracing::info!(model = %name, version, "model ready"),
            ModelState::Unavailable(reason) => {
                tracing::error!(model = %name, version, %reason, "model unavailable")
            }
        }
        versions.insert(version, state);
    }
    ModelEntry {
        versions,
        failure: None,
        graph: false,
        route: None,
    }
}

/// Checks the inputs and outputs declared in `model.toml` against what the model reports.
pub fn check_declared(config: &ModelConfig, metadata: &ModelMetadata) -> Result<()> {
    let sides = [
        ("input", &config.inputs, &metadata.inputs),
        ("output", &config.outputs, &metadata.outputs),
    ];
    for (side, declared, actual) in sides {
        for want in declared {
            let Some(have) = actual.iter().find(|spec| spec.name == want.name) else {
                let names: Vec<&str> = actual.iter().map(|s| s.name.as_str()).collect();
                return Err(Error::invalid(format!(
                    "model.toml declares {side} '{}' but the model's {side}s are {names:?}",
                    want.name
                )));
            };
            let expected = declared_shape(config.max_batch_size, want);
            let shape_fits = expected.len() == have.shape.len()
                && expected
                    .iter()
                    .zip(&have.shape)
                    .all(|(&e, &h)| e == h || h < 0);
            if want.datatype != have.datatype || !shape_fits {
                return Err(Error::invalid(format!(
                    "model.toml declares {side} '{}' as {} {expected:?} but the model has {} {:?}",
                    want.name, want.datatype, have.datatype, have.shape
                )));
            }
        }
    }
    Ok(())
}

/// The full shape a declaration means: batching models get a variable dimension 0 in front.
fn declared_shape(max_batch_size: usize, declared: &DeclaredTensor) -> Vec<i64> {
    if max_batch_size > 0 {
        std::iter::once(-1)
            .chain(declared.dims.iter().copied())
            .collect()
    } else {
        declared.dims.clone()
    }
}

#[cfg(test)]
mod tests {
    use std::fs;
    use std::sync::Mutex;

    use weft_core::{BoxFuture, DataType, NamedTensor, TensorSpec};

    use super::*;

    struct FakeModel(ModelMetadata);

    impl Model for FakeModel {
        fn metadata(&self) -> &ModelMetadata {
            &self.0
        }
        fn infer<'a>(
            &'a self,
            _: &'a weft_core::RequestContext,
            inputs: Vec<NamedTensor>,
        ) -> BoxFuture<'a, Result<Vec<NamedTensor>>> {
            Box::pin(async move { Ok(inputs) })
        }
    }

    /// Loads any file whose content is "ok"; anything else fails with its content as reason.
    #[derive(Default)]
    struct FakeLoader {
        loaded: Mutex<Vec<(String, u64)>>,
    }

    impl ModelLoader for FakeLoader {
        fn load(
            &self,
            name: &str,
            version: u64,
            path: &Path,
            _: &ModelConfig,
        ) -> Result<Arc<dyn Model>> {
            self.loaded
                .lock()
                .unwrap()
                .push((name.to_string(), version));
            let text = fs::read_to_string(path).unwrap();
            if text != "ok" {
                return Err(Error::invalid(text));
            }
            Ok(Arc::new(FakeModel(ModelMetadata {
                platform: "fake".into(),
                inputs: vec![TensorSpec {
                    name: "x".into(),
                    datatype: DataType::Fp32,
                    shape: vec![-1, 4],
                }],
                outputs: vec![],
                max_batch_size: 0,
            })))
        }
    }

    fn repo(files: &[(&str, &str)]) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        for (path, text) in files {
            let path = dir.path().join(path);
            fs::create_dir_all(path.parent().unwrap()).unwrap();
            fs::write(path, text).unwrap();
        }
        dir
    }

    const ONNX: &str = "platform = \"onnx\"\nversion_policy = \"all\"\n";

    #[test]
    fn broken_version_is_unavailable_while_others_serve() {
        let dir = repo(&[
            ("models/m/model.toml", ONNX),
            ("models/m/1/model.onnx", "ok"),
            ("models/m/2/model.onnx", "corrupt protobuf"),
        ]);
        let registry = ModelRegistry::load(dir.path(), &FakeLoader::default()).unwrap();
        assert_eq!(registry.resolve("m", None).unwrap().0, 1);
        assert_eq!(registry.resolve("m", Some("1")).unwrap().0, 1);
        let error = registry.resolve("m", Some("2")).err().unwrap();
        assert_eq!(error.kind(), weft_core::ErrorKind::Unavailable);
        assert_eq!(
            error.to_string(),
            "model 'm' version 2 is not ready: corrupt protobuf"
        );
        assert_eq!(
            registry.failures(),
            vec!["model 'm' version 2: corrupt protobuf"]
        );
    }

    #[test]
    fn graphs_share_the_namespace_and_keep_their_versions() {
        let dir = repo(&[
            ("models/m/model.toml", ONNX),
            ("models/m/1/model.onnx", "ok"),
        ]);
        let mut registry = ModelRegistry::load(dir.path(), &FakeLoader::default()).unwrap();
        let (_, model) = registry.resolve("m", None).unwrap();
        let clash = registry.add_graph("m", Some(1), ModelState::Ready(Arc::clone(&model)));
        assert!(
            clash
                .unwrap_err()
                .to_string()
                .contains("has the name of a repository model")
        );
        registry
            .add_graph("g", Some(1), ModelState::Ready(Arc::clone(&model)))
            .unwrap();
        registry
            .add_graph(
                "g",
                Some(2),
                ModelState::Unavailable("node 'n': broken".into()),
            )
            .unwrap();
        let twice = registry.add_graph("g", Some(1), ModelState::Ready(Arc::clone(&model)));
        assert!(twice.unwrap_err().to_string().contains("defined twice"));
        assert_eq!(registry.versions("g"), Some(vec![1, 2]));
        // The latest ready version serves; the broken one says why, naming a graph.
        assert_eq!(registry.resolve("g", None).unwrap().0, 1);
        let error = registry.resolve("g", Some("2")).err().unwrap();
        assert_eq!(
            error.to_string(),
            "graph 'g' version 2 is not ready: node 'n': broken"
        );
        registry
            .add_graph("lost", None, ModelState::Unavailable("bad TOML".into()))
            .unwrap();
        assert_eq!(
            registry.resolve("lost", None).err().unwrap().to_string(),
            "graph 'lost' is not ready: bad TOML"
        );
    }

    #[test]
    fn unknown_names_and_versions_are_not_found() {
        let dir = repo(&[
            ("models/m/model.toml", ONNX),
            ("models/m/1/model.onnx", "ok"),
        ]);
        let registry = ModelRegistry::load(dir.path(), &FakeLoader::default()).unwrap();
        for (name, version) in [("nope", None), ("m", Some("7")), ("m", Some("one"))] {
            let error = registry.resolve(name, version).err().unwrap();
            assert_eq!(
                error.kind(),
                weft_core::ErrorKind::NotFound,
                "{name} {version:?}"
            );
        }
    }

    #[test]
    fn broken_config_is_reported_and_nothing_is_loaded() {
        let dir = repo(&[
            ("models/m/model.toml", "platform = 3"),
            ("models/m/1/model.onnx", "ok"),
        ]);
        let loader = FakeLoader::default();
        let registry = ModelRegistry::load(dir.path(), &loader).unwrap();
        assert!(loader.loaded.lock().unwrap().is_empty());
        let error = registry.resolve("m", None).err().unwrap();
        assert_eq!(error.kind(), weft_core::ErrorKind::Unavailable);
        assert!(error.to_string().contains("model.toml"), "{error}");
        assert_eq!(registry.index()[0].version, None);
    }

    #[test]
    fn declared_inputs_are_checked_against_the_model() {
        let dir = repo(&[
            (
                "models/m/model.toml",
                "platform = \"onnx\"\nmax_batch_size = 8\n[[input]]\nname = \"x\"\ndatatype = \"FP32\"\ndims = [5]\n",
            ),
            ("models/m/1/model.onnx", "ok"),
            (
                "models/n/model.toml",
                "platform = \"onnx\"\nmax_batch_size = 8\n[[input]]\nname = \"x\"\ndatatype = \"FP32\"\ndims = [4]\n",
            ),
            ("models/n/1/model.onnx", "ok"),
        ]);
        let registry = ModelRegistry::load(dir.path(), &FakeLoader::default()).unwrap();
        let error = registry.resolve("m", Some("1")).err().unwrap().to_string();
        assert!(
            error.contains("declares input 'x' as FP32 [-1, 5] but the model has FP32 [-1, 4]"),
            "{error}"
        );
        assert!(registry.resolve("n", None).is_ok());
    }

    #[test]
    fn missing_model_file_is_unavailable() {
        let dir = repo(&[("models/m/model.toml", ONNX), ("models/m/3/notes.txt", "")]);
        let registry = ModelRegistry::load(dir.path(), &FakeLoader::default()).unwrap();
        let error = registry.resolve("m", Some("3")).err().unwrap().to_string();
        assert!(error.contains("model.onnx does not exist"), "{error}");
    }
}
