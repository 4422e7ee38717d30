//! The dynamic batcher: concurrent requests to one model version are merged along dimension 0
//! into one backend call, and the outputs are split back, row for row, to each caller.
//!
//! [`BatchedModel`] wraps any [`Model`] and is itself a `Model`, so everything that calls a model
//! — HTTP requests, graph model nodes, and plugins' `wasi:nn` `compute` — goes through the same
//! queue: calls from different plugins and different tenants on a shared model batch together.
//!
//! Scheduling follows Triton's dynamic batcher. A batch is formed only when an instance is free
//! (so while all instances are busy, waiting requests pile up into the next, larger batch). It
//! takes the first request, then waiting requests with the same signature (input names,
//! datatypes and dimensions after the first) while they fit in `max_batch_size`; if the rows
//! reach neither a preferred batch size nor the maximum, it waits for more until the first
//! request has waited `max_queue_delay`. A full queue refuses at once (503); a request that
//! waited past its queue timeout gets 504; a caller that went away is dropped from the queue
//! without running.
//!
//! Two things differ from a plain timer wait, so that batching costs a lone request nothing and
//! the delay is the one configured:
//! - **Adaptive:** the batcher counts the model's requests in flight (queued, in a batch, or
//!   computing, until their answer is sent). When every request in flight is already in the
//!   batch being formed, no other can join it in time, so the batch goes at once instead of
//!   waiting out the delay: at concurrency 1 a batched model answers as fast as an unbatched
//!   one, and under load the wait still fills batches. The count falling also wakes the wait.
//! - **Exact:** the delay ends on [`crate::precise_timer`] (a condition-variable wait of the
//!   requested length), not at tokio's next 1 ms tick.
//!
//! Tenants share a model's queue fairly ([`FairQueue`]): each tenant (the request's
//! [`RequestContext::tenant`]) has its own first-in-first-out line, the first request of a batch
//! comes from the tenants in turn, and the batch is filled one request per tenant in turn. So a
//! tenant with a thousand requests waiting delays another tenant's one request by at most one
//! batch per instance, not a thousand. Admission is fair too: a full queue still admits a
//! tenant that holds less than its share (`max_queue_size` divided among the tenants waiting),
//! so one tenant filling the queue cannot lock the others out (the queue then holds at most
//! twice `max_queue_size`). Requests that cannot be merged (no batch dimension, or more rows
//! than `max_batch_size`) skip the queue but take the same instance turns, shared fairly between
//! them and the batches ([`FairGate`]).
//!
//! Batch jobs' rows ([`RequestContext::batch`]) wait in a lane of their own: a batch starts
//! from a real-time request whenever one waits and takes real-time requests before batch rows,
//! which only fill the room left.
//!
//! One request must not fail the others it was batched with (they may be other tenants'). When
//! a merged call fails, each member whose caller is still waiting runs again alone, one after
//! another on the same instance, and gets the result of its own run; the merged call's error is
//! never shown to anyone (it may quote another request's values). So a bad request costs its
//! batch one extra backend call per member, once: a batch of one is never retried.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use tokio::sync::{Notify, mpsc, oneshot};
use weft_core::fair::{FairGate, ShareKey};
use weft_core::{
    BoxFuture, DataType, Error, ErrorKind, Model, ModelMetadata, NamedTensor, RequestContext,
    Result, Spent, Tensor, bytes_elements,
};

/// How a model batches (model.toml's `[dynamic_batching]`, plus its limits).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BatchingConfig {
    /// Most rows in one backend call.
    pub max_batch_size: usize,
    /// Batch sizes worth dispatching at once, without waiting for `max_queue_delay`.
    pub preferred_batch_sizes: Vec<usize>,
    /// How long the oldest waiting request may be held back for a bigger batch.
    pub max_queue_delay: Duration,
    /// Most requests waiting; more are refused with 503.
    pub max_queue_size: usize,
    /// A request that waits longer than this is answered with 504 instead of run.
    pub queue_timeout: Option<Duration>,
    /// Backend calls in flight at once (the model's instance count).
    pub instances: usize,
}

/// Counters for metrics and tests.
#[derive(Debug, Default)]
pub struct BatchStats {
    /// Backend calls made from the queue, reruns of single requests included.
    pub batches: AtomicU64,
    /// Requests those calls carried (a request run again alone counts again).
    pub requests: AtomicU64,
    /// Rows those calls carried.
    pub rows: AtomicU64,
    /// Requests run again alone because the merged call they were part of failed.
    pub retried: AtomicU64,
    /// Requests waiting now.
    pub queue_depth: AtomicUsize,
    /// Requests refused because the queue was full.
    pub rejected: AtomicU64,
    /// Requests answered 504 after waiting past their queue timeout.
    pub timed_out: AtomicU64,
}

/// Sees every batch, for metrics. Called on the batcher's tasks; keep it cheap.
pub trait BatchObserver: Send + Sync {
    /// A backend call of `rows` rows for `requests` requests took `compute`.
    fn batch(&self, rows: usize, requests: usize, compute: Duration);
    /// A request waited `queued` before its batch started.
    fn waited(&self, queued: Duration);
    /// Requests waiting now.
    fn depth(&self, depth: usize);
    /// A merged call failed and one of its requests runs again alone (the rerun is also
    /// reported to [`BatchObserver::batch`]).
    fn retried(&self) {}
    /// A request was refused because the queue (or its tenant's share) was full.
    fn rejected(&self) {}
}

/// What a caller gets back: its outputs, how long it queued and how long its batch computed.
struct Reply {
    result: Result<Vec<NamedTensor>>,
    queued: Duration,
    compute: Duration,
}

/// The runtime every batch scheduler runs on, once the server names one.
static SCHEDULER_RUNTIME: OnceLock<tokio::runtime::Handle> = OnceLock::new();

/// Makes every model's batch scheduler (started by the model's first call) run on `runtime`,
/// the server's request runtime, whichever runtime that first call came from: batch jobs'
/// rows run on a low-priority runtime of their own and must not take a model's scheduler
/// there. Without it a scheduler starts on the runtime of the first call. The first call of
/// this function wins.
pub fn run_schedulers_on(runtime: tokio::runtime::Handle) {
    let _ = SCHEDULER_RUNTIME.set(runtime);
}

/// Input names, datatypes and dims after the first: requests batch only with their own kind.
pub(crate) type Signature = Vec<(String, DataType, Vec<usize>)>;

struct Waiting {
    inputs: Vec<NamedTensor>,
    /// Whom it runs for: a member that runs alone (a batch of one, or a rerun after a merged
    /// call failed) runs under its own request.
    request: RequestContext,
    rows: usize,
    signature: Signature,
    /// The tenant's place in the queue; dropped (freeing it) when the request leaves the queue.
    slot: QueueSlot,
    enqueued: Instant,
    reply: oneshot::Sender<Reply>,
    /// Set when the scheduler takes the request into a batch: from then on the caller waits
    /// for the answer even past its queue timeout (the timeout is for queueing, not compute).
    dispatched: Arc<AtomicBool>,
    /// Counts the request in flight until its answer is sent (or it is dropped unanswered).
    in_flight: InFlight,
}

/// How many of a model's batchable requests are in flight, and a signal when one ends.
#[derive(Default)]
struct InFlightCount {
    count: AtomicUsize,
    fell: Notify,
}

/// One request's share of [`InFlightCount`], given back when dropped.
struct InFlight(Arc<InFlightCount>);

impl InFlight {
    fn enter(count: &Arc<InFlightCount>) -> Self {
        count.count.fetch_add(1, Ordering::SeqCst);
        InFlight(Arc::clone(count))
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.count.fetch_sub(1, Ordering::SeqCst);
        // One waiter at most (the scheduler); a stored permit just makes it check again.
        self.0.fell.notify_one();
    }
}

/// Where a merged batch's inputs are written. The server supplies page-locked (pinned) host
/// memory for a model on a GPU, so the provider's copy to the device is a DMA from it rather
/// than a copy through the driver's own bounce buffer; the engine knows only this trait.
pub trait Staging: Send + Sync {
    /// One buffer holding `parts` back to back, or `None` to stage in ordinary memory (no
    /// pinned memory left, or none on this machine).
    fn stage(&self, parts: &[&[u8]]) -> Option<Bytes>;
}

/// A model behind a dynamic batcher.
pub struct BatchedModel {
    inner: Arc<dyn Model>,
    config: BatchingConfig,
    stats: Arc<BatchStats>,
    observer: Option<Arc<dyn BatchObserver>>,
    /// Where merged batches are written (ordinary memory when `None`).
    staging: Option<Arc<dyn Staging>>,
    /// Instance turns: one per backend call in flight, shared by the batches (key `None`) and
    /// by requests that cannot be merged (their tenant's key).
    turns: FairGate,
    /// How many requests each tenant has waiting, for fair admission.
    shares: Arc<Mutex<QueueShares>>,
    /// The scheduler starts with the first request, inside the async runtime.
    queue: OnceLock<mpsc::UnboundedSender<Waiting>>,
    in_flight: Arc<InFlightCount>,
}

impl BatchedModel {
    pub fn new(inner: Arc<dyn Model>, config: BatchingConfig) -> Self {
        let instances = config.instances.max(1);
        BatchedModel {
            inner,
            config,
            stats: Arc::default(),
            observer: None,
            staging: None,
            turns: FairGate::new(instances, instances),
            shares: Arc::default(),
            queue: OnceLock::new(),
            in_flight: Arc::default(),
        }
    }

    /// Reports every batch, wait and queue depth to `observer` (metrics).
    pub fn with_observer(mut self, observer: Arc<dyn BatchObserver>) -> Self {
        self.observer = Some(observer);
        self
    }

    /// Writes merged batches through `staging` (pinned memory for a model on a GPU).
    pub fn with_staging(mut self, staging: Arc<dyn Staging>) -> Self {
        self.staging = Some(staging);
        self
    }

    pub fn stats(&self) -> &Arc<BatchStats> {
        &self.stats
    }

    pub fn config(&self) -> &BatchingConfig {
        &self.config
    }

    fn sender(&self) -> &mpsc::UnboundedSender<Waiting> {
        self.queue.get_or_init(|| {
            let (sender, receiver) = mpsc::unbounded_channel();
            let scheduler = Scheduler {
                inner: Arc::clone(&self.inner),
                config: self.config.clone(),
                stats: Arc::clone(&self.stats),
                observer: self.observer.clone(),
                staging: self.staging.clone(),
                turns: self.turns.clone(),
                queue: Lanes::default(),
                in_flight: Arc::clone(&self.in_flight),
            };
            match SCHEDULER_RUNTIME.get() {
                Some(runtime) => drop(runtime.spawn(scheduler.run(receiver))),
                None => drop(tokio::spawn(scheduler.run(receiver))),
            }
            sender
        })
    }

    async fn submit(
        &self,
        request: &RequestContext,
        inputs: Vec<NamedTensor>,
    ) -> Result<Vec<NamedTensor>> {
        let tenant = request.share_key();
        let Some((rows, signature)) = batch_signature(&inputs)
            .filter(|(rows, _)| *rows > 0 && *rows <= self.config.max_batch_size)
        else {
            // Nothing to merge (no batch dimension, or already a full batch): run it alone, in
            // an instance turn shared fairly with the batches and other tenants.
            let turn = crate::shared::take_turn(&self.turns, request).await;
            let started = Instant::now();
            let result = self.inner.infer(request, inputs).await;
            drop(turn);
            let compute = started.elapsed();
            request.add(Spent::Compute, compute);
            if let Some(observer) = &self.observer {
                observer.batch(rows_of(&result), 1, compute);
            }
            return result;
        };
        let slot = match QueueSlot::take(&self.shares, tenant, self.config.max_queue_size) {
            Ok(slot) => slot,
            Err(refusal) => {
                self.stats.rejected.fetch_add(1, Ordering::Relaxed);
                if let Some(observer) = &self.observer {
                    observer.rejected();
                }
                return Err(Error::unavailable(refusal));
            }
        };
        self.stats.queue_depth.fetch_add(1, Ordering::SeqCst);
        report_depth(&self.stats, self.observer.as_deref());
        let (reply, mut answer) = oneshot::channel();
        let dispatched = Arc::new(AtomicBool::new(false));
        let waiting = Waiting {
            inputs,
            request: request.clone(),
            rows,
            signature,
            slot,
            enqueued: Instant::now(),
            reply,
            dispatched: Arc::clone(&dispatched),
            in_flight: InFlight::enter(&self.in_flight),
        };
        if self.sender().send(waiting).is_err() {
            self.stats.queue_depth.fetch_sub(1, Ordering::SeqCst);
            return Err(Error::unavailable("the model's batcher has stopped"));
        }
        // The queue timeout, or the request's own deadline when that comes first.
        let timeout = match (self.config.queue_timeout, request.remaining()) {
            (Some(queue), Some(left)) => Some(queue.min(left)),
            (queue, left) => queue.or(left),
        };
        let answered = match timeout {
            None => answer.await,
            Some(timeout) => match tokio::time::timeout(timeout, &mut answer).await {
                Ok(answered) => answered,
                // Still queued when its timeout passed: answer now, even while every instance
                // is busy; the scheduler drops it when it gets there (its caller has left).
                Err(_) if !dispatched.load(Ordering::SeqCst) => {
                    self.stats.timed_out.fetch_add(1, Ordering::Relaxed);
                    request.add(Spent::Queue, timeout);
                    return Err(queue_timeout_error(timeout));
                }
                Err(_) => answer.await,
            },
        };
        let reply =
            answered.map_err(|_| Error::internal("the model's batcher dropped the request"))?;
        request.add(Spent::Queue, reply.queued);
        request.add(Spent::Compute, reply.compute);
        reply.result
    }
}

fn queue_timeout_error(timeout: Duration) -> Error {
    Error::new(
        ErrorKind::DeadlineExceeded,
        format!("the request waited in the model's batch queue longer than {timeout:?}"),
    )
}

/// Rows of a successful result (dimension 0 of its first output), for metrics.
fn rows_of(result: &Result<Vec<NamedTensor>>) -> usize {
    result
        .as_ref()
        .ok()
        .and_then(|outputs| outputs.first())
        .and_then(|output| output.tensor.shape().first().copied())
        .unwrap_or(0)
}

fn report_depth(stats: &BatchStats, observer: Option<&dyn BatchObserver>) {
    if let Some(observer) = observer {
        observer.depth(stats.queue_depth.load(Ordering::SeqCst));
    }
}

impl Model for BatchedModel {
    fn metadata(&self) -> &ModelMetadata {
        self.inner.metadata()
    }

    fn health(&self) -> std::result::Result<(), String> {
        self.inner.health()
    }

    fn serving(&self) -> weft_core::ServingConfig {
        let inner = self.inner.serving();
        weft_core::ServingConfig {
            gpu: inner.gpu,
            gpu_memory_bytes: inner.gpu_memory_bytes,
            instances: self.config.instances,
            dynamic_batching: Some(weft_core::DynamicBatchingConfig {
                preferred_batch_size: self.config.preferred_batch_sizes.clone(),
                max_queue_delay_microseconds: u64::try_from(
                    self.config.max_queue_delay.as_micros(),
                )
                .unwrap_or(u64::MAX),
            }),
        }
    }

    fn infer<'a>(
        &'a self,
        request: &'a RequestContext,
        inputs: Vec<NamedTensor>,
    ) -> BoxFuture<'a, Result<Vec<NamedTensor>>> {
        Box::pin(self.submit(request, inputs))
    }
}

/// The rows (dimension 0, the same across inputs) and signature of a request; `None` when it
/// cannot be merged with others.
pub(crate) fn batch_signature(inputs: &[NamedTensor]) -> Option<(usize, Signature)> {
    let rows = *inputs.first()?.tensor.shape().first()?;
    let mut signature = Vec::with_capacity(inputs.len());
    for input in inputs {
        let (&first, rest) = input.tensor.shape().split_first()?;
        if first != rows {
            return None;
        }
        signature.push((input.name.clone(), input.tensor.datatype(), rest.to_vec()));
    }
    signature.sort();
    Some((rows, signature))
}

/// How many requests each tenant has in a model's queue.
#[derive(Default)]
struct QueueShares {
    waiting: HashMap<ShareKey, usize>,
    total: usize,
}

fn lock_shares(shares: &Mutex<QueueShares>) -> MutexGuard<'_, QueueShares> {
    // Counters only, updated without panicking code under the lock.
    shares
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// One tenant's place in a model's queue, given back when dropped.
struct QueueSlot {
    shares: Arc<Mutex<QueueShares>>,
    tenant: ShareKey,
}

impl QueueSlot {
    /// A place for `tenant`: granted while the queue holds fewer than `max_queue_size`, and
    /// beyond that while the tenant holds less than its share (`max_queue_size` divided among
    /// the tenants waiting, itself included). Else the refusal's text.
    fn take(
        shares: &Arc<Mutex<QueueShares>>,
        tenant: ShareKey,
        max_queue_size: usize,
    ) -> std::result::Result<Self, String> {
        let mut state = lock_shares(shares);
        let mine = state.waiting.get(&tenant).copied().unwrap_or(0);
        let tenants = state.waiting.len() + usize::from(mine == 0);
        let share = (max_queue_size / tenants.max(1)).max(1);
        if state.total >= max_queue_size && mine >= share {
            // Never says how many other tenants wait or what they hold.
            return Err(if tenants == 1 {
                format!(
                    "the model's batch queue is full ({max_queue_size} requests waiting; \
                     max_queue_size)"
                )
            } else {
                format!(
                    "the model's batch queue is full and this tenant holds its share of it \
                     ({mine} requests waiting; max_queue_size {max_queue_size} is shared \
                     between the tenants using the model)"
                )
            });
        }
        state.total += 1;
        *state.waiting.entry(tenant.clone()).or_insert(0) += 1;
        Ok(QueueSlot {
            shares: Arc::clone(shares),
            tenant,
        })
    }
}

impl Drop for QueueSlot {
    fn drop(&mut self) {
        let mut state = lock_shares(&self.shares);
        state.total = state.total.saturating_sub(1);
        if let Some(waiting) = state.waiting.get_mut(&self.tenant) {
            *waiting = waiting.saturating_sub(1);
            if *waiting == 0 {
                state.waiting.remove(&self.tenant);
            }
        }
    }
}

/// How far into one tenant's line [`FairQueue::take_fitting`] looks for a request that fits.
const FIT_SCAN: usize = 32;

/// The waiting requests of a model, one first-in-first-out line per tenant, served in turn.
struct FairQueue {
    /// Tenants with requests waiting, in the order their turn comes.
    turns: VecDeque<ShareKey>,
    lines: HashMap<ShareKey, VecDeque<Waiting>>,
    len: usize,
    /// [`FairQueue::purge_abandoned`] scans only once the queue has doubled since its last
    /// sweep, so sweeping costs O(1) per request, not O(queue) per batch.
    sweep_at: usize,
}

/// The smallest queue worth sweeping for abandoned requests.
const SWEEP_FLOOR: usize = 64;

impl Default for FairQueue {
    fn default() -> Self {
        FairQueue {
            turns: VecDeque::new(),
            lines: HashMap::new(),
            len: 0,
            sweep_at: SWEEP_FLOOR,
        }
    }
}

impl FairQueue {
    fn push(&mut self, waiting: Waiting) {
        let tenant = waiting.slot.tenant.clone();
        let line = self.lines.entry(tenant.clone()).or_default();
        if line.is_empty() {
            self.turns.push_back(tenant);
        }
        line.push_back(waiting);
        self.len += 1;
    }

    fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The oldest request of the tenant whose turn it is.
    fn pop_turn(&mut self) -> Option<Waiting> {
        let tenant = self.turns.front()?.clone();
        self.take_from(0, &tenant, 0)
    }

    /// A request with `signature` and at most `room` rows, from the first tenant in turn that
    /// has one (its oldest such request among the first [`FIT_SCAN`] of its line).
    fn take_fitting(&mut self, signature: &Signature, room: usize) -> Option<Waiting> {
        for turn in 0..self.turns.len() {
            let tenant = self.turns.get(turn)?.clone();
            let found = self.lines.get(&tenant).and_then(|line| {
                line.iter()
                    .take(FIT_SCAN)
                    .position(|waiting| waiting.signature == *signature && waiting.rows <= room)
            });
            if let Some(index) = found {
                return self.take_from(turn, &tenant, index);
            }
        }
        None
    }

    /// Removes entry `index` of `tenant`'s line (the tenant at `turn`), moving the tenant to
    /// the back of the turns, or out of them when its line is empty.
    fn take_from(&mut self, turn: usize, tenant: &ShareKey, index: usize) -> Option<Waiting> {
        let line = self.lines.get_mut(tenant)?;
        let waiting = line.remove(index)?;
        self.len -= 1;
        let emptied = line.is_empty();
        self.turns.remove(turn);
        if emptied {
            self.lines.remove(tenant);
        } else {
            self.turns.push_back(tenant.clone());
        }
        Some(waiting)
    }

    /// Drops the requests whose callers went away, when the queue has grown enough since the
    /// last sweep to make it worth a scan (abandoned requests are also dropped as they come up,
    /// see `Scheduler::admit`); returns how many.
    fn purge_abandoned(&mut self) -> usize {
        if self.len < self.sweep_at {
            return 0;
        }
        let before = self.len;
        self.lines.retain(|_, line| {
            line.retain(|waiting| !waiting.reply.is_closed());
            !line.is_empty()
        });
        let lines = &self.lines;
        self.turns.retain(|tenant| lines.contains_key(tenant));
        self.len = self.lines.values().map(VecDeque::len).sum();
        self.sweep_at = (2 * self.len).max(SWEEP_FLOOR);
        before - self.len
    }
}

/// The queue in two lanes: real-time requests and batch jobs' rows
/// ([`RequestContext::batch`]). A batch starts from a real-time request whenever one waits, and
/// takes real-time requests before batch rows, so real-time requests never wait behind batch
/// rows in the queue; batch rows fill the room real-time ones leave.
#[derive(Default)]
struct Lanes {
    realtime: FairQueue,
    batch: FairQueue,
}

impl Lanes {
    fn push(&mut self, waiting: Waiting) {
        if waiting.request.batch() {
            self.batch.push(waiting);
        } else {
            self.realtime.push(waiting);
        }
    }

    fn is_empty(&self) -> bool {
        self.realtime.is_empty() && self.batch.is_empty()
    }

    fn pop_turn(&mut self) -> Option<Waiting> {
        self.realtime.pop_turn().or_else(|| self.batch.pop_turn())
    }

    fn take_fitting(&mut self, signature: &Signature, room: usize) -> Option<Waiting> {
        self.realtime
            .take_fitting(signature, room)
            .or_else(|| self.batch.take_fitting(signature, room))
    }

    fn purge_abandoned(&mut self) -> usize {
        self.realtime.purge_abandoned() + self.batch.purge_abandoned()
    }
}

struct Scheduler {
    inner: Arc<dyn Model>,
    config: BatchingConfig,
    stats: Arc<BatchStats>,
    observer: Option<Arc<dyn BatchObserver>>,
    staging: Option<Arc<dyn Staging>>,
    turns: FairGate,
    /// Requests taken off the channel and not yet in a batch.
    queue: Lanes,
    in_flight: Arc<InFlightCount>,
}

impl Scheduler {
    async fn run(mut self, mut receiver: mpsc::UnboundedReceiver<Waiting>) {
        loop {
            // A request first, then an instance turn: an idle scheduler holds no turn, so
            // requests that cannot be merged have every instance.
            if self.queue.is_empty() {
                match receiver.recv().await {
                    Some(waiting) => self.queue.push(waiting),
                    None => return,
                }
            }
            let permit = self.turns.acquire(None).await;
            self.drain(&mut receiver);
            let abandoned = self.queue.purge_abandoned();
            if abandoned > 0 {
                self.stats
                    .queue_depth
                    .fetch_sub(abandoned, Ordering::SeqCst);
                report_depth(&self.stats, self.observer.as_deref());
            }
            let first = loop {
                match self.queue.pop_turn() {
                    Some(waiting) => {
                        if let Some(first) = self.admit(waiting) {
                            break Some(first);
                        }
                    }
                    None => break None,
                }
            };
            let Some(first) = first else {
                continue;
            };
            let batch = self.collect(first, &mut receiver).await;
            self.stats
                .queue_depth
                .fetch_sub(batch.len(), Ordering::SeqCst);
            report_depth(&self.stats, self.observer.as_deref());
            let inner = Arc::clone(&self.inner);
            let stats = Arc::clone(&self.stats);
            let observer = self.observer.clone();
            let staging = self.staging.clone();
            tokio::spawn(async move {
                run_batch(
                    inner.as_ref(),
                    &stats,
                    observer.as_deref(),
                    staging.as_deref(),
                    batch,
                )
                .await;
                drop(permit);
            });
        }
    }

    /// Moves every request sent so far into the fair queue.
    fn drain(&mut self, receiver: &mut mpsc::UnboundedReceiver<Waiting>) {
        while let Ok(waiting) = receiver.try_recv() {
            self.queue.push(waiting);
        }
    }

    /// Drops a request whose caller left and answers one that waited too long.
    fn admit(&self, waiting: Waiting) -> Option<Waiting> {
        if waiting.reply.is_closed() {
            self.stats.queue_depth.fetch_sub(1, Ordering::SeqCst);
            report_depth(&self.stats, self.observer.as_deref());
            return None;
        }
        if let Some(timeout) = self.config.queue_timeout
            && waiting.enqueued.elapsed() > timeout
        {
            self.stats.queue_depth.fetch_sub(1, Ordering::SeqCst);
            self.stats.timed_out.fetch_add(1, Ordering::Relaxed);
            report_depth(&self.stats, self.observer.as_deref());
            let _ = waiting.reply.send(Reply {
                result: Err(queue_timeout_error(timeout)),
                queued: waiting.enqueued.elapsed(),
                compute: Duration::ZERO,
            });
            return None;
        }
        waiting.dispatched.store(true, Ordering::SeqCst);
        Some(waiting)
    }

    /// Whether a batch of `rows` should go now rather than wait for more.
    fn ready(&self, rows: usize) -> bool {
        rows >= self.config.max_batch_size || self.config.preferred_batch_sizes.contains(&rows)
    }

    async fn collect(
        &mut self,
        first: Waiting,
        receiver: &mut mpsc::UnboundedReceiver<Waiting>,
    ) -> Vec<Waiting> {
        // The delay is bounded by model.toml's validation (10 s); should a deadline ever be past
        // what Instant can hold, the batch goes without waiting rather than panicking.
        let deadline = first
            .enqueued
            .checked_add(self.config.max_queue_delay)
            .unwrap_or(first.enqueued);
        // One timer for the whole wait, however many times the loop below goes round.
        let mut timer = std::pin::pin!(crate::precise_timer::sleep_until(deadline));
        let mut rows = first.rows;
        let mut batch = vec![first];
        while !self.ready(rows) {
            self.drain(receiver);
            let room = self.config.max_batch_size.saturating_sub(rows);
            if let Some(next) = self.queue.take_fitting(&batch[0].signature, room) {
                if let Some(next) = self.admit(next) {
                    rows += next.rows;
                    batch.push(next);
                }
                continue;
            }
            if !self.queue.is_empty() {
                // Requests wait that do not fit this batch: send what we have rather than
                // hold them back.
                break;
            }
            if Instant::now() >= deadline {
                break;
            }
            // Every request in flight is in this batch: no other can join it, go now.
            if self.in_flight.count.load(Ordering::SeqCst) <= batch.len() {
                break;
            }
            tokio::select! {
                received = receiver.recv() => match received {
                    Some(waiting) => self.queue.push(waiting),
                    None => break,
                },
                // A request ended (answered or abandoned): check the count again.
                () = self.in_flight.fell.notified() => {}
                () = &mut timer => break,
            }
        }
        batch
    }
}

async fn run_batch(
    inner: &dyn Model,
    stats: &BatchStats,
    observer: Option<&dyn BatchObserver>,
    staging: Option<&dyn Staging>,
    batch: Vec<Waiting>,
) {
    let started = Instant::now();
    let rows: Vec<usize> = batch.iter().map(|w| w.rows).collect();
    let total_rows: usize = rows.iter().sum();
    count_call(stats, batch.len(), total_rows);
    let queued: Vec<Duration> = batch
        .iter()
        .map(|w| started.saturating_duration_since(w.enqueued))
        .collect();
    if let Some(observer) = observer {
        queued.iter().for_each(|&wait| observer.waited(wait));
    }
    let requests = batch.len();
    let mut inputs = Vec::with_capacity(requests);
    let mut members = Vec::with_capacity(requests);
    let mut replies = Vec::with_capacity(requests);
    // The members stay counted in flight until run_batch returns, their answers sent.
    let mut counted = Vec::with_capacity(requests);
    for waiting in batch {
        inputs.push(waiting.inputs);
        members.push(waiting.request);
        replies.push(waiting.reply);
        counted.push(waiting.in_flight);
    }
    if requests == 1 {
        // Alone already: its result, error included, is its own.
        let result = match (inputs.pop(), members.first()) {
            (Some(only), Some(request)) => inner.infer(request, only).await,
            _ => Ok(Vec::new()),
        };
        let compute = started.elapsed();
        if let Some(observer) = observer {
            observer.batch(total_rows, 1, compute);
        }
        if let (Some(reply), Some(&queued)) = (replies.into_iter().next(), queued.first()) {
            let _ = reply.send(Reply {
                result,
                queued,
                compute,
            });
        }
        return;
    }
    // The members' inputs are kept (tensor data is shared, not copied) for a rerun alone.
    let outcome = match merge(&inputs, staging) {
        // A merged call runs for several requests, perhaps of several tenants: for no one.
        Ok(merged) => match inner.infer(&RequestContext::background(), merged).await {
            Ok(outputs) => split(outputs, &rows),
            Err(error) => Err(error),
        },
        Err(error) => Err(error),
    };
    let compute = started.elapsed();
    if let Some(observer) = observer {
        observer.batch(total_rows, requests, compute);
    }
    // Each caller is charged its rows' share of the batch's compute, so a tenant's cost does
    // not grow with the other requests it happened to be batched with.
    let shares: Vec<Duration> = rows
        .iter()
        .map(|&r| compute_share(compute, r, total_rows, requests))
        .collect();
    match outcome {
        Ok(parts) => {
            for (((reply, part), queued), compute) in
                replies.into_iter().zip(parts).zip(queued).zip(shares)
            {
                let _ = reply.send(Reply {
                    result: Ok(part),
                    queued,
                    compute,
                });
            }
        }
        Err(error) => {
            // Operator logs only, and at debug: a tenant can cause this at will.
            tracing::debug!(requests, %error, "a merged batch failed; its requests run again alone");
            let members = inputs.into_iter().zip(members).zip(replies).zip(rows);
            for (((((inputs, request), reply), rows), queued), share) in
                members.zip(queued).zip(shares)
            {
                // Its caller left (perhaps while an earlier member ran): nobody to answer.
                if reply.is_closed() {
                    continue;
                }
                stats.retried.fetch_add(1, Ordering::Relaxed);
                if let Some(observer) = observer {
                    observer.retried();
                }
                count_call(stats, 1, rows);
                let alone = Instant::now();
                let result = inner.infer(&request, inputs).await;
                let own = alone.elapsed();
                if let Some(observer) = observer {
                    observer.batch(rows, 1, own);
                }
                // A request that fails alone too is charged its share of the failed merged
                // call as well; one that succeeds alone pays only for its own run.
                let compute = if result.is_err() { own + share } else { own };
                let _ = reply.send(Reply {
                    result,
                    queued,
                    compute,
                });
            }
        }
    }
}

/// Counts one backend call of `requests` requests and `rows` rows.
fn count_call(stats: &BatchStats, requests: usize, rows: usize) {
    stats.batches.fetch_add(1, Ordering::Relaxed);
    stats.requests.fetch_add(requests as u64, Ordering::Relaxed);
    stats.rows.fetch_add(rows as u64, Ordering::Relaxed);
}

/// `rows` of `total_rows` of a batch's `compute`; an equal share per request when the batch has
/// no rows to weigh by.
fn compute_share(compute: Duration, rows: usize, total_rows: usize, requests: usize) -> Duration {
    let (part, whole) = if total_rows == 0 {
        (1, requests.max(1))
    } else {
        (rows, total_rows)
    };
    let nanos = compute.as_nanos() * part as u128 / whole as u128;
    Duration::from_nanos(u64::try_from(nanos).unwrap_or(u64::MAX))
}

/// Concatenates same-signature requests along dimension 0, inputs in the first request's order,
/// each merged input written through `staging` when it has room, else into ordinary memory.
pub(crate) fn merge(
    requests: &[Vec<NamedTensor>],
    staging: Option<&dyn Staging>,
) -> Result<Vec<NamedTensor>> {
    let Some(first) = requests.first() else {
        return Ok(Vec::new());
    };
    let mut merged = Vec::with_capacity(first.len());
    for input in first {
        let parts: Vec<&Tensor> = requests
            .iter()
            .map(|request| {
                request
                    .iter()
                    .find(|t| t.name == input.name)
                    .map(|t| &t.tensor)
                    .ok_or_else(|| Error::internal("batched requests differ in their inputs"))
            })
            .collect::<Result<_>>()?;
        let slices: Vec<&[u8]> = parts.iter().map(|t| t.data().as_ref()).collect();
        let data = match staging.and_then(|staging| staging.stage(&slices)) {
            Some(staged) => staged,
            None => {
                let total_bytes = slices.iter().map(|slice| slice.len()).sum();
                let mut data = BytesMut::with_capacity(total_bytes);
                slices
                    .iter()
                    .for_each(|slice| data.extend_from_slice(slice));
                data.freeze()
            }
        };
        let mut shape = input.tensor.shape().to_vec();
        shape[0] = parts.iter().map(|t| t.shape()[0]).sum();
        merged.push(NamedTensor::new(
            input.name.clone(),
            Tensor::new(input.tensor.datatype(), shape, data)?,
        ));
    }
    Ok(merged)
}

/// Splits each output along dimension 0 into the callers' row counts (zero-copy slices).
pub(crate) fn split(outputs: Vec<NamedTensor>, rows: &[usize]) -> Result<Vec<Vec<NamedTensor>>> {
    let total: usize = rows.iter().sum();
    let mut parts: Vec<Vec<NamedTensor>> = rows.iter().map(|_| Vec::new()).collect();
    for output in outputs {
        let shape = output.tensor.shape();
        if shape.first() != Some(&total) {
            return Err(Error::internal(format!(
                "output '{}' has shape {shape:?}, not {total} rows: the model cannot be batched \
                 (set max_batch_size = 0 or remove [dynamic_batching])",
                output.name
            )));
        }
        let per_row: usize = shape[1..].iter().product();
        let offsets = row_offsets(&output.tensor, per_row, total)?;
        let mut row = 0;
        for (part, &count) in parts.iter_mut().zip(rows) {
            let data: Bytes = output
                .tensor
                .data()
                .slice(offsets[row]..offsets[row + count]);
            let mut piece_shape = shape.to_vec();
            piece_shape[0] = count;
            part.push(NamedTensor::new(
                output.name.clone(),
                Tensor::new(output.tensor.datatype(), piece_shape, data)?,
            ));
            row += count;
        }
    }
    Ok(parts)
}

/// Byte offset of the start of every row, plus the end.
fn row_offsets(tensor: &Tensor, per_row: usize, rows: usize) -> Result<Vec<usize>> {
    if let Some(size) = tensor.datatype().element_size() {
        return Ok((0..=rows).map(|row| row * per_row * size).collect());
    }
    // BYTES: each element is a 4-byte length and its bytes.
    let mut offsets = Vec::with_capacity(rows + 1);
    let mut position = 0;
    offsets.push(0);
    for (index, element) in bytes_elements(tensor.data())?.enumerate() {
        position += 4 + element.len();
        if per_row > 0 && (index + 1) % per_row == 0 {
            offsets.push(position);
        }
    }
    if per_row == 0 {
        offsets.resize(rows + 1, 0);
    }
    if offsets.len() != rows + 1 {
        return Err(Error::internal(
            "a BYTES output does not divide into its rows",
        ));
    }
    Ok(offsets)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compute_is_charged_by_rows() {
        let batch = Duration::from_micros(800);
        assert_eq!(compute_share(batch, 1, 4, 2), Duration::from_micros(200));
        assert_eq!(compute_share(batch, 3, 4, 2), Duration::from_micros(600));
        assert_eq!(compute_share(batch, 0, 0, 4), Duration::from_micros(200));
        assert_eq!(compute_share(batch, 5, 5, 1), batch);
    }
}
