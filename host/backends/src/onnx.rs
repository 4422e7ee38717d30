//! ONNX Runtime backend (`ort` 2.0.0-rc.10, library loaded at run time).
//!
//! Why it looks the way it does:
//! - `ort::Session::run` takes `&mut self`, so one model version owns a pool of sessions
//!   (Triton's `instance_count`). A semaphore with one permit per session hands a caller a free
//!   session, so concurrent requests run in parallel instead of queueing on one mutex.
//! - Inference runs on tokio's blocking pool, never on the async workers that serve sockets.
//! - Inputs whose bytes are suitably aligned are handed to ORT as views (no copy); outputs are
//!   copied once out of ORT-owned memory into the response bytes.
//! - A missing or too-old library makes `ort` panic on first use; [`init_onnxruntime`] checks it
//!   up front and turns that into an error saying how to get the library.
//! - A model that asks for CUDA ([`Execution::Cuda`]) gets CUDA or an error, never a silent
//!   fallback to the CPU (ONNX Runtime's default when a provider fails to register): the device
//!   is checked through `weft-gpu`, the library is checked for the provider, and the provider
//!   is registered with `error_on_failure`.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::Path;
use std::sync::{Arc, Mutex, TryLockError};

use bytes::Bytes;
use half::{bf16, f16};
use ort::session::builder::GraphOptimizationLevel;
use ort::session::{Session, SessionInputValue};
use ort::tensor::{PrimitiveTensorElementType, TensorElementType};
use ort::value::{DynValue, Tensor as OrtTensor, TensorRef, ValueType};
use tokio::sync::Semaphore;
use weft_core::{
    BoxFuture, DataType, Error, Model, ModelMetadata, NamedTensor, Result, Tensor, TensorSpec,
    bytes_elements, encode_bytes_elements,
};

/// How to get the library, repeated in every error about it.
const HOW_TO_GET_ORT: &str = "get it with `cargo xtask setup` (it unpacks libonnxruntime.so.1.22.1 \
     from the onnxruntime 1.22.1 PyPI wheel into target/onnxruntime/) and pass its path with \
     --ort-library or ORT_DYLIB_PATH";

/// Loads the ONNX Runtime shared library from `path` and checks that it works. Returns its build
/// information. Call once, before any model is loaded.
///
/// `shared_threads` > 0 gives the process one ONNX Runtime intra-op thread pool of that many
/// threads (spinning while work is likely), used by every session that does not ask for its
/// own ([`OnnxOptions::own_threads`]): a lone request then runs on every core, and concurrent
/// ones share the same threads instead of oversubscribing the machine with a pool per
/// session. 0 keeps one pool per session (`intra_op_threads` each).
pub fn init_onnxruntime(path: &Path, shared_threads: usize) -> Result<String> {
    if !path.is_file() {
        return Err(Error::unavailable(format!(
            "ONNX Runtime library not found at {}; {HOW_TO_GET_ORT}",
            path.display()
        )));
    }
    let path_text = path.display().to_string();
    // ort panics (rather than erring) when the library cannot be opened or is too old. Silence
    // the default hook so the user sees one clear message instead of a panic report.
    let previous_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let outcome = catch_unwind(AssertUnwindSafe(|| {
        let builder = ort::init_from(path_text.clone()).with_name("weft");
        let builder = if shared_threads > 0 {
            let pool = ort::environment::GlobalThreadPoolOptions::default()
                .with_intra_threads(shared_threads)
                .and_then(|pool| pool.with_inter_threads(1))
                .and_then(|pool| pool.with_spin_control(true))?;
            builder.with_global_thread_pool(pool)
        } else {
            builder
        };
        builder.commit().map(|_| ort::info().to_string())
    }));
    std::panic::set_hook(previous_hook);
    match outcome {
        Ok(Ok(info)) => Ok(info),
        Ok(Err(error)) => Err(Error::unavailable(format!(
            "ONNX Runtime library at {path_text} failed to initialise: {error}; {HOW_TO_GET_ORT}"
        ))),
        Err(panic) => {
            let reason = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "unknown failure".to_string());
            Err(Error::unavailable(format!(
                "ONNX Runtime library at {path_text} cannot be used (it must be version 1.22 or \
                 newer): {reason}; {HOW_TO_GET_ORT}"
            )))
        }
    }
}

/// How to build one ONNX model version's sessions (the server maps `model.toml` onto this;
/// a model worker receives it as it is).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct OnnxOptions {
    /// Sessions in the pool: how many requests run at once.
    pub instance_count: usize,
    pub intra_op_threads: usize,
    pub inter_op_threads: usize,
    pub optimization_level: GraphOptimization,
    /// 0: the model does not batch; otherwise dim 0 of every input and output must be variable.
    pub max_batch_size: usize,
    /// Each session gets its own `intra_op_threads` pool even when the process has a shared
    /// one (see [`init_onnxruntime`]); set when model.toml names a thread count.
    #[serde(default)]
    pub own_threads: bool,
    /// Where the sessions run.
    #[serde(default)]
    pub execution: Execution,
}

/// Where a model's sessions run (`[ort] execution` and `device` in model.toml).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Execution {
    #[default]
    Cpu,
    /// ONNX Runtime's CUDA execution provider on this CUDA device ordinal.
    Cuda { device: u32 },
}

impl Execution {
    /// The CUDA device, or `None` on the CPU.
    pub fn gpu(self) -> Option<u32> {
        match self {
            Execution::Cpu => None,
            Execution::Cuda { device } => Some(device),
        }
    }
}

/// How to get the GPU build of the library, repeated in errors about it.
const HOW_TO_GET_ORT_GPU: &str = "`cargo xtask setup --gpu` fetches the GPU build \
     (onnxruntime-gpu 1.22 and its CUDA 12 libraries, from PyPI) into target/onnxruntime-gpu/; \
     pass its libonnxruntime.so with --ort-library and put its CUDA libraries on \
     LD_LIBRARY_PATH (the setup prints both)";

/// The CUDA provider for `device`, registered so that a failure is an error, after checking
/// what would make it fail in ways ONNX Runtime reports badly: no driver or device (through
/// `gpus`), and a library built without the provider.
pub fn cuda_provider(
    gpus: &dyn weft_gpu::GpuDevices,
    device: u32,
) -> Result<ort::execution_providers::ExecutionProviderDispatch> {
    use ort::execution_providers::{CUDAExecutionProvider, ExecutionProvider};
    gpus.device(device).map_err(|reason| {
        Error::unavailable(format!("execution = \"cuda\" cannot run here: {reason}"))
    })?;
    let provider = CUDAExecutionProvider::default().with_device_id(device as i32);
    let available = provider.is_available().map_err(|error| {
        Error::unavailable(format!(
            "cannot ask ONNX Runtime for its execution providers: {error}"
        ))
    })?;
    if !available {
        return Err(Error::unavailable(format!(
            "execution = \"cuda\" cannot run here: the ONNX Runtime library has no CUDA \
             execution provider (it is the CPU build); {HOW_TO_GET_ORT_GPU}"
        )));
    }
    Ok(provider.build().error_on_failure())
}

/// This process's CUDA devices (discovered on first use; loading no library until then).
pub fn process_gpus() -> &'static dyn weft_gpu::GpuDevices {
    static GPUS: std::sync::OnceLock<weft_gpu::cuda::CudaDevices> = std::sync::OnceLock::new();
    GPUS.get_or_init(weft_gpu::cuda::CudaDevices::default)
}

/// ONNX Runtime's graph optimization levels.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum GraphOptimization {
    Disable,
    Basic,
    Extended,
    All,
}

impl Default for OnnxOptions {
    fn default() -> Self {
        OnnxOptions {
            instance_count: 1,
            intra_op_threads: 1,
            inter_op_threads: 1,
            optimization_level: GraphOptimization::All,
            max_batch_size: 0,
            own_threads: false,
            execution: Execution::Cpu,
        }
    }
}

/// One loaded ONNX model version: its metadata and a pool of sessions.
pub struct OnnxModel {
    metadata: ModelMetadata,
    sessions: Arc<SessionPool>,
    /// The CUDA device its sessions run on.
    gpu: Option<u32>,
    /// Device memory the sessions took at load.
    gpu_memory_bytes: Option<u64>,
}

struct SessionPool {
    sessions: Vec<Mutex<Session>>,
    free: Semaphore,
}

impl OnnxModel {
    /// Loads the model at `path`, handing ONNX Runtime its bytes (never its path, so a model's
    /// external-data references cannot resolve against the server's files).
    pub fn load(path: &Path, options: &OnnxOptions) -> Result<Self> {
        let bytes = std::fs::read(path)
            .map_err(|error| Error::invalid(format!("cannot read {}: {error}", path.display())))?;
        Self::from_bytes(&bytes, options)
    }

    /// Loads a model from its bytes.
    pub fn from_bytes(bytes: &[u8], options: &OnnxOptions) -> Result<Self> {
        Self::from_source(SessionSource::Bytes(bytes), options)
    }

    /// Loads the model by path so ONNX Runtime resolves its external-data files next to it.
    /// Only for operator repository models whose `model.toml` sets `allow_external_data`.
    pub fn load_with_external_data(path: &Path, options: &OnnxOptions) -> Result<Self> {
        Self::from_source(SessionSource::File(path), options)
    }

    /// Builds the sessions, measuring the device memory they take on a GPU.
    fn from_source(source: SessionSource<'_>, options: &OnnxOptions) -> Result<Self> {
        let ((sessions, metadata), gpu_memory_bytes) =
            device_memory_taken(process_gpus(), options.execution.gpu(), || {
                build_sessions(source, options)
            })?;
        let count = sessions.len();
        Ok(OnnxModel {
            metadata,
            gpu: options.execution.gpu(),
            gpu_memory_bytes,
            sessions: Arc::new(SessionPool {
                sessions: sessions.into_iter().map(Mutex::new).collect(),
                free: Semaphore::new(count),
            }),
        })
    }
}

/// Runs `load` and measures the device memory it took on `device` (free bytes before less
/// after, through `weft-gpu`): what a model's sessions hold on the GPU once loaded. Loads on the
/// same device at the same moment blur it, and the CUDA provider's arena grows further with the
/// first runs, so it is a load-time figure, not a limit.
fn device_memory_taken<T>(
    gpus: &dyn weft_gpu::GpuDevices,
    device: Option<u32>,
    load: impl FnOnce() -> Result<T>,
) -> Result<(T, Option<u64>)> {
    let free = |device: u32| gpus.device(device).ok().map(|info| info.memory_free_bytes);
    let before = device.and_then(free);
    let loaded = load()?;
    let after = device.and_then(free);
    Ok((
        loaded,
        before
            .zip(after)
            .map(|(before, after)| before.saturating_sub(after)),
    ))
}

/// Where ONNX Runtime reads a model from.
pub enum SessionSource<'a> {
    Bytes(&'a [u8]),
    File(&'a Path),
}

/// Builds `options.instance_count` sessions of one model and reads its metadata from the first.
pub fn build_sessions(
    source: SessionSource<'_>,
    options: &OnnxOptions,
) -> Result<(Vec<Session>, ModelMetadata)> {
    let level = || match options.optimization_level {
        GraphOptimization::Disable => GraphOptimizationLevel::Disable,
        GraphOptimization::Basic => GraphOptimizationLevel::Level1,
        GraphOptimization::Extended => GraphOptimizationLevel::Level2,
        GraphOptimization::All => GraphOptimizationLevel::Level3,
    };
    let cuda = match options.execution {
        Execution::Cpu => None,
        Execution::Cuda { device } => Some((device, cuda_provider(process_gpus(), device)?)),
    };
    let mut sessions = Vec::with_capacity(options.instance_count.max(1));
    for _ in 0..options.instance_count.max(1) {
        let builder = Session::builder()
            .and_then(|builder| builder.with_optimization_level(level()))
            .and_then(|builder| builder.with_intra_threads(options.intra_op_threads.max(1)))
            .and_then(|builder| builder.with_inter_threads(options.inter_op_threads.max(1)))
            .and_then(|builder| {
                if options.own_threads {
                    builder.with_independent_thread_pool()
                } else {
                    Ok(builder)
                }
            })
            .map_err(|error| {
                Error::invalid(format!("ONNX Runtime cannot load the model: {error}"))
            });
        let builder = match &cuda {
            None => builder,
            Some((device, provider)) => builder.and_then(|builder| {
                builder
                    .with_execution_providers([provider.clone()])
                    .map_err(|error| {
                        Error::unavailable(format!(
                            "the CUDA execution provider failed to start on device {device} \
                             (no CPU fallback): {error}; check the CUDA 12 and cuDNN 9 \
                             libraries on LD_LIBRARY_PATH ({HOW_TO_GET_ORT_GPU})"
                        ))
                    })
            }),
        };
        let builder = builder?;
        let session = match source {
            SessionSource::Bytes(bytes) => builder.commit_from_memory(bytes),
            SessionSource::File(path) => builder.commit_from_file(path),
        }
        .map_err(|error| Error::invalid(format!("ONNX Runtime cannot load the model: {error}")))?;
        sessions.push(session);
    }
    let first = sessions
        .first()
        .ok_or_else(|| Error::internal("no session was created"))?;
    let metadata = session_metadata(first, options.max_batch_size)?;
    Ok((sessions, metadata))
}

impl Model for OnnxModel {
    fn metadata(&self) -> &ModelMetadata {
        &self.metadata
    }

    fn serving(&self) -> weft_core::ServingConfig {
        weft_core::ServingConfig {
            instances: self.sessions.sessions.len(),
            dynamic_batching: None,
            gpu: self.gpu,
            gpu_memory_bytes: self.gpu_memory_bytes,
        }
    }

    fn infer<'a>(
        &'a self,
        _request: &'a weft_core::RequestContext,
        inputs: Vec<NamedTensor>,
    ) -> BoxFuture<'a, Result<Vec<NamedTensor>>> {
        Box::pin(async move {
            let pool = Arc::clone(&self.sessions);
            self.sessions
                .free
                .acquire()
                .await
                .map_err(|_| Error::unavailable("model is shutting down"))?
                .forget();
            // The session's permit travels with the blocking work: a caller that goes away
            // (a client disconnect, a plugin deadline) does not free the session while ONNX
            // Runtime still runs on it.
            let session = SessionTurn(Arc::clone(&pool));
            tokio::task::spawn_blocking(move || {
                let result = pool.run(&inputs);
                drop(inputs);
                drop(session);
                result
            })
            .await
            .map_err(|error| Error::internal(format!("ONNX Runtime inference failed: {error}")))?
        })
    }
}

/// A session's permit, given back to the pool when the blocking work that holds it ends (or
/// is dropped unrun).
struct SessionTurn(Arc<SessionPool>);

impl Drop for SessionTurn {
    fn drop(&mut self) {
        self.0.free.add_permits(1);
    }
}

impl SessionPool {
    /// Runs on a blocking thread holding a semaphore permit, so a free session exists.
    fn run(&self, inputs: &[NamedTensor]) -> Result<Vec<NamedTensor>> {
        let mut guard = None;
        for session in &self.sessions {
            match session.try_lock() {
                Ok(locked) => {
                    guard = Some(locked);
                    break;
                }
                Err(TryLockError::Poisoned(poisoned)) => {
                    guard = Some(poisoned.into_inner());
                    break;
                }
                Err(TryLockError::WouldBlock) => {}
            }
        }
        let mut session = match guard {
            Some(session) => session,
            None => lock(
                self.sessions
                    .first()
                    .ok_or_else(|| Error::internal("no session"))?,
            ),
        };
        run_session(&mut session, inputs)
    }
}

/// Runs one session on validated inputs; returns its outputs copied out of ONNX Runtime.
pub fn run_session(session: &mut Session, inputs: &[NamedTensor]) -> Result<Vec<NamedTensor>> {
    let values = inputs
        .iter()
        .map(|input| {
            Ok((
                input.name.as_str(),
                to_ort_value(&input.name, &input.tensor)?,
            ))
        })
        .collect::<Result<Vec<(&str, SessionInputValue<'_>)>>>()?;
    let outputs = session
        .run(values)
        .map_err(|error| Error::invalid(format!("ONNX Runtime rejected the inputs: {error}")))?;
    outputs
        .into_iter()
        .map(|(name, value)| Ok(NamedTensor::new(name, from_ort_value(name, &value)?)))
        .collect()
}

fn lock(session: &Mutex<Session>) -> std::sync::MutexGuard<'_, Session> {
    session
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn session_metadata(session: &Session, max_batch_size: usize) -> Result<ModelMetadata> {
    let spec = |kind: &str, name: &str, value_type: &ValueType| -> Result<TensorSpec> {
        match value_type {
            ValueType::Tensor { ty, shape, .. } => Ok(TensorSpec {
                name: name.to_string(),
                datatype: datatype_of(*ty).ok_or_else(|| {
                    Error::invalid(format!(
                        "{kind} '{name}' has ONNX type {ty}, which has no Open Inference Protocol datatype"
                    ))
                })?,
                shape: shape.iter().map(|&dim| if dim < 0 { -1 } else { dim }).collect(),
            }),
            other => Err(Error::invalid(format!(
                "{kind} '{name}' is {other}, not a tensor; only tensor inputs and outputs can be served"
            ))),
        }
    };
    let inputs = session
        .inputs
        .iter()
        .map(|input| spec("input", &input.name, &input.input_type))
        .collect::<Result<Vec<_>>>()?;
    let outputs = session
        .outputs
        .iter()
        .map(|output| spec("output", &output.name, &output.output_type))
        .collect::<Result<Vec<_>>>()?;
    let fixed_first_dim = inputs
        .iter()
        .chain(&outputs)
        .find(|s| s.shape.first() != Some(&-1));
    if let Some(fixed) = fixed_first_dim.filter(|_| max_batch_size > 0) {
        return Err(Error::invalid(format!(
            "max_batch_size is {max_batch_size} but '{}' has shape {:?}: a batching model \
             needs a variable first dimension",
            fixed.name, fixed.shape
        )));
    }
    Ok(ModelMetadata {
        platform: "onnxruntime_onnx".to_string(),
        inputs,
        outputs,
        max_batch_size,
    })
}

fn datatype_of(ty: TensorElementType) -> Option<DataType> {
    Some(match ty {
        TensorElementType::Bool => DataType::Bool,
        TensorElementType::Uint8 => DataType::Uint8,
        TensorElementType::Uint16 => DataType::Uint16,
        TensorElementType::Uint32 => DataType::Uint32,
        TensorElementType::Uint64 => DataType::Uint64,
        TensorElementType::Int8 => DataType::Int8,
        TensorElementType::Int16 => DataType::Int16,
        TensorElementType::Int32 => DataType::Int32,
        TensorElementType::Int64 => DataType::Int64,
        TensorElementType::Float16 => DataType::Fp16,
        TensorElementType::Bfloat16 => DataType::Bf16,
        TensorElementType::Float32 => DataType::Fp32,
        TensorElementType::Float64 => DataType::Fp64,
        TensorElementType::String => DataType::Bytes,
        _ => return None,
    })
}

/// Little-endian element decoding, so unaligned request bytes can be copied into typed memory.
trait Element: PrimitiveTensorElementType + bytemuck::Pod + std::fmt::Debug + Clone {
    const SIZE: usize = std::mem::size_of::<Self>();
    fn from_le(bytes: &[u8]) -> Self;
}

macro_rules! element {
    ($($ty:ty),*) => {$(
        impl Element for $ty {
            fn from_le(bytes: &[u8]) -> Self {
                let mut array = [0u8; std::mem::size_of::<$ty>()];
                array.copy_from_slice(bytes);
                <$ty>::from_le_bytes(array)
            }
        }
    )*};
}
element!(u8, u16, u32, u64, i8, i16, i32, i64, f16, bf16, f32, f64);

fn ort_error(name: &str) -> impl Fn(ort::Error) -> Error + '_ {
    move |error| {
        Error::invalid(format!(
            "input '{name}': ONNX Runtime cannot take it: {error}"
        ))
    }
}

/// A view when the bytes are aligned for `T` (no copy), else an owned copy.
fn primitive<'a, T: Element>(
    name: &str,
    shape: Vec<i64>,
    data: &'a [u8],
) -> Result<SessionInputValue<'a>> {
    // Wire bytes are little-endian, so a view is only valid on a little-endian host.
    let aligned = bytemuck::try_cast_slice::<u8, T>(data).ok();
    if let Some(view) = aligned.filter(|_| cfg!(target_endian = "little")) {
        return TensorRef::from_array_view((shape, view))
            .map(SessionInputValue::from)
            .map_err(ort_error(name));
    }
    let owned: Vec<T> = data.chunks_exact(T::SIZE).map(T::from_le).collect();
    OrtTensor::from_array((shape, owned))
        .map(SessionInputValue::from)
        .map_err(ort_error(name))
}

fn to_ort_value<'a>(name: &str, tensor: &'a Tensor) -> Result<SessionInputValue<'a>> {
    let shape: Vec<i64> = tensor.shape().iter().map(|&dim| dim as i64).collect();
    let data: &'a [u8] = tensor.data();
    match tensor.datatype() {
        DataType::Bool => {
            let owned: Vec<bool> = data.iter().map(|&byte| byte != 0).collect();
            OrtTensor::from_array((shape, owned))
                .map(SessionInputValue::from)
                .map_err(ort_error(name))
        }
        DataType::Uint8 => primitive::<u8>(name, shape, data),
        DataType::Uint16 => primitive::<u16>(name, shape, data),
        DataType::Uint32 => primitive::<u32>(name, shape, data),
        DataType::Uint64 => primitive::<u64>(name, shape, data),
        DataType::Int8 => primitive::<i8>(name, shape, data),
        DataType::Int16 => primitive::<i16>(name, shape, data),
        DataType::Int32 => primitive::<i32>(name, shape, data),
        DataType::Int64 => primitive::<i64>(name, shape, data),
        DataType::Fp16 => primitive::<f16>(name, shape, data),
        DataType::Bf16 => primitive::<bf16>(name, shape, data),
        DataType::Fp32 => primitive::<f32>(name, shape, data),
        DataType::Fp64 => primitive::<f64>(name, shape, data),
        DataType::Bytes => {
            let strings = bytes_elements(data)?
                .enumerate()
                .map(|(index, element)| {
                    String::from_utf8(element.to_vec()).map_err(|_| {
                        Error::invalid(format!(
                            "input '{name}': BYTES element {index} is not valid UTF-8, which ONNX \
                             string tensors require"
                        ))
                    })
                })
                .collect::<Result<Vec<String>>>()?;
            OrtTensor::from_string_array((shape, &strings[..]))
                .map(SessionInputValue::from)
                .map_err(ort_error(name))
        }
    }
}

fn extract<T: Element>(name: &str, value: &DynValue) -> Result<(Vec<usize>, Bytes)> {
    let (shape, data) = value
        .try_extract_tensor::<T>()
        .map_err(|error| Error::internal(format!("output '{name}': {error}")))?;
    let bytes = Bytes::copy_from_slice(bytemuck::cast_slice::<T, u8>(data));
    Ok((dims(shape), bytes))
}

fn dims(shape: &[i64]) -> Vec<usize> {
    shape.iter().map(|&dim| dim.max(0) as usize).collect()
}

fn from_ort_value(name: &str, value: &DynValue) -> Result<Tensor> {
    let ValueType::Tensor { ty, .. } = value.dtype() else {
        return Err(Error::internal(format!("output '{name}' is not a tensor")));
    };
    let datatype = datatype_of(*ty).ok_or_else(|| {
        Error::internal(format!("output '{name}' has unsupported ONNX type {ty}"))
    })?;
    let (shape, bytes) = match datatype {
        DataType::Bool => {
            let (shape, data) = value
                .try_extract_tensor::<bool>()
                .map_err(|error| Error::internal(format!("output '{name}': {error}")))?;
            (
                dims(shape),
                data.iter()
                    .map(|&b| u8::from(b))
                    .collect::<Vec<u8>>()
                    .into(),
            )
        }
        DataType::Uint8 => extract::<u8>(name, value)?,
        DataType::Uint16 => extract::<u16>(name, value)?,
        DataType::Uint32 => extract::<u32>(name, value)?,
        DataType::Uint64 => extract::<u64>(name, value)?,
        DataType::Int8 => extract::<i8>(name, value)?,
        DataType::Int16 => extract::<i16>(name, value)?,
        DataType::Int32 => extract::<i32>(name, value)?,
        DataType::Int64 => extract::<i64>(name, value)?,
        DataType::Fp16 => extract::<f16>(name, value)?,
        DataType::Bf16 => extract::<bf16>(name, value)?,
        DataType::Fp32 => extract::<f32>(name, value)?,
        DataType::Fp64 => extract::<f64>(name, value)?,
        DataType::Bytes => {
            let (shape, strings) = value
                .try_extract_strings()
                .map_err(|error| Error::internal(format!("output '{name}': {error}")))?;
            let encoded = encode_bytes_elements(strings.iter().map(|s| s.as_bytes()))?;
            (dims(shape), Bytes::from(encoded))
        }
    };
    Tensor::new(datatype, shape, bytes).map_err(|error| error.context(format!("output '{name}'")))
}

#[cfg(test)]
mod device_memory_tests {
    #![allow(clippy::unwrap_used)]

    use std::sync::atomic::{AtomicU64, Ordering};

    use weft_gpu::{GpuAbsent, GpuDevices, GpuInfo, PinnedBuffer};

    use super::*;

    /// One device whose free memory the test sets.
    struct Device {
        free: AtomicU64,
    }

    impl GpuDevices for Device {
        fn discover(&self) -> std::result::Result<Vec<GpuInfo>, GpuAbsent> {
            Ok(vec![GpuInfo {
                index: 0,
                name: "fake".into(),
                uuid: "GPU-0".into(),
                compute_capability: (9, 0),
                memory_total_bytes: 80 << 30,
                memory_free_bytes: self.free.load(Ordering::SeqCst),
            }])
        }

        fn pinned(&self, _: u32, _: usize) -> Option<Box<dyn PinnedBuffer>> {
            None
        }
    }

    #[test]
    fn a_load_on_a_gpu_is_charged_the_device_memory_it_took_and_a_cpu_load_none() {
        let device = Device {
            free: AtomicU64::new(10 << 30),
        };
        let (value, taken) = device_memory_taken(&device, Some(0), || {
            device.free.fetch_sub(300 << 20, Ordering::SeqCst);
            Ok(7)
        })
        .unwrap();
        assert_eq!((value, taken), (7, Some(300 << 20)));
        // On the CPU nothing is measured; on a device that is not there, nothing is made up.
        let (_, taken) = device_memory_taken(&device, None, || Ok(())).unwrap();
        assert_eq!(taken, None);
        let (_, taken) = device_memory_taken(&device, Some(3), || Ok(())).unwrap();
        assert_eq!(taken, None);
        // A failed load is the load's error.
        let failed = device_memory_taken(&device, Some(0), || -> Result<()> {
            Err(Error::invalid("bad model"))
        });
        assert!(failed.is_err());
    }
}
