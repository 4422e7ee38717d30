//! Wires models to the backends: `model.toml` settings become backend options, every ONNX
//! model is checked ([`weft_onnx_check`]) before ONNX Runtime sees its bytes, `isolation`
//! picks the server's process or a sandboxed model worker, and `[dynamic_batching]` puts the
//! engine's batcher in front of the model.
//!
//! Repository models (the operator's) default to `in_process` and may opt out of the
//! external-data check; tenant models always run in the tenant's own worker, under the
//! tenant's model limits. Kept in the server so that neither the engine nor the backends
//! depend on each other.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use weft_backends::worker::{ModelWorker, WeakModelWorker, WorkerConfig, WorkerObserver};
use weft_backends::{GraphOptimization, OnnxModel, OnnxOptions};
use weft_core::{Error, Model, ModelMetadata, Result};
use weft_onnx_check::{ModelLimits, check_model};

use crate::metrics::Metrics;
use weft_engine::config::{OptimizationLevel, Platform};
use weft_engine::{BatchedModel, BatchingConfig, FairShared, Isolation, ModelConfig, ModelLoader};

/// How model workers are started; one [`WorkerPool`] per server.
#[derive(Clone, Debug)]
pub struct WorkerSettings {
    /// The `weft` binary (the server's own executable) and the arguments of its worker mode.
    pub program: PathBuf,
    pub program_args: Vec<String>,
    pub ort_library: PathBuf,
    pub slots: usize,
    pub slot_bytes: usize,
    pub call_timeout: Duration,
    pub load_timeout: Duration,
    pub allow_weak_sandbox: bool,
    pub nice: i32,
}

/// The label of the worker that runs repository models with `isolation = "process"`.
pub const REPOSITORY_WORKER: &str = "repository";

/// The model workers of this server: one per tenant (and one for process-isolated repository
/// models), started on first use and kept while a model loaded in them lives: the pool holds
/// them weakly, so a tenant whose models are all gone has no process left.
pub struct WorkerPool {
    settings: WorkerSettings,
    observer: Option<Arc<dyn WorkerObserver>>,
    workers: Mutex<HashMap<(String, Option<u64>), WeakModelWorker>>,
    /// Trial loads (a throwaway worker each) running at once, server-wide: pushes in parallel
    /// wait for a turn instead of starting a process each.
    trials: Arc<tokio::sync::Semaphore>,
}

impl WorkerPool {
    pub fn new(settings: WorkerSettings, observer: Option<Arc<dyn WorkerObserver>>) -> Self {
        let cores = std::thread::available_parallelism().map_or(1, usize::from);
        WorkerPool {
            settings,
            observer,
            workers: Mutex::default(),
            trials: Arc::new(tokio::sync::Semaphore::new(cores)),
        }
    }

    /// The start-up settings of a worker for `label` with this memory limit.
    pub fn config(&self, label: &str, memory_limit: Option<u64>) -> WorkerConfig {
        let settings = &self.settings;
        WorkerConfig {
            program: settings.program.clone(),
            program_args: settings.program_args.clone(),
            ort_library: settings.ort_library.clone(),
            label: label.to_string(),
            memory_limit,
            allow_weak_sandbox: settings.allow_weak_sandbox,
            nice: settings.nice,
            slots: settings.slots,
            slot_bytes: settings.slot_bytes,
            call_timeout: settings.call_timeout,
            load_timeout: settings.load_timeout,
            restart: true,
            observer: self.observer.clone(),
        }
    }

    /// The worker of `label` with this memory limit, started if there is none. A changed limit
    /// (the tenant's quota was changed) gets a worker of its own for models loaded from then on.
    pub fn worker(&self, label: &str, memory_limit: Option<u64>) -> Result<ModelWorker> {
        let mut workers = self
            .workers
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        workers.retain(|_, worker| worker.upgrade().is_some());
        let key = (label.to_string(), memory_limit);
        if let Some(worker) = workers.get(&key).and_then(WeakModelWorker::upgrade) {
            return Ok(worker);
        }
        let worker = ModelWorker::start(self.config(label, memory_limit))?;
        workers.insert(key, worker.downgrade());
        Ok(worker)
    }
}

/// Runs an async worker operation from the synchronous loading code, which runs on blocking
/// threads (start-up, control-plane changes): on a thread of its own, so it never blocks a
/// thread of the async runtime from inside.
fn block_on<T: Send>(future: impl std::future::Future<Output = Result<T>> + Send) -> Result<T> {
    let runtime = tokio::runtime::Handle::try_current()
        .map_err(|_| Error::internal("model workers need the server's async runtime"))?;
    std::thread::scope(|scope| {
        scope
            .spawn(|| runtime.block_on(future))
            .join()
            .unwrap_or_else(|_| Err(Error::internal("a model load panicked")))
    })
}

/// Loads models with the backend their `platform` names.
#[derive(Clone)]
pub struct RepositoryLoader {
    /// CPU cores that model instances share when `model.toml` leaves threads unset.
    pub cores: usize,
    /// Where loaded models report compute time, batches and queues; none in dry runs.
    pub metrics: Option<Arc<Metrics>>,
    /// Model workers; `None` (offline tools) loads `isolation = "process"` models in process.
    pub workers: Option<Arc<WorkerPool>>,
    /// Limits a tenant's model is checked against (initializer bytes are further capped by the
    /// tenant's `model_memory_mb`).
    pub tenant_limits: ModelLimits,
}

impl Default for RepositoryLoader {
    fn default() -> Self {
        RepositoryLoader {
            cores: std::thread::available_parallelism()
                .map(usize::from)
                .unwrap_or(1),
            metrics: None,
            workers: None,
            tenant_limits: ModelLimits::default(),
        }
    }
}

/// What a tenant's model may cost, from its quotas (its `model_memory_mb` in bytes).
pub type TenantModelBudget = weft_tenancy::backends::ModelBudget;

impl RepositoryLoader {
    /// Session options for `config` on this machine.
    fn onnx_options(&self, config: &ModelConfig) -> OnnxOptions {
        let (instance_count, intra_op_threads) = config.ort.resolved_threads(self.cores);
        OnnxOptions {
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
            // A thread count in model.toml is the operator's choice for this model: it keeps
            // its own pools even when the process shares one (--ort-threads).
            own_threads: config.ort.intra_op_threads != 0,
            execution: match config.ort.cuda_device() {
                None => weft_backends::onnx::Execution::Cpu,
                Some(device) => weft_backends::onnx::Execution::Cuda { device },
            },
        }
    }

    /// Sessions a model version keeps: what its memory counts as (× its size).
    pub fn instances(&self, config: &ModelConfig) -> u64 {
        config.ort.resolved_threads(self.cores).0 as u64
    }

    /// The limits a tenant's model is checked against.
    pub fn tenant_model_limits(&self, budget: TenantModelBudget) -> ModelLimits {
        ModelLimits {
            max_initializer_bytes: self
                .tenant_limits
                .max_initializer_bytes
                .min(budget.worker_memory),
            allow_external_data: false,
            ..self.tenant_limits.clone()
        }
    }

    /// Checks a tenant's model bytes (external data, domains, sizes) against its limits.
    pub fn check_tenant_model(&self, onnx: &Bytes, budget: TenantModelBudget) -> Result<()> {
        check_model(onnx, &self.tenant_model_limits(budget))?;
        Ok(())
    }

    /// Loads one of a tenant's model versions into the tenant's worker, for bytes
    /// [`RepositoryLoader::check_tenant_model`] already accepted (a push checks once, then trial-loads and loads).
    pub fn load_checked_tenant_model(
        &self,
        tenant: &str,
        label: &str,
        onnx: Bytes,
        config: &ModelConfig,
        budget: TenantModelBudget,
    ) -> Result<Arc<dyn Model>> {
        no_gpu_in_workers(config)?;
        let workers = self
            .workers
            .as_ref()
            .ok_or_else(|| Error::unavailable("this server runs no model workers"))?;
        let worker = workers.worker(tenant, Some(budget.worker_memory))?;
        let options = self.onnx_options(config);
        let max_batch_size = config.max_batch_size;
        let model: Arc<dyn Model> = Arc::new(block_on(worker.load(onnx, options, max_batch_size))?);
        weft_engine::check_declared(config, model.metadata())?;
        Ok(self.serve(label, model, config))
    }

    /// Loads a tenant's model (bytes [`RepositoryLoader::check_tenant_model`] accepted) once
    /// in a worker of its own limited to `memory` bytes and discards it: the push-time proof
    /// that it loads within the tenant's budget.
    pub fn trial_load_tenant_model(
        &self,
        tenant: &str,
        onnx: Bytes,
        config: &ModelConfig,
        memory: u64,
    ) -> Result<ModelMetadata> {
        no_gpu_in_workers(config)?;
        let workers = self
            .workers
            .as_ref()
            .ok_or_else(|| Error::unavailable("this server runs no model workers"))?;
        let trial = workers.config(tenant, Some(memory));
        let trials = Arc::clone(&workers.trials);
        let options = self.onnx_options(config);
        let metadata = block_on(async move {
            let _turn = trials
                .acquire_owned()
                .await
                .map_err(|_| Error::unavailable("the server is shutting down"))?;
            weft_backends::worker::trial_load(trial, onnx, options, config.max_batch_size).await
        })?;
        weft_engine::check_declared(config, &metadata)?;
        Ok(metadata)
    }

    /// Puts the batcher (or compute metering) in front of a loaded model.
    fn serve(&self, name: &str, model: Arc<dyn Model>, config: &ModelConfig) -> Arc<dyn Model> {
        let instance_count = self.onnx_options(config).instance_count;
        // A model on a GPU also reports to that device's histograms (it loaded, so the device
        // was found).
        let gpu_uuid = config.ort.cuda_device().and_then(|device| {
            let gpus = weft_backends::onnx::process_gpus();
            weft_gpu::GpuDevices::device(gpus, device)
                .ok()
                .map(|info| info.uuid)
        });
        if let (Some(metrics), Some(uuid), Some(bytes)) =
            (&self.metrics, &gpu_uuid, model.serving().gpu_memory_bytes)
        {
            metrics.model_gpu_memory(name, uuid, bytes);
            tracing::info!(model = name, gpu_uuid = %uuid, bytes, "model loaded on a GPU");
        }
        match &config.dynamic_batching {
            None => {
                let metered = match &self.metrics {
                    Some(metrics) => metrics.metered(name, model, gpu_uuid.as_deref()),
                    None => model,
                };
                Arc::new(FairShared::new(metered, instance_count))
            }
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
                        queue_timeout: (batching.default_timeout_microseconds > 0)
                            .then(|| Duration::from_micros(batching.default_timeout_microseconds)),
                        instances: instance_count,
                    },
                );
                // A model on a GPU gets its merged batches in page-locked memory, so the
                // provider's copy to the device is a DMA.
                let batched = match config.ort.cuda_device() {
                    Some(device) => batched.with_staging(Arc::new(PinnedStaging {
                        gpus: weft_backends::onnx::process_gpus(),
                        device,
                    })),
                    None => batched,
                };
                Arc::new(match &self.metrics {
                    Some(metrics) => {
                        batched.with_observer(metrics.batch_observer(name, gpu_uuid.as_deref()))
                    }
                    None => batched,
                })
            }
        }
    }
}

/// A model worker's sandbox grants no GPU device files and caps the address space below what
/// CUDA reserves, so a GPU model cannot run in one (yet): it is refused with that reason rather
/// than with a CUDA error from inside the sandbox. Tenants' models always run in a worker.
fn no_gpu_in_workers(config: &ModelConfig) -> Result<()> {
    match config.ort.cuda_device() {
        None => Ok(()),
        Some(_) => Err(Error::unavailable(
            "execution = \"cuda\" cannot run in a sandboxed model worker yet (its sandbox grants \
             no GPU device files), and tenants' models always run in one; GPU models are served \
             from the operator's repository, in process",
        )),
    }
}

/// Page-locked host memory from `weft-gpu`'s bounded pool for the merged batches of a model on
/// CUDA device `device`; when the pool is spent (or there is no GPU) the batcher stages in
/// ordinary memory, which is slower to copy to the device but otherwise the same.
struct PinnedStaging {
    gpus: &'static dyn weft_gpu::GpuDevices,
    device: u32,
}

impl weft_engine::Staging for PinnedStaging {
    fn stage(&self, parts: &[&[u8]]) -> Option<Bytes> {
        let total = parts.iter().map(|part| part.len()).sum();
        let mut buffer = self.gpus.pinned(self.device, total)?;
        let mut rest: &mut [u8] = (*buffer).as_mut();
        for part in parts {
            let (head, tail) = std::mem::take(&mut rest).split_at_mut_checked(part.len())?;
            head.copy_from_slice(part);
            rest = tail;
        }
        Some(Bytes::from_owner(PinnedBytes(buffer)))
    }
}

/// A pinned buffer as the bytes of a tensor; back to its pool when the last view is dropped.
struct PinnedBytes(Box<dyn weft_gpu::PinnedBuffer>);

impl AsRef<[u8]> for PinnedBytes {
    fn as_ref(&self) -> &[u8] {
        (*self.0).as_ref()
    }
}

/// Tenant models, as the tenancy layer checks and loads them: in the tenant's model worker.
impl weft_tenancy::backends::ModelBackend for RepositoryLoader {
    fn instances(&self, config: &ModelConfig) -> u64 {
        RepositoryLoader::instances(self, config)
    }

    fn check(&self, onnx: &Bytes, budget: TenantModelBudget) -> Result<()> {
        self.check_tenant_model(onnx, budget)
    }

    fn trial_load(&self, tenant: &str, onnx: Bytes, config: &ModelConfig, left: u64) -> Result<()> {
        self.trial_load_tenant_model(tenant, onnx, config, left)
            .map(drop)
    }

    fn load_checked(
        &self,
        tenant: &str,
        label: &str,
        onnx: Bytes,
        config: &ModelConfig,
        budget: TenantModelBudget,
    ) -> Result<Arc<dyn Model>> {
        self.load_checked_tenant_model(tenant, label, onnx, config, budget)
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
                let bytes = Bytes::from(std::fs::read(path).map_err(|error| {
                    Error::invalid(format!("cannot read {}: {error}", path.display()))
                })?);
                let isolation = config.isolation.unwrap_or(Isolation::InProcess);
                if isolation == Isolation::Process {
                    no_gpu_in_workers(config)?;
                }
                if config.allow_external_data && isolation == Isolation::Process {
                    return Err(Error::invalid(
                        "allow_external_data needs isolation = \"in_process\": a model worker \
                         reads no files",
                    ));
                }
                if !config.allow_external_data {
                    // The operator's models are trusted in all but this: they get the same
                    // external-data check as tenant models unless model.toml opts out.
                    check_model(&bytes, &ModelLimits::operator())?;
                }
                let options = self.onnx_options(config);
                let model: Arc<dyn Model> = match (isolation, &self.workers) {
                    (Isolation::Process, Some(workers)) => {
                        let worker = workers.worker(REPOSITORY_WORKER, None)?;
                        Arc::new(block_on(worker.load(
                            bytes,
                            self.onnx_options(config),
                            config.max_batch_size,
                        ))?)
                    }
                    _ if config.allow_external_data => {
                        Arc::new(OnnxModel::load_with_external_data(path, &options)?)
                    }
                    _ => Arc::new(OnnxModel::from_bytes(&bytes, &options)?),
                };
                Ok(self.serve(name, model, config))
            }
        }
    }
}

#[cfg(test)]
mod pinned_staging_tests {
    use super::*;
    use weft_engine::Staging as _;

    #[test]
    fn parts_are_staged_back_to_back_in_a_pinned_buffer_or_not_at_all() {
        let gpus: &'static weft_gpu::fake::FakeGpus =
            Box::leak(Box::new(weft_gpu::fake::FakeGpus::with_devices(1)));
        let staging = PinnedStaging { gpus, device: 0 };
        let staged = staging.stage(&[b"abc", b"", b"defg"]);
        assert_eq!(staged.as_deref(), Some(&b"abcdefg"[..]));
        assert_eq!(
            gpus.pinned_handed.load(std::sync::atomic::Ordering::SeqCst),
            1
        );
        // A device that does not exist has no pinned memory: the batcher stages as usual.
        let elsewhere = PinnedStaging { gpus, device: 3 };
        assert!(elsewhere.stage(&[b"abc"]).is_none());
        let none: &'static weft_gpu::fake::FakeGpus = Box::leak(Box::new(
            weft_gpu::fake::FakeGpus::absent(weft_gpu::GpuAbsent::NoDriver),
        ));
        assert!(
            PinnedStaging {
                gpus: none,
                device: 0
            }
            .stage(&[b"abc"])
            .is_none()
        );
    }
}
