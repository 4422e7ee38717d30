//! Wires the engine's repository to the backends: `model.toml` settings become backend options.
//!
//! Kept in the server so that neither the engine nor the backends depend on each other.

use std::path::Path;
use std::sync::Arc;

use weft_backends::{GraphOptimization, OnnxModel, OnnxOptions};
use weft_core::{Model, Result};
use weft_engine::config::{OptimizationLevel, Platform};
use weft_engine::{ModelConfig, ModelLoader};

/// Loads repository models with the backend their `platform` names.
#[derive(Clone, Debug)]
pub struct RepositoryLoader {
    /// CPU cores that model instances share when `model.toml` leaves threads unset.
    pub cores: usize,
}

impl Default for RepositoryLoader {
    fn default() -> Self {
        RepositoryLoader {
            cores: std::thread::available_parallelism()
                .map(usize::from)
                .unwrap_or(1),
        }
    }
}

impl ModelLoader for RepositoryLoader {
    fn load(&self, _: &str, _: u64, path: &Path, config: &ModelConfig) -> Result<Arc<dyn Model>> {
        match config.platform {
            Platform::Onnx => {
                let (instance_count, intra_op_threads) = config.ort.resolved_threads(self.cores);
                let options = OnnxOptions {
                    instance_count,
                    intra_op_threads,
                    inter_op_threads: config.ort.inter_op_threads,
                    optimization_level: match config.ort.optimization_level {
                        OptimizationLevel::Disable => GraphOptimization::Disable,
                        OptimizationLevel::Basic => GraphOptimization::Basic,
                        OptimizationLevel::Extended => GraphOptimization::Extended,
                        OptimizationLevel::All => GraphOptimization::All,
                    },
                    max_batch_size: config.max_batch_size,
                };
                Ok(Arc::new(OnnxModel::load(path, &options)?))
            }
        }
    }
}
