//! Scans a model repository directory laid out as Triton does it, in TOML:
//! `<repo>/models/<name>/model.toml` and `<repo>/models/<name>/<version>/model.onnx`.
//!
//! Scanning never fails because one model is broken: each model carries its own configuration
//! result, so the registry can report it unavailable with the reason and serve the rest.

use std::fs;
use std::path::{Path, PathBuf};

use weft_core::{Error, Result};

use crate::config::ModelConfig;

/// File name of a model's weights inside a version folder.
pub const MODEL_FILE: &str = "model.onnx";
/// File name of a model's configuration.
pub const CONFIG_FILE: &str = "model.toml";

/// One model directory found in the repository.
#[derive(Debug)]
pub struct DiscoveredModel {
    pub name: String,
    pub dir: PathBuf,
    /// The parsed `model.toml`, or why it could not be read.
    pub config: Result<ModelConfig>,
    /// Version folders chosen by the version policy, ascending, with the model file each should
    /// hold (which may be missing: the loader reports that).
    pub versions: Vec<(u64, PathBuf)>,
}

/// Lists `<repo>/models/*`. Fails only if the repository itself cannot be read.
pub fn discover(repository: &Path) -> Result<Vec<DiscoveredModel>> {
    let models_dir = repository.join("models");
    if !repository.is_dir() {
        return Err(Error::invalid(format!(
            "model repository {} is not a directory",
            repository.display()
        )));
    }
    if !models_dir.exists() {
        return Ok(Vec::new());
    }
    let mut models = Vec::new();
    for dir in sorted_subdirs(&models_dir)? {
        let Some(name) = dir.file_name().and_then(|n| n.to_str()).map(str::to_owned) else {
            continue;
        };
        models.push(discover_model(name, dir));
    }
    Ok(models)
}

fn discover_model(name: String, dir: PathBuf) -> DiscoveredModel {
    let config_path = dir.join(CONFIG_FILE);
    let config = match fs::read_to_string(&config_path) {
        Ok(text) => ModelConfig::parse(&config_path, &text),
        Err(error) => Err(Error::invalid(format!(
            "{}: cannot read: {error}",
            config_path.display()
        ))),
    };
    let found: Vec<u64> = sorted_subdirs(&dir)
        .unwrap_or_default()
        .iter()
        .filter_map(|sub| sub.file_name()?.to_str()?.parse::<u64>().ok())
        .collect();
    let versions = match &config {
        Ok(config) => config
            .version_policy
            .select(found)
            .into_iter()
            .map(|version| (version, dir.join(version.to_string()).join(MODEL_FILE)))
            .collect(),
        Err(_) => Vec::new(),
    };
    DiscoveredModel {
        name,
        dir,
        config,
        versions,
    }
}

fn sorted_subdirs(dir: &Path) -> Result<Vec<PathBuf>> {
    let entries = fs::read_dir(dir)
        .map_err(|error| Error::invalid(format!("cannot read {}: {error}", dir.display())))?;
    let mut dirs: Vec<PathBuf> = entries
        .filter_map(|entry| entry.ok().map(|entry| entry.path()))
        .filter(|path| path.is_dir())
        .collect();
    dirs.sort();
    Ok(dirs)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn repo_with(files: &[(&str, &str)]) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        for (path, text) in files {
            let path = dir.path().join(path);
            fs::create_dir_all(path.parent().unwrap()).unwrap();
            fs::write(path, text).unwrap();
        }
        dir
    }

    #[test]
    fn finds_models_and_applies_version_policy() {
        let repo = repo_with(&[
            (
                "models/a/model.toml",
                "platform = \"onnx\"\nversion_policy = { latest = 2 }",
            ),
            ("models/a/1/model.onnx", ""),
            ("models/a/2/model.onnx", ""),
            ("models/a/10/model.onnx", ""),
            ("models/a/notes/readme", ""),
            ("models/b/model.toml", "platform = \"tensorflow\""),
        ]);
        let models = discover(repo.path()).unwrap();
        assert_eq!(models.len(), 2);
        assert_eq!(models[0].name, "a");
        let versions: Vec<u64> = models[0].versions.iter().map(|(v, _)| *v).collect();
        assert_eq!(versions, vec![2, 10]);
        let error = models[1].config.as_ref().unwrap_err().to_string();
        assert!(
            error.contains("models/b/model.toml") && error.contains("tensorflow"),
            "{error}"
        );
    }

    #[test]
    fn missing_model_toml_is_a_per_model_error() {
        let repo = repo_with(&[("models/c/1/model.onnx", "")]);
        let models = discover(repo.path()).unwrap();
        let error = models[0].config.as_ref().unwrap_err().to_string();
        assert!(error.contains("model.toml: cannot read"), "{error}");
    }

    #[test]
    fn missing_repository_is_an_error() {
        assert!(discover(Path::new("/definitely/not/here")).is_err());
    }
}
