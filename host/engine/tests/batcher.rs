//! The dynamic batcher with a fake model: merge and split are exact (FP32 and BYTES), requests of
//! different shapes never share a batch, a full queue refuses, queue timeouts answer 504, a
//! cancelled caller does not disturb the others, a model error reaches every caller, and a
//! request that fails its batch fails alone: the others are rerun and get their own results.
//! Tenants share the queue fairly: one tenant's backlog delays another's request by a batch, not
//! by the backlog; a tenant filling the queue does not lock another out; requests that cannot be
//! merged take instance turns in fair shares with the batches.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use weft_core::{
    BoxFuture, DataType, Error, ErrorKind, Model, ModelMetadata, NamedTensor, RequestContext,
    Result, Tensor, TensorSpec, bytes_elements, encode_bytes_elements,
};
use weft_engine::{BatchedModel, BatchingConfig, Staging};

/// y = 2x (FP32, any row width); tag = "row:<first value of the row>" (BYTES [n, 1]).
/// Records the rows of every call, and sleeps `delay` in each. With `refuse_negative`, a call
/// with a negative value fails with an error that quotes every value of the call.
struct Doubler {
    metadata: ModelMetadata,
    calls: Mutex<Vec<usize>>,
    /// The first value of each row of every call, in call order (tells whose requests a call
    /// carried).
    seen: Mutex<Vec<Vec<f32>>>,
    delay: Duration,
    fail: bool,
    refuse_negative: bool,
    /// Where the input `x` of every call lay in memory (tells a staged batch from another).
    addresses: Mutex<Vec<usize>>,
}

impl Doubler {
    fn new(delay: Duration) -> Arc<Self> {
        let spec = |name: &str, datatype, shape| TensorSpec {
            name: name.into(),
            datatype,
            shape,
        };
        Arc::new(Doubler {
            metadata: ModelMetadata {
                platform: "fake".into(),
                inputs: vec![spec("x", DataType::Fp32, vec![-1, -1])],
                outputs: vec![
                    spec("y", DataType::Fp32, vec![-1, -1]),
                    spec("tag", DataType::Bytes, vec![-1, 1]),
                ],
                max_batch_size: 8,
            },
            calls: Mutex::new(Vec::new()),
            seen: Mutex::new(Vec::new()),
            delay,
            fail: false,
            refuse_negative: false,
            addresses: Mutex::new(Vec::new()),
        })
    }

    fn calls(&self) -> Vec<usize> {
        self.calls.lock().unwrap().clone()
    }

    /// The first value of every call.
    fn starts(&self) -> Vec<f32> {
        self.seen
            .lock()
            .unwrap()
            .iter()
            .map(|rows| rows[0])
            .collect()
    }
}

fn floats(tensor: &Tensor) -> Vec<f32> {
    tensor
        .data()
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect()
}

fn fp32(shape: Vec<usize>, values: &[f32]) -> Tensor {
    let data: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
    Tensor::new(DataType::Fp32, shape, Bytes::from(data)).unwrap()
}

impl Model for Doubler {
    fn metadata(&self) -> &ModelMetadata {
        &self.metadata
    }

    fn infer<'a>(
        &'a self,
        _: &'a RequestContext,
        inputs: Vec<NamedTensor>,
    ) -> BoxFuture<'a, Result<Vec<NamedTensor>>> {
        Box::pin(async move {
            let x = &inputs[0].tensor;
            let (rows, width) = (x.shape()[0], x.shape()[1]);
            self.calls.lock().unwrap().push(rows);
            self.addresses
                .lock()
                .unwrap()
                .push(x.data().as_ptr() as usize);
            let row_starts = floats(x).chunks(width.max(1)).map(|row| row[0]).collect();
            self.seen.lock().unwrap().push(row_starts);
            tokio::time::sleep(self.delay).await;
            if self.fail {
                return Err(Error::invalid("the fake model refuses"));
            }
            let values = floats(x);
            if self.refuse_negative && values.iter().any(|v| *v < 0.0) {
                return Err(Error::invalid(format!("the fake model refuses {values:?}")));
            }
            let doubled: Vec<f32> = values.iter().map(|v| v * 2.0).collect();
            let tags: Vec<String> = values
                .chunks(width.max(1))
                .map(|row| format!("row:{}", row[0]))
                .collect();
            let tag_bytes: Vec<&[u8]> = tags.iter().map(|t| t.as_bytes()).collect();
            Ok(vec![
                NamedTensor::new("y", fp32(vec![rows, width], &doubled)),
                NamedTensor::new(
                    "tag",
                    Tensor::new(
                        DataType::Bytes,
                        vec![rows, 1],
                        Bytes::from(encode_bytes_elements(tag_bytes.iter().copied()).unwrap()),
                    )
                    .unwrap(),
                ),
            ])
        })
    }
}

/// Starts `count` one-row requests, `gap` apart (request `i` starts at value `i`).
async fn spawn_staggered(
    batched: &Arc<BatchedModel>,
    count: usize,
    gap: Duration,
) -> Vec<tokio::task::JoinHandle<Result<Vec<NamedTensor>>>> {
    let mut tasks = Vec::new();
    for i in 0..count {
        let batched = Arc::clone(batched);
        tasks.push(tokio::spawn(async move {
            batched
                .infer(&RequestContext::background(), request(1, 2, i as f32))
                .await
        }));
        tokio::time::sleep(gap).await;
    }
    tasks
}

/// Sends every request at once (one task each) and returns the answers in request order.
async fn infer_all(
    batched: &Arc<BatchedModel>,
    requests: &[Vec<NamedTensor>],
) -> Vec<Result<Vec<NamedTensor>>> {
    let tasks: Vec<_> = requests
        .iter()
        .cloned()
        .map(|r| {
            let batched = Arc::clone(batched);
            tokio::spawn(async move { batched.infer(&RequestContext::background(), r).await })
        })
        .collect();
    let mut answers = Vec::with_capacity(tasks.len());
    for task in tasks {
        answers.push(task.await.unwrap());
    }
    answers
}

fn config(instances: usize) -> BatchingConfig {
    BatchingConfig {
        max_batch_size: 8,
        preferred_batch_sizes: Vec::new(),
        max_queue_delay: Duration::from_millis(5),
        max_queue_size: 100,
        queue_timeout: None,
        instances,
    }
}

/// A request of `rows` rows of `width`, values starting at `start`.
fn request(rows: usize, width: usize, start: f32) -> Vec<NamedTensor> {
    let values: Vec<f32> = (0..rows * width).map(|i| start + i as f32).collect();
    vec![NamedTensor::new("x", fp32(vec![rows, width], &values))]
}

fn check_answer(request: &[NamedTensor], answer: &[NamedTensor]) {
    let x = &request[0].tensor;
    let (rows, width) = (x.shape()[0], x.shape()[1]);
    assert_eq!(answer[0].name, "y");
    assert_eq!(answer[0].tensor.shape(), &[rows, width]);
    let expected: Vec<f32> = floats(x).iter().map(|v| v * 2.0).collect();
    assert_eq!(floats(&answer[0].tensor), expected);
    assert_eq!(answer[1].tensor.shape(), &[rows, 1]);
    let tags: Vec<String> = bytes_elements(answer[1].tensor.data())
        .unwrap()
        .map(|t| String::from_utf8(t.to_vec()).unwrap())
        .collect();
    let expected: Vec<String> = floats(x)
        .chunks(width)
        .map(|row| format!("row:{}", row[0]))
        .collect();
    assert_eq!(tags, expected);
}

#[tokio::test]
async fn concurrent_requests_merge_into_few_calls_and_split_back_exactly() {
    let fake = Doubler::new(Duration::from_millis(30));
    let batched = Arc::new(BatchedModel::new(fake.clone(), config(1)));
    let requests: Vec<Vec<NamedTensor>> = (0..12)
        .map(|i| request(1 + i % 3, 4, (i * 100) as f32))
        .collect();
    for (request, answer) in requests.iter().zip(infer_all(&batched, &requests).await) {
        check_answer(request, &answer.unwrap());
    }
    let calls = fake.calls();
    assert_eq!(calls.iter().sum::<usize>(), 24, "{calls:?}");
    assert!(calls.iter().all(|&rows| rows <= 8), "{calls:?}");
    assert!(calls.len() <= 5, "12 requests should batch: {calls:?}");
    let stats = batched.stats();
    assert_eq!(
        stats.requests.load(std::sync::atomic::Ordering::Relaxed),
        12
    );
    assert_eq!(
        stats.queue_depth.load(std::sync::atomic::Ordering::SeqCst),
        0
    );
}

#[tokio::test]
async fn requests_of_different_shapes_never_share_a_batch() {
    let fake = Doubler::new(Duration::from_millis(20));
    let batched = Arc::new(BatchedModel::new(fake.clone(), config(1)));
    let requests: Vec<Vec<NamedTensor>> = (0..10)
        .map(|i| request(1, if i % 2 == 0 { 4 } else { 3 }, i as f32))
        .collect();
    for (request, answer) in requests.iter().zip(infer_all(&batched, &requests).await) {
        check_answer(request, &answer.unwrap());
    }
    assert_eq!(fake.calls().iter().sum::<usize>(), 10);
}

#[tokio::test]
async fn a_preferred_size_dispatches_without_waiting_for_the_delay() {
    let fake = Doubler::new(Duration::ZERO);
    let batched = Arc::new(BatchedModel::new(
        fake.clone(),
        BatchingConfig {
            preferred_batch_sizes: vec![4],
            max_queue_delay: Duration::from_secs(30),
            ..config(1)
        },
    ));
    let started = std::time::Instant::now();
    let tasks: Vec<_> = (0..4)
        .map(|i| {
            let batched = Arc::clone(&batched);
            tokio::spawn(async move {
                batched
                    .infer(&RequestContext::background(), request(1, 2, i as f32))
                    .await
            })
        })
        .collect();
    for task in tasks {
        task.await.unwrap().unwrap();
    }
    assert!(started.elapsed() < Duration::from_secs(10));
    assert_eq!(fake.calls(), vec![4]);
}

#[tokio::test]
async fn a_full_queue_refuses_with_unavailable() {
    let fake = Doubler::new(Duration::from_millis(300));
    let batched = Arc::new(BatchedModel::new(
        fake.clone(),
        BatchingConfig {
            max_queue_size: 2,
            max_queue_delay: Duration::ZERO,
            ..config(1)
        },
    ));
    // One runs (holding the only instance); two wait; the fourth is refused.
    let tasks = spawn_staggered(&batched, 3, Duration::from_millis(30)).await;
    let error = batched
        .infer(&RequestContext::background(), request(1, 2, 9.0))
        .await
        .unwrap_err();
    assert_eq!(error.kind(), ErrorKind::Unavailable);
    assert!(error.to_string().contains("queue is full"), "{error}");
    for task in tasks {
        task.await.unwrap().unwrap();
    }
    // Recovered: it serves again.
    batched
        .infer(&RequestContext::background(), request(1, 2, 1.0))
        .await
        .unwrap();
}

#[tokio::test]
async fn a_request_waiting_past_its_timeout_gets_deadline_exceeded() {
    let fake = Doubler::new(Duration::from_millis(500));
    let batched = Arc::new(BatchedModel::new(
        fake.clone(),
        BatchingConfig {
            queue_timeout: Some(Duration::from_millis(20)),
            max_queue_delay: Duration::ZERO,
            ..config(1)
        },
    ));
    let first = {
        let batched = Arc::clone(&batched);
        tokio::spawn(async move {
            batched
                .infer(&RequestContext::background(), request(1, 2, 0.0))
                .await
        })
    };
    tokio::time::sleep(Duration::from_millis(20)).await;
    let error = batched
        .infer(&RequestContext::background(), request(1, 2, 5.0))
        .await
        .unwrap_err();
    assert_eq!(error.kind(), ErrorKind::DeadlineExceeded);
    // Answered when its timeout passed, not when the only instance freed up.
    assert!(
        !first.is_finished(),
        "the timed-out caller waited for the busy batch"
    );
    first.await.unwrap().unwrap();
    assert_eq!(fake.calls(), vec![1], "the timed-out request never ran");
    let stats = batched.stats();
    assert_eq!(
        stats.timed_out.load(std::sync::atomic::Ordering::Relaxed),
        1
    );
    // The scheduler drops it (its caller left) once it reaches it, after the busy batch.
    for _ in 0..100 {
        if stats.queue_depth.load(std::sync::atomic::Ordering::SeqCst) == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(
        stats.queue_depth.load(std::sync::atomic::Ordering::SeqCst),
        0
    );
}

#[tokio::test]
async fn a_cancelled_caller_is_dropped_and_the_others_are_unaffected() {
    let fake = Doubler::new(Duration::from_millis(100));
    let batched = Arc::new(BatchedModel::new(
        fake.clone(),
        BatchingConfig {
            max_queue_delay: Duration::ZERO,
            ..config(1)
        },
    ));
    let spawn = |rows: usize, start: f32| {
        let batched = Arc::clone(&batched);
        tokio::spawn(async move {
            batched
                .infer(&RequestContext::background(), request(rows, 2, start))
                .await
        })
    };
    let running = spawn(1, 0.0);
    tokio::time::sleep(Duration::from_millis(20)).await;
    let cancelled = spawn(3, 10.0);
    let kept = spawn(2, 20.0);
    tokio::time::sleep(Duration::from_millis(20)).await;
    cancelled.abort();
    check_answer(&request(1, 2, 0.0), &running.await.unwrap().unwrap());
    check_answer(&request(2, 2, 20.0), &kept.await.unwrap().unwrap());
    assert!(cancelled.await.unwrap_err().is_cancelled());
    assert_eq!(fake.calls(), vec![1, 2], "the cancelled rows never ran");
}

#[tokio::test]
async fn a_model_error_reaches_every_caller_of_the_batch() {
    let fake = Arc::new(Doubler {
        fail: true,
        ..Arc::into_inner(Doubler::new(Duration::from_millis(20))).unwrap()
    });
    let batched = Arc::new(BatchedModel::new(fake.clone(), config(1)));
    let tasks: Vec<_> = (0..6)
        .map(|i| {
            let batched = Arc::clone(&batched);
            tokio::spawn(async move {
                batched
                    .infer(&RequestContext::background(), request(1, 2, i as f32))
                    .await
            })
        })
        .collect();
    for task in tasks {
        let error = task.await.unwrap().unwrap_err();
        assert!(error.to_string().contains("refuses"), "{error}");
    }
    // A request larger than max_batch_size bypasses the queue and reaches the model.
    let error = batched
        .infer(&RequestContext::background(), request(9, 2, 0.0))
        .await
        .unwrap_err();
    assert!(error.to_string().contains("refuses"), "{error}");
    assert!(fake.calls().contains(&9));
}

fn refusing_negatives(delay: Duration) -> Arc<Doubler> {
    Arc::new(Doubler {
        refuse_negative: true,
        ..Arc::into_inner(Doubler::new(delay)).unwrap()
    })
}

#[tokio::test]
async fn a_request_that_fails_its_batch_fails_alone_and_the_others_get_their_results() {
    let fake = refusing_negatives(Duration::from_millis(5));
    let batched = Arc::new(BatchedModel::new(
        fake.clone(),
        BatchingConfig {
            // The three go out together as soon as they are all queued.
            preferred_batch_sizes: vec![3],
            max_queue_delay: Duration::from_secs(30),
            ..config(1)
        },
    ));
    let requests = [
        request(1, 2, 100.0),
        request(1, 2, -7.0),
        request(1, 2, 300.0),
    ];
    let results = infer_all(&batched, &requests).await;
    check_answer(&requests[0], results[0].as_ref().unwrap());
    check_answer(&requests[2], results[2].as_ref().unwrap());
    // Only its own run's error: no value of the other requests, which the merged call quoted.
    let error = results[1].as_ref().unwrap_err();
    assert_eq!(error.to_string(), "the fake model refuses [-7.0, -6.0]");
    assert_eq!(
        fake.calls(),
        vec![3, 1, 1, 1],
        "merged once, then each alone once"
    );
    let stats = batched.stats();
    assert_eq!(stats.retried.load(std::sync::atomic::Ordering::Relaxed), 3);
    assert_eq!(stats.batches.load(std::sync::atomic::Ordering::Relaxed), 4);
}

#[tokio::test]
async fn a_batch_of_one_that_fails_is_not_run_again() {
    let fake = refusing_negatives(Duration::ZERO);
    let batched = BatchedModel::new(fake.clone(), config(1));
    let error = batched
        .infer(&RequestContext::background(), request(2, 2, -1.0))
        .await
        .unwrap_err();
    assert_eq!(
        error.to_string(),
        "the fake model refuses [-1.0, 0.0, 1.0, 2.0]"
    );
    assert_eq!(fake.calls(), vec![2]);
    let stats = batched.stats();
    assert_eq!(stats.retried.load(std::sync::atomic::Ordering::Relaxed), 0);
    assert_eq!(stats.batches.load(std::sync::atomic::Ordering::Relaxed), 1);
}

/// Runs `future` as a request of `tenant`.
/// A request of `tenant`.
fn as_tenant(tenant: &str) -> RequestContext {
    RequestContext::for_tenant(tenant)
}

type Call = tokio::task::JoinHandle<Result<Vec<NamedTensor>>>;

/// Starts a call of `model` as a request of `tenant`, in its own task.
fn spawn_as(
    tenant: &'static str,
    model: &Arc<impl Model + 'static>,
    inputs: Vec<NamedTensor>,
) -> Call {
    let model = Arc::clone(model);
    tokio::spawn(async move { model.infer(&as_tenant(tenant), inputs).await })
}

#[tokio::test]
async fn one_tenants_backlog_delays_another_tenants_request_by_one_batch_not_the_backlog() {
    let fake = Doubler::new(Duration::from_millis(10));
    let batched = Arc::new(BatchedModel::new(
        fake.clone(),
        BatchingConfig {
            max_queue_delay: Duration::ZERO,
            ..config(1)
        },
    ));
    // Tenant "a" queues 40 full batches (values from 0); then "b" sends one (value 10000).
    let mut backlog = Vec::new();
    for i in 0..40 {
        backlog.push(spawn_as("a", &batched, request(8, 1, i as f32 * 8.0)));
    }
    tokio::time::sleep(Duration::from_millis(15)).await;
    let victim = batched
        .infer(&as_tenant("b"), request(8, 1, 10_000.0))
        .await
        .unwrap();
    check_answer(&request(8, 1, 10_000.0), &victim);
    for task in backlog {
        task.await.unwrap().unwrap();
    }
    let starts = fake.starts();
    let turn = starts.iter().position(|&start| start == 10_000.0).unwrap();
    // "a" had a batch running, perhaps one more dispatched: b's comes next, not 40th.
    assert!(turn <= 3, "b's request ran as call {turn} of {starts:?}");
    assert_eq!(
        starts.len(),
        41,
        "every request ran once, unmerged (full batches)"
    );
}

/// The rows of the first batch formed after a backlog: a batch of 8 runs first (holding the
/// only instance), then tenant "a" queues 16 one-row requests (as batch-job rows when
/// `a_is_a_job`) and tenant "b" 2. Checks the calls were 8, 8, 8, 2.
async fn first_batch_after_a_backlog(a_is_a_job: bool) -> Vec<f32> {
    let fake = Doubler::new(Duration::from_millis(40));
    let batched = Arc::new(BatchedModel::new(
        fake.clone(),
        BatchingConfig {
            max_queue_delay: Duration::from_millis(20),
            ..config(1)
        },
    ));
    let blocker = spawn_as("a", &batched, request(8, 1, -100.0));
    tokio::time::sleep(Duration::from_millis(10)).await;
    let mut tasks = Vec::new();
    for i in 0..16 {
        let batched = Arc::clone(&batched);
        let context = if a_is_a_job {
            as_tenant("a").as_batch()
        } else {
            as_tenant("a")
        };
        tasks.push(tokio::spawn(async move {
            batched.infer(&context, request(1, 1, i as f32)).await
        }));
    }
    tokio::time::sleep(Duration::from_millis(5)).await;
    for i in 0..2 {
        tasks.push(spawn_as("b", &batched, request(1, 1, 1000.0 + i as f32)));
    }
    blocker.await.unwrap().unwrap();
    for task in tasks {
        task.await.unwrap().unwrap();
    }
    assert_eq!(fake.calls(), vec![8, 8, 8, 2]);
    fake.seen.lock().unwrap()[1].clone()
}

#[tokio::test]
async fn a_batch_is_filled_one_request_per_tenant_in_turn() {
    // The first fair batch: a and b in turn while b has requests, not a's first 8.
    assert_eq!(
        first_batch_after_a_backlog(false).await,
        vec![0.0, 1000.0, 1.0, 1001.0, 2.0, 3.0, 4.0, 5.0]
    );
}

#[tokio::test]
async fn real_time_requests_go_before_a_batch_jobs_rows_and_the_rows_fill_the_room() {
    // The same backlog as a job's rows: b's two real-time requests lead the next batch.
    assert_eq!(
        first_batch_after_a_backlog(true).await,
        vec![1000.0, 1001.0, 0.0, 1.0, 2.0, 3.0, 4.0, 5.0]
    );
}

#[tokio::test]
async fn a_tenant_filling_the_queue_does_not_lock_another_tenant_out() {
    let fake = Doubler::new(Duration::from_millis(300));
    let batched = Arc::new(BatchedModel::new(
        fake.clone(),
        BatchingConfig {
            max_queue_size: 4,
            max_queue_delay: Duration::ZERO,
            ..config(1)
        },
    ));
    // "a": one runs, four wait (the queue is full), the next is refused.
    let mut tasks = Vec::new();
    for i in 0..5 {
        tasks.push(spawn_as("a", &batched, request(8, 1, i as f32)));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let refused = batched
        .infer(&as_tenant("a"), request(8, 1, 50.0))
        .await
        .unwrap_err();
    assert_eq!(refused.kind(), ErrorKind::Unavailable);
    assert!(refused.to_string().contains("queue is full"), "{refused}");
    // "b" holds none of the queue: it gets in up to its share (4 / 2 tenants = 2).
    for i in 0..2 {
        tasks.push(spawn_as("b", &batched, request(8, 1, 1000.0 + i as f32)));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let over_share = batched
        .infer(&as_tenant("b"), request(8, 1, 2000.0))
        .await
        .unwrap_err();
    assert!(
        over_share.to_string().contains("holds its share"),
        "{over_share}"
    );
    assert!(
        !over_share.to_string().contains("\"a\""),
        "never names another tenant: {over_share}"
    );
    for task in tasks {
        task.await.unwrap().unwrap();
    }
    let starts = fake.starts();
    let first_b = starts.iter().position(|&start| start >= 1000.0).unwrap();
    assert!(
        first_b <= 2,
        "b is served in turn, not after a's queue: {starts:?}"
    );
}

#[tokio::test]
async fn requests_that_cannot_be_merged_share_instance_turns_with_the_batches() {
    let fake = Doubler::new(Duration::from_millis(20));
    let batched = Arc::new(BatchedModel::new(
        fake.clone(),
        BatchingConfig {
            max_queue_delay: Duration::ZERO,
            ..config(1)
        },
    ));
    // "a" floods with requests of 16 rows (over max_batch_size 8: never merged); "b" sends one
    // mergeable request and is served after at most a call or two of a's, not after all ten.
    let mut flood = Vec::new();
    for i in 0..10 {
        flood.push(spawn_as("a", &batched, request(16, 1, i as f32 * 16.0)));
    }
    tokio::time::sleep(Duration::from_millis(5)).await;
    batched
        .infer(&as_tenant("b"), request(2, 1, 10_000.0))
        .await
        .unwrap();
    for task in flood {
        task.await.unwrap().unwrap();
    }
    let starts = fake.starts();
    let turn = starts.iter().position(|&start| start == 10_000.0).unwrap();
    assert!(turn <= 2, "b's request ran as call {turn} of {starts:?}");
    let calls = fake.calls();
    assert_eq!(calls.iter().filter(|&&rows| rows == 16).count(), 10);
    assert!(
        calls.iter().all(|&rows| rows == 16 || rows == 2),
        "{calls:?}"
    );
}

#[tokio::test]
async fn an_unbatched_shared_model_serves_tenants_in_turn() {
    let fake = Doubler::new(Duration::from_millis(10));
    let shared = Arc::new(weft_engine::FairShared::new(fake.clone(), 1));
    let mut flood = Vec::new();
    for i in 0..20 {
        flood.push(spawn_as("a", &shared, request(1, 1, i as f32)));
    }
    tokio::time::sleep(Duration::from_millis(5)).await;
    shared
        .infer(&as_tenant("b"), request(1, 1, 10_000.0))
        .await
        .unwrap();
    for task in flood {
        task.await.unwrap().unwrap();
    }
    let starts = fake.starts();
    let turn = starts.iter().position(|&start| start == 10_000.0).unwrap();
    assert!(turn <= 2, "b's request ran as call {turn} of {starts:?}");
}

#[tokio::test]
async fn a_request_deadline_shorter_than_the_queue_timeout_ends_its_wait() {
    // No queue timeout at all: only the request's own deadline bounds the wait.
    let fake = Doubler::new(Duration::from_millis(500));
    let batched = Arc::new(BatchedModel::new(
        fake.clone(),
        BatchingConfig {
            queue_timeout: None,
            max_queue_delay: Duration::ZERO,
            ..config(1)
        },
    ));
    let busy = spawn_as("a", &batched, request(1, 2, 0.0));
    tokio::time::sleep(Duration::from_millis(20)).await;
    let started = Instant::now();
    let hurried = as_tenant("b").with_deadline(Instant::now() + Duration::from_millis(30));
    let error = batched
        .infer(&hurried, request(1, 2, 5.0))
        .await
        .unwrap_err();
    assert_eq!(error.kind(), ErrorKind::DeadlineExceeded);
    assert!(
        started.elapsed() < Duration::from_millis(300),
        "waited for the busy batch"
    );
    busy.await.unwrap().unwrap();
    assert_eq!(fake.calls(), vec![1], "the expired request never ran");
    assert!(
        hurried
            .cost()
            .queue_us
            .load(std::sync::atomic::Ordering::Relaxed)
            >= 20_000
    );
}

#[tokio::test]
async fn a_lone_request_does_not_wait_for_the_queue_delay() {
    let fake = Doubler::new(Duration::ZERO);
    let batched = BatchedModel::new(
        fake.clone(),
        BatchingConfig {
            max_queue_delay: Duration::from_secs(30),
            ..config(1)
        },
    );
    let started = Instant::now();
    for i in 0..3 {
        let answer = batched
            .infer(&RequestContext::background(), request(1, 2, i as f32))
            .await
            .unwrap();
        check_answer(&request(1, 2, i as f32), &answer);
    }
    // Nothing else was in flight, so none of the three waited out the 30 s delay.
    assert!(started.elapsed() < Duration::from_secs(10));
    assert_eq!(fake.calls(), vec![1, 1, 1]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_with_others_in_flight_still_waits_to_be_batched() {
    // One instance, busy 200 ms with the first request; two more arrive meanwhile, a few ms
    // apart. The second waits (the third is in flight) instead of going alone, so they share
    // the next call.
    let fake = Doubler::new(Duration::from_millis(200));
    let batched = Arc::new(BatchedModel::new(
        fake.clone(),
        BatchingConfig {
            max_queue_delay: Duration::from_secs(5),
            ..config(1)
        },
    ));
    let tasks = spawn_staggered(&batched, 3, Duration::from_millis(20)).await;
    let started = Instant::now();
    for task in tasks {
        task.await.unwrap().unwrap();
    }
    assert_eq!(fake.calls(), vec![1, 2]);
    // The second batch went when the first answer was sent and both were in it, not after 5 s.
    assert!(started.elapsed() < Duration::from_secs(3));
}

/// Records how long each request waited in the queue.
#[derive(Default)]
struct Waits(Mutex<Vec<Duration>>);

impl weft_engine::BatchObserver for Waits {
    fn batch(&self, _rows: usize, _requests: usize, _compute: Duration) {}
    fn waited(&self, queued: Duration) {
        self.0.lock().unwrap().push(queued);
    }
    fn depth(&self, _depth: usize) {}
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_with_another_computing_waits_out_the_delay_then_runs_on_the_free_instance() {
    let fake = Doubler::new(Duration::from_millis(300));
    let waits = Arc::new(Waits::default());
    let batched = Arc::new(
        BatchedModel::new(
            fake.clone(),
            BatchingConfig {
                max_queue_delay: Duration::from_micros(400),
                ..config(2)
            },
        )
        .with_observer(waits.clone()),
    );
    let first = {
        let batched = Arc::clone(&batched);
        tokio::spawn(async move {
            batched
                .infer(&RequestContext::background(), request(1, 2, 0.0))
                .await
        })
    };
    tokio::time::sleep(Duration::from_millis(50)).await;
    // The first is computing (in flight, not in this batch): the second waits for the
    // delay in case it joins, then goes alone to the second instance.
    let started = Instant::now();
    batched
        .infer(&RequestContext::background(), request(1, 2, 1.0))
        .await
        .unwrap();
    assert!(!first.is_finished() || started.elapsed() < Duration::from_millis(600));
    first.await.unwrap().unwrap();
    assert_eq!(fake.calls(), vec![1, 1]);
    let waits = waits.0.lock().unwrap().clone();
    assert_eq!(waits.len(), 2, "{waits:?}");
    assert!(waits[1] >= Duration::from_micros(400), "{waits:?}");
    assert!(waits[1] < Duration::from_millis(250), "{waits:?}");
}

/// Page-locked memory as the batcher sees it: buffers handed out up to a limit, each kept
/// (so no later allocation can take its address); past the limit there is none (as when the
/// pinned pool is spent).
struct FakePinned {
    limit: usize,
    handed_out: Mutex<Vec<Bytes>>,
}

impl Staging for FakePinned {
    fn stage(&self, parts: &[&[u8]]) -> Option<Bytes> {
        let mut handed_out = self.handed_out.lock().unwrap();
        if handed_out.len() >= self.limit {
            return None;
        }
        let staged = Bytes::from(parts.concat());
        handed_out.push(staged.clone());
        Some(staged)
    }
}

#[tokio::test]
async fn merged_batches_are_written_through_the_staging_buffers_while_there_are_any() {
    let fake = Doubler::new(Duration::from_millis(20));
    let pinned = Arc::new(FakePinned {
        limit: 1,
        handed_out: Mutex::new(Vec::new()),
    });
    let batched = Arc::new(
        BatchedModel::new(fake.clone(), config(1))
            .with_staging(Arc::clone(&pinned) as Arc<dyn Staging>),
    );
    // Two rounds of concurrent requests: the first merged batch gets the one staging buffer,
    // the later ones fall back to ordinary memory, and every answer is exact either way.
    for round in 0..2 {
        let requests: Vec<Vec<NamedTensor>> = (0..6)
            .map(|i| request(1, 4, (round * 1000 + i * 10) as f32))
            .collect();
        for (request, answer) in requests.iter().zip(infer_all(&batched, &requests).await) {
            check_answer(request, &answer.unwrap());
        }
    }
    let handed_out: Vec<usize> = pinned
        .handed_out
        .lock()
        .unwrap()
        .iter()
        .map(|staged| staged.as_ptr() as usize)
        .collect();
    assert_eq!(handed_out.len(), 1, "{handed_out:?}");
    let calls = fake.calls();
    let addresses = fake.addresses.lock().unwrap().clone();
    let merged: Vec<usize> = calls
        .iter()
        .zip(&addresses)
        .filter(|(rows, _)| **rows > 1)
        .map(|(_, address)| *address)
        .collect();
    assert!(merged.len() >= 2, "both rounds should merge: {calls:?}");
    // The model read the first merged batch from the staging buffer itself (no copy between).
    assert_eq!(merged[0], handed_out[0], "{calls:?}");
    assert!(merged[1..].iter().all(|address| *address != handed_out[0]));
}
