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
//! every row, so a cancel stops a job within the time of the rows already in flight. Rows run as batch work
//! ([`RequestContext::as_batch`]): a dynamic batcher serves real-time requests before them.
//!
//! The record, quotas, files and the API live in the tenancy layer and the server; this module
//! needs none of them, so it is tested with fakes.

use std::collections::BTreeSet;
use std::io::BufRead;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use futures_util::StreamExt;
use serde_json::{Value, json};
use weft_core::{Error, ErrorKind, Model, NamedTensor, Parameters, RequestContext, Result};
use weft_protocol::{decode_infer_request, tensor_json};

/// Rows per chunk unless a job says otherwise.
pub const DEFAULT_CHUNK_ROWS: usize = 1000;
/// Longest input line unless a job says otherwise.
pub const DEFAULT_MAX_LINE_BYTES: usize = 1 << 20;
/// Most input bytes one chunk holds in memory unless a job says otherwise: a chunk ends at
/// `chunk_rows` rows or at this many bytes, whichever comes first.
pub const DEFAULT_MAX_CHUNK_BYTES: usize = 16 << 20;

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
    /// Rows of one chunk in flight at once.
    pub concurrency: usize,
    /// When the job stops (checked before every row).
    pub deadline: Option<Instant>,
    /// Called first on each of the job's own threads (the reader, which decodes rows, and the
    /// writer, which encodes and commits them): the server lowers their scheduling priority
    /// there, so a job's parsing and encoding yield the cores to real-time requests.
    pub on_thread_start: Option<fn()>,
}

impl JobSettings {
    pub fn new(tenant: &str) -> Self {
        JobSettings {
            tenant: tenant.to_string(),
            chunk_rows: DEFAULT_CHUNK_ROWS,
            max_line_bytes: DEFAULT_MAX_LINE_BYTES,
            max_chunk_bytes: DEFAULT_MAX_CHUNK_BYTES,
            concurrency: 8,
            deadline: None,
            on_thread_start: None,
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

/// A row's answer line (`{"line": n, "id": ..., "outputs": [...], "parameters": {...}}`).
fn answer_line(number: u64, row: &RowOutputs) -> std::result::Result<Value, RowError> {
    let mut encoded = Vec::new();
    for output in &row.outputs {
        if row.wanted.is_empty() || row.wanted.contains(&output.name) {
            encoded.push(tensor_json(output).map_err(|e| row_error(&e))?);
        }
    }
    Ok(json!({
        "id": row.id,
        "outputs": encoded,
        "parameters": row.parameters,
        "line": number,
    }))
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
}

/// Encodes a chunk's answer and error lines (on the writer thread).
fn encode_chunk(chunk: ChunkAnswers) -> ChunkResult {
    let mut result = ChunkResult {
        index: chunk.index,
        ..ChunkResult::default()
    };
    for (number, answer) in chunk.rows {
        result.rows += 1;
        match answer.and_then(|row| answer_line(number, &row)) {
            Ok(line) => push_line(&mut result.outputs, &line),
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

/// Chunks read ahead of the rows being run: enough that the rows never wait for the reader,
/// few enough that a job holds at most this many chunks' rows in memory.
const CHUNKS_AHEAD: usize = 2;

/// A chunk read and decoded off the input: its number and its non-blank lines.
struct Chunk {
    index: u64,
    rows: Vec<(u64, std::result::Result<ReadyRow, RowError>)>,
}

/// One row to run: its chunk, whether it is that chunk's last, its line number and the row.
struct RowTask {
    chunk: u64,
    last_of_chunk: bool,
    number: u64,
    row: std::result::Result<ReadyRow, RowError>,
}

/// Starts one of the job's own threads (see [`JobSettings::on_thread_start`]).
fn job_thread<T: Send + 'static>(
    name: &str,
    on_start: Option<fn()>,
    work: impl FnOnce() -> T + Send + 'static,
) -> Result<std::thread::JoinHandle<T>> {
    std::thread::Builder::new()
        .name(name.to_string())
        .spawn(move || {
            if let Some(on_start) = on_start {
                on_start();
            }
            work()
        })
        .map_err(|error| Error::unavailable(format!("cannot start a job thread: {error}")))
}

/// The reader thread: reads the input chunk by chunk, decodes every chunk not yet committed
/// and sends it on; at the end sends how many chunks the input holds. Stops early once
/// nobody listens.
fn read_chunks(
    mut input: Box<dyn BufRead + Send>,
    model: &dyn Model,
    bounds: ChunkBounds,
    committed: &BTreeSet<u64>,
    sender: &tokio::sync::mpsc::Sender<Result<Chunk>>,
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
                    if sender.blocking_send(Ok(Chunk { index, rows })).is_err() {
                        return None;
                    }
                }
                index += 1;
            }
        }
    }
}

/// A chunk's rows, in order, for the row stream (a read error is one item).
fn chunk_rows(chunk: Result<Chunk>) -> Vec<std::result::Result<RowTask, Stop>> {
    match chunk {
        Err(error) => vec![Err(Stop::Failed(error))],
        Ok(Chunk { index, rows }) => {
            let count = rows.len();
            rows.into_iter()
                .enumerate()
                .map(|(position, (number, row))| {
                    Ok(RowTask {
                        chunk: index,
                        last_of_chunk: position + 1 == count,
                        number,
                        row,
                    })
                })
                .collect()
        }
    }
}

/// What the writer thread is asked to commit, and where it answers with the chunk's counts.
type CommitOrder = (
    ChunkAnswers,
    tokio::sync::oneshot::Sender<Result<(u64, u64)>>,
);

/// The writer thread: encodes and commits chunks in the order it gets them, until the job
/// drops its end of the channel.
fn write_chunks(orders: &std::sync::mpsc::Receiver<CommitOrder>, checkpoint: &dyn JobCheckpoint) {
    while let Ok((chunk, reply)) = orders.recv() {
        let result = encode_chunk(chunk);
        let committed = checkpoint
            .commit(&result)
            .map(|()| (result.rows, result.failed));
        let _ = reply.send(committed);
    }
}

/// Waits for the writer's answer to one commit.
async fn finish_commit(
    commit: tokio::sync::oneshot::Receiver<Result<(u64, u64)>>,
) -> Result<(u64, u64)> {
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
/// encodes and commits it while the next chunk's rows run (one commit at a time, in order).
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
    let (sender, receiver) = tokio::sync::mpsc::channel(CHUNKS_AHEAD);
    let (count_sender, chunk_count) = tokio::sync::oneshot::channel();
    let reader_model = Arc::clone(&model);
    job_thread("weft-job-read", settings.on_thread_start, move || {
        let count = read_chunks(input, reader_model.as_ref(), bounds, &committed, &sender);
        if let Some(count) = count {
            let _ = count_sender.send(count);
        }
    })?;
    let (orders, writer_orders) = std::sync::mpsc::channel::<CommitOrder>();
    let writer_checkpoint = Arc::clone(&checkpoint);
    job_thread("weft-job-write", settings.on_thread_start, move || {
        write_chunks(&writer_orders, writer_checkpoint.as_ref());
    })?;

    let chunks = futures_util::stream::unfold(receiver, |mut receiver| async move {
        receiver.recv().await.map(|chunk| (chunk, receiver))
    });
    let model = &model;
    let settings = &settings;
    let checkpoint_ref = &checkpoint;
    // Boxed to be pinned, and so that dropping it drops the rows in flight and the reader's end.
    let mut answers = Box::pin(
        chunks
            .flat_map(|chunk| futures_util::stream::iter(chunk_rows(chunk)))
            .map(|task| async move {
                let task = task?;
                if checkpoint_ref.cancelled() {
                    return Err(Stop::Cancelled);
                }
                let mut context = RequestContext::for_tenant(&settings.tenant).as_batch();
                if let Some(deadline) = settings.deadline {
                    if Instant::now() >= deadline {
                        return Err(Stop::Deadline);
                    }
                    context = context.with_deadline(deadline);
                }
                let answer = match task.row {
                    Ok(row) => run_row(model.as_ref(), &context, row).await,
                    Err(error) => Err(error),
                };
                Ok((task.chunk, task.last_of_chunk, task.number, answer))
            })
            .buffered(settings.concurrency.max(1)),
    );

    let (mut rows, mut failed) = (0u64, 0u64);
    let mut current: Option<ChunkAnswers> = None;
    let mut committing = None;
    let stop = loop {
        let Some(answer) = answers.next().await else {
            break None;
        };
        let (chunk, last_of_chunk, number, answer) = match answer {
            Ok(answer) => answer,
            Err(stop) => break Some(stop),
        };
        if matches!(&answer, Err((ErrorKind::DeadlineExceeded, _)))
            && settings.deadline.is_some_and(|d| Instant::now() >= d)
        {
            // The job ran out of time mid-row: the chunk is not committed.
            break Some(Stop::Deadline);
        }
        current
            .get_or_insert_with(|| ChunkAnswers {
                index: chunk,
                rows: Vec::new(),
            })
            .rows
            .push((number, answer));
        if !last_of_chunk {
            continue;
        }
        let Some(finished) = current.take() else {
            continue;
        };
        if let Some(previous) = committing.take() {
            match finish_commit(previous).await {
                Ok((chunk_rows, chunk_failed)) => {
                    rows += chunk_rows;
                    failed += chunk_failed;
                }
                Err(error) => break Some(Stop::Failed(error)),
            }
        }
        // Checked after the previous commit, which may itself have seen the cancel.
        if checkpoint.cancelled() {
            break Some(Stop::Cancelled);
        }
        let (reply, answer) = tokio::sync::oneshot::channel();
        if orders.send((finished, reply)).is_err() {
            break Some(Stop::Failed(Error::internal("the job's writer stopped")));
        }
        committing = Some(answer);
    };
    // Rows still in flight are dropped with the stream (and the reader stops at its next send).
    drop(answers);
    if let Some(last) = committing.take() {
        let (chunk_rows, chunk_failed) = finish_commit(last).await?;
        rows += chunk_rows;
        failed += chunk_failed;
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
