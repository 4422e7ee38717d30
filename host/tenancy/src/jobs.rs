//! Batch jobs, the tenancy half: the job as a tenant's resource (submit, status, cancel,
//! results, delete, each within the tenant's quotas) and the runner that works through them.
//!
//! A job's record lives in the tenant's store record ([`JobRecord`]): its input file (a blob,
//! counted against the tenant's storage), its target, deadline and state. The record changes
//! only at submit, start, cancel and end, so the store is not rewritten per chunk. Progress
//! between those points is the runner's chunk files under `<store>/jobs/<tenant>/<id>/`: each
//! chunk is an output file, an error file and a marker written last (every file durably
//! replaced), so a chunk is committed exactly when its marker exists. After a crash the
//! record still says `running`; the runner takes the job up again, the engine skips every
//! committed chunk ([`weft_engine::jobs`]), and at the end the chunks are joined, in input
//! order, into the output and error files of the blob store and the record says how it ended.
//!
//! What bounds a job, so one tenant's jobs cost others nothing they did not agree to:
//! - per tenant, `max_active_jobs` queued or running at once, `max_jobs` records kept,
//!   `max_job_rows` rows per job, `max_job_seconds` of deadline, and its storage quota for
//!   the input and every committed chunk (a job whose output would pass it fails, named so);
//! - per replica, [`JobRunnerConfig::slots`] jobs run at once, taken from tenants in turn
//!   (the tenant with the fewest running jobs first, then the oldest job);
//! - per job, [`JobRunnerConfig::rows_in_flight`] rows at once, all marked as batch work, so
//!   the dynamic batcher serves every waiting real-time request before them and a job holds
//!   at most that many of a model's batch slots.
//!
//! A cancel stops a running job at its next row (the flag is checked before every row); a
//! queued job is cancelled on the spot.

use std::collections::{BTreeSet, HashMap};
use std::fs::{self, File};
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use weft_core::{Error, ErrorKind, Result};
use weft_engine::jobs::{Background, ChunkResult, JobCheckpoint, JobEnd, JobSettings, run_job};
use weft_store::{JobFile, JobRecord, JobState, StagedBlob, Tenant, unix_now_ms};

use crate::lifecycle::{tenant_mut, tenant_of};
use crate::tenancy::{Tenancy, lock};

/// How often the runner looks for jobs to start and for cancels made elsewhere.
pub const RUNNER_TICK: Duration = Duration::from_millis(100);
/// Jobs one replica runs at once unless configured otherwise.
pub const DEFAULT_JOB_SLOTS: usize = 2;
/// Rows of one job in flight at once unless configured otherwise: one full batch of the
/// reference models, so a job keeps a batcher busy without holding more of it.
pub const DEFAULT_ROWS_IN_FLIGHT: usize = 64;
/// Largest and smallest chunk a job may ask for.
pub const MAX_CHUNK_ROWS: u64 = 100_000;

/// How a replica's runner works.
#[derive(Clone, Debug)]
pub struct JobRunnerConfig {
    /// Jobs running at once on this replica.
    pub slots: usize,
    /// Rows of one job in flight at once.
    pub rows_in_flight: usize,
    /// The runtime claimed jobs run on (the server's low-priority one, so a job's own work
    /// between model calls yields to requests); `None`: the runner's.
    pub runtime: Option<tokio::runtime::Handle>,
    /// How every job keeps out of real-time traffic's way.
    pub background: Background,
}

impl Default for JobRunnerConfig {
    fn default() -> Self {
        JobRunnerConfig {
            slots: DEFAULT_JOB_SLOTS,
            rows_in_flight: DEFAULT_ROWS_IN_FLIGHT,
            runtime: None,
            background: Background::default(),
        }
    }
}

/// What a submit asks for (the input comes apart).
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobRequest {
    /// The model or graph name.
    pub target: String,
    #[serde(default)]
    pub version: Option<u64>,
    /// Rows per committed chunk (default [`weft_engine::jobs::DEFAULT_CHUNK_ROWS`]).
    #[serde(default)]
    pub chunk_rows: Option<u64>,
    /// Seconds from now the job must end by (default and most: `max_job_seconds`).
    #[serde(default)]
    pub deadline_seconds: Option<u64>,
    /// Run a file the tenant already stored (a job's input, output or error file, by digest)
    /// instead of an upload.
    #[serde(default)]
    pub input: Option<String>,
}

/// The input of a submit.
pub enum JobInput {
    /// A file received with the submit.
    Uploaded(StagedBlob),
    /// A blob this tenant's jobs already hold, by digest.
    Stored(String),
}

/// Which file of a job to read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum JobFileKind {
    Input,
    Output,
    Errors,
}

/// A running job's progress on this replica, shared by its runner and status reads.
#[derive(Debug)]
pub struct LiveJob {
    cancel: AtomicBool,
    rows_done: AtomicU64,
    rows_failed: AtomicU64,
    /// Rows found committed when this run began (not counted in the rate).
    rows_resumed: AtomicU64,
    /// Bytes of committed chunk files, counted against the tenant's storage quota.
    chunk_bytes: AtomicU64,
    started: Instant,
}

impl LiveJob {
    fn new() -> Self {
        LiveJob {
            cancel: AtomicBool::new(false),
            rows_done: AtomicU64::new(0),
            rows_failed: AtomicU64::new(0),
            rows_resumed: AtomicU64::new(0),
            chunk_bytes: AtomicU64::new(0),
            started: Instant::now(),
        }
    }

    /// Rows per second of this run.
    fn rate(&self) -> f64 {
        let run = self
            .rows_done
            .load(Ordering::Relaxed)
            .saturating_sub(self.rows_resumed.load(Ordering::Relaxed));
        let seconds = self.started.elapsed().as_secs_f64();
        if seconds > 0.0 {
            run as f64 / seconds
        } else {
            0.0
        }
    }
}

/// (tenant, job id).
pub(crate) type JobKey = (String, String);

/// The live jobs of this replica.
pub(crate) type LiveJobs = std::sync::Mutex<HashMap<JobKey, Arc<LiveJob>>>;

fn unknown_job(id: &str) -> Error {
    Error::not_found(format!("unknown job '{id}'"))
}

fn too_many(message: String) -> Error {
    Error::new(ErrorKind::PermissionDenied, message)
}

/// Counts the rows of a job's input: its non-blank lines, as the engine cuts them.
fn count_rows(reader: impl Read) -> Result<u64> {
    let mut reader = BufReader::with_capacity(1 << 20, reader);
    let (mut rows, mut blank) = (0u64, true);
    loop {
        let buffer = reader
            .fill_buf()
            .map_err(|error| Error::internal(format!("cannot read the job's input: {error}")))?;
        if buffer.is_empty() {
            break;
        }
        for &byte in buffer {
            if byte == b'\n' {
                if !blank {
                    rows += 1;
                }
                blank = true;
            } else if !byte.is_ascii_whitespace() {
                blank = false;
            }
        }
        let taken = buffer.len();
        reader.consume(taken);
    }
    Ok(rows + u64::from(!blank))
}

/// A committed chunk's marker: what it holds.
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize)]
struct ChunkMarker {
    rows: u64,
    failed: u64,
    bytes: u64,
}

/// A job's chunk files on this replica: `<index>.out`, `<index>.err`, then `<index>.done`.
struct ChunkFiles {
    dir: PathBuf,
    live: Arc<LiveJob>,
    /// What the tenant may still store, counted when the run began.
    storage_left: u64,
}

impl ChunkFiles {
    fn path(&self, index: u64, ext: &str) -> PathBuf {
        self.dir.join(format!("{index:010}.{ext}"))
    }

    /// The committed chunks in index order, with their markers.
    fn markers(dir: &Path) -> Result<Vec<(u64, ChunkMarker)>> {
        let entries = match fs::read_dir(dir) {
            Ok(entries) => entries,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(error) => return Err(storage_error("list the job's chunks", &error)),
        };
        let mut markers = Vec::new();
        for entry in entries {
            let entry = entry.map_err(|error| storage_error("list the job's chunks", &error))?;
            let name = entry.file_name();
            let Some(index) = name
                .to_str()
                .and_then(|name| name.strip_suffix(".done"))
                .and_then(|index| index.parse::<u64>().ok())
            else {
                continue;
            };
            let bytes = fs::read(entry.path())
                .map_err(|error| storage_error("read a chunk marker", &error))?;
            let marker: ChunkMarker = serde_json::from_slice(&bytes)
                .map_err(|error| Error::internal(format!("a chunk marker is damaged: {error}")))?;
            markers.push((index, marker));
        }
        markers.sort_by_key(|(index, _)| *index);
        Ok(markers)
    }
}

/// A storage failure as the tenant may see it (the path stays in the operator's log).
fn storage_error(what: &str, error: &std::io::Error) -> Error {
    tracing::warn!(%error, "batch job storage: cannot {what}");
    Error::unavailable(format!("cannot {what} (details in the server log)"))
}

impl JobCheckpoint for ChunkFiles {
    fn committed(&self) -> Result<BTreeSet<u64>> {
        let markers = ChunkFiles::markers(&self.dir)?;
        if !markers.is_empty() {
            tracing::info!(
                job = %self.dir.file_name().and_then(|n| n.to_str()).unwrap_or("?"),
                chunks = markers.len(),
                "resuming a batch job: its committed chunks are skipped"
            );
        }
        let (mut rows, mut failed, mut bytes) = (0, 0, 0);
        for (_, marker) in &markers {
            rows += marker.rows;
            failed += marker.failed;
            bytes += marker.bytes;
        }
        self.live.rows_done.store(rows, Ordering::Relaxed);
        self.live.rows_failed.store(failed, Ordering::Relaxed);
        self.live.rows_resumed.store(rows, Ordering::Relaxed);
        self.live.chunk_bytes.store(bytes, Ordering::Relaxed);
        Ok(markers.into_iter().map(|(index, _)| index).collect())
    }

    fn commit(&self, chunk: &ChunkResult) -> Result<()> {
        let bytes = (chunk.outputs.len() + chunk.errors.len()) as u64;
        let held = self.live.chunk_bytes.load(Ordering::Relaxed);
        if held.saturating_add(bytes) > self.storage_left {
            return Err(Error::new(
                ErrorKind::PermissionDenied,
                format!(
                    "the job's output would pass the tenant's storage quota (max_stored_bytes; \
                     {} bytes were left for it): delete jobs or models, or ask the operator to \
                     raise the quota",
                    self.storage_left
                ),
            ));
        }
        fs::create_dir_all(&self.dir)
            .map_err(|error| storage_error("create the job's directory", &error))?;
        let marker = ChunkMarker {
            rows: chunk.rows,
            failed: chunk.failed,
            bytes,
        };
        let marker = serde_json::to_vec(&marker)
            .map_err(|error| Error::internal(format!("cannot encode a chunk marker: {error}")))?;
        for (ext, bytes) in [
            ("out", chunk.outputs.as_slice()),
            ("err", chunk.errors.as_slice()),
            ("done", marker.as_slice()),
        ] {
            weft_store::write_file_durably(&self.path(chunk.index, ext), bytes).map_err(
                |error| {
                    tracing::warn!(%error, "batch job storage: cannot commit a chunk");
                    Error::unavailable(
                        "cannot commit a chunk of the job (details in the server log)",
                    )
                },
            )?;
        }
        self.live.rows_done.fetch_add(chunk.rows, Ordering::Relaxed);
        self.live
            .rows_failed
            .fetch_add(chunk.failed, Ordering::Relaxed);
        self.live.chunk_bytes.fetch_add(bytes, Ordering::Relaxed);
        Ok(())
    }

    fn cancelled(&self) -> bool {
        self.live.cancel.load(Ordering::Relaxed)
    }
}

/// A job taken by this replica's runner.
struct Claim {
    tenant: String,
    record: JobRecord,
    live: Arc<LiveJob>,
}

impl Tenancy {
    /// Where this replica keeps the chunk files of `tenant`'s job `id`.
    fn chunk_dir(&self, tenant: &str, id: &str) -> PathBuf {
        self.store.dir().join("jobs").join(tenant).join(id)
    }

    fn live_job(&self, tenant: &str, id: &str) -> Option<Arc<LiveJob>> {
        lock(&self.jobs)
            .ok()?
            .get(&(tenant.to_string(), id.to_string()))
            .cloned()
    }

    /// Submits a job: checks the target, the quotas and the input, stores the input (when
    /// uploaded) and queues the job. Returns its view. Blocking.
    pub fn submit_job(&self, tenant: &str, request: JobRequest, input: JobInput) -> Result<Value> {
        let scope = self
            .scope(tenant)
            .ok_or_else(|| Error::not_found(format!("unknown tenant '{tenant}'")))?;
        let target = request.target.trim();
        if target.is_empty() {
            return Err(Error::invalid(
                "a job needs a target: a model or graph name",
            ));
        }
        // The target must exist now (it is resolved again when the job starts).
        scope
            .registry
            .resolve(target, request.version.map(|v| v.to_string()).as_deref())?;
        let chunk_rows = request
            .chunk_rows
            .unwrap_or(weft_engine::jobs::DEFAULT_CHUNK_ROWS as u64);
        if !(1..=MAX_CHUNK_ROWS).contains(&chunk_rows) {
            return Err(Error::invalid(format!(
                "chunk_rows must be between 1 and {MAX_CHUNK_ROWS}, got {chunk_rows}"
            )));
        }
        let quotas = &scope.quotas;
        let seconds = request.deadline_seconds.unwrap_or(quotas.max_job_seconds);
        if seconds == 0 || seconds > quotas.max_job_seconds {
            return Err(Error::invalid(format!(
                "deadline_seconds must be between 1 and {} (the tenant's max_job_seconds), got \
                 {seconds}",
                quotas.max_job_seconds
            )));
        }
        let (digest, bytes, staged) = match input {
            JobInput::Uploaded(staged) => (staged.digest().to_string(), staged.len(), Some(staged)),
            JobInput::Stored(digest) => {
                let state = self.store.state();
                let record = tenant_of(&state, tenant)?;
                let file = record
                    .jobs
                    .values()
                    .flat_map(JobRecord::files)
                    .find(|file| file.digest == digest)
                    .ok_or_else(|| {
                        Error::not_found(format!(
                            "no file of this tenant's jobs has the digest '{digest}'"
                        ))
                    })?;
                (digest.clone(), file.bytes, None)
            }
        };
        // Counted before anything is stored: the file is read once, sequentially.
        let rows = match &staged {
            Some(staged) => count_rows(staged.open()?)?,
            None => count_rows(self.store.open_blob(&digest)?)?,
        };
        if rows > quotas.max_job_rows {
            return Err(too_many(format!(
                "the input has {rows} rows; a job of tenant '{tenant}' may have at most {} \
                 (max_job_rows)",
                quotas.max_job_rows
            )));
        }
        if let Some(staged) = staged {
            self.store.share_staged(&staged)?;
            self.store.put_staged(staged)?;
        }
        let id = format!("job-{}", &weft_store::signing::challenge_nonce()?[..20]);
        let now = unix_now_ms();
        let record = JobRecord {
            id: id.clone(),
            target: target.to_string(),
            version: request.version,
            input: JobFile { digest, bytes },
            rows_total: rows,
            chunk_rows,
            state: JobState::Queued,
            cancel_requested: false,
            created_unix_ms: now,
            deadline_unix_ms: now.saturating_add(seconds.saturating_mul(1000)),
            started_unix_ms: None,
            finished_unix_ms: None,
            runner: None,
            rows_done: 0,
            rows_failed: 0,
            output: None,
            errors: None,
            error: None,
        };
        let stored = record.clone();
        self.change(Some(tenant), move |state| {
            let owner = tenant_mut(state, tenant)?;
            let quotas = &owner.quotas;
            let active = owner.jobs.values().filter(|j| j.state.is_active()).count();
            if active >= quotas.max_active_jobs as usize {
                return Err(too_many(format!(
                    "tenant '{tenant}' has {active} jobs queued or running, the most it may \
                     (max_active_jobs): wait for one to end or cancel one"
                )));
            }
            if owner.jobs.len() >= quotas.max_jobs as usize {
                return Err(too_many(format!(
                    "tenant '{tenant}' keeps {} jobs, the most it may (max_jobs): delete \
                     finished ones",
                    owner.jobs.len()
                )));
            }
            if !owner
                .jobs
                .values()
                .any(|j| j.files().any(|f| f.digest == stored.input.digest))
                && owner.stored_bytes().saturating_add(bytes) > quotas.max_stored_bytes
            {
                return Err(too_many(format!(
                    "the input's {bytes} bytes would pass tenant '{tenant}''s storage quota \
                     (max_stored_bytes {})",
                    quotas.max_stored_bytes
                )));
            }
            owner.jobs.insert(stored.id.clone(), stored);
            Ok(())
        })?;
        Ok(self.job_view(tenant, &record))
    }

    /// Every job of `tenant`, newest first.
    pub fn list_jobs(&self, tenant: &str) -> Result<Value> {
        let state = self.store.state();
        let record = tenant_of(&state, tenant)?;
        let mut jobs: Vec<&JobRecord> = record.jobs.values().collect();
        jobs.sort_by(|a, b| {
            b.created_unix_ms
                .cmp(&a.created_unix_ms)
                .then(a.id.cmp(&b.id))
        });
        let views: Vec<Value> = jobs.iter().map(|job| self.job_view(tenant, job)).collect();
        Ok(json!({ "jobs": views }))
    }

    /// One job's record and progress.
    pub fn job(&self, tenant: &str, id: &str) -> Result<Value> {
        let state = self.store.state();
        let job = tenant_of(&state, tenant)?
            .jobs
            .get(id)
            .ok_or_else(|| unknown_job(id))?;
        Ok(self.job_view(tenant, job))
    }

    /// What a job looks like over the API: its record, rows done, failed and total, the rate
    /// and the time left.
    fn job_view(&self, tenant: &str, job: &JobRecord) -> Value {
        let (done, failed, rate) = match self.live_job(tenant, &job.id) {
            Some(live) if job.state.is_active() => (
                live.rows_done.load(Ordering::Relaxed),
                live.rows_failed.load(Ordering::Relaxed),
                live.rate(),
            ),
            _ => {
                let seconds = match (job.started_unix_ms, job.finished_unix_ms) {
                    (Some(start), Some(end)) => end.saturating_sub(start) as f64 / 1000.0,
                    _ => 0.0,
                };
                let rate = if seconds > 0.0 {
                    job.rows_done as f64 / seconds
                } else {
                    0.0
                };
                (job.rows_done, job.rows_failed, rate)
            }
        };
        let eta = (job.state.is_active() && rate > 0.0)
            .then(|| job.rows_total.saturating_sub(done) as f64 / rate);
        let file = |file: &Option<JobFile>| {
            file.as_ref()
                .map(|f| json!({ "digest": f.digest, "bytes": f.bytes }))
        };
        json!({
            "id": job.id,
            "target": job.target,
            "version": job.version,
            "state": job.state,
            "cancel_requested": job.cancel_requested,
            "rows": { "total": job.rows_total, "done": done, "failed": failed },
            "rows_per_second": (rate * 10.0).round() / 10.0,
            "eta_seconds": eta.map(|s| (s * 10.0).round() / 10.0),
            "chunk_rows": job.chunk_rows,
            "created_unix_ms": job.created_unix_ms,
            "started_unix_ms": job.started_unix_ms,
            "finished_unix_ms": job.finished_unix_ms,
            "deadline_unix_ms": job.deadline_unix_ms,
            "input": { "digest": job.input.digest, "bytes": job.input.bytes },
            "output": file(&job.output),
            "errors": file(&job.errors),
            "error": job.error,
        })
    }

    /// Cancels a job: a queued one at once, a running one at its next row (its finished
    /// chunks are kept in its files). A job that already ended is left as it is. Blocking.
    pub fn cancel_job(&self, tenant: &str, id: &str) -> Result<Value> {
        if let Some(live) = self.live_job(tenant, id) {
            live.cancel.store(true, Ordering::Relaxed);
        }
        let record = self.change(Some(tenant), |state| {
            let job = tenant_mut(state, tenant)?
                .jobs
                .get_mut(id)
                .ok_or_else(|| unknown_job(id))?;
            match job.state {
                JobState::Queued => {
                    job.state = JobState::Cancelled;
                    job.cancel_requested = true;
                    job.finished_unix_ms = Some(unix_now_ms());
                }
                JobState::Running => job.cancel_requested = true,
                _ => {}
            }
            Ok(job.clone())
        })?;
        Ok(self.job_view(tenant, &record))
    }

    /// Deletes an ended job and its files. Blocking.
    pub fn delete_job(&self, tenant: &str, id: &str) -> Result<()> {
        self.change(Some(tenant), |state| {
            let owner = tenant_mut(state, tenant)?;
            let job = owner.jobs.get(id).ok_or_else(|| unknown_job(id))?;
            if job.state.is_active() {
                return Err(Error::conflict(format!(
                    "job '{id}' is {}: cancel it first",
                    if job.state == JobState::Queued {
                        "queued"
                    } else {
                        "running"
                    }
                )));
            }
            owner.jobs.remove(id);
            Ok(())
        })?;
        let _ = fs::remove_dir_all(self.chunk_dir(tenant, id));
        Ok(())
    }

    /// Opens one file of a job, with its length: the input at once, the output and error
    /// files once the job ended (409 before). Blocking.
    pub fn open_job_file(&self, tenant: &str, id: &str, kind: JobFileKind) -> Result<(File, u64)> {
        let state = self.store.state();
        let job = tenant_of(&state, tenant)?
            .jobs
            .get(id)
            .ok_or_else(|| unknown_job(id))?;
        let file = match kind {
            JobFileKind::Input => Some(&job.input),
            JobFileKind::Output => job.output.as_ref(),
            JobFileKind::Errors => job.errors.as_ref(),
        };
        let Some(file) = file else {
            return Err(Error::conflict(format!(
                "job '{id}' is {}: its output and error files exist once it ended",
                serde_json::to_value(job.state)
                    .ok()
                    .and_then(|v| v.as_str().map(str::to_owned))
                    .unwrap_or_default()
            )));
        };
        Ok((self.store.open_blob(&file.digest)?, file.bytes))
    }

    /// Takes the next job this replica should run, if any: a queued job, or a running one
    /// whose runner is gone (this replica before a restart with the embedded store; on a
    /// shared store, any replica that stopped announcing itself). Among tenants, the one with
    /// the fewest jobs running here goes first, then the oldest job.
    fn claim_next_job(&self) -> Result<Option<Claim>> {
        let live: Vec<JobKey> = lock(&self.jobs)?.keys().cloned().collect();
        // With the embedded store this process is the only runner: a running job it does not
        // hold was interrupted by a crash. On a shared store, a running job is orphaned once
        // its runner is no longer a live replica (unknown until this one's first heartbeat).
        let live_replicas = match self.store.shared() {
            None => None,
            Some(_) => Some(lock(&self.live_replicas)?.clone().unwrap_or_default()),
        };
        let orphaned = |job: &JobRecord| match &live_replicas {
            None => true,
            Some(replicas) if replicas.is_empty() => false,
            Some(replicas) => job.runner.as_ref().is_none_or(|r| !replicas.contains(r)),
        };
        let runnable = |tenant: &Tenant, job: &JobRecord| {
            let key = (tenant.name.clone(), job.id.clone());
            match job.state {
                JobState::Queued => true,
                JobState::Running => !live.contains(&key) && orphaned(job),
                _ => false,
            }
        };
        let writer = self.writer()?;
        let state = writer.state();
        let running_here = |tenant: &str| live.iter().filter(|(t, _)| t == tenant).count();
        let Some((tenant, id)) = state
            .tenants
            .values()
            .flat_map(|tenant| {
                tenant
                    .jobs
                    .values()
                    .filter(|job| runnable(tenant, job))
                    .map(move |job| (tenant, job))
            })
            .min_by_key(|(tenant, job)| {
                (
                    running_here(&tenant.name),
                    job.created_unix_ms,
                    job.id.clone(),
                )
            })
            .map(|(tenant, job)| (tenant.name.clone(), job.id.clone()))
        else {
            return Ok(None);
        };
        let replica = self.replica_id.clone();
        let claimed = writer.commit(Some(&tenant), |state| {
            let owner = tenant_mut(state, &tenant)?;
            let still = owner.jobs.get(&id).is_some_and(|job| runnable(owner, job));
            let job = owner
                .jobs
                .get_mut(&id)
                .filter(|_| still)
                // Another replica took it first (the shared store's commit sees the latest
                // state): nothing is written.
                .ok_or_else(|| Error::conflict(format!("job '{id}' was taken")))?;
            job.state = JobState::Running;
            job.runner = Some(replica);
            job.started_unix_ms.get_or_insert_with(unix_now_ms);
            Ok(job.clone())
        });
        let record = match claimed {
            Ok(record) => record,
            Err(error) if error.kind() == ErrorKind::Conflict => return Ok(None),
            Err(error) => return Err(error),
        };
        let live = Arc::new(LiveJob::new());
        if record.cancel_requested {
            live.cancel.store(true, Ordering::Relaxed);
        }
        lock(&self.jobs)?.insert((tenant.clone(), id), Arc::clone(&live));
        Ok(Some(Claim {
            tenant,
            record,
            live,
        }))
    }

    /// Sets the cancel flag of every job running here whose record asks for it, names another
    /// runner, or is gone (with its tenant).
    fn notice_cancels(&self) -> Result<()> {
        let state = self.store.state();
        for ((tenant, id), live) in lock(&self.jobs)?.iter() {
            let wanted = state
                .tenants
                .get(tenant)
                .and_then(|record| record.jobs.get(id))
                .is_none_or(|job| {
                    // Cancelled, or taken over by another replica while this one was cut off.
                    job.cancel_requested || job.runner.as_deref() != Some(&self.replica_id)
                });
            if wanted {
                live.cancel.store(true, Ordering::Relaxed);
            }
        }
        Ok(())
    }

    /// Joins a job's committed chunks, in order, into its output and error files (blobs).
    fn assemble(&self, dir: &Path) -> Result<(JobFile, JobFile, u64, u64)> {
        let markers = ChunkFiles::markers(dir)?;
        let mut files = Vec::new();
        for ext in ["out", "err"] {
            let mut writer = self.store.blob_writer()?;
            for (index, _) in &markers {
                let path = dir.join(format!("{index:010}.{ext}"));
                let bytes =
                    fs::read(&path).map_err(|error| storage_error("read a chunk", &error))?;
                writer.write(&bytes)?;
            }
            let staged = writer.finish()?;
            let bytes = staged.len();
            self.store.share_staged(&staged)?;
            let digest = self.store.put_staged(staged)?;
            files.push(JobFile { digest, bytes });
        }
        let rows = markers.iter().map(|(_, m)| m.rows).sum();
        let failed = markers.iter().map(|(_, m)| m.failed).sum();
        let errors = files
            .pop()
            .ok_or_else(|| Error::internal("no error file"))?;
        let output = files
            .pop()
            .ok_or_else(|| Error::internal("no output file"))?;
        Ok((output, errors, rows, failed))
    }

    /// Records how a job ended: its files, counts and state; then forgets its chunk files.
    fn finish_job(&self, claim: &Claim, end: Result<JobEnd>) {
        let dir = self.chunk_dir(&claim.tenant, &claim.record.id);
        let (mut state, mut error) = match end {
            Ok(JobEnd::Finished { .. }) => (JobState::Succeeded, None),
            Ok(JobEnd::Cancelled) => (JobState::Cancelled, None),
            Ok(JobEnd::DeadlineExceeded) => (
                JobState::Expired,
                Some("the job's deadline passed; the rows done by then are in its files".into()),
            ),
            Err(error) => (JobState::Failed, Some(error.message().to_string())),
        };
        let files = match self.assemble(&dir) {
            Ok(files) => Some(files),
            Err(failure) => {
                state = JobState::Failed;
                error = Some(failure.message().to_string());
                None
            }
        };
        let (tenant, id) = (&claim.tenant, &claim.record.id);
        let replica = self.replica_id.as_str();
        let result = self.change(Some(tenant), |store| {
            let Some(job) = store
                .tenants
                .get_mut(tenant)
                .and_then(|record| record.jobs.get_mut(id))
            else {
                return Ok(()); // deleted with its tenant
            };
            if job.runner.as_deref() != Some(replica) {
                // Another replica took the job over (this one was taken for dead): its run
                // records the end, this one's chunks are dropped.
                return Ok(());
            }
            job.state = state;
            job.error = error;
            job.runner = None;
            job.finished_unix_ms = Some(unix_now_ms());
            if let Some((output, errors, rows, failed)) = files {
                job.output = Some(output);
                job.errors = Some(errors);
                job.rows_done = rows;
                job.rows_failed = failed;
            }
            Ok(())
        });
        match result {
            Ok(()) => {
                let _ = fs::remove_dir_all(&dir);
            }
            // The record still says running: the next start takes the job up again and
            // finds every chunk committed.
            Err(error) => tracing::warn!(%error, tenant, job = id, "cannot record a job's end"),
        }
        if let Ok(mut live) = lock(&self.jobs) {
            live.remove(&(tenant.clone(), id.clone()));
        }
    }

    /// Runs a claimed job to its end and records it.
    async fn run_claimed(self: Arc<Self>, claim: Claim, config: JobRunnerConfig) {
        let end = self.run_claimed_job(&claim, &config).await;
        let tenancy = Arc::clone(&self);
        let _ = tokio::task::spawn_blocking(move || tenancy.finish_job(&claim, end)).await;
    }

    async fn run_claimed_job(&self, claim: &Claim, config: &JobRunnerConfig) -> Result<JobEnd> {
        let job = &claim.record;
        let scope = self
            .scope(&claim.tenant)
            .ok_or_else(|| Error::not_found("the job's tenant is gone"))?;
        let version = job.version.map(|v| v.to_string());
        let (_, model) = scope.registry.resolve(&job.target, version.as_deref())?;
        let input = self.store.open_blob(&job.input.digest)?;
        let stored = tenant_of(&self.store.state(), &claim.tenant)
            .map(Tenant::stored_bytes)
            .unwrap_or(u64::MAX);
        let checkpoint = Arc::new(ChunkFiles {
            dir: self.chunk_dir(&claim.tenant, &job.id),
            live: Arc::clone(&claim.live),
            storage_left: scope.quotas.max_stored_bytes.saturating_sub(stored),
        });
        let left = job.deadline_unix_ms.saturating_sub(unix_now_ms());
        let mut settings = JobSettings::new(&claim.tenant);
        settings.chunk_rows = usize::try_from(job.chunk_rows).unwrap_or(usize::MAX);
        settings.concurrency = config.rows_in_flight;
        settings.background = config.background.clone();
        settings.deadline = Some(Instant::now() + Duration::from_millis(left));
        run_job(
            Box::new(BufReader::with_capacity(1 << 20, input)),
            model,
            settings,
            checkpoint,
        )
        .await
    }
}

/// Runs this replica's job runner until the process ends: every [`RUNNER_TICK`] it notices
/// cancels and starts queued (or interrupted) jobs while it has free slots.
pub fn run_job_runner(tenancy: Arc<Tenancy>, config: JobRunnerConfig) {
    tokio::spawn(async move {
        let slots = Arc::new(tokio::sync::Semaphore::new(config.slots.max(1)));
        let mut timer = tokio::time::interval(RUNNER_TICK);
        timer.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            timer.tick().await;
            if let Err(error) = tenancy.notice_cancels() {
                tracing::warn!(%error, "the job runner cannot check cancels");
            }
            while let Ok(permit) = Arc::clone(&slots).try_acquire_owned() {
                let claimer = Arc::clone(&tenancy);
                let claim = tokio::task::spawn_blocking(move || claimer.claim_next_job()).await;
                let claim = match claim {
                    Ok(Ok(Some(claim))) => claim,
                    Ok(Ok(None)) => break,
                    Ok(Err(error)) => {
                        tracing::warn!(%error, "the job runner cannot take a job");
                        break;
                    }
                    Err(error) => {
                        tracing::warn!(%error, "the job runner failed");
                        break;
                    }
                };
                let runner = Arc::clone(&tenancy);
                let job_config = config.clone();
                let run = async move {
                    runner.run_claimed(claim, job_config).await;
                    drop(permit);
                };
                match &config.runtime {
                    Some(runtime) => drop(runtime.spawn(run)),
                    None => drop(tokio::spawn(run)),
                }
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::count_rows;

    #[test]
    fn rows_are_the_non_blank_lines() {
        assert_eq!(count_rows(&b""[..]).unwrap(), 0);
        assert_eq!(count_rows(&b"a\n\n  \nb"[..]).unwrap(), 2);
        assert_eq!(count_rows(&b"a\r\nb\r\n\r\n"[..]).unwrap(), 2);
        assert_eq!(count_rows(&b" \n\t\n"[..]).unwrap(), 0);
    }
}
