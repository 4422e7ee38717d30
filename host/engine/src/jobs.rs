//! Batch jobs, the execution half: a JSON Lines file of V2 inference requests run through a
//! [`Model`] chunk by chunk, each chunk's output and error lines committed as one unit.
//!
//! Durability comes from the unit of commit. A chunk's lines are computed in memory and handed
//! to [`JobCheckpoint::commit`] whole; the store behind it writes them and marks the chunk done
//! in one step. After a crash the job starts again from the input's beginning, skips (reads but
//! does not run) every committed chunk and redoes only the chunk that was in flight, so no
//! finished chunk is redone and no output line is written twice. The final files are the
//! committed chunks in order.
//!
//! A bad line fails only itself: it becomes a line of the error file, keyed by its line number,
//! and the job goes on. Lines are bounded in bytes before they are parsed; blank lines are
//! skipped (they keep their numbers). Cancellation and the job's deadline are checked before
//! every row, so a cancel stops a job within one row's time. Rows run as batch work
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
use weft_core::{Error, ErrorKind, Model, RequestContext, Result};
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

/// One row's answer line, or the kind and message of its error line.
type RowAnswer = std::result::Result<Value, (ErrorKind, String)>;

/// One input line: its number (from 1) and its bytes, or why it cannot be read.
type Line = (u64, std::result::Result<Vec<u8>, String>);

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

/// Runs one row: decode, infer, encode. An error is the row's, never the job's.
async fn run_row(
    model: &dyn Model,
    context: &RequestContext,
    line: std::result::Result<Vec<u8>, String>,
) -> RowAnswer {
    let bytes = line.map_err(|message| (ErrorKind::InvalidArgument, message))?;
    let request = decode_infer_request(Bytes::from(bytes), None)
        .map_err(|error| (error.kind(), error.message().to_string()))?;
    let inputs: Vec<_> = request
        .inputs
        .into_iter()
        .map(|input| input.tensor)
        .collect();
    model
        .metadata()
        .validate_inputs(&inputs)
        .map_err(|error| (error.kind(), error.message().to_string()))?;
    let (outputs, parameters) = model
        .infer_with_parameters(context, inputs, &request.parameters)
        .await
        .map_err(|error| (error.kind(), error.message().to_string()))?;
    let wanted: Vec<&str> = request.outputs.iter().map(|o| o.name.as_str()).collect();
    let mut encoded = Vec::new();
    for output in &outputs {
        if wanted.is_empty() || wanted.contains(&output.name.as_str()) {
            encoded.push(
                tensor_json(output).map_err(|error| (error.kind(), error.message().to_string()))?,
            );
        }
    }
    Ok(json!({ "id": request.id, "outputs": encoded, "parameters": parameters }))
}

fn push_line(file: &mut Vec<u8>, value: &Value) {
    // A `Value` always serialises; an empty line would only mean a bug upstream.
    if let Ok(text) = serde_json::to_vec(value) {
        file.extend_from_slice(&text);
    }
    file.push(b'\n');
}

/// Why a chunk stopped early.
enum Stop {
    Cancelled,
    Deadline,
}

/// Runs the job over `input` to its end, committing chunk by chunk (see the module docs).
/// Reading happens on blocking threads; rows run on the caller's runtime, `concurrency` at once.
pub async fn run_job(
    input: Box<dyn BufRead + Send>,
    model: Arc<dyn Model>,
    settings: JobSettings,
    checkpoint: Arc<dyn JobCheckpoint>,
) -> Result<JobEnd> {
    let committed = checkpoint.committed()?;
    let bounds = ChunkBounds {
        rows: settings.chunk_rows.max(1),
        line_bytes: settings.max_line_bytes,
        chunk_bytes: settings.max_chunk_bytes.max(1),
    };
    let concurrency = settings.concurrency.max(1);
    let mut input = Some(input);
    let mut next_line = 0u64;
    let (mut rows, mut failed, mut index) = (0u64, 0u64, 0u64);
    loop {
        let Some(mut reader) = input.take() else {
            return Err(Error::internal("the job's input went missing"));
        };
        let (reader, chunk, line_after) = tokio::task::spawn_blocking(move || {
            let mut line = next_line;
            let chunk = read_chunk(reader.as_mut(), bounds, &mut line);
            (reader, chunk, line)
        })
        .await
        .map_err(|error| Error::internal(format!("the job's reader failed: {error}")))?;
        input = Some(reader);
        next_line = line_after;
        let chunk = chunk?;
        if chunk.is_empty() {
            return Ok(JobEnd::Finished {
                rows,
                failed,
                chunks: index,
            });
        }
        if committed.contains(&index) {
            index += 1;
            continue;
        }
        let model = &model;
        let settings = &settings;
        let checkpoint = &checkpoint;
        let results: Vec<std::result::Result<(u64, RowAnswer), Stop>> =
            futures_util::stream::iter(chunk)
                .map(|(number, line)| async move {
                    if checkpoint.cancelled() {
                        return Err(Stop::Cancelled);
                    }
                    let mut context = RequestContext::for_tenant(&settings.tenant).as_batch();
                    if let Some(deadline) = settings.deadline {
                        if Instant::now() >= deadline {
                            return Err(Stop::Deadline);
                        }
                        context = context.with_deadline(deadline);
                    }
                    Ok((number, run_row(model.as_ref(), &context, line).await))
                })
                .buffered(concurrency)
                .collect()
                .await;
        let mut result = ChunkResult {
            index,
            ..ChunkResult::default()
        };
        for row in results {
            let (number, answer) = match row {
                Ok(row) => row,
                Err(Stop::Cancelled) => return Ok(JobEnd::Cancelled),
                Err(Stop::Deadline) => return Ok(JobEnd::DeadlineExceeded),
            };
            result.rows += 1;
            match answer {
                Ok(mut value) => {
                    if let Value::Object(fields) = &mut value {
                        fields.insert("line".into(), json!(number));
                    }
                    push_line(&mut result.outputs, &value);
                }
                Err((ErrorKind::DeadlineExceeded, _))
                    if settings.deadline.is_some_and(|d| Instant::now() >= d) =>
                {
                    // The job ran out of time mid-row: the chunk is not committed.
                    return Ok(JobEnd::DeadlineExceeded);
                }
                Err((kind, message)) => {
                    result.failed += 1;
                    push_line(
                        &mut result.errors,
                        &json!({ "line": number, "error": message, "kind": format!("{kind:?}") }),
                    );
                }
            }
        }
        if checkpoint.cancelled() {
            return Ok(JobEnd::Cancelled);
        }
        checkpoint.commit(&result)?;
        rows += result.rows;
        failed += result.failed;
        index += 1;
    }
}

#[cfg(test)]
mod tests;
