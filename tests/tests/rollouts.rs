//! Rollouts end to end, on the real server with real plugins and the quickstart's ONNX model:
//! the arms are one graph (`pre` plugin, then `mlp`) with the plugin pinned to different
//! versions — 1.0 passes its input through (`runtime_echo`), 2.0 fails a fifth of calls and
//! traps on inputs >= 1 (`rollout_flaky`), 3.0 z-scores its input (`normalize`, so the model's
//! answers drift). A failing candidate under steady load is rolled back (the time from the
//! window failing to 0 % is printed and must stay under 2 s); a trapping one on the trap rule;
//! a drifting one on mirrored traffic alone; a healthy one walks its steps to a promotion;
//! sticky clients keep their arm across steps and a restart, and `weft rollout` drives it all;
//! another tenant sees none of it; two replicas on PostgreSQL both drop the candidate within
//! 2 s of the decision.
//!
//! Timings are printed (run with `--nocapture`).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use support::tenants::*;
use support::*;
use tokio::sync::Mutex;

/// The graph every arm serves: `pre` (pinned per arm), then the model.
const SVC_GRAPH: &str = r#"name = "svc"
version = 1
[[input]]
name = "x"
datatype = "FP32"
shape = [-1, 64]
[[output]]
name = "y"
datatype = "FP32"
shape = [-1, 10]
from = "m.y"
[[node]]
name = "pre"
kind = "transformer"
plugin = "pre"
inputs = ["request"]
[[node]]
name = "m"
kind = "model"
model = "mlp"
inputs = ["pre"]
"#;

/// A canary of `svc` from `pre` 1.0 to `candidate` under `target`, with `rest` (steps,
/// analysis rules, sticky) appended.
fn canary(name: &str, target: &str, candidate: &str, rest: &str) -> String {
    format!(
        r#"name = "{name}"
target = "{target}"
[stable]
graph = "svc"
version = 1
plugin = "pre"
plugin_version = "1.0"
[candidate]
graph = "svc"
version = 1
plugin = "pre"
plugin_version = "{candidate}"
{rest}
"#
    )
}

/// Tenant `acme` sharing `mlp`, with `pre` at 1.0, 2.0 and 3.0 and the graph `svc`.
async fn acme(server: &Server) -> String {
    let key = create_tenant(server, "acme", json!({ "shared_models": ["mlp"] })).await;
    let signer = signing_key(server, &key).await;
    for (version, guest_name) in [
        ("1.0", "runtime_echo"),
        ("2.0", "rollout_flaky"),
        ("3.0", "normalize"),
    ] {
        let (status, body) =
            push_plugin(server, &key, &signer, "pre", version, guest(guest_name)).await;
        assert_eq!(status, 201, "{body}");
    }
    let (status, body) = apply_graph(server, &key, "svc", SVC_GRAPH).await;
    assert_eq!(status, 201, "{body}");
    key
}

async fn apply(server: &Server, key: &str, name: &str, text: &str) -> Value {
    let (status, body) = send(
        client_with_key(key)
            .put(server.url(&format!("/api/v1/rollouts/{name}")))
            .body(text.to_string()),
    )
    .await;
    assert_eq!(status, 201, "{body}");
    body
}

async fn status(server: &Server, key: &str, name: &str) -> Value {
    let (code, body) =
        send(client_with_key(key).get(server.url(&format!("/api/v1/rollouts/{name}")))).await;
    assert_eq!(code, 200, "{body}");
    body
}

/// A row whose first feature is `first` (the flaky plugin looks only at that one).
fn request(first: f32) -> Value {
    let mut x: Vec<f32> = (0..64).map(|i| i as f32 / 100.0).collect();
    x[0] = first;
    json!({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 64], "data": x}]})
}

/// Spread evenly over [0, 1): the i-th client request's first feature.
fn spread(index: u64) -> f32 {
    ((index * 7919) % 1000) as f32 / 1000.0
}

/// One answer as the load loop saw it.
#[derive(Clone, Debug)]
struct Seen {
    at: Instant,
    /// 200, or a server-side failure (5xx). Refusals at the door (429) are not kept: they
    /// never reached an arm.
    ok: bool,
    arm: String,
}

/// Calls `target` at `base` (a server's URL) from `clients` loops until `stop`, each
/// request's first feature from `first`; returns every answer as the clients saw it.
async fn steady_load(
    base: String,
    key: String,
    target: &'static str,
    clients: usize,
    first: fn(u64) -> f32,
    stop: Arc<AtomicBool>,
) -> Vec<Seen> {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let url = format!("{base}/v2/models/{target}/infer");
    let mut loops = Vec::new();
    for client_index in 0..clients {
        let (url, seen, stop) = (url.clone(), Arc::clone(&seen), Arc::clone(&stop));
        let http = client_with_key(&key);
        loops.push(tokio::spawn(async move {
            let mut index = client_index as u64;
            while !stop.load(Ordering::Relaxed) {
                let (status, body) = send(http.post(&url).json(&request(first(index)))).await;
                let arm = body["parameters"]["rollout_arm"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string();
                assert!(
                    status == 200 || status == 429 || status >= 500,
                    "{status} {body}"
                );
                index += clients as u64;
                if status != 429 {
                    seen.lock().await.push(Seen {
                        at: Instant::now(),
                        ok: status == 200,
                        arm,
                    });
                }
            }
        }));
    }
    for task in loops {
        task.await.unwrap();
    }
    Arc::try_unwrap(seen).unwrap().into_inner()
}

/// Starts [`steady_load`] on its own task.
fn start_load(
    server: &Server,
    key: &str,
    target: &'static str,
    clients: usize,
    first: fn(u64) -> f32,
    stop: &Arc<AtomicBool>,
) -> tokio::task::JoinHandle<Vec<Seen>> {
    tokio::spawn(steady_load(
        server.url(""),
        key.to_string(),
        target,
        clients,
        first,
        Arc::clone(stop),
    ))
}

/// Polls the rollout until `phase`; panics with its view after `limit`.
async fn until_phase(
    server: &Server,
    key: &str,
    name: &str,
    phase: &str,
    limit: Duration,
) -> Value {
    let started = Instant::now();
    loop {
        let view = status(server, key, name).await;
        if view["phase"] == phase {
            return view;
        }
        assert!(
            started.elapsed() < limit,
            "not {phase} within {limit:?}: {view:#}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

const FAILING_RULES: &str = r#"[[steps]]
weight = 25
hold_seconds = 3600
[analysis]
window_seconds = 10
min_requests = 20
max_error_rate = 0.05
"#;

/// Most client failures the failing-candidate test allows: the window needs 20 candidate
/// calls (about 4 of them fail), then up to one controller tick (100 ms) of candidate traffic
/// and the calls in flight at the decision fail a fifth of the time too (7 to 13 seen).
const MAX_CLIENT_FAILURES: usize = 20;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_candidate_failing_a_fifth_of_requests_is_rolled_back_within_two_seconds() {
    let repo = Repo::new().with_model(&quickstart(), "mlp");
    let server = Server::start(repo.path());
    let key = acme(&server).await;
    apply(
        &server,
        &key,
        "svc-canary",
        &canary("svc-canary", "svc-live", "2.0", FAILING_RULES),
    )
    .await;

    let stop = Arc::new(AtomicBool::new(false));
    let load = start_load(&server, &key, "svc-live", 4, spread, &stop);
    let view = until_phase(
        &server,
        &key,
        "svc-canary",
        "rolled_back",
        Duration::from_secs(30),
    )
    .await;
    // Keep the load on a second longer: no client may reach the candidate again.
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.store(true, Ordering::Relaxed);
    let seen = load.await.unwrap();

    let failures = seen.iter().filter(|s| !s.ok).count();
    // Only the candidate fails, so every failure is a candidate call.
    let candidate = |s: &&Seen| !s.ok || s.arm == "candidate";
    let mut calls = 0usize;
    let mut failed = 0usize;
    let mut window_failed_at = None;
    for answer in seen.iter().filter(candidate) {
        calls += 1;
        failed += usize::from(!answer.ok);
        if window_failed_at.is_none() && calls >= 20 && failed as f64 / calls as f64 > 0.05 {
            window_failed_at = Some(answer.at);
        }
    }
    let window_failed_at = window_failed_at.expect("the candidate's window never failed");
    let last_candidate = seen.iter().filter(candidate).map(|s| s.at).max().unwrap();
    let to_zero = last_candidate.saturating_duration_since(window_failed_at);
    eprintln!(
        "failing window -> 0 % candidate: {to_zero:?}; {failures} client failures of {} requests",
        seen.len()
    );
    assert!(to_zero < Duration::from_secs(2), "{to_zero:?}");
    assert!(failures < MAX_CLIENT_FAILURES, "{failures} client failures");
    let stable_after = seen.iter().filter(|s| s.at > last_candidate).count();
    assert!(
        stable_after > 20,
        "the stable keeps serving: {stable_after}"
    );

    // The decision is recorded with the numbers that caused it.
    let event = view["events"].as_array().unwrap().last().unwrap().clone();
    assert_eq!(event["action"], "rolled_back");
    assert!(
        event["reason"].as_str().unwrap().contains("error rate"),
        "{event}"
    );
    assert!(
        event["evidence"]["candidate_requests"].as_u64().unwrap() >= 20,
        "{event}"
    );
    assert_eq!(view["weights"]["candidate"], 0.0);
    let metrics = scrape(&server).await;
    for line in [
        "weft_rollout_weight{arm=\"candidate\",rollout=\"svc-canary\",tenant=\"acme\"} 0",
        "weft_rollout_decisions_total{action=\"rolled_back\",rollout=\"svc-canary\",tenant=\"acme\"} 1",
        "weft_rollout_phase{phase=\"rolled_back\",rollout=\"svc-canary\",tenant=\"acme\"} 1",
    ] {
        assert!(metrics.contains(line), "{line} not in:\n{metrics}");
    }
    assert!(metrics.contains("weft_rollout_requests_total{arm=\"candidate\",outcome=\"error\""));
    // The pinned plugin versions keep their own series (they are not the current version).
    for pinned in ["acme/pre@1.0", "acme/pre@2.0"] {
        let series = format!("weft_plugin_calls_total{{plugin=\"{pinned}\"}}");
        assert!(metrics.contains(&series), "{series} not in:\n{metrics}");
    }
}

/// Inputs from [0.5, 1.5): half of them make the flaky plugin trap.
fn half_trapping(index: u64) -> f32 {
    0.5 + spread(index)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_candidate_whose_plugin_traps_is_rolled_back_on_the_trap_rule() {
    let repo = Repo::new().with_model(&quickstart(), "mlp");
    let server = Server::start(repo.path());
    let key = acme(&server).await;
    let rules = "[[steps]]\nweight = 50\nhold_seconds = 3600\n[analysis]\nmin_requests = 10\nmax_trap_rate = 0.0\n";
    apply(
        &server,
        &key,
        "trap-canary",
        &canary("trap-canary", "svc-trap", "2.0", rules),
    )
    .await;
    let stop = Arc::new(AtomicBool::new(false));
    let load = start_load(&server, &key, "svc-trap", 2, half_trapping, &stop);
    let view = until_phase(
        &server,
        &key,
        "trap-canary",
        "rolled_back",
        Duration::from_secs(30),
    )
    .await;
    stop.store(true, Ordering::Relaxed);
    load.await.unwrap();
    let event = view["events"].as_array().unwrap().last().unwrap().clone();
    let reason = event["reason"].as_str().unwrap();
    assert!(reason.contains("plugin trap rate"), "{event}");
    assert!(
        event["evidence"]["candidate_traps"].as_u64().unwrap() >= 1,
        "{event}"
    );
    // The trap is counted as the candidate's, by the plugin's own metrics too.
    let metrics = scrape(&server).await;
    assert!(
        metrics.contains("weft_rollout_requests_total{arm=\"candidate\",outcome=\"trap\""),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn drift_is_caught_with_shadow_traffic_only_and_no_client_sees_the_candidate() {
    let repo = Repo::new().with_model(&quickstart(), "mlp");
    let server = Server::start(repo.path());
    let key = acme(&server).await;
    let rules = r#"[[steps]]
weight = 0
shadow = 100
hold_seconds = 3600
[analysis]
min_requests = 20
max_error_rate = 0.05
[analysis.drift]
output = "y"
metric = "mean_abs_diff"
max = 0.001
"#;
    apply(
        &server,
        &key,
        "drift-canary",
        &canary("drift-canary", "svc-shadow", "3.0", rules),
    )
    .await;
    // What the stable answers: the model on the raw row.
    let (code, direct) = send(
        client_with_key(&key)
            .post(server.url("/v2/models/mlp/infer"))
            .json(&request(0.5)),
    )
    .await;
    assert_eq!(code, 200, "{direct}");
    let mut answers = 0;
    let started = Instant::now();
    let view = loop {
        let (code, body) = send(
            client_with_key(&key)
                .post(server.url("/v2/models/svc-shadow/infer"))
                .json(&request(0.5)),
        )
        .await;
        assert_eq!(code, 200, "{body}");
        assert_eq!(body["parameters"]["rollout_arm"], "stable", "{body}");
        assert_eq!(body["outputs"][0]["data"], direct["outputs"][0]["data"]);
        answers += 1;
        let view = status(&server, &key, "drift-canary").await;
        if view["phase"] == "rolled_back" {
            break view;
        }
        assert!(started.elapsed() < Duration::from_secs(30), "{view:#}");
    };
    let event = view["events"].as_array().unwrap().last().unwrap().clone();
    assert!(
        event["reason"].as_str().unwrap().contains("drift"),
        "{event}"
    );
    assert!(
        event["evidence"]["compared"].as_u64().unwrap() >= 20,
        "{event}"
    );
    assert_eq!(event["evidence"]["candidate_failures"], 0, "{event}");
    let shadow = view["arms"]
        .as_array()
        .unwrap()
        .iter()
        .find(|arm| arm["arm"] == "candidate-shadow")
        .unwrap()
        .clone();
    assert!(
        shadow["total"]["requests"].as_u64().unwrap() >= 20,
        "{shadow}"
    );
    let served = view["arms"]
        .as_array()
        .unwrap()
        .iter()
        .find(|arm| arm["arm"] == "candidate")
        .unwrap()
        .clone();
    assert_eq!(served["total"]["requests"], 0, "{served}");
    eprintln!("drift caught after {answers} client answers, all from the stable");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_healthy_candidate_walks_every_step_and_is_promoted() {
    let repo = Repo::new().with_model(&quickstart(), "mlp");
    let server = Server::start(repo.path());
    let key = acme(&server).await;
    let rules = r#"[[steps]]
weight = 20
hold_seconds = 1
[[steps]]
weight = 60
hold_seconds = 1
[analysis]
min_requests = 10
max_error_rate = 0.01
max_trap_rate = 0.0
max_p99_ratio = 20.0
latency_floor_ms = 50.0
"#;
    // The "candidate" is the stable's plugin at 3.0: healthy, just different.
    apply(
        &server,
        &key,
        "walk",
        &canary("walk", "svc-walk", "3.0", rules),
    )
    .await;
    let stop = Arc::new(AtomicBool::new(false));
    let load = start_load(&server, &key, "svc-walk", 2, spread, &stop);
    let view = until_phase(&server, &key, "walk", "promoted", Duration::from_secs(60)).await;
    stop.store(true, Ordering::Relaxed);
    let seen = load.await.unwrap();
    assert!(
        seen.iter().all(|s| s.ok),
        "a healthy candidate fails no client"
    );
    let actions: Vec<&str> = view["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|event| event["action"].as_str().unwrap())
        .collect();
    assert_eq!(actions, ["applied", "advanced", "promoted"], "{view:#}");
    assert_eq!(view["weights"]["candidate"], 100.0);
    let (_, body) = send(
        client_with_key(&key)
            .post(server.url("/v2/models/svc-walk/infer"))
            .json(&request(0.5)),
    )
    .await;
    assert_eq!(body["parameters"]["rollout_arm"], "candidate", "{body}");
}

/// Runs the `weft` CLI against `server` as the tenant of `key`; returns stdout.
fn weft(server: &Server, key: &str, args: &[&str]) -> String {
    let output = Command::new(env!("CARGO_BIN_EXE_weft-under-test"))
        .args(args)
        .env("WEFT_SERVER", server.url(""))
        .env("WEFT_API_KEY", key)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout).to_string();
    assert!(
        output.status.success(),
        "weft {args:?}: {stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    stdout
}

/// The arm each of `users` gets through the sticky header.
async fn arms_of(server: &Server, key: &str, users: &[String]) -> Vec<String> {
    let http = client_with_key(key);
    let mut arms = Vec::new();
    for user in users {
        let (code, body) = send(
            http.post(server.url("/v2/models/svc-sticky/infer"))
                .header("x-user", user)
                .json(&request(0.5)),
        )
        .await;
        assert_eq!(code, 200, "{body}");
        arms.push(
            body["parameters"]["rollout_arm"]
                .as_str()
                .unwrap()
                .to_string(),
        );
    }
    arms
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sticky_clients_keep_their_arm_across_steps_and_a_restart_driven_by_the_cli() {
    let repo = Repo::new().with_model(&quickstart(), "mlp");
    let server = Server::start(repo.path());
    let key = acme(&server).await;
    let rules = r#"[[steps]]
weight = 30
hold_seconds = 1
[[steps]]
weight = 60
hold_seconds = 3600
[sticky]
header = "x-user"
[analysis]
min_requests = 10
max_error_rate = 0.01
"#;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("sticky.toml");
    std::fs::write(&file, canary("sticky", "svc-sticky", "3.0", rules)).unwrap();
    let applied: Value = serde_json::from_str(&weft(
        &server,
        &key,
        &["rollout", "apply", file.to_str().unwrap()],
    ))
    .unwrap();
    assert_eq!(applied["phase"], "progressing", "{applied}");
    let users: Vec<String> = (0..60).map(|i| format!("user-{i}")).collect();
    let first = arms_of(&server, &key, &users).await;
    assert_eq!(
        first,
        arms_of(&server, &key, &users).await,
        "the same arm every time"
    );
    // Traffic until the first step passes and the rollout moves to 60 %.
    let started = Instant::now();
    loop {
        arms_of(&server, &key, &users).await;
        if status(&server, &key, "sticky").await["step"] == 1 {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(30), "no advance");
    }
    let second = arms_of(&server, &key, &users).await;
    for (user, (before, after)) in users.iter().zip(first.iter().zip(&second)) {
        if before == "candidate" {
            assert_eq!(after, "candidate", "{user} moved back");
        }
    }
    let on_candidate = |arms: &[String]| arms.iter().filter(|arm| *arm == "candidate").count();
    assert!(
        on_candidate(&second) > on_candidate(&first),
        "{first:?} -> {second:?}"
    );
    // A restart on the same store resumes the step, and nobody changes arms.
    let data = server.crash();
    let server = Server::try_start_in(repo.path(), &[], data).unwrap();
    let view: Value =
        serde_json::from_str(&weft(&server, &key, &["rollout", "status", "sticky"])).unwrap();
    assert_eq!(view["step"], 1, "{view}");
    assert_eq!(arms_of(&server, &key, &users).await, second);
    // Ended by hand from the CLI: everyone on the candidate.
    let promoted: Value =
        serde_json::from_str(&weft(&server, &key, &["rollout", "promote", "sticky"])).unwrap();
    assert_eq!(promoted["phase"], "promoted", "{promoted}");
    assert!(
        arms_of(&server, &key, &users)
            .await
            .iter()
            .all(|arm| arm == "candidate")
    );
    let listed: Value = serde_json::from_str(&weft(&server, &key, &["rollout", "status"])).unwrap();
    assert_eq!(listed["rollouts"][0]["name"], "sticky");
    weft(&server, &key, &["rollout", "delete", "sticky"]);
    let (code, _) = send(
        client_with_key(&key)
            .post(server.url("/v2/models/svc-sticky/infer"))
            .json(&request(0.5)),
    )
    .await;
    assert_eq!(code, 404, "the target goes with the rollout");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn another_tenants_rollouts_and_names_are_invisible() {
    let repo = Repo::new().with_model(&quickstart(), "mlp");
    let server = Server::start(repo.path());
    let key = acme(&server).await;
    let text = canary("private", "svc-private", "3.0", FAILING_RULES);
    apply(&server, &key, "private", &text).await;
    let rival = create_tenant(&server, "rival", json!({ "shared_models": ["mlp"] })).await;
    let http = client_with_key(&rival);
    for call in [
        http.get(server.url("/api/v1/rollouts/private")),
        http.post(server.url("/api/v1/rollouts/private/promote")),
        http.post(server.url("/api/v1/rollouts/private/abort")),
        http.delete(server.url("/api/v1/rollouts/private")),
        http.post(server.url("/v2/models/svc-private/infer"))
            .json(&request(0.5)),
    ] {
        let (code, body) = send(call).await;
        assert_eq!(code, 404, "{body}");
        assert!(!body.to_string().contains("acme"), "{body}");
    }
    let (code, body) = send(http.get(server.url("/api/v1/rollouts"))).await;
    assert_eq!((code, body), (200, json!({ "rollouts": [] })));
    // Its own rollout naming acme's graph finds nothing to roll out.
    let (code, body) = send(
        http.put(server.url("/api/v1/rollouts/private"))
            .body(text.clone()),
    )
    .await;
    assert_eq!(code, 404, "{body}");
    assert!(!body.to_string().contains("acme"), "{body}");
    // Bad files get clear errors.
    for (bad, expected) in [
        (text.replace("[stable]", "[stabel]"), "stabel"),
        (text.replace("weight = 25", "weight = 250"), "percentage"),
        ("name = \"private\"\n".repeat(5000), "at most"),
    ] {
        let (code, body) = send(
            client_with_key(&key)
                .put(server.url("/api/v1/rollouts/private"))
                .body(bad),
        )
        .await;
        assert!(code == 400 || code == 413, "{code} {body}");
        assert!(body.to_string().contains(expected), "{expected}: {body}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_rollback_reaches_every_replica_on_postgres_within_two_seconds() {
    let postgres = weft_testkit::Postgres::start();
    let database_url = postgres.create_database();
    let s3 = weft_testkit::SeaweedS3::start();
    let blob_url = s3.blob_url("rollouts");
    let repo = Repo::new().with_model(&quickstart(), "mlp");
    let extra = [
        "--database-url",
        database_url.as_str(),
        "--blob-url",
        blob_url.as_str(),
    ];
    let start = || {
        Server::try_start_with_env(repo.path(), &extra, &s3.env(), tempfile::tempdir().unwrap())
            .unwrap()
    };
    let (one, two) = (start(), start());
    let key = acme(&one).await;
    apply(
        &one,
        &key,
        "svc-canary",
        &canary("svc-canary", "svc-live", "2.0", FAILING_RULES),
    )
    .await;
    // Replica two serves the rollout too, at the same weights.
    let started = Instant::now();
    loop {
        let (code, view) =
            send(client_with_key(&key).get(two.url("/api/v1/rollouts/svc-canary"))).await;
        if code == 200 && view["weights"]["candidate"] == 25.0 {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(10), "{view}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Failing traffic on replica one only: it decides; replica two must follow.
    let stop = Arc::new(AtomicBool::new(false));
    let load = start_load(&one, &key, "svc-live", 4, spread, &stop);
    let view = until_phase(
        &one,
        &key,
        "svc-canary",
        "rolled_back",
        Duration::from_secs(30),
    )
    .await;
    let decided_ms = view["events"].as_array().unwrap().last().unwrap()["unix_ms"]
        .as_u64()
        .unwrap();
    let followed_ms = loop {
        let view = status(&two, &key, "svc-canary").await;
        if view["weights"]["candidate"] == 0.0 {
            break weft_store::unix_now_ms();
        }
        assert!(
            weft_store::unix_now_ms() - decided_ms < 10_000,
            "replica two still sends traffic to the candidate: {view:#}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    stop.store(true, Ordering::Relaxed);
    load.await.unwrap();
    let lag = Duration::from_millis(followed_ms.saturating_sub(decided_ms));
    eprintln!("rollback decided on replica one, candidate at 0 % on replica two after {lag:?}");
    assert!(lag < Duration::from_secs(2), "{lag:?}");
    // And replica two's clients see the stable only.
    for _ in 0..20 {
        let (code, body) = send(
            client_with_key(&key)
                .post(two.url("/v2/models/svc-live/infer"))
                .json(&request(0.1)),
        )
        .await;
        assert_eq!(code, 200, "{body}");
        assert_eq!(body["parameters"]["rollout_arm"], "stable");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_readme_canary_example_serves_the_classify_graph() {
    let repo = Repo::new().with_model(&quickstart(), "mlp");
    let server = Server::start(repo.path());
    let key = create_tenant(&server, "acme", json!({ "shared_models": ["mlp"] })).await;
    let signer = signing_key(&server, &key).await;
    push_classify_plugins(&server, &key, &signer, "1.0.0").await;
    let (code, body) = push_plugin(
        &server,
        &key,
        &signer,
        "normalize",
        "1.1.0",
        guest("normalize"),
    )
    .await;
    assert_eq!(code, 201, "{body}");
    let (code, body) = apply_graph(
        &server,
        &key,
        "classify",
        &classify_graph("classify", 1, "mlp"),
    )
    .await;
    assert_eq!(code, 201, "{body}");
    let text =
        std::fs::read_to_string(workspace_root().join("examples/rollouts/canary.toml")).unwrap();
    let view = apply(&server, &key, "classify-normalize", &text).await;
    assert_eq!(view["weights"]["candidate"], 5.0, "{view}");
    let (code, body) = infer(&server, &key, "classify").await;
    assert_eq!(code, 200, "{body}");
    assert_eq!(
        body["parameters"]["rollout"], "classify-normalize",
        "{body}"
    );
    assert_eq!(body["parameters"]["rollout_version"], 1, "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_experiment_reports_each_arm_and_ends_with_the_winner_the_cli_names() {
    let repo = Repo::new().with_model(&quickstart(), "mlp");
    let server = Server::start(repo.path());
    let key = acme(&server).await;
    let text = r#"name = "ab"
target = "svc-ab"
kind = "experiment"
[[arms]]
name = "raw"
graph = "svc"
version = 1
plugin = "pre"
plugin_version = "1.0"
weight = 50
[[arms]]
name = "zscored"
graph = "svc"
version = 1
plugin = "pre"
plugin_version = "3.0"
weight = 50
[sticky]
parameter = "user_id"
[metric]
output = "y"
reduce = "max"
"#;
    apply(&server, &key, "ab", text).await;
    let http = client_with_key(&key);
    let mut arms = std::collections::BTreeMap::new();
    for user in 0..60 {
        let mut body = request(0.5);
        body["parameters"] = json!({ "user_id": format!("u{user}") });
        let (code, answer) =
            send(http.post(server.url("/v2/models/svc-ab/infer")).json(&body)).await;
        assert_eq!(code, 200, "{answer}");
        let arm = answer["parameters"]["rollout_arm"]
            .as_str()
            .unwrap()
            .to_string();
        // A user keeps its arm.
        let (_, again) = send(http.post(server.url("/v2/models/svc-ab/infer")).json(&body)).await;
        assert_eq!(again["parameters"]["rollout_arm"], arm.as_str());
        *arms.entry(arm).or_insert(0) += 1;
    }
    assert_eq!(arms.len(), 2, "{arms:?}");
    let view = status(&server, &key, "ab").await;
    assert_eq!(view["phase"], "running");
    for arm in view["arms"].as_array().unwrap() {
        let total = &arm["total"];
        assert!(total["requests"].as_u64().unwrap() > 0, "{arm}");
        assert_eq!(total["failures"], 0, "{arm}");
        assert!(total["metric"].is_number(), "{arm}");
        assert!(total["p50_ms"].is_number(), "{arm}");
        assert!(
            !total["latency_ms_histogram"].as_array().unwrap().is_empty(),
            "{arm}"
        );
    }
    let ended: Value = serde_json::from_str(&weft(
        &server,
        &key,
        &["rollout", "promote", "ab", "--arm", "zscored"],
    ))
    .unwrap();
    assert_eq!(ended["phase"], "concluded", "{ended}");
    assert_eq!(ended["winner"], "zscored");
    for user in 0..10 {
        let mut body = request(0.5);
        body["parameters"] = json!({ "user_id": format!("u{user}") });
        let (_, answer) = send(http.post(server.url("/v2/models/svc-ab/infer")).json(&body)).await;
        assert_eq!(answer["parameters"]["rollout_arm"], "zscored", "{answer}");
    }
    let metrics = scrape(&server).await;
    assert!(
        metrics.contains("weft_rollout_weight{arm=\"zscored\",rollout=\"ab\",tenant=\"acme\"} 100"),
        "{metrics}"
    );
}
