//! Batch jobs, the execution half: a JSON Lines file of V2 inference requests run through a
//! [`Model`] chunk by chunk, each chunk's output and error lines committed as one unit.
//!
//! Durability comes from the unit of commit. A chunk's lines are computed in memory and handed
//! to [`JobCheckpoint::commit`] whole; the store behind it writes them and marks the chunk done
//! in one step. After a crash the job starts again from the input's beginning, skips (reads but
//! does not run) every committed chunk and redoes only the chunks that were in flight, so no
//! finished chunk is redone and no output line is written twice. The final files are the
//! committed chunks in order. Reading, running and committing overlap ([`run_job`]), so a
//! job's speed is its model's, not its disk's.
//!
//! A bad line fails only itself: it becomes a line of the error file, keyed by its line number,
//! and the job goes on. Lines are bounded in bytes before they are parsed; blank lines are
//! skipped (they keep their numbers). Cancellation and the job's deadline are checked before
//! every unit (a row, or rows merged into one call), so a cancel stops a job within the time
//! of the units already in flight.
//!
//! Real-time requests come first. Rows run as batch work ([`RequestContext::as_batch`]): a
//! dynamic batcher serves waiting real-time requests before them. While real-time requests
//! are in flight each unit waits for them first ([`RealtimeLoad`]), and the decoding and
//! encoding happen on the job's own threads, which the server runs at the idle priority.
//!
//! The record, quotas, files and the API live in the tenancy layer and the server; this module
//! needs none of them, so it is tested with fakes.

use std::collections::BTreeSet;
use std::io::BufRead;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::StreamExt;
use serde_json::{Value, json};
use weft_core::{Error, ErrorKind, Model, NamedTensor, Parameters, RequestContext, Result};
use weft_protocol::{JsonTensors, decode_infer_request};

use crate::batcher::{Signature, batch_signature, merge, split};

/// Rows per chunk unless a job says otherwise.
pub const DEFAULT_CHUNK_ROWS: usize = 1000;
/// Longest input line unless a job says otherwise.
pub const DEFAULT_MAX_LINE_BYTES: usize = 1 << 20;
/// Most input bytes one chunk holds in memory unless a job says otherwise: a chunk ends at
/// `chunk_rows` rows or at this many bytes, whichever comes first.
pub const DEFAULT_MAX_CHUNK_BYTES: usize = 16 << 20;
/// Most output bytes (tensor data, before JSON) one chunk's rows may produce unless a job
/// says otherwise: a chunk's answers are held until it is committed, and the model decides
/// their size, so this bounds what one job's outputs cost the host's memory.
pub const DEFAULT_MAX_CHUNK_OUTPUT_BYTES: usize = 64 << 20;

/// How one job runs.
#[derive(Clone, Debug)]
pub struct JobSettings {
    /// The tenant the rows run for (fair shares, model pools).
    pub tenant: String,
    /// Rows per committed chunk.
    pub chunk_rows: usize,
    /// A longer line is an error line, read past without being held whole.
    pub max_line_bytes: usize,
    /// A chunk ends once its lines hold this many bytes (so a chunk of long lines is not
    /// `chunk_rows` times `max_line_bytes` in memory).
    pub max_chunk_bytes: usize,
    /// A chunk whose rows produce more output bytes than this fails the job, named so (a
    /// smaller `chunk_rows` fits).
    pub max_chunk_output_bytes: usize,
    /// Rows of one chunk in flight at once.
    pub concurrency: usize,
    /// When the job stops (checked before every row).
    pub deadline: Option<Instant>,
    /// How the job keeps out of real-time traffic's way.
    pub background: Background,
}

/// How a job keeps out of real-time traffic's way: the same for every job of a replica, so
/// the runner hands one to each job it starts.
#[derive(Clone, Debug)]
pub struct Background {
    /// Called first on each of the job's own threads (the reader, which decodes rows, and the
    /// writer, which encodes and commits them): the server lowers their scheduling priority
    /// there, so a job's parsing and encoding yield the cores to real-time requests.
    pub on_thread_start: Option<fn()>,
    /// The replica's real-time requests: while any is in flight, each unit of the job waits
    /// up to `realtime_pause` for them first (see [`RealtimeLoad`]).
    pub yield_to: Option<Arc<RealtimeLoad>>,
    /// The longest a unit waits for real-time requests before it runs anyway: under unbroken
    /// real-time load a job still runs one unit per pause per window slot.
    pub realtime_pause: Duration,
}

impl Default for Background {
    fn default() -> Self {
        Background {
            on_thread_start: None,
            yield_to: None,
            realtime_pause: REALTIME_PAUSE,
        }
    }
}

impl JobSettings {
    pub fn new(tenant: &str) -> Self {
        JobSettings {
            tenant: tenant.to_string(),
            chunk_rows: DEFAULT_CHUNK_ROWS,
            max_line_bytes: DEFAULT_MAX_LINE_BYTES,
            max_chunk_bytes: DEFAULT_MAX_CHUNK_BYTES,
            max_chunk_output_bytes: DEFAULT_MAX_CHUNK_OUTPUT_BYTES,
            concurrency: 8,
            deadline: None,
            background: Background::default(),
        }
    }
}

/// The longest a unit of a job waits for real-time requests to finish before it runs anyway,
/// unless the replica says otherwise ([`Background::realtime_pause`]).
pub const REALTIME_PAUSE: Duration = Duration::from_millis(20);

/// Real-time inference requests in flight on this replica, counted by the server around each
/// one. A job yields the machine to them: measured on a 2-core VM, any other busy thread, even
/// one at the idle scheduling priority, doubled the p99 of a c=8 real-time load, so priority
/// alone cannot keep a job from hurting real-time latency; using no CPU while they run can.
#[derive(Debug, Default)]
pub struct RealtimeLoad {
    in_flight: AtomicUsize,
}

/// One real-time request in flight, until dropped.
pub struct RealtimeRequest<'a>(&'a RealtimeLoad);

impl Drop for RealtimeRequest<'_> {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

impl RealtimeLoad {
    /// Counts a real-time request until the returned guard drops.
    pub fn enter(&self) -> RealtimeRequest<'_> {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        RealtimeRequest(self)
    }

    /// Whether any real-time request is in flight.
    pub fn busy(&self) -> bool {
        self.in_flight.load(Ordering::Relaxed) > 0
    }

    /// Waits until no real-time request is in flight, or `at_most`, checking every
    /// millisecond.
    pub async fn wait_quiet(&self, at_most: Duration) {
        let started = Instant::now();
        while self.busy() && started.elapsed() < at_most {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }
}

/// One chunk's results, committed whole.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ChunkResult {
    /// The chunk's number, from 0.
    pub index: u64,
    /// Rows run (blank lines are not rows).
    pub rows: u64,
    /// Rows that went to the error file.
    pub failed: u64,
    /// JSON Lines: `{"line": n, "id": ..., "outputs": [...], "parameters": {...}}`.
    pub outputs: Vec<u8>,
    /// JSON Lines: `{"line": n, "error": "...", "kind": "..."}`.
    pub errors: Vec<u8>,
}

/// Where a job's progress lives (the store, or a fake).
pub trait JobCheckpoint: Send + Sync {
    /// The chunks committed so far: skipped when the job runs again.
    fn committed(&self) -> Result<BTreeSet<u64>>;
    /// Stores a chunk's lines and marks it done, all or nothing.
    fn commit(&self, chunk: &ChunkResult) -> Result<()>;
    /// Whether the job was cancelled.
    fn cancelled(&self) -> bool;
}

/// How a run ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum JobEnd {
    /// Every line was read and every chunk committed.
    Finished {
        rows: u64,
        failed: u64,
        chunks: u64,
    },
    Cancelled,
    DeadlineExceeded,
}

/// Why a row failed: its error line's kind and message.
type RowError = (ErrorKind, String);

/// A row decoded and checked against the model on the reader thread, ready to run.
struct ReadyRow {
    id: Option<String>,
    inputs: Vec<NamedTensor>,
    parameters: Parameters,
    /// Outputs the row asked for; empty means all.
    wanted: Vec<String>,
}

/// A row's model answer, encoded on the writer thread.
struct RowOutputs {
    id: Option<String>,
    outputs: Vec<NamedTensor>,
    parameters: Parameters,
    wanted: Vec<String>,
}

/// One input line: its number (from 1) and its bytes, or why it cannot be read.
type Line = (u64, std::result::Result<Vec<u8>, String>);

fn row_error(error: &Error) -> RowError {
    (error.kind(), error.message().to_string())
}

/// Reads one line of at most `max` bytes (without the newline). A longer line is read past
/// (not kept) and reported; `None` at the end of the input.
fn read_line(
    input: &mut dyn BufRead,
    max: usize,
) -> Result<Option<std::result::Result<Vec<u8>, String>>> {
    let mut line = Vec::new();
    let mut too_long = false;
    let mut read_any = false;
    loop {
        let buffer = input
            .fill_buf()
            .map_err(|error| Error::unavailable(format!("cannot read the job's input: {error}")))?;
        if buffer.is_empty() {
            break;
        }
        read_any = true;
        let (taken, done) = match buffer.iter().position(|&b| b == b'\n') {
            Some(at) => (at + 1, true),
            None => (buffer.len(), false),
        };
        let content = &buffer[..if done { taken - 1 } else { taken }];
        if !too_long {
            if line.len() + content.len() > max {
                too_long = true;
                line = Vec::new();
            } else {
                line.extend_from_slice(content);
            }
        }
        input.consume(taken);
        if done {
            break;
        }
    }
    if !read_any {
        return Ok(None);
    }
    if too_long {
        return Ok(Some(Err(format!("the line is longer than {max} bytes"))));
    }
    if line.last() == Some(&b'\r') {
        line.pop();
    }
    Ok(Some(Ok(line)))
}

/// How much of the input one chunk takes.
#[derive(Clone, Copy)]
struct ChunkBounds {
    rows: usize,
    line_bytes: usize,
    chunk_bytes: usize,
}

/// The next chunk of up to `bounds.rows` non-blank lines (fewer once they hold
/// `bounds.chunk_bytes`), numbered from `next_line`; empty at the end. Chunk boundaries depend
/// only on the input, so a resumed job cuts the same chunks.
fn read_chunk(
    input: &mut dyn BufRead,
    bounds: ChunkBounds,
    next_line: &mut u64,
) -> Result<Vec<Line>> {
    let mut chunk = Vec::new();
    let mut bytes = 0usize;
    while chunk.len() < bounds.rows && bytes < bounds.chunk_bytes {
        let Some(line) = read_line(input, bounds.line_bytes)? else {
            break;
        };
        *next_line += 1;
        if matches!(&line, Ok(bytes) if bytes.iter().all(u8::is_ascii_whitespace)) {
            continue;
        }
        bytes += line.as_ref().map_or(0, Vec::len);
        chunk.push((*next_line, line));
    }
    Ok(chunk)
}

/// Decodes a line and checks it against the model (on the reader thread). An error is the
/// row's, never the job's.
fn prepare_row(
    model: &dyn Model,
    line: std::result::Result<Vec<u8>, String>,
) -> std::result::Result<ReadyRow, RowError> {
    let bytes = line.map_err(|message| (ErrorKind::InvalidArgument, message))?;
    let request = decode_infer_request(Bytes::from(bytes), None).map_err(|e| row_error(&e))?;
    let inputs: Vec<_> = request
        .inputs
        .into_iter()
        .map(|input| input.tensor)
        .collect();
    model
        .metadata()
        .validate_inputs(&inputs)
        .map_err(|e| row_error(&e))?;
    Ok(ReadyRow {
        id: request.id,
        inputs,
        parameters: request.parameters,
        wanted: request.outputs.into_iter().map(|o| o.name).collect(),
    })
}

/// Runs a ready row through the model (on the async runtime: only the model call).
async fn run_row(
    model: &dyn Model,
    context: &RequestContext,
    row: ReadyRow,
) -> std::result::Result<RowOutputs, RowError> {
    let (outputs, parameters) = model
        .infer_with_parameters(context, row.inputs, &row.parameters)
        .await
        .map_err(|e| row_error(&e))?;
    Ok(RowOutputs {
        id: row.id,
        outputs,
        parameters,
        wanted: row.wanted,
    })
}

/// A row's answer line, keys in the order a `serde_json::Value` would print them.
#[derive(serde::Serialize)]
struct AnswerLine<'a> {
    id: &'a Option<String>,
    line: u64,
    outputs: JsonTensors<'a>,
    parameters: &'a Parameters,
}

/// Appends a row's answer line (`{"id": ..., "line": n, "outputs": [...], "parameters":
/// {...}}`) to `file`, written straight from the tensors; on error `file` is left as it was.
fn push_answer_line(
    file: &mut Vec<u8>,
    number: u64,
    row: &RowOutputs,
) -> std::result::Result<(), RowError> {
    let outputs = JsonTensors::new(
        row.outputs
            .iter()
            .filter(|output| row.wanted.is_empty() || row.wanted.contains(&output.name)),
    )
    .map_err(|e| row_error(&e))?;
    let line = AnswerLine {
        id: &row.id,
        line: number,
        outputs,
        parameters: &row.parameters,
    };
    let start = file.len();
    if let Err(error) = serde_json::to_writer(&mut *file, &line) {
        file.truncate(start);
        return Err((
            ErrorKind::Internal,
            format!("cannot encode the row's answer: {error}"),
        ));
    }
    file.push(b'\n');
    Ok(())
}

fn push_line(file: &mut Vec<u8>, value: &Value) {
    // A `Value` always serialises; an empty line would only mean a bug upstream.
    if let Ok(text) = serde_json::to_vec(value) {
        file.extend_from_slice(&text);
    }
    file.push(b'\n');
}

/// A finished chunk's rows in order, as the writer thread receives them.
struct ChunkAnswers {
    index: u64,
    rows: Vec<(u64, std::result::Result<RowOutputs, RowError>)>,
    /// Output tensor bytes its rows hold (bounded by `max_chunk_output_bytes`).
    output_bytes: usize,
}

/// Encodes a chunk's answer and error lines (on the writer thread).
fn encode_chunk(chunk: ChunkAnswers) -> ChunkResult {
    let mut result = ChunkResult {
        index: chunk.index,
        ..ChunkResult::default()
    };
    for (number, answer) in chunk.rows {
        result.rows += 1;
        match answer.and_then(|row| push_answer_line(&mut result.outputs, number, &row)) {
            Ok(()) => {}
            Err((kind, message)) => {
                result.failed += 1;
                push_line(
                    &mut result.errors,
                    &json!({ "line": number, "error": message, "kind": format!("{kind:?}") }),
                );
            }
        }
    }
    result
}

/// Why the rows stopped before the input's end.
enum Stop {
    Cancelled,
    Deadline,
    /// The input could not be read or a commit failed: the job's error, not a row's.
    Failed(Error),
}

/// Chunks read ahead of the rows being run: one is enough for the rows not to wait for the
/// reader (it decodes the next chunk while this one runs), and a decoded chunk can be several
/// times its text (`1,` is 8 bytes as FP64), so a job holds no more than it needs.
const CHUNKS_AHEAD: usize = 1;

/// A line's number and its decoded row (or the error its line gets).
type NumberedRow = (u64, std::result::Result<ReadyRow, RowError>);

/// Rows that run as one model call: one row, or consecutive rows of one signature merged
/// along dimension 0 (see [`group_rows`]).
struct Unit {
    chunk: u64,
    /// Whether this unit ends its chunk (the chunk is complete once it is answered).
    last_of_chunk: bool,
    rows: Vec<NumberedRow>,
}

/// How many rows of a job one model call may carry: half the model's `max_batch_size`, so a
/// job's calls go through the dynamic batcher's queue like other requests (a full batch
/// would skip it) and every batch they join leaves room for real-time rows, which the batcher
/// takes first. 1 (no merging) for models that do not batch, and for graphs, whose plugins
/// may treat a request as a whole.
fn group_rows(model: &dyn Model) -> usize {
    (model.metadata().max_batch_size / 2).max(1)
}

/// Cuts a chunk's rows into units: consecutive rows that can be merged (no request
/// parameters, one signature, at most `limit` rows together) share one; any other row is a
/// unit of its own.
fn units_of(chunk: u64, rows: Vec<NumberedRow>, limit: usize) -> Vec<Unit> {
    let mut units: Vec<Unit> = Vec::new();
    // The unit being filled, with its signature and rows so far.
    let mut open: Option<(Signature, usize)> = None;
    for (number, row) in rows {
        let key = match &row {
            Ok(ready) if limit > 1 && ready.parameters.is_empty() => {
                batch_signature(&ready.inputs).filter(|(count, _)| *count <= limit)
            }
            _ => None,
        };
        match (key, open.as_mut(), units.last_mut()) {
            (Some((count, signature)), Some((open_signature, open_rows)), Some(unit))
                if *open_signature == signature && *open_rows + count <= limit =>
            {
                *open_rows += count;
                unit.rows.push((number, row));
            }
            (key, _, _) => {
                open = key.map(|(count, signature)| (signature, count));
                units.push(Unit {
                    chunk,
                    last_of_chunk: false,
                    rows: vec![(number, row)],
                });
            }
        }
    }
    if let Some(last) = units.last_mut() {
        last.last_of_chunk = true;
    }
    units
}

/// Starts one of the job's own threads (see [`Background::on_thread_start`]); it reports
/// back through channels, so nobody joins it.
fn job_thread(
    name: &str,
    on_start: Option<fn()>,
    work: impl FnOnce() + Send + 'static,
) -> Result<()> {
    std::thread::Builder::new()
        .name(name.to_string())
        .spawn(move || {
            if let Some(on_start) = on_start {
                on_start();
            }
            work();
        })
        .map(drop)
        .map_err(|error| Error::unavailable(format!("cannot start a job thread: {error}")))
}

/// The reader thread: reads the input chunk by chunk, decodes every chunk not yet committed
/// and sends it on as units; at the end sends how many chunks the input holds. Stops early once
/// nobody listens.
fn read_chunks(
    mut input: Box<dyn BufRead + Send>,
    model: &dyn Model,
    group: usize,
    bounds: ChunkBounds,
    committed: &BTreeSet<u64>,
    sender: &tokio::sync::mpsc::Sender<Result<Vec<Unit>>>,
) -> Option<u64> {
    let mut next_line = 0u64;
    let mut index = 0u64;
    loop {
        match read_chunk(input.as_mut(), bounds, &mut next_line) {
            Err(error) => {
                let _ = sender.blocking_send(Err(error));
                return None;
            }
            Ok(lines) if lines.is_empty() => return Some(index),
            Ok(lines) => {
                if !committed.contains(&index) {
                    let rows = lines
                        .into_iter()
                        .map(|(number, line)| (number, prepare_row(model, line)))
                        .collect();
                    let units = units_of(index, rows, group);
                    if sender.blocking_send(Ok(units)).is_err() {
                        return None;
                    }
                }
                index += 1;
            }
        }
    }
}

/// A chunk's units, in order, for the unit stream (a read error is one item).
fn chunk_units(chunk: Result<Vec<Unit>>) -> Vec<std::result::Result<Unit, Stop>> {
    match chunk {
        Err(error) => vec![Err(Stop::Failed(error))],
        Ok(units) => units.into_iter().map(Ok).collect(),
    }
}

/// Runs a unit: one row alone, or its rows merged into one call and the outputs split back.
/// If a merged call fails, its rows run again one by one, so a row's error is its own.
async fn run_unit(
    model: &dyn Model,
    context: &RequestContext,
    rows: Vec<NumberedRow>,
) -> Vec<(u64, std::result::Result<RowOutputs, RowError>)> {
    if rows.len() > 1 {
        let ready: Vec<(u64, &ReadyRow)> = rows
            .iter()
            .filter_map(|(number, row)| row.as_ref().ok().map(|row| (*number, row)))
            .collect();
        if ready.len() == rows.len()
            && let Some(answers) = run_merged(model, context, &ready).await
        {
            return answers;
        }
    }
    let mut answers = Vec::with_capacity(rows.len());
    for (number, row) in rows {
        let answer = match row {
            Ok(row) => run_row(model, context, row).await,
            Err(error) => Err(error),
        };
        answers.push((number, answer));
    }
    answers
}

/// One call for rows of one signature; `None` if it failed (the rows then run alone).
async fn run_merged(
    model: &dyn Model,
    context: &RequestContext,
    rows: &[(u64, &ReadyRow)],
) -> Option<Vec<(u64, std::result::Result<RowOutputs, RowError>)>> {
    let requests: Vec<Vec<NamedTensor>> = rows.iter().map(|(_, row)| row.inputs.clone()).collect();
    let counts: Vec<usize> = rows
        .iter()
        .map(|(_, row)| {
            row.inputs
                .first()
                .and_then(|t| t.tensor.shape().first())
                .copied()
        })
        .collect::<Option<_>>()?;
    let merged = merge(&requests, None).ok()?;
    let outputs = model.infer(context, merged).await.ok()?;
    let parts = split(outputs, &counts).ok()?;
    Some(
        rows.iter()
            .zip(parts)
            .map(|((number, row), outputs)| {
                let answer = RowOutputs {
                    id: row.id.clone(),
                    outputs,
                    parameters: Parameters::new(),
                    wanted: row.wanted.clone(),
                };
                (*number, Ok(answer))
            })
            .collect(),
    )
}

/// Chunks handed to the writer thread and not yet committed: two, so the rows never wait for
/// a commit unless the writer is a whole chunk behind.
const COMMITS_QUEUED: usize = 2;

/// What the writer thread answers for one chunk: its rows and failed rows once committed,
/// `None` when it was not committed because the job was cancelled meanwhile.
type CommitReply = Result<Option<(u64, u64)>>;

/// What the writer thread is asked to commit, and where it answers.
type CommitOrder = (ChunkAnswers, tokio::sync::oneshot::Sender<CommitReply>);

/// The writer thread: encodes and commits chunks in the order it gets them, until the job
/// drops its end of the channel. After a cancel it commits nothing more, and after a failed
/// commit nothing after it (a resumed job finds no gap before a committed chunk).
fn write_chunks(orders: &std::sync::mpsc::Receiver<CommitOrder>, checkpoint: &dyn JobCheckpoint) {
    let mut failed = false;
    while let Ok((chunk, reply)) = orders.recv() {
        let answer = if failed {
            Err(Error::unavailable(
                "an earlier chunk of the job could not be committed",
            ))
        } else if checkpoint.cancelled() {
            Ok(None)
        } else {
            let result = encode_chunk(chunk);
            let committed = checkpoint.commit(&result);
            failed = committed.is_err();
            committed.map(|()| Some((result.rows, result.failed)))
        };
        let _ = reply.send(answer);
    }
}

/// Waits for the writer's answer to one commit.
async fn finish_commit(commit: tokio::sync::oneshot::Receiver<CommitReply>) -> CommitReply {
    commit
        .await
        .map_err(|_| Error::internal("the job's writer stopped"))?
}

/// Runs the job over `input` to its end, committing chunk by chunk (see the module docs).
///
/// The work is a pipeline, so the model is never idle at a chunk's end and the async
/// runtime only calls the model: the job's reader thread reads and decodes chunks ahead
/// ([`CHUNKS_AHEAD`]); the rows of consecutive chunks flow through one window of
/// `concurrency` rows in flight; a finished chunk goes to the job's writer thread, which
/// encodes and commits it while the next chunks' rows run (in order, up to
/// [`COMMITS_QUEUED`] waiting).
/// A row already in flight when a cancel lands finishes, but its chunk is not committed.
pub async fn run_job(
    input: Box<dyn BufRead + Send>,
    model: Arc<dyn Model>,
    settings: JobSettings,
    checkpoint: Arc<dyn JobCheckpoint>,
) -> Result<JobEnd> {
    let committed = {
        let checkpoint = Arc::clone(&checkpoint);
        tokio::task::spawn_blocking(move || checkpoint.committed())
            .await
            .map_err(|error| Error::internal(format!("the job's checkpoint failed: {error}")))??
    };
    let bounds = ChunkBounds {
        rows: settings.chunk_rows.max(1),
        line_bytes: settings.max_line_bytes,
        chunk_bytes: settings.max_chunk_bytes.max(1),
    };
    let group = group_rows(model.as_ref());
    let on_thread_start = settings.background.on_thread_start;
    let (sender, receiver) = tokio::sync::mpsc::channel(CHUNKS_AHEAD);
    let (count_sender, chunk_count) = tokio::sync::oneshot::channel();
    let reader_model = Arc::clone(&model);
    job_thread("weft-job-read", on_thread_start, move || {
        let count = read_chunks(
            input,
            reader_model.as_ref(),
            group,
            bounds,
            &committed,
            &sender,
        );
        if let Some(count) = count {
            let _ = count_sender.send(count);
        }
    })?;
    let (orders, writer_orders) = std::sync::mpsc::channel::<CommitOrder>();
    let writer_checkpoint = Arc::clone(&checkpoint);
    job_thread("weft-job-write", on_thread_start, move || {
        write_chunks(&writer_orders, writer_checkpoint.as_ref());
    })?;

    let chunks = futures_util::stream::unfold(receiver, |mut receiver| async move {
        receiver.recv().await.map(|chunk| (chunk, receiver))
    });
    let model = &model;
    let settings = &settings;
    let checkpoint_ref = &checkpoint;
    // Units in flight: `concurrency` rows' worth.
    let window = (settings.concurrency.max(1) / group).max(1);
    // Boxed to be pinned, and so that dropping it drops the rows in flight and the reader's end.
    let mut answers = Box::pin(
        chunks
            .flat_map(|chunk| futures_util::stream::iter(chunk_units(chunk)))
            .map(|unit| async move {
                let unit = unit?;
                if checkpoint_ref.cancelled() {
                    return Err(Stop::Cancelled);
                }
                if let Some(realtime) = &settings.background.yield_to {
                    realtime
                        .wait_quiet(settings.background.realtime_pause)
                        .await;
                    if checkpoint_ref.cancelled() {
                        return Err(Stop::Cancelled);
                    }
                }
                let mut context = RequestContext::for_tenant(&settings.tenant).as_batch();
                if let Some(deadline) = settings.deadline {
                    if Instant::now() >= deadline {
                        return Err(Stop::Deadline);
                    }
                    context = context.with_deadline(deadline);
                }
                let answers = run_unit(model.as_ref(), &context, unit.rows).await;
                Ok((unit.chunk, unit.last_of_chunk, answers))
            })
            .buffered(window),
    );

    let (mut rows, mut failed) = (0u64, 0u64);
    let mut current: Option<ChunkAnswers> = None;
    let mut committing = std::collections::VecDeque::new();
    let stop = loop {
        let Some(answer) = answers.next().await else {
            break None;
        };
        let (chunk, last_of_chunk, unit_answers) = match answer {
            Ok(answer) => answer,
            Err(stop) => break Some(stop),
        };
        let out_of_time = unit_answers
            .iter()
            .any(|(_, answer)| matches!(answer, Err((ErrorKind::DeadlineExceeded, _))))
            && settings.deadline.is_some_and(|d| Instant::now() >= d);
        if out_of_time {
            // The job ran out of time mid-row: the chunk is not committed.
            break Some(Stop::Deadline);
        }
        let chunk_answers = current.get_or_insert_with(|| ChunkAnswers {
            index: chunk,
            rows: Vec::new(),
            output_bytes: 0,
        });
        chunk_answers.output_bytes += unit_answers
            .iter()
            .filter_map(|(_, answer)| answer.as_ref().ok())
            .flat_map(|row| &row.outputs)
            .map(|output| output.tensor.data().len())
            .sum::<usize>();
        if chunk_answers.output_bytes > settings.max_chunk_output_bytes {
            break Some(Stop::Failed(Error::invalid(format!(
                "the rows of chunk {chunk} (from 0) produced more than {} bytes of outputs, \
                 the most a chunk may hold in memory: submit the job with a smaller chunk_rows",
                settings.max_chunk_output_bytes
            ))));
        }
        chunk_answers.rows.extend(unit_answers);
        if !last_of_chunk {
            continue;
        }
        let Some(finished) = current.take() else {
            continue;
        };
        if committing.len() >= COMMITS_QUEUED
            && let Some(oldest) = committing.pop_front()
        {
            match finish_commit(oldest).await {
                Ok(Some((chunk_rows, chunk_failed))) => {
                    rows += chunk_rows;
                    failed += chunk_failed;
                }
                Ok(None) => break Some(Stop::Cancelled),
                Err(error) => break Some(Stop::Failed(error)),
            }
        }
        // Checked after the oldest commit, which may itself have seen the cancel.
        if checkpoint.cancelled() {
            break Some(Stop::Cancelled);
        }
        let (reply, answer) = tokio::sync::oneshot::channel();
        if orders.send((finished, reply)).is_err() {
            break Some(Stop::Failed(Error::internal("the job's writer stopped")));
        }
        committing.push_back(answer);
    };
    // Rows still in flight are dropped with the stream (and the reader stops at its next send).
    drop(answers);
    let mut stop = stop;
    for pending in committing {
        match finish_commit(pending).await {
            Ok(Some((chunk_rows, chunk_failed))) => {
                rows += chunk_rows;
                failed += chunk_failed;
            }
            Ok(None) => {
                stop.get_or_insert(Stop::Cancelled);
            }
            Err(error) => return Err(error),
        }
    }
    // The writer ends once it has nothing more to do.
    drop(orders);
    match stop {
        Some(Stop::Cancelled) => Ok(JobEnd::Cancelled),
        Some(Stop::Deadline) => Ok(JobEnd::DeadlineExceeded),
        Some(Stop::Failed(error)) => Err(error),
        None => {
            let chunks = chunk_count
                .await
                .map_err(|_| Error::internal("the job's reader stopped before the end"))?;
            Ok(JobEnd::Finished {
                rows,
                failed,
                chunks,
            })
        }
    }
}

#[cfg(test)]
mod tests;
