//! Wires the engine's repository to the backends: `model.toml` settings become backend options,
//! and `[dynamic_batching]` puts the engine's batcher in front of the model.
//!
//! Kept in the server so that neither the engine nor the backends depend on each other.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use weft_backends::{GraphOptimization, OnnxModel, OnnxOptions};
use weft_core::{Model, Result};

use crate::metrics::Metrics;
use weft_engine::config::{OptimizationLevel, Platform};
use weft_engine::{BatchedModel, BatchingConfig, ModelConfig, ModelLoader};

/// Loads repository models with the backend their `platform` names.
#[derive(Clone)]
pub struct RepositoryLoader {
    /// CPU cores that model instances share when `model.toml` leaves threads unset.
    pub cores: usize,
    /// Where loaded models report compute time, batches and queues; none in dry runs.
    pub metrics: Option<Arc<Metrics>>,
}

impl Default for RepositoryLoader {
    fn default() -> Self {
        RepositoryLoader {
            cores: std::thread::available_parallelism()
                .map(usize::from)
                .unwrap_or(1),
            metrics: None,
        }
    }
}

impl ModelLoader for RepositoryLoader {
    fn load(
        &self,
        name: &str,
        _: u64,
        path: &Path,
        config: &ModelConfig,
    ) -> Result<Arc<dyn Model>> {
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
                let model: Arc<dyn Model> = Arc::new(OnnxModel::load(path, &options)?);
                Ok(match &config.dynamic_batching {
                    None => match &self.metrics {
                        Some(metrics) => metrics.metered(name, model),
                        None => model,
                    },
                    Some(batching) => {
                        let batched = BatchedModel::new(
                            model,
                            BatchingConfig {
                                max_batch_size: config.max_batch_size,
                                preferred_batch_sizes: batching.preferred_batch_size.clone(),
                                max_queue_delay: Duration::from_micros(
                                    batching.max_queue_delay_microseconds,
                                ),
                                max_queue_size: batching.max_queue_size,
                                queue_timeout: (batching.default_timeout_microseconds > 0).then(
                                    || Duration::from_micros(batching.default_timeout_microseconds),
                                ),
                                instances: instance_count,
                            },
                        );
                        Arc::new(match &self.metrics {
                            Some(metrics) => batched.with_observer(metrics.batch_observer(name)),
                            None => batched,
                        })
                    }
                })
            }
        }
    }
}
