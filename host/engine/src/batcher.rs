//! The dynamic batcher: concurrent requests to one model version are merged along dimension 0
//! into one backend call, and the outputs are split back, row for row, to each caller.
//!
//! [`BatchedModel`] wraps any [`Model`] and is itself a `Model`, so everything that calls a model
//! — HTTP requests, graph model nodes, and plugins' `wasi:nn` `compute` — goes through the same
//! queue: calls from different plugins and different tenants on a shared model batch together.
//!
//! Scheduling follows Triton's dynamic batcher. A batch is formed only when an instance is free
//! (so while all instances are busy, waiting requests pile up into the next, larger batch). It
//! takes the oldest request, then every waiting request with the same signature (input names,
//! datatypes and dimensions after the first) that fits in `max_batch_size`; if the rows reach
//! neither a preferred batch size nor the maximum, it waits for more until the oldest request has
//! waited `max_queue_delay`. A full queue refuses at once (503); a request that waited past its
//! queue timeout gets 504; a caller that went away is dropped from the queue without running.
//!
//! One request must not fail the others it was batched with (they may be other tenants'). When
//! a merged call fails, each member whose caller is still waiting runs again alone, one after
//! another on the same instance, and gets the result of its own run; the merged call's error is
//! never shown to anyone (it may quote another request's values). So a bad request costs its
//! batch one extra backend call per member, once: a batch of one is never retried.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use tokio::sync::{Semaphore, mpsc, oneshot};
use weft_core::{
    BoxFuture, DataType, Error, ErrorKind, Model, ModelMetadata, NamedTensor, Result, Tensor,
    bytes_elements,
};

use crate::accounting::{self, Spent};

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
}

/// What a caller gets back: its outputs, how long it queued and how long its batch computed.
struct Reply {
    result: Result<Vec<NamedTensor>>,
    queued: Duration,
    compute: Duration,
}

/// Input names, datatypes and dims after the first: requests batch only with their own kind.
type Signature = Vec<(String, DataType, Vec<usize>)>;

struct Waiting {
    inputs: Vec<NamedTensor>,
    rows: usize,
    signature: Signature,
    enqueued: Instant,
    reply: oneshot::Sender<Reply>,
    /// Set when the scheduler takes the request into a batch: from then on the caller waits
    /// for the answer even past its queue timeout (the timeout is for queueing, not compute).
    dispatched: Arc<AtomicBool>,
}

/// A model behind a dynamic batcher.
pub struct BatchedModel {
    inner: Arc<dyn Model>,
    config: BatchingConfig,
    stats: Arc<BatchStats>,
    observer: Option<Arc<dyn BatchObserver>>,
    /// The scheduler starts with the first request, inside the async runtime.
    queue: OnceLock<mpsc::UnboundedSender<Waiting>>,
}

impl BatchedModel {
    pub fn new(inner: Arc<dyn Model>, config: BatchingConfig) -> Self {
        BatchedModel {
            inner,
            config,
            stats: Arc::default(),
            observer: None,
            queue: OnceLock::new(),
        }
    }

    /// Reports every batch, wait and queue depth to `observer` (metrics).
    pub fn with_observer(mut self, observer: Arc<dyn BatchObserver>) -> Self {
        self.observer = Some(observer);
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
                instances: Arc::new(Semaphore::new(self.config.instances.max(1))),
                held: VecDeque::new(),
            };
            tokio::spawn(scheduler.run(receiver));
            sender
        })
    }

    async fn submit(&self, inputs: Vec<NamedTensor>) -> Result<Vec<NamedTensor>> {
        let Some((rows, signature)) = batch_signature(&inputs)
            .filter(|(rows, _)| *rows > 0 && *rows <= self.config.max_batch_size)
        else {
            // Nothing to merge (no batch dimension, or already a full batch): run it alone.
            let started = Instant::now();
            let result = self.inner.infer(inputs).await;
            let compute = started.elapsed();
            accounting::add(Spent::Compute, compute);
            if let Some(observer) = &self.observer {
                observer.batch(rows_of(&result), 1, compute);
            }
            return result;
        };
        let depth = self.stats.queue_depth.fetch_add(1, Ordering::SeqCst);
        if depth >= self.config.max_queue_size {
            self.stats.queue_depth.fetch_sub(1, Ordering::SeqCst);
            self.stats.rejected.fetch_add(1, Ordering::Relaxed);
            return Err(Error::unavailable(format!(
                "the model's batch queue is full ({} requests waiting; max_queue_size)",
                self.config.max_queue_size
            )));
        }
        report_depth(&self.stats, self.observer.as_deref());
        let (reply, mut answer) = oneshot::channel();
        let dispatched = Arc::new(AtomicBool::new(false));
        let waiting = Waiting {
            inputs,
            rows,
            signature,
            enqueued: Instant::now(),
            reply,
            dispatched: Arc::clone(&dispatched),
        };
        if self.sender().send(waiting).is_err() {
            self.stats.queue_depth.fetch_sub(1, Ordering::SeqCst);
            return Err(Error::unavailable("the model's batcher has stopped"));
        }
        let answered = match self.config.queue_timeout {
            None => answer.await,
            Some(timeout) => match tokio::time::timeout(timeout, &mut answer).await {
                Ok(answered) => answered,
                // Still queued when its timeout passed: answer now, even while every instance
                // is busy; the scheduler drops it when it gets there (its caller has left).
                Err(_) if !dispatched.load(Ordering::SeqCst) => {
                    self.stats.timed_out.fetch_add(1, Ordering::Relaxed);
                    accounting::add(Spent::Queue, timeout);
                    return Err(queue_timeout_error(timeout));
                }
                Err(_) => answer.await,
            },
        };
        let reply =
            answered.map_err(|_| Error::internal("the model's batcher dropped the request"))?;
        accounting::add(Spent::Queue, reply.queued);
        accounting::add(Spent::Compute, reply.compute);
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

    fn infer(&self, inputs: Vec<NamedTensor>) -> BoxFuture<'_, Result<Vec<NamedTensor>>> {
        Box::pin(self.submit(inputs))
    }
}

/// The rows (dimension 0, the same across inputs) and signature of a request; `None` when it
/// cannot be merged with others.
fn batch_signature(inputs: &[NamedTensor]) -> Option<(usize, Signature)> {
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

struct Scheduler {
    inner: Arc<dyn Model>,
    config: BatchingConfig,
    stats: Arc<BatchStats>,
    observer: Option<Arc<dyn BatchObserver>>,
    instances: Arc<Semaphore>,
    /// Requests taken off the channel that did not fit the last batch; they go first next time.
    held: VecDeque<Waiting>,
}

impl Scheduler {
    async fn run(mut self, mut receiver: mpsc::UnboundedReceiver<Waiting>) {
        loop {
            let Ok(permit) = Arc::clone(&self.instances).acquire_owned().await else {
                return;
            };
            let first = match self.held.pop_front() {
                Some(waiting) => waiting,
                None => match receiver.recv().await {
                    Some(waiting) => waiting,
                    None => return,
                },
            };
            let Some(first) = self.admit(first) else {
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
            tokio::spawn(async move {
                run_batch(inner.as_ref(), &stats, observer.as_deref(), batch).await;
                drop(permit);
            });
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
        let deadline = tokio::time::Instant::from_std(first.enqueued + self.config.max_queue_delay);
        let mut rows = first.rows;
        let mut batch = vec![first];
        // Held requests of the same kind first, oldest first.
        let mut index = 0;
        while index < self.held.len() && rows < self.config.max_batch_size {
            let fits = self.held[index].signature == batch[0].signature
                && rows + self.held[index].rows <= self.config.max_batch_size;
            if !fits {
                index += 1;
                continue;
            }
            if let Some(waiting) = self.held.remove(index).and_then(|w| self.admit(w)) {
                rows += waiting.rows;
                batch.push(waiting);
            }
        }
        while !self.ready(rows) {
            let next = match receiver.try_recv() {
                Ok(waiting) => waiting,
                // Checked first: tokio's timer fires even a past deadline only at its next
                // millisecond tick.
                Err(_) if tokio::time::Instant::now() >= deadline => break,
                Err(_) => match tokio::time::timeout_at(deadline, receiver.recv()).await {
                    Ok(Some(waiting)) => waiting,
                    Ok(None) | Err(_) => break,
                },
            };
            let Some(next) = self.admit(next) else {
                continue;
            };
            if next.signature == batch[0].signature
                && rows + next.rows <= self.config.max_batch_size
            {
                rows += next.rows;
                batch.push(next);
            } else {
                self.held.push_back(next);
                // The next request does not fit: send what we have rather than reorder further.
                break;
            }
        }
        batch
    }
}

async fn run_batch(
    inner: &dyn Model,
    stats: &BatchStats,
    observer: Option<&dyn BatchObserver>,
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
    let (inputs, replies): (Vec<_>, Vec<_>) =
        batch.into_iter().map(|w| (w.inputs, w.reply)).unzip();
    if requests == 1 {
        // Alone already: its result, error included, is its own.
        let mut inputs = inputs;
        let result = match inputs.pop() {
            Some(only) => inner.infer(only).await,
            None => Ok(Vec::new()),
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
    let outcome = match merge(&inputs) {
        Ok(merged) => match inner.infer(merged).await {
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
            let members = inputs.into_iter().zip(replies).zip(rows).zip(queued);
            for ((((inputs, reply), rows), queued), share) in members.zip(shares) {
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
                let result = inner.infer(inputs).await;
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

/// Concatenates same-signature requests along dimension 0, inputs in the first request's order.
fn merge(requests: &[Vec<NamedTensor>]) -> Result<Vec<NamedTensor>> {
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
        let total_bytes = parts.iter().map(|t| t.data().len()).sum();
        let mut data = BytesMut::with_capacity(total_bytes);
        parts.iter().for_each(|t| data.extend_from_slice(t.data()));
        let mut shape = input.tensor.shape().to_vec();
        shape[0] = parts.iter().map(|t| t.shape()[0]).sum();
        merged.push(NamedTensor::new(
            input.name.clone(),
            Tensor::new(input.tensor.datatype(), shape, data.freeze())?,
        ));
    }
    Ok(merged)
}

/// Splits each output along dimension 0 into the callers' row counts (zero-copy slices).
fn split(outputs: Vec<NamedTensor>, rows: &[usize]) -> Result<Vec<Vec<NamedTensor>>> {
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
