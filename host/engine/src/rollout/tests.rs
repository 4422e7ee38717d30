//! The routing model against fake arms: sticky assignment, weights, failure and trap
//! counting, mirrored calls with drift, and the bounded shadow pool.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use weft_core::{
    BoxFuture, DataType, Error, Model, ModelMetadata, NamedTensor, Parameters, RequestContext,
    Result, Tensor, TensorSpec,
};

use super::route::drift;
use super::spec::DriftMetric;
use super::*;

/// An arm that answers `y = x + offset`, fails every `fail_every`th call, traps if asked,
/// and can be slowed down.
struct Fake {
    metadata: ModelMetadata,
    offset: f32,
    fail_every: u64,
    trap: bool,
    delay: Duration,
    calls: AtomicU64,
}

fn fake(offset: f32) -> Fake {
    Fake {
        metadata: ModelMetadata {
            platform: "fake".into(),
            inputs: vec![TensorSpec {
                name: "x".into(),
                datatype: DataType::Fp32,
                shape: vec![-1],
            }],
            outputs: vec![TensorSpec {
                name: "y".into(),
                datatype: DataType::Fp32,
                shape: vec![-1],
            }],
            max_batch_size: 0,
        },
        offset,
        fail_every: 0,
        trap: false,
        delay: Duration::ZERO,
        calls: AtomicU64::new(0),
    }
}

fn tensor(values: &[f32]) -> Tensor {
    let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
    Tensor::new(DataType::Fp32, vec![values.len()], Bytes::from(bytes)).unwrap()
}

impl Model for Fake {
    fn metadata(&self) -> &ModelMetadata {
        &self.metadata
    }

    fn infer<'a>(
        &'a self,
        _request: &'a RequestContext,
        inputs: Vec<NamedTensor>,
    ) -> BoxFuture<'a, Result<Vec<NamedTensor>>> {
        Box::pin(async move {
            let call = self.calls.fetch_add(1, Ordering::SeqCst) + 1;
            if !self.delay.is_zero() {
                tokio::time::sleep(self.delay).await;
            }
            if self.trap {
                return Err(Error::internal("plugin 'p': trapped: unreachable").trapped());
            }
            if self.fail_every > 0 && call.is_multiple_of(self.fail_every) {
                return Err(Error::internal("candidate broke"));
            }
            let x = super::route::numbers(&inputs[0].tensor).unwrap();
            let y: Vec<f32> = x.iter().map(|v| *v as f32 + self.offset).collect();
            Ok(vec![NamedTensor::new("y", tensor(&y))])
        })
    }
}

pub(super) fn canary(extra: &str) -> Arc<RolloutSpec> {
    canary_with("", extra)
}

/// A canary with `top` among the top-level keys and `extra` tables after the steps.
fn canary_with(top: &str, extra: &str) -> Arc<RolloutSpec> {
    Arc::new(
        RolloutSpec::parse(
            "r.toml",
            &format!(
                r#"
name = "r"
target = "m"
{top}
[stable]
model = "m"
version = 1
[candidate]
model = "m"
version = 2
[[steps]]
weight = 10
hold_seconds = 1
[[steps]]
weight = 50
hold_seconds = 1
{extra}
"#
            ),
        )
        .unwrap(),
    )
}

/// A canary's two arms: the stable at version 1, the candidate at version 2.
fn canary_arms(stable: Arc<dyn Model>, candidate: Arc<dyn Model>) -> Vec<RolloutArm> {
    vec![
        RolloutArm {
            name: "stable".into(),
            version: 1,
            model: stable,
        },
        RolloutArm {
            name: "candidate".into(),
            version: 2,
            model: candidate,
        },
    ]
}

fn served(live: &Arc<RolloutLive>, stable: Fake, candidate: Fake) -> RolloutModel {
    RolloutModel::new(
        Arc::clone(live),
        canary_arms(Arc::new(stable), Arc::new(candidate)),
    )
    .unwrap()
}

async fn call(model: &RolloutModel, key: Option<&str>) -> Result<(Vec<NamedTensor>, Parameters)> {
    let mut parameters = Parameters::new();
    if let Some(key) = key {
        parameters.insert("user".into(), key.into());
    }
    let request = RequestContext::for_tenant("acme");
    model
        .infer_with_parameters(
            &request,
            vec![NamedTensor::new("x", tensor(&[1.0, 2.0]))],
            &parameters,
        )
        .await
}

fn arm_of(reply: &Result<(Vec<NamedTensor>, Parameters)>) -> String {
    reply.as_ref().unwrap().1["rollout_arm"]
        .as_str()
        .unwrap()
        .to_string()
}

#[tokio::test]
async fn sticky_clients_keep_their_arm_and_growing_weight_only_moves_them_to_the_candidate() {
    let spec = canary("[sticky]\nparameter = \"user\"");
    let live = RolloutLive::new(Arc::clone(&spec));
    let model = served(&live, fake(0.0), fake(0.0));
    live.set_canary(10.0, 0.0);
    let mut first = Vec::new();
    for user in 0..400 {
        first.push(arm_of(&call(&model, Some(&format!("u{user}"))).await));
    }
    let on_candidate = first.iter().filter(|arm| *arm == "candidate").count();
    assert!(
        (20..70).contains(&on_candidate),
        "{on_candidate} of 400 at 10 %"
    );
    // Asked again: the same answer, every time.
    for (user, arm) in first.iter().enumerate() {
        assert_eq!(&arm_of(&call(&model, Some(&format!("u{user}"))).await), arm);
    }
    live.set_canary(50.0, 0.0);
    let mut moved = 0;
    for (user, arm) in first.iter().enumerate() {
        let now = arm_of(&call(&model, Some(&format!("u{user}"))).await);
        if arm == "candidate" {
            assert_eq!(now, "candidate", "u{user} went back to the stable");
        } else if now == "candidate" {
            moved += 1;
        }
    }
    assert!(moved > 100, "{moved}");
    // A new live state (a restart) gives every client the same arm at the same weight.
    let restarted = RolloutLive::new(spec);
    restarted.set_canary(10.0, 0.0);
    let model = served(&restarted, fake(0.0), fake(0.0));
    for (user, arm) in first.iter().enumerate() {
        assert_eq!(&arm_of(&call(&model, Some(&format!("u{user}"))).await), arm);
    }
    let reply = call(&model, Some("u1")).await.unwrap().1;
    assert_eq!(reply["rollout"], "r");
    assert!(reply["rollout_version"] == 1 || reply["rollout_version"] == 2);
}

#[tokio::test]
async fn failures_and_traps_are_the_candidates_and_client_errors_count_for_nobody() {
    let live = RolloutLive::new(canary(""));
    let mut candidate = fake(0.0);
    candidate.fail_every = 5;
    let model = served(&live, fake(0.0), candidate);
    live.set_canary(100.0, 0.0);
    for _ in 0..50 {
        let _ = call(&model, None).await;
    }
    let (stable, candidate) = live.canary_window(Instant::now());
    assert_eq!(
        (stable.requests, candidate.requests, candidate.failures),
        (0, 50, 10)
    );

    let live = RolloutLive::new(canary(""));
    let mut trapping = fake(0.0);
    trapping.trap = true;
    let model = served(&live, fake(0.0), trapping);
    live.set_canary(100.0, 0.0);
    let error = call(&model, None).await.unwrap_err();
    assert!(error.is_trap());
    let (_, candidate) = live.canary_window(Instant::now());
    assert_eq!((candidate.failures, candidate.traps), (1, 1));

    // A bad request (here: no inputs at all reach a client-error path) is not counted.
    struct Refuses(ModelMetadata);
    impl Model for Refuses {
        fn metadata(&self) -> &ModelMetadata {
            &self.0
        }
        fn infer<'a>(
            &'a self,
            _: &'a RequestContext,
            _: Vec<NamedTensor>,
        ) -> BoxFuture<'a, Result<Vec<NamedTensor>>> {
            Box::pin(async { Err(Error::invalid("bad input")) })
        }
    }
    let live = RolloutLive::new(canary(""));
    let model = RolloutModel::new(
        Arc::clone(&live),
        canary_arms(Arc::new(fake(0.0)), Arc::new(Refuses(fake(0.0).metadata))),
    )
    .unwrap();
    live.set_canary(100.0, 0.0);
    assert!(call(&model, None).await.is_err());
    assert_eq!(live.canary_window(Instant::now()).1.requests, 0);
}

#[tokio::test]
async fn mirrored_calls_feed_drift_and_the_client_only_ever_sees_the_stable() {
    let live = RolloutLive::new(canary(
        "[analysis]\nmin_requests = 5\ndrift = { output = \"y\", metric = \"mean_abs_diff\", max = 0.1 }",
    ));
    let model = served(&live, fake(0.0), fake(0.5));
    live.set_canary(0.0, 100.0);
    for _ in 0..20 {
        let (outputs, reply) = call(&model, None).await.unwrap();
        assert_eq!(reply["rollout_arm"], "stable");
        assert_eq!(
            super::route::numbers(&outputs[0].tensor).unwrap(),
            [1.0, 2.0]
        );
    }
    // The mirrors finish on their own tasks.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let (_, candidate) = live.canary_window(Instant::now());
        if candidate.compared == 20 {
            assert!((candidate.drift().unwrap() - 0.5).abs() < 1e-6);
            let (verdict, _) = judge(
                &live.spec().analysis,
                &live.canary_window(Instant::now()).0,
                &candidate,
            );
            assert!(
                matches!(verdict, Verdict::Fail(ref r) if r[0].contains("drift")),
                "{verdict:?}"
            );
            break;
        }
        assert!(
            Instant::now() < deadline,
            "mirrors did not finish: {candidate:?}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(live.shadow_counts(), (20, 0));
}

#[tokio::test]
async fn a_full_shadow_pool_drops_mirrors_without_slowing_the_client() {
    let live = RolloutLive::new(canary_with("shadow_max_in_flight = 2", ""));
    let mut slow = fake(0.0);
    slow.delay = Duration::from_secs(30);
    let model = served(&live, fake(0.0), slow);
    live.set_canary(0.0, 100.0);
    let started = Instant::now();
    for _ in 0..10 {
        call(&model, None).await.unwrap();
    }
    assert!(started.elapsed() < Duration::from_secs(5));
    assert_eq!(live.shadow_counts(), (2, 8));
}

#[tokio::test]
async fn a_tenants_shared_shadow_pool_bounds_all_its_rollouts_together() {
    let tenant_pool = Arc::new(tokio::sync::Semaphore::new(3));
    let lives = [
        RolloutLive::with_tenant_slots(canary_with("", ""), Arc::clone(&tenant_pool)),
        RolloutLive::with_tenant_slots(canary_with("", ""), Arc::clone(&tenant_pool)),
    ];
    let mut models = Vec::new();
    for live in &lives {
        let mut slow = fake(0.0);
        slow.delay = Duration::from_secs(30);
        models.push(served(live, fake(0.0), slow));
        live.set_canary(0.0, 100.0);
    }
    for _ in 0..5 {
        for model in &models {
            call(model, None).await.unwrap();
        }
    }
    let sent: u64 = lives.iter().map(|live| live.shadow_counts().0).sum();
    let dropped: u64 = lives.iter().map(|live| live.shadow_counts().1).sum();
    assert_eq!(
        (sent, dropped),
        (3, 7),
        "3 in flight for the tenant, whatever the rollouts"
    );
}

#[tokio::test]
async fn an_experiment_splits_by_weight_reports_per_arm_metrics_and_a_winner_takes_all() {
    let spec = Arc::new(
        RolloutSpec::parse(
            "ab.toml",
            r#"
name = "ab"
target = "m"
kind = "experiment"
[[arms]]
name = "a"
model = "m"
version = 1
weight = 25
[[arms]]
name = "b"
model = "m"
version = 2
weight = 75
[metric]
output = "y"
reduce = "mean"
"#,
        )
        .unwrap(),
    );
    let live = RolloutLive::new(spec);
    let model = RolloutModel::new(
        Arc::clone(&live),
        vec![
            RolloutArm {
                name: "a".into(),
                version: 1,
                model: Arc::new(fake(0.0)),
            },
            RolloutArm {
                name: "b".into(),
                version: 2,
                model: Arc::new(fake(1.0)),
            },
        ],
    )
    .unwrap();
    for _ in 0..800 {
        call(&model, None).await.unwrap();
    }
    let report = live.report(Instant::now());
    assert_eq!(report.len(), 2);
    let a = report[0].total.requests as f64 / 800.0;
    assert!((0.18..0.32).contains(&a), "{a}");
    assert_eq!(report[0].total.metric_mean(), Some(1.5));
    assert_eq!(report[1].total.metric_mean(), Some(2.5));
    live.set_winner(Some(1));
    for _ in 0..20 {
        assert_eq!(arm_of(&call(&model, None).await), "b");
    }
    assert_eq!(live.weights_percent(), [0.0, 100.0]);
}

#[test]
fn arms_must_serve_the_same_tensors() {
    let live = RolloutLive::new(canary(""));
    let mut other = fake(0.0);
    other.metadata.outputs[0].name = "z".into();
    let error = RolloutModel::new(live, canary_arms(Arc::new(fake(0.0)), Arc::new(other)))
        .err()
        .unwrap();
    assert!(
        error.message().contains("same inputs and outputs"),
        "{error}"
    );
}

#[test]
fn drift_metrics_measure_what_they_say() {
    let a = tensor(&[1.0, 0.0, 0.0, 1.0]);
    let b = tensor(&[1.5, 0.0, 0.0, 1.5]);
    assert_eq!(drift(DriftMetric::MeanAbsDiff, &a, &b), Some(0.25));
    let rows = |v: &[f32]| {
        let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
        Tensor::new(DataType::Fp32, vec![2, 2], Bytes::from(bytes)).unwrap()
    };
    let stable = rows(&[0.9, 0.1, 0.2, 0.8]);
    let candidate = rows(&[0.9, 0.1, 0.7, 0.3]);
    assert_eq!(
        drift(DriftMetric::Top1Disagreement, &stable, &candidate),
        Some(0.5)
    );
    assert_eq!(drift(DriftMetric::Top1Disagreement, &stable, &a), Some(1.0));
    let text = Tensor::new(
        DataType::Bytes,
        vec![1],
        Bytes::from_static(b"\x01\x00\x00\x00a"),
    )
    .unwrap();
    assert_eq!(drift(DriftMetric::MeanAbsDiff, &text, &text), None);
}

#[tokio::test]
async fn a_header_key_from_the_edge_keeps_a_client_on_its_arm() {
    let live = RolloutLive::new(canary("[sticky]\nheader = \"x-user\""));
    let model = served(&live, fake(0.0), fake(0.0));
    assert_eq!(model.sticky_header(), Some("x-user"));
    live.set_canary(50.0, 0.0);
    let inputs = || vec![NamedTensor::new("x", tensor(&[1.0]))];
    let parameters = Parameters::new();
    let mut arms = std::collections::BTreeSet::new();
    for user in 0..40 {
        let request = RequestContext::for_tenant("acme").with_sticky_key(&format!("u{user}"));
        let first = model
            .infer_with_parameters(&request, inputs(), &parameters)
            .await;
        let first = arm_of(&first);
        for _ in 0..5 {
            let again = model
                .infer_with_parameters(&request, inputs(), &parameters)
                .await;
            assert_eq!(arm_of(&again), first, "u{user}");
        }
        arms.insert(first);
    }
    // At 50 %, forty clients land on both arms.
    assert_eq!(arms.len(), 2, "{arms:?}");
}

#[tokio::test]
async fn a_new_step_is_judged_on_its_own_traffic() {
    let live = RolloutLive::new(canary(""));
    let mut candidate = fake(0.0);
    candidate.fail_every = 1;
    let model = served(&live, fake(0.0), candidate);
    live.set_canary(100.0, 0.0);
    for _ in 0..5 {
        let _ = call(&model, None).await;
    }
    assert_eq!(live.canary_window(Instant::now()).1.failures, 5);
    live.clear_recent();
    assert_eq!(live.canary_window(Instant::now()).1.requests, 0);
    let report = live.report(Instant::now());
    assert_eq!(report[1].total.failures, 5, "totals stay");
    assert_eq!(report[1].weight, 100.0);
}

#[test]
fn every_example_rollout_parses() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/rollouts");
    let mut parsed = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|ext| ext == "toml") {
            let text = std::fs::read_to_string(&path).unwrap();
            RolloutSpec::parse(&path.display().to_string(), &text)
                .unwrap_or_else(|error| panic!("{}: {error}", path.display()));
            parsed += 1;
        }
    }
    assert_eq!(parsed, 3, "canary, shadow and experiment");
}
