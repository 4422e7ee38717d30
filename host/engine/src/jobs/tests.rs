#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeSet;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use weft_core::{BoxFuture, DataType, ModelMetadata, NamedTensor, Tensor, TensorSpec};

use super::*;

/// Doubles its FP32 input `x` into `y`; counts calls.
struct Double {
    metadata: ModelMetadata,
    calls: AtomicU64,
}

impl Double {
    /// A model that batches up to `max_batch_size` rows per call.
    fn batching(max_batch_size: usize) -> Arc<Self> {
        let mut model = Arc::into_inner(Double::new()).unwrap();
        model.metadata.max_batch_size = max_batch_size;
        Arc::new(model)
    }

    fn new() -> Arc<Self> {
        let spec = |name: &str| TensorSpec {
            name: name.into(),
            datatype: DataType::Fp32,
            shape: vec![-1, 2],
        };
        Arc::new(Double {
            metadata: ModelMetadata {
                platform: "fake".into(),
                inputs: vec![spec("x")],
                outputs: vec![spec("y")],
                max_batch_size: 0,
            },
            calls: AtomicU64::new(0),
        })
    }
}

impl Model for Double {
    fn metadata(&self) -> &ModelMetadata {
        &self.metadata
    }
    fn infer<'a>(
        &'a self,
        _: &'a RequestContext,
        inputs: Vec<NamedTensor>,
    ) -> BoxFuture<'a, Result<Vec<NamedTensor>>> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        Box::pin(async move {
            let input = &inputs[0].tensor;
            let values = input.data().chunks_exact(4);
            if values
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .any(|v| v < 0.0)
            {
                // A poisoned row fails the whole call it is in.
                return Err(Error::invalid("negative input"));
            }
            let doubled: Vec<u8> = input
                .data()
                .chunks_exact(4)
                .flat_map(|b| (f32::from_le_bytes([b[0], b[1], b[2], b[3]]) * 2.0).to_le_bytes())
                .collect();
            let tensor = Tensor::new(DataType::Fp32, input.shape().to_vec(), doubled.into())?;
            Ok(vec![NamedTensor::new("y", tensor)])
        })
    }
}

/// Keeps committed chunks in memory; can fail one commit (a crash) or cancel after some.
#[derive(Default)]
struct Memory {
    chunks: Mutex<Vec<ChunkResult>>,
    fail_commit_of: Mutex<Option<u64>>,
    cancel_after: Mutex<Option<usize>>,
    cancelled: AtomicBool,
    /// Runs when the cancel lands (to note what had run by then).
    on_cancel: Mutex<Option<Box<dyn Fn() + Send>>>,
}

impl JobCheckpoint for Memory {
    fn committed(&self) -> Result<BTreeSet<u64>> {
        Ok(self
            .chunks
            .lock()
            .unwrap()
            .iter()
            .map(|c| c.index)
            .collect())
    }
    fn commit(&self, chunk: &ChunkResult) -> Result<()> {
        if *self.fail_commit_of.lock().unwrap() == Some(chunk.index) {
            return Err(Error::unavailable("the process died here"));
        }
        let mut chunks = self.chunks.lock().unwrap();
        chunks.push(chunk.clone());
        if *self.cancel_after.lock().unwrap() == Some(chunks.len()) {
            if let Some(note) = self.on_cancel.lock().unwrap().as_ref() {
                note();
            }
            self.cancelled.store(true, Ordering::SeqCst);
        }
        Ok(())
    }
    fn cancelled(&self) -> bool {
        self.cancelled.load(Ordering::SeqCst)
    }
}

impl Memory {
    /// Every output and error line committed, chunks in order.
    fn files(&self) -> (Vec<Value>, Vec<Value>) {
        let mut chunks = self.chunks.lock().unwrap().clone();
        chunks.sort_by_key(|c| c.index);
        let lines = |bytes: &[u8]| -> Vec<Value> {
            bytes
                .split(|&b| b == b'\n')
                .filter(|line| !line.is_empty())
                .map(|line| serde_json::from_slice(line).unwrap())
                .collect()
        };
        let outputs = chunks.iter().flat_map(|c| lines(&c.outputs)).collect();
        let errors = chunks.iter().flat_map(|c| lines(&c.errors)).collect();
        (outputs, errors)
    }
}

fn row(value: f32) -> String {
    format!(
        r#"{{"id": "r{value}", "inputs": [{{"name": "x", "datatype": "FP32", "shape": [1, 2], "data": [{value}, 1.0]}}]}}"#
    )
}

fn input(lines: &[String]) -> Box<dyn BufRead + Send> {
    Box::new(std::io::Cursor::new(lines.join("\n").into_bytes()))
}

/// Runs the job over `lines` with `settings` against a fresh [`Double`] and `checkpoint`.
async fn run_double(
    lines: &[String],
    settings: JobSettings,
    checkpoint: &Arc<Memory>,
) -> Result<JobEnd> {
    run_job(input(lines), Double::new(), settings, checkpoint.clone()).await
}

/// Runs the job over `lines` with `settings(10)` against `model` and `checkpoint`.
async fn run_ten_a_chunk(
    lines: &[String],
    model: &Arc<Double>,
    checkpoint: &Arc<Memory>,
) -> Result<JobEnd> {
    run_job(
        input(lines),
        model.clone(),
        settings(10),
        checkpoint.clone(),
    )
    .await
}

/// The line numbers of answer or error lines.
fn line_numbers(lines: &[Value]) -> Vec<u64> {
    lines
        .iter()
        .map(|line| line["line"].as_u64().unwrap())
        .collect()
}

fn settings(chunk_rows: usize) -> JobSettings {
    JobSettings {
        chunk_rows,
        concurrency: 4,
        ..JobSettings::new("acme")
    }
}

#[tokio::test]
async fn every_row_is_answered_in_order_and_bad_lines_go_to_the_error_file() {
    let mut lines: Vec<String> = (0..25).map(|i| row(i as f32)).collect();
    lines[3] = "{not json".into();
    lines[7] = String::new(); // blank: skipped, keeps its number
    lines[9] =
        r#"{"inputs": [{"name": "nope", "datatype": "FP32", "shape": [1, 2], "data": [1, 2]}]}"#
            .into();
    lines[11] = format!(r#"{{"inputs": [], "pad": "{}"}}"#, "z".repeat(2000));
    let checkpoint = Arc::new(Memory::default());
    let end = run_double(
        &lines,
        JobSettings {
            max_line_bytes: 1000,
            ..settings(10)
        },
        &checkpoint,
    )
    .await
    .unwrap();
    assert_eq!(
        end,
        JobEnd::Finished {
            rows: 24,
            failed: 3,
            chunks: 3
        }
    );
    let (outputs, errors) = checkpoint.files();
    let numbers = line_numbers(&outputs);
    let expected: Vec<u64> = (1..=25).filter(|n| ![4, 8, 10, 12].contains(n)).collect();
    assert_eq!(numbers, expected, "input order, numbered from 1");
    for output in &outputs {
        let line = output["line"].as_u64().unwrap();
        let value = (line - 1) as f64;
        assert_eq!(output["id"], format!("r{value}"));
        assert_eq!(output["outputs"][0]["name"], "y");
        assert_eq!(output["outputs"][0]["data"], json!([value * 2.0, 2.0]));
    }
    let error_lines = line_numbers(&errors);
    assert_eq!(error_lines, [4, 10, 12]);
    assert!(
        errors[2]["error"]
            .as_str()
            .unwrap()
            .contains("longer than 1000 bytes")
    );
    assert!(
        errors[1]["error"].as_str().unwrap().contains("nope"),
        "{}",
        errors[1]
    );
}

#[tokio::test]
async fn a_job_killed_mid_way_resumes_without_redoing_or_duplicating_a_line() {
    let lines: Vec<String> = (0..50).map(|i| row(i as f32)).collect();
    let checkpoint = Arc::new(Memory::default());
    *checkpoint.fail_commit_of.lock().unwrap() = Some(3);
    let model = Double::new();
    let error = run_ten_a_chunk(&lines, &model, &checkpoint)
        .await
        .unwrap_err();
    assert_eq!(error.kind(), ErrorKind::Unavailable);
    let first_run = model.calls.load(Ordering::SeqCst);
    assert!(
        (40..=50).contains(&first_run),
        "chunks 0-3 ran (and maybe rows of 4 beside 3's commit): {first_run}"
    );
    assert_eq!(
        checkpoint.committed().unwrap(),
        BTreeSet::from([0, 1, 2]),
        "nothing after the failed commit"
    );
    *checkpoint.fail_commit_of.lock().unwrap() = None;
    let end = run_ten_a_chunk(&lines, &model, &checkpoint).await.unwrap();
    assert_eq!(
        end,
        JobEnd::Finished {
            rows: 20,
            failed: 0,
            chunks: 5
        }
    );
    assert_eq!(
        model.calls.load(Ordering::SeqCst) - first_run,
        20,
        "only chunks 3 and 4 again"
    );
    let (outputs, _) = checkpoint.files();
    let numbers = line_numbers(&outputs);
    assert_eq!(
        numbers,
        (1..=50).collect::<Vec<_>>(),
        "every line exactly once"
    );
}

#[tokio::test]
async fn a_cancelled_job_stops_before_its_next_row_and_commits_nothing_more() {
    let lines: Vec<String> = (0..100).map(|i| row(i as f32)).collect();
    let checkpoint = Arc::new(Memory::default());
    *checkpoint.cancel_after.lock().unwrap() = Some(2);
    let model = Double::new();
    let calls_at_cancel = Arc::new(AtomicU64::new(u64::MAX));
    *checkpoint.on_cancel.lock().unwrap() = Some(Box::new({
        let model = Arc::clone(&model);
        let calls_at_cancel = Arc::clone(&calls_at_cancel);
        move || {
            let calls = model.calls.load(Ordering::SeqCst);
            calls_at_cancel.store(calls, Ordering::SeqCst);
        }
    }));
    let end = run_ten_a_chunk(&lines, &model, &checkpoint).await.unwrap();
    assert_eq!(end, JobEnd::Cancelled);
    assert_eq!(checkpoint.chunks.lock().unwrap().len(), 2);
    let at_cancel = calls_at_cancel.load(Ordering::SeqCst);
    let calls = model.calls.load(Ordering::SeqCst);
    assert!(
        (20..100).contains(&at_cancel),
        "the cancel landed after two commits: {at_cancel}"
    );
    assert!(
        calls <= at_cancel + 4,
        "no row starts after the cancel, beyond the 4 already in flight: {calls} calls, \
         {at_cancel} when it landed"
    );
}

#[tokio::test]
async fn a_job_past_its_deadline_stops() {
    let lines: Vec<String> = (0..10).map(|i| row(i as f32)).collect();
    let checkpoint = Arc::new(Memory::default());
    let end = run_double(
        &lines,
        JobSettings {
            deadline: Some(Instant::now()),
            ..settings(5)
        },
        &checkpoint,
    )
    .await
    .unwrap();
    assert_eq!(end, JobEnd::DeadlineExceeded);
    assert!(checkpoint.chunks.lock().unwrap().is_empty());
}

#[tokio::test]
async fn a_chunk_of_long_lines_ends_at_its_byte_bound() {
    let lines: Vec<String> = (0..10).map(|i| row(i as f32)).collect();
    let checkpoint = Arc::new(Memory::default());
    let end = run_double(
        &lines,
        JobSettings {
            max_chunk_bytes: lines[0].len() * 3,
            ..settings(100)
        },
        &checkpoint,
    )
    .await
    .unwrap();
    // About three lines a chunk, not all ten in one.
    let JobEnd::Finished { rows, chunks, .. } = end else {
        panic!("{end:?}")
    };
    assert_eq!(rows, 10);
    assert!((3..=5).contains(&chunks), "{chunks} chunks");
    assert_eq!(
        line_numbers(&checkpoint.files().0),
        (1..=10).collect::<Vec<_>>()
    );
}

/// Threads that ran [`Background::on_thread_start`], by name (only the test below sets it).
static STARTED_THREADS: Mutex<Vec<String>> = Mutex::new(Vec::new());

fn note_thread_start() {
    let name = std::thread::current().name().unwrap_or("?").to_string();
    STARTED_THREADS.lock().unwrap().push(name);
}

#[tokio::test]
async fn decoding_and_encoding_run_on_the_jobs_own_threads_started_with_its_hook() {
    let lines: Vec<String> = (0..25).map(|i| row(i as f32)).collect();
    let checkpoint = Arc::new(Memory::default());
    let end = run_double(
        &lines,
        JobSettings {
            background: Background {
                on_thread_start: Some(note_thread_start),
                ..Background::default()
            },
            ..settings(10)
        },
        &checkpoint,
    )
    .await
    .unwrap();
    assert_eq!(
        end,
        JobEnd::Finished {
            rows: 25,
            failed: 0,
            chunks: 3
        }
    );
    let mut started = STARTED_THREADS.lock().unwrap().clone();
    started.sort();
    assert_eq!(started, ["weft-job-read", "weft-job-write"]);
    let (outputs, _) = checkpoint.files();
    assert_eq!(outputs.len(), 25);
    assert_eq!(outputs[24]["outputs"][0]["data"], json!([48.0, 2.0]));
}

#[tokio::test]
async fn rows_of_a_batching_model_share_calls_and_a_failing_call_fails_only_its_bad_row() {
    let mut lines: Vec<String> = (0..25).map(|i| row(i as f32)).collect();
    lines[5] = row(-1.0);
    let checkpoint = Arc::new(Memory::default());
    let model = Double::batching(8);
    let end = run_ten_a_chunk(&lines, &model, &checkpoint).await.unwrap();
    assert_eq!(
        end,
        JobEnd::Finished {
            rows: 25,
            failed: 1,
            chunks: 3
        }
    );
    // Up to 4 rows (half of 8) a call: chunks of 10 are calls of 4, 4 and 2 (5 in the last).
    // The call holding the bad row fails and its 4 rows run again alone.
    assert_eq!(model.calls.load(Ordering::SeqCst), 3 + 3 + 2 + 4);
    let (outputs, errors) = checkpoint.files();
    assert_eq!(
        line_numbers(&outputs),
        (1..=25).filter(|&n| n != 6).collect::<Vec<_>>()
    );
    for output in &outputs {
        let n = output["line"].as_u64().unwrap() - 1;
        assert_eq!(output["id"], json!(format!("r{n}")));
        assert_eq!(output["outputs"][0]["data"], json!([2.0 * n as f64, 2.0]));
        assert_eq!(output["outputs"][0]["shape"], json!([1, 2]));
    }
    assert_eq!(line_numbers(&errors), [6]);
    assert!(errors[0]["error"].as_str().unwrap().contains("negative"));
}

/// Runs 20 rows, 10 a chunk, 4 at a time, yielding to `realtime`; returns how it ended and
/// how long it took.
async fn run_yielding(realtime: Arc<RealtimeLoad>) -> (JobEnd, Duration) {
    let lines: Vec<String> = (0..20).map(|i| row(i as f32)).collect();
    let started = Instant::now();
    let end = run_double(
        &lines,
        JobSettings {
            background: Background {
                yield_to: Some(realtime),
                ..Background::default()
            },
            ..settings(10)
        },
        &Arc::new(Memory::default()),
    )
    .await
    .unwrap();
    (end, started.elapsed())
}

#[tokio::test]
async fn a_job_waits_for_real_time_requests_before_each_unit_but_still_moves() {
    let realtime = Arc::new(RealtimeLoad::default());
    let finished = JobEnd::Finished {
        rows: 20,
        failed: 0,
        chunks: 2,
    };
    // A real-time request in flight the whole time: 20 rows, 4 at a time, each waits the
    // full pause first, so at least 5 pauses pass; every row still runs.
    let request = realtime.enter();
    assert!(realtime.busy());
    let (end, took) = run_yielding(Arc::clone(&realtime)).await;
    assert_eq!(end, finished);
    assert!(took >= REALTIME_PAUSE * 5, "{took:?}");
    drop(request);
    assert!(!realtime.busy(), "the request's guard counts it out");
    let (end, _) = run_yielding(realtime).await;
    assert_eq!(end, finished);
}

#[tokio::test]
async fn a_chunk_whose_outputs_pass_their_bound_fails_the_job_naming_chunk_rows() {
    let lines: Vec<String> = (0..30).map(|i| row(i as f32)).collect();
    let checkpoint = Arc::new(Memory::default());
    // Each row's output is 8 bytes: a chunk of 10 rows holds 80, more than the 50 allowed.
    let error = run_double(
        &lines,
        JobSettings {
            max_chunk_output_bytes: 50,
            ..settings(10)
        },
        &checkpoint,
    )
    .await
    .unwrap_err();
    assert_eq!(error.kind(), ErrorKind::InvalidArgument);
    assert!(error.message().contains("smaller chunk_rows"), "{error}");
    assert!(checkpoint.chunks.lock().unwrap().is_empty());
    // Chunks of 5 rows (40 bytes) fit.
    let end = run_double(
        &lines,
        JobSettings {
            max_chunk_output_bytes: 50,
            ..settings(5)
        },
        &checkpoint,
    )
    .await
    .unwrap();
    assert_eq!(
        end,
        JobEnd::Finished {
            rows: 30,
            failed: 0,
            chunks: 6
        }
    );
}
