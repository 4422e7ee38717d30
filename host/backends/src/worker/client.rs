//! The server's side of a model worker: starting and supervising one worker process, and
//! [`WorkerModel`], the [`Model`] that runs inside it.
//!
//! A [`ModelWorker`] owns one process at a time (a generation). A supervisor task starts it,
//! hands it the shared arena, reloads every model that was loaded before, publishes it as
//! ready, and waits for it to end. When it ends — crash, SIGKILL, out of memory, a call that
//! hung past the call timeout — every call in flight on it fails at once with a 503 that says
//! what happened, the cause is counted, and a new generation starts after a backoff (100 ms,
//! doubling to 5 s, reset after a generation that lived 30 s). Calls that arrive meanwhile wait
//! for the new generation (within the load timeout) instead of failing, so only the calls that
//! were running when the worker died see the failure.
//!
//! A call's slot in the arena is released when the worker answers or dies, never when the
//! caller gives up, so a slot is never reused while the worker may still be writing into it.

use std::collections::{BTreeMap, HashMap};
use std::os::fd::{AsFd, OwnedFd};
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::io::{AsyncReadExt, BufReader};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore, oneshot, watch};
use weft_core::{
    BoxFuture, Error, ErrorKind, Model, ModelMetadata, NamedTensor, Result, Tensor, TensorSpec,
};

use super::shm::SharedArena;
use super::wire::{
    FromWorker, Placement, ToWorker, WireMetadata, WireTensor, decode, encode_frame, frame_len,
    place,
};
use crate::onnx::OnnxOptions;

/// Largest frame the server accepts from a worker (outputs too large for a slot come inline).
const MAX_FRAME_FROM_WORKER: usize = 256 << 20;

/// Told when a worker generation ends, for `/metrics`.
pub trait WorkerObserver: Send + Sync {
    /// A worker for `label` starts (its restart series can start at zero).
    fn started(&self, label: &str) {
        let _ = label;
    }

    /// `cause` is one of [`RESTART_CAUSES`].
    fn restarted(&self, label: &str, cause: &str);
}

/// Why a worker generation ended, as `weft_model_worker_restarts_total` labels it.
pub const RESTART_CAUSES: [&str; 6] = [
    "killed",
    "crashed",
    "exited",
    "hang",
    "load_timeout",
    "protocol",
];

/// How to start and bound one worker.
#[derive(Clone)]
pub struct WorkerConfig {
    /// The `weft` binary and the arguments that select its worker mode (`["worker"]`).
    pub program: PathBuf,
    pub program_args: Vec<String>,
    pub ort_library: PathBuf,
    /// Who the worker serves (a tenant name): in logs, metrics and error messages.
    pub label: String,
    /// Address space the worker may use beyond its baseline; `None`: no limit.
    pub memory_limit: Option<u64>,
    pub allow_weak_sandbox: bool,
    /// Nice value of the worker process (0..=19).
    pub nice: i32,
    /// Calls in flight at once, and the bytes of each call's slot in the shared arena.
    pub slots: usize,
    pub slot_bytes: usize,
    /// A call the worker has not answered by then is a hang: the worker is restarted.
    pub call_timeout: Duration,
    /// Longest a start (sandbox and handshake) or one model load may take.
    pub load_timeout: Duration,
    /// Restart after the worker ends; off for one-off trial loads.
    pub restart: bool,
    pub observer: Option<Arc<dyn WorkerObserver>>,
}

impl std::fmt::Debug for WorkerConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WorkerConfig")
            .field("label", &self.label)
            .field("memory_limit", &self.memory_limit)
            .field("slots", &self.slots)
            .field("slot_bytes", &self.slot_bytes)
            .finish_non_exhaustive()
    }
}

#[derive(Clone)]
enum Status {
    Starting,
    Ready(Arc<Connection>),
    /// Not serving and not coming back (could not start, or a trial worker that ended).
    Down(String),
}

struct Registered {
    onnx: Bytes,
    options: OnnxOptions,
    /// Loaded at least once: reloaded into every new generation.
    loaded: bool,
    /// Why it can no longer be served (it crashed its worker while reloading); shared with
    /// the [`WorkerModel`], which reads it on every call without a lock.
    broken: Arc<std::sync::OnceLock<String>>,
}

struct Shared {
    config: WorkerConfig,
    status: watch::Sender<Status>,
    models: Mutex<BTreeMap<u64, Registered>>,
    next_handle: AtomicU64,
    next_call: AtomicU64,
    runtime: tokio::runtime::Handle,
}

/// Drops with the last [`ModelWorker`] clone: ends the supervisor, which kills the process.
struct ShutdownGuard {
    _stop: watch::Sender<()>,
}

/// One supervised worker process (restarted when it dies), shared by the models loaded in it.
#[derive(Clone)]
pub struct ModelWorker {
    shared: Arc<Shared>,
    _guard: Arc<ShutdownGuard>,
}

/// A [`ModelWorker`] that does not keep it running: it upgrades while a model loaded in it
/// (or another handle) lives.
#[derive(Clone)]
pub struct WeakModelWorker {
    shared: std::sync::Weak<Shared>,
    guard: std::sync::Weak<ShutdownGuard>,
}

impl WeakModelWorker {
    pub fn upgrade(&self) -> Option<ModelWorker> {
        Some(ModelWorker {
            shared: self.shared.upgrade()?,
            _guard: self.guard.upgrade()?,
        })
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl ModelWorker {
    /// Starts the supervisor (and so the first process) on the current tokio runtime.
    pub fn start(config: WorkerConfig) -> Result<Self> {
        let runtime = tokio::runtime::Handle::try_current()
            .map_err(|_| Error::internal("model workers need a tokio runtime"))?;
        let (status, _) = watch::channel(Status::Starting);
        let shared = Arc::new(Shared {
            config,
            status,
            models: Mutex::default(),
            next_handle: AtomicU64::new(1),
            next_call: AtomicU64::new(1),
            runtime: runtime.clone(),
        });
        if let Some(observer) = &shared.config.observer {
            observer.started(&shared.config.label);
        }
        let (stop, stopped) = watch::channel(());
        runtime.spawn(supervise(Arc::clone(&shared), stopped));
        Ok(ModelWorker {
            shared,
            _guard: Arc::new(ShutdownGuard { _stop: stop }),
        })
    }

    pub fn downgrade(&self) -> WeakModelWorker {
        WeakModelWorker {
            shared: Arc::downgrade(&self.shared),
            guard: Arc::downgrade(&self._guard),
        }
    }

    /// Loads a model into the worker; it is reloaded into every later generation.
    pub async fn load(
        &self,
        onnx: Bytes,
        options: OnnxOptions,
        max_batch_size: usize,
    ) -> Result<WorkerModel> {
        let handle = self.shared.next_handle.fetch_add(1, Ordering::Relaxed);
        let sessions = options.instance_count.max(1);
        let gpu = options.execution.gpu();
        let broken: Arc<std::sync::OnceLock<String>> = Arc::default();
        lock(&self.shared.models).insert(
            handle,
            Registered {
                onnx: onnx.clone(),
                options: options.clone(),
                loaded: false,
                broken: Arc::clone(&broken),
            },
        );
        let loaded = async {
            let connection = self.connection().await?;
            connection
                .load(
                    &self.shared,
                    handle,
                    onnx,
                    options,
                    self.shared.config.load_timeout,
                )
                .await
        }
        .await;
        match loaded {
            Ok(metadata) => {
                if let Some(registered) = lock(&self.shared.models).get_mut(&handle) {
                    registered.loaded = true;
                }
                Ok(WorkerModel {
                    worker: self.clone(),
                    handle,
                    admitted: Arc::new(Semaphore::new(sessions)),
                    sessions,
                    gpu,
                    broken,
                    outputs: metadata.outputs.clone().into(),
                    metadata: ModelMetadata {
                        platform: "onnxruntime_onnx".into(),
                        inputs: metadata.inputs,
                        outputs: metadata.outputs,
                        max_batch_size,
                    },
                })
            }
            Err(error) => {
                lock(&self.shared.models).remove(&handle);
                Err(error)
            }
        }
    }

    /// The ready generation, waiting (within the load timeout) while one starts.
    async fn connection(&self) -> Result<Arc<Connection>> {
        let mut status = self.shared.status.subscribe();
        let waited = tokio::time::timeout(
            self.shared.config.load_timeout,
            // A generation already dying is skipped: calls wait for the next one.
            status.wait_for(|status| match status {
                Status::Starting => false,
                Status::Ready(connection) => !connection.is_dead(),
                Status::Down(_) => true,
            }),
        )
        .await;
        let label = &self.shared.config.label;
        match waited {
            Err(_) => Err(Error::unavailable(format!(
                "the model worker of '{label}' is restarting and did not come back within {} s",
                self.shared.config.load_timeout.as_secs()
            ))),
            Ok(Err(_)) => Err(Error::unavailable("the model worker was shut down")),
            Ok(Ok(status)) => match &*status {
                Status::Ready(connection) => Ok(Arc::clone(connection)),
                Status::Down(reason) => Err(Error::unavailable(reason.clone())),
                Status::Starting => Err(Error::unavailable("the model worker is starting")),
            },
        }
    }

    fn health(&self, broken: &std::sync::OnceLock<String>) -> std::result::Result<(), String> {
        if let Some(reason) = broken.get() {
            return Err(reason.clone());
        }
        match &*self.shared.status.borrow() {
            Status::Ready(_) => Ok(()),
            Status::Starting => Err(format!(
                "the model worker of '{}' is restarting",
                self.shared.config.label
            )),
            Status::Down(reason) => Err(reason.clone()),
        }
    }
}

/// A model loaded in a worker process. Inputs go into the call's arena slot, outputs come back
/// out of it; the batcher, graph nodes and `wasi:nn` use it exactly like an in-process model.
pub struct WorkerModel {
    worker: ModelWorker,
    handle: u64,
    metadata: ModelMetadata,
    /// One permit per session in the worker: calls beyond them wait here, so the call timeout
    /// measures a call the worker is running, not one queued behind others.
    admitted: Arc<Semaphore>,
    /// Sessions the worker holds for it (its instance count).
    sessions: usize,
    /// The CUDA device its sessions run on.
    gpu: Option<u32>,
    broken: Arc<std::sync::OnceLock<String>>,
    /// The declared outputs, shared with each pending call that checks its answer.
    outputs: Arc<[TensorSpec]>,
}

impl Drop for WorkerModel {
    fn drop(&mut self) {
        lock(&self.worker.shared.models).remove(&self.handle);
        if let Status::Ready(connection) = &*self.worker.shared.status.borrow() {
            let connection = Arc::clone(connection);
            let handle = self.handle;
            self.worker.shared.runtime.spawn(async move {
                let _ = connection.queue(&ToWorker::Unload { handle });
            });
        }
    }
}

impl Model for WorkerModel {
    fn metadata(&self) -> &ModelMetadata {
        &self.metadata
    }

    fn serving(&self) -> weft_core::ServingConfig {
        weft_core::ServingConfig {
            instances: self.sessions,
            dynamic_batching: None,
            gpu: self.gpu,
            // Measured in the worker's process; not reported back (yet).
            gpu_memory_bytes: None,
        }
    }

    fn health(&self) -> std::result::Result<(), String> {
        self.worker.health(&self.broken)
    }

    fn infer<'a>(
        &'a self,
        _request: &'a weft_core::RequestContext,
        inputs: Vec<NamedTensor>,
    ) -> BoxFuture<'a, Result<Vec<NamedTensor>>> {
        Box::pin(async move {
            if let Some(reason) = self.broken.get() {
                return Err(Error::unavailable(reason.clone()));
            }
            // The session permit travels with the call to the worker and is released by the
            // worker's answer (or death), not by a caller that went away while it computes.
            let admitted = Arc::clone(&self.admitted)
                .acquire_owned()
                .await
                .map_err(|_| Error::unavailable("the model is shutting down"))?;
            let connection = self.worker.connection().await?;
            connection
                .infer(
                    &self.worker.shared,
                    self.handle,
                    inputs,
                    &self.outputs,
                    admitted,
                )
                .await
        })
    }
}

/// Free slots of one generation's arena.
struct SlotPool {
    free: Mutex<Vec<u32>>,
    available: Arc<Semaphore>,
}

/// A slot held by one call until the worker answers it (or dies).
struct SlotLease {
    pool: Arc<SlotPool>,
    slot: u32,
    _permit: OwnedSemaphorePermit,
}

impl Drop for SlotLease {
    fn drop(&mut self) {
        lock(&self.pool.free).push(self.slot);
    }
}

impl SlotPool {
    fn new(slots: usize) -> Arc<Self> {
        Arc::new(SlotPool {
            free: Mutex::new((0..slots as u32).rev().collect()),
            available: Arc::new(Semaphore::new(slots)),
        })
    }

    async fn acquire(self: &Arc<Self>) -> Result<SlotLease> {
        let permit = Arc::clone(&self.available)
            .acquire_owned()
            .await
            .map_err(|_| Error::unavailable("the model worker is shutting down"))?;
        let slot = lock(&self.free)
            .pop()
            .ok_or_else(|| Error::internal("no free slot although one was admitted"))?;
        Ok(SlotLease {
            pool: Arc::clone(self),
            slot,
            _permit: permit,
        })
    }
}

struct PendingCall {
    reply: oneshot::Sender<Result<Vec<NamedTensor>>>,
    lease: SlotLease,
    outputs: Arc<[TensorSpec]>,
    /// The model session's permit, held until the worker answers.
    _admitted: OwnedSemaphorePermit,
}

/// The sending side of a worker's socket. A frame goes straight into the socket when nothing
/// is waiting before it (the common case: one non-blocking write, no task hop); what the
/// socket does not take joins a backlog that a flusher task writes out in order.
struct Outgoing {
    half: OwnedWriteHalf,
    backlog: Mutex<Vec<u8>>,
    flush: Notify,
    closed: std::sync::atomic::AtomicBool,
}

impl Outgoing {
    fn queue(&self, frame: &[u8]) -> Result<()> {
        if self.closed.load(Ordering::Relaxed) {
            return Err(Error::unavailable(
                "the model worker's connection is closed",
            ));
        }
        let mut backlog = lock(&self.backlog);
        if backlog.is_empty() {
            match self.half.try_write(frame) {
                Ok(written) if written == frame.len() => return Ok(()),
                Ok(written) => backlog.extend_from_slice(&frame[written..]),
                Err(error) if error.kind() == std::io::ErrorKind::WouldBlock => {
                    backlog.extend_from_slice(frame)
                }
                Err(_) => {
                    self.closed.store(true, Ordering::Relaxed);
                    return Err(Error::unavailable(
                        "the model worker's connection is closed",
                    ));
                }
            }
        } else {
            backlog.extend_from_slice(frame);
        }
        drop(backlog);
        self.flush.notify_one();
        Ok(())
    }

    /// Writes the backlog out whenever there is one, until the socket fails or the connection
    /// is gone.
    async fn flush_backlog(self: Arc<Self>) {
        loop {
            self.flush.notified().await;
            if Arc::strong_count(&self) == 1 {
                return;
            }
            loop {
                if self.half.writable().await.is_err() {
                    self.closed.store(true, Ordering::Relaxed);
                    return;
                }
                let mut backlog = lock(&self.backlog);
                if backlog.is_empty() {
                    break;
                }
                match self.half.try_write(&backlog) {
                    Ok(written) => {
                        backlog.drain(..written);
                        if backlog.is_empty() {
                            break;
                        }
                    }
                    Err(error) if error.kind() == std::io::ErrorKind::WouldBlock => {}
                    Err(_) => {
                        self.closed.store(true, Ordering::Relaxed);
                        return;
                    }
                }
            }
        }
    }
}

/// One generation: the process, its socket and its arena.
struct Connection {
    pid: rustix::process::Pid,
    /// Frames to the worker. Queueing is synchronous, so a caller that gives up never leaves
    /// half a frame on the socket.
    writer: Arc<Outgoing>,
    arena: SharedArena,
    slots: Arc<SlotPool>,
    calls: Mutex<Calls>,
    died: Notify,
    /// Set when the server itself ended the process (a hang), so the cause is known.
    kill_cause: Mutex<Option<&'static str>>,
}

#[derive(Default)]
struct Calls {
    dead: Option<String>,
    infer: HashMap<u64, PendingCall>,
    load: HashMap<u64, oneshot::Sender<Result<WireMetadata>>>,
}

impl Drop for Connection {
    fn drop(&mut self) {
        // Lets the flusher see it is the last holder and end.
        self.writer.flush.notify_one();
    }
}

impl Connection {
    fn queue(&self, message: &ToWorker) -> Result<()> {
        self.writer.queue(&encode_frame(message)?)
    }

    /// Whether this generation takes no more calls (it is being killed or has ended).
    fn is_dead(&self) -> bool {
        lock(&self.calls).dead.is_some()
    }

    fn kill(&self, cause: &'static str) {
        lock(&self.kill_cause).get_or_insert(cause);
        // New calls wait for the next generation instead of joining this one.
        lock(&self.calls)
            .dead
            .get_or_insert_with(|| "the model worker is being restarted".to_string());
        let _ = rustix::process::kill_process(self.pid, rustix::process::Signal::KILL);
    }

    /// Fails every call in flight with `reason`; later calls on this generation fail at once.
    fn fail_all(&self, reason: &str) {
        let mut calls = lock(&self.calls);
        calls.dead.get_or_insert_with(|| reason.to_string());
        for (_, call) in calls.infer.drain() {
            let _ = call.reply.send(Err(Error::unavailable(reason)));
        }
        for (_, load) in calls.load.drain() {
            let _ = load.send(Err(Error::unavailable(reason)));
        }
    }

    /// Fails the loads in flight; later loads on this generation fail at once.
    fn fail_loads(&self, reason: &str) {
        let mut calls = lock(&self.calls);
        calls.dead.get_or_insert_with(|| reason.to_string());
        for (_, load) in calls.load.drain() {
            let _ = load.send(Err(Error::unavailable(reason)));
        }
    }

    async fn load(
        &self,
        shared: &Shared,
        handle: u64,
        onnx: Bytes,
        options: OnnxOptions,
        timeout: Duration,
    ) -> Result<WireMetadata> {
        let call = shared.next_call.fetch_add(1, Ordering::Relaxed);
        let (reply, answer) = oneshot::channel();
        {
            let mut calls = lock(&self.calls);
            if let Some(reason) = &calls.dead {
                return Err(Error::unavailable(reason.clone()));
            }
            calls.load.insert(call, reply);
        }
        let message = ToWorker::Load {
            call,
            handle,
            onnx: onnx.to_vec(),
            options,
        };
        if let Err(error) = self.queue(&message) {
            lock(&self.calls).load.remove(&call);
            return Err(error);
        }
        drop(message);
        match tokio::time::timeout(timeout, answer).await {
            Ok(Ok(result)) => result,
            Ok(Err(_)) => Err(Error::unavailable(
                "the model worker stopped during the load",
            )),
            Err(_) => {
                lock(&self.calls).load.remove(&call);
                self.kill("load_timeout");
                Err(Error::unavailable(format!(
                    "loading the model took longer than the load timeout of {} s",
                    timeout.as_secs()
                )))
            }
        }
    }

    async fn infer(
        &self,
        shared: &Shared,
        handle: u64,
        inputs: Vec<NamedTensor>,
        outputs: &Arc<[TensorSpec]>,
        admitted: OwnedSemaphorePermit,
    ) -> Result<Vec<NamedTensor>> {
        let timeout = shared.config.call_timeout;
        let lease = tokio::time::timeout(timeout, self.slots.acquire())
            .await
            .map_err(|_| {
                Error::unavailable(format!(
                    "the model worker had no free call slot for {} s",
                    timeout.as_secs()
                ))
            })??;
        let slot = lease.slot;
        let mut used = 0usize;
        let mut wire = Vec::with_capacity(inputs.len());
        for input in &inputs {
            let placement = place(&self.arena, slot, &mut used, input.tensor.data())?;
            wire.push(WireTensor {
                name: input.name.clone(),
                datatype: input.tensor.datatype(),
                shape: input.tensor.shape().iter().map(|&d| d as u64).collect(),
                data: placement,
            });
        }
        drop(inputs);
        let call = shared.next_call.fetch_add(1, Ordering::Relaxed);
        let (reply, answer) = oneshot::channel();
        {
            let mut calls = lock(&self.calls);
            if let Some(reason) = &calls.dead {
                return Err(Error::unavailable(reason.clone()));
            }
            calls.infer.insert(
                call,
                PendingCall {
                    reply,
                    lease,
                    outputs: Arc::clone(outputs),
                    _admitted: admitted,
                },
            );
        }
        let message = ToWorker::Infer {
            call,
            handle,
            slot,
            inputs: wire,
        };
        // Queued with no await since the insert: a caller dropped from here on leaves its
        // pending call (and slot) to be released by the worker's answer or death.
        if let Err(error) = self.queue(&message) {
            lock(&self.calls).infer.remove(&call);
            return Err(error);
        }
        match tokio::time::timeout(timeout, answer).await {
            Ok(Ok(result)) => result,
            Ok(Err(_)) => Err(Error::unavailable(
                "the model worker stopped during the call",
            )),
            Err(_) => {
                self.kill("hang");
                Err(Error::unavailable(format!(
                    "the model did not answer within the call timeout of {} s; its worker is \
                     being restarted",
                    timeout.as_secs()
                )))
            }
        }
    }

    /// Handles one frame from the worker; an `Err` is a protocol violation.
    fn dispatch(&self, body: &[u8]) -> Result<()> {
        match decode::<FromWorker>(body)? {
            FromWorker::Ready { .. } => Err(Error::internal("a second Ready")),
            FromWorker::Loaded { call, result } => {
                if let Some(reply) = lock(&self.calls).load.remove(&call) {
                    let _ = reply.send(result.map_err(Error::from));
                }
                Ok(())
            }
            FromWorker::Inferred { call, result } => {
                let Some(pending) = lock(&self.calls).infer.remove(&call) else {
                    return Ok(());
                };
                let outputs = match result {
                    Ok(outputs) => self.outputs(pending.lease.slot, outputs, &pending.outputs),
                    Err(error) => Err(Error::from(error)),
                };
                // Copied out: the slot may now be reused.
                drop(pending.lease);
                let _ = pending.reply.send(outputs);
                Ok(())
            }
        }
    }

    /// Copies a call's outputs out of its slot, checking them against the declared outputs.
    fn outputs(
        &self,
        slot: u32,
        outputs: Vec<WireTensor>,
        declared: &[TensorSpec],
    ) -> Result<Vec<NamedTensor>> {
        let malformed = |what: String| {
            Error::internal(format!(
                "the model worker returned malformed outputs: {what}"
            ))
        };
        if outputs.len() != declared.len() {
            return Err(malformed(format!(
                "{} outputs for {} declared",
                outputs.len(),
                declared.len()
            )));
        }
        outputs
            .into_iter()
            .zip(declared)
            .map(|(output, spec)| {
                if output.name != spec.name || output.datatype != spec.datatype {
                    return Err(malformed(format!("unexpected output '{}'", output.name)));
                }
                let bytes = match output.data {
                    Placement::Slot { offset, len } => self.arena.read(slot, offset, len)?,
                    Placement::Inline(data) => data,
                };
                let shape = output
                    .shape
                    .iter()
                    .map(|&dim| usize::try_from(dim).map_err(|_| malformed("shape".into())))
                    .collect::<Result<Vec<_>>>()?;
                let tensor = Tensor::new(output.datatype, shape, Bytes::from(bytes))
                    .map_err(|error| malformed(error.to_string()))?;
                Ok(NamedTensor::new(output.name, tensor))
            })
            .collect()
    }
}

async fn read_frame(reader: &mut BufReader<OwnedReadHalf>) -> std::io::Result<Option<Vec<u8>>> {
    let mut header = [0u8; 4];
    match reader.read_exact(&mut header).await {
        Ok(_) => {}
        Err(error) if error.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(error) => return Err(error),
    }
    let len = frame_len(header, MAX_FRAME_FROM_WORKER)?;
    let mut body = vec![0u8; len];
    reader.read_exact(&mut body).await?;
    Ok(Some(body))
}

/// Reads the worker's answers until its socket closes or it breaks the protocol.
async fn read_loop(connection: Arc<Connection>, mut reader: BufReader<OwnedReadHalf>) {
    while let Ok(Some(body)) = read_frame(&mut reader).await {
        if connection.dispatch(&body).is_err() {
            connection.kill("protocol");
            break;
        }
    }
    // A load waiting on a dead worker learns it now (the supervisor may be reloading, not
    // watching); calls get the cause once the supervisor has the exit status.
    connection.fail_loads("the model worker stopped while loading the model");
    connection.died.notify_one();
}

/// Sends the arena's fd over the socket (SCM_RIGHTS) with one byte of data.
fn send_fd(socket: &std::os::unix::net::UnixStream, fd: std::os::fd::BorrowedFd<'_>) -> Result<()> {
    use rustix::net::{SendAncillaryBuffer, SendAncillaryMessage, SendFlags, sendmsg};
    let mut space = [std::mem::MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
    let mut control = SendAncillaryBuffer::new(&mut space);
    let fds = [fd];
    if !control.push(SendAncillaryMessage::ScmRights(&fds)) {
        return Err(Error::internal("cannot attach the arena fd"));
    }
    sendmsg(
        socket,
        &[std::io::IoSlice::new(b"A")],
        &mut control,
        SendFlags::empty(),
    )
    .map_err(|error| Error::unavailable(format!("cannot hand the worker its arena: {error}")))?;
    Ok(())
}

/// Starts one generation: the process, the arena handshake and the sandbox's `Ready`.
async fn spawn_generation(
    config: &WorkerConfig,
) -> Result<(Arc<Connection>, tokio::process::Child)> {
    let (arena, arena_fd) = SharedArena::create(config.slots, config.slot_bytes)?;
    let (ours, theirs) = std::os::unix::net::UnixStream::pair()
        .map_err(|error| Error::unavailable(format!("cannot create a socket pair: {error}")))?;
    let mut command = tokio::process::Command::new(&config.program);
    command
        .args(&config.program_args)
        .arg("--ort-library")
        .arg(&config.ort_library)
        .arg("--slots")
        .arg(config.slots.to_string())
        .arg("--slot-bytes")
        .arg(config.slot_bytes.to_string());
    if let Some(limit) = config.memory_limit {
        command.arg("--memory-limit-bytes").arg(limit.to_string());
    }
    if config.allow_weak_sandbox {
        command.arg("--allow-weak-model-sandbox");
    }
    if config.nice != 0 {
        command.arg("--nice").arg(config.nice.to_string());
    }
    command
        .env_clear()
        .env("MALLOC_ARENA_MAX", "1")
        .current_dir("/")
        .stdin(Stdio::from(OwnedFd::from(theirs)))
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let mut child = command
        .spawn()
        .map_err(|error| Error::unavailable(format!("cannot start a model worker: {error}")))?;
    // The command holds the child's end of the socket: close ours, so the worker's death is
    // an end of file here.
    drop(command);
    let pid = child
        .id()
        .and_then(|id| rustix::process::Pid::from_raw(id as i32))
        .ok_or_else(|| Error::unavailable("the model worker exited at once"))?;
    if let Some(stderr) = child.stderr.take() {
        tokio::spawn(forward_logs(config.label.clone(), stderr));
    }
    send_fd(&ours, arena_fd.as_fd())?;
    drop(arena_fd);
    ours.set_nonblocking(true)
        .map_err(|error| Error::unavailable(format!("socket: {error}")))?;
    let stream = tokio::net::UnixStream::from_std(ours)
        .map_err(|error| Error::unavailable(format!("socket: {error}")))?;
    let (read, write) = stream.into_split();
    let mut reader = BufReader::with_capacity(64 << 10, read);
    let first = tokio::time::timeout(config.load_timeout, read_frame(&mut reader)).await;
    let sandbox = match first {
        Ok(Ok(Some(body))) => match decode::<FromWorker>(&body)? {
            FromWorker::Ready { sandbox } => sandbox,
            _ => {
                return Err(Error::unavailable(
                    "the model worker did not start correctly",
                ));
            }
        },
        Ok(_) => {
            let status = tokio::time::timeout(Duration::from_secs(2), child.wait()).await;
            let detail = match status {
                Ok(Ok(status)) => format!(" ({status})"),
                _ => String::new(),
            };
            return Err(Error::unavailable(format!(
                "the model worker failed to start{detail}; the server log has its reason"
            )));
        }
        Err(_) => {
            return Err(Error::unavailable(
                "the model worker did not start within the load timeout",
            ));
        }
    };
    let frames = Arc::new(Outgoing {
        half: write,
        backlog: Mutex::default(),
        flush: Notify::new(),
        closed: std::sync::atomic::AtomicBool::new(false),
    });
    tokio::spawn(Arc::clone(&frames).flush_backlog());
    tracing::info!(tenant = %config.label, pid = pid.as_raw_nonzero().get(), %sandbox, "model worker ready");
    let connection = Arc::new(Connection {
        pid,
        writer: frames,
        slots: SlotPool::new(config.slots),
        arena,
        calls: Mutex::default(),
        died: Notify::new(),
        kill_cause: Mutex::new(None),
    });
    tokio::spawn(read_loop(Arc::clone(&connection), reader));
    Ok((connection, child))
}

/// Forwards the worker's stderr to the server log, bounded: lines cut at 1 KiB, at most 100
/// lines per minute (the rest counted in one line), so a model cannot flood the log.
async fn forward_logs(label: String, stderr: tokio::process::ChildStderr) {
    let mut stderr = stderr;
    let mut chunk = vec![0u8; 4096];
    // The line being collected (at most 1 KiB kept; the rest of a long line is skipped).
    let mut line = Vec::with_capacity(1024);
    let mut window = Instant::now();
    let (mut logged, mut dropped) = (0u32, 0u64);
    let mut emit = |line: &[u8]| {
        if window.elapsed() > Duration::from_secs(60) {
            if dropped > 0 {
                tracing::warn!(tenant = %label, dropped, "model worker log lines dropped");
            }
            window = Instant::now();
            (logged, dropped) = (0, 0);
        }
        if logged >= 100 {
            dropped += 1;
            return;
        }
        logged += 1;
        let text = String::from_utf8_lossy(line).escape_debug().to_string();
        tracing::warn!(tenant = %label, line = %text, "model worker");
    };
    while let Ok(read) = stderr.read(&mut chunk).await {
        if read == 0 {
            break;
        }
        for &byte in &chunk[..read] {
            if byte == b'\n' {
                emit(&line);
                line.clear();
            } else if line.len() < 1024 {
                line.push(byte);
            }
        }
    }
    if !line.is_empty() {
        emit(&line);
    }
}

fn describe_exit(status: std::process::ExitStatus) -> (&'static str, String) {
    use std::os::unix::process::ExitStatusExt;
    match (status.signal(), status.code()) {
        (Some(9), _) => (
            "killed",
            "killed by SIGKILL, e.g. out of memory or by the operator".into(),
        ),
        (Some(signal), _) => ("crashed", format!("crashed with signal {signal}")),
        (None, Some(code)) => ("exited", format!("exited with status {code}")),
        (None, None) => ("exited", "exited".into()),
    }
}

async fn supervise(shared: Arc<Shared>, mut stop: watch::Receiver<()>) {
    let config = &shared.config;
    let mut failures = 0u32;
    loop {
        let started = Instant::now();
        let spawned = tokio::select! {
            spawned = spawn_generation(config) => spawned,
            _ = stop.changed() => return,
        };
        let (connection, mut child) = match spawned {
            Ok(generation) => generation,
            Err(error) => {
                tracing::error!(tenant = %config.label, %error, "model worker did not start");
                shared
                    .status
                    .send_replace(Status::Down(error.message().to_string()));
                if !config.restart {
                    return;
                }
                if !backoff(&mut failures, started, &mut stop).await {
                    return;
                }
                continue;
            }
        };
        let alive = reload(&shared, &connection).await;
        if alive {
            shared
                .status
                .send_replace(Status::Ready(Arc::clone(&connection)));
        }
        let ended = tokio::select! {
            status = child.wait() => status.ok(),
            _ = connection.died.notified() => {
                match tokio::time::timeout(Duration::from_secs(2), child.wait()).await {
                    Ok(status) => status.ok(),
                    Err(_) => {
                        connection.kill("protocol");
                        child.wait().await.ok()
                    }
                }
            }
            _ = stop.changed() => {
                connection.fail_all("the model worker was shut down");
                let _ = child.kill().await;
                return;
            }
        };
        let (mut cause, mut detail) = ended
            .map(describe_exit)
            .unwrap_or(("exited", "ended".into()));
        if let Some(ours) = *lock(&connection.kill_cause) {
            cause = ours;
            detail = match ours {
                "hang" => "stopped by the server: a call exceeded the call timeout".into(),
                "load_timeout" => "stopped by the server: a load exceeded the load timeout".into(),
                _ => "stopped by the server: it broke the worker protocol".into(),
            };
        }
        let reason = format!(
            "the model worker of '{}' {detail} while this call was running{}",
            config.label,
            if config.restart {
                "; it is being restarted"
            } else {
                ""
            }
        );
        if config.restart {
            shared.status.send_replace(Status::Starting);
        } else {
            shared
                .status
                .send_replace(Status::Down(format!("the model worker {detail}")));
        }
        connection.fail_all(&reason);
        tracing::warn!(tenant = %config.label, cause, %detail, "model worker ended");
        if let Some(observer) = &config.observer {
            observer.restarted(&config.label, cause);
        }
        if !config.restart || !backoff(&mut failures, started, &mut stop).await {
            return;
        }
    }
}

/// Sleeps before the next start: 100 ms doubling to 5 s, reset after a 30 s generation.
/// `false` when the worker is being shut down.
async fn backoff(failures: &mut u32, started: Instant, stop: &mut watch::Receiver<()>) -> bool {
    if started.elapsed() > Duration::from_secs(30) {
        *failures = 0;
    }
    let delay = Duration::from_millis(100u64 << (*failures).min(6)).min(Duration::from_secs(5));
    *failures += 1;
    tokio::select! {
        _ = tokio::time::sleep(delay) => true,
        _ = stop.changed() => false,
    }
}

/// Loads every model that was loaded before into a new generation. A model whose load kills
/// the worker is marked broken (it would crash every generation) and not loaded again.
/// Returns whether the generation survived.
async fn reload(shared: &Shared, connection: &Connection) -> bool {
    let models: Vec<(u64, Bytes, OnnxOptions)> = lock(&shared.models)
        .iter()
        .filter(|(_, registered)| registered.loaded && registered.broken.get().is_none())
        .map(|(handle, registered)| (*handle, registered.onnx.clone(), registered.options.clone()))
        .collect();
    for (handle, onnx, options) in models {
        let result = connection
            .load(shared, handle, onnx, options, shared.config.load_timeout)
            .await;
        if result.is_ok() && !lock(&shared.models).contains_key(&handle) {
            // Its model was dropped while this generation was loading it.
            let _ = connection.queue(&ToWorker::Unload { handle });
        }
        if let Err(error) = result {
            let dead = lock(&connection.calls).dead.is_some();
            let reason = if dead || error.kind() == ErrorKind::Unavailable {
                format!("the model could not be reloaded after its worker restarted: {error}")
            } else {
                format!("the model no longer loads: {error}")
            };
            if let Some(registered) = lock(&shared.models).get_mut(&handle) {
                let _ = registered.broken.set(reason);
            }
            if dead {
                return false;
            }
        }
    }
    lock(&connection.calls).dead.is_none()
}

/// Loads a model once in a worker of its own that is never restarted, and reports its
/// metadata: the push-time check that a model loads within the tenant's memory and the load
/// timeout without touching the tenant's serving worker. Failures are `InvalidArgument`.
pub async fn trial_load(
    mut config: WorkerConfig,
    onnx: Bytes,
    options: OnnxOptions,
    max_batch_size: usize,
) -> Result<ModelMetadata> {
    config.restart = false;
    config.observer = None;
    config.slots = 1;
    config.slot_bytes = 4096;
    let limits = format!(
        "model memory {}, load timeout {} s",
        config
            .memory_limit
            .map(|bytes| format!("{} MiB", bytes >> 20))
            .unwrap_or_else(|| "unlimited".into()),
        config.load_timeout.as_secs()
    );
    let on_gpu = options.execution != crate::onnx::Execution::Cpu;
    let worker = ModelWorker::start(config)?;
    let loaded = worker.load(onnx, options, max_batch_size).await;
    match loaded {
        Ok(model) => Ok(model.metadata.clone()),
        // No GPU here, or no CUDA provider: the machine's reason, not the tenant's limits.
        Err(error) if on_gpu && error.message().to_ascii_lowercase().contains("cuda") => Err(error),
        Err(error)
            if error.kind() == ErrorKind::Unavailable
                || ["bad_alloc", "allocate", "memory"]
                    .iter()
                    .any(|word| error.message().contains(word)) =>
        {
            Err(Error::invalid(format!(
                "the model cannot be loaded within the tenant's limits ({limits}): {}",
                error.message()
            )))
        }
        Err(error) => Err(error),
    }
}
