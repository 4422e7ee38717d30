//! The hostile-tenant suite: one tenant (the attacker, with a valid key) runs a hostile plugin
//! or sends a hostile graph while a second tenant (the victim) calls its own graph. Each test
//! shows that the server stays up, the attacker's calls fail with the right error, the server's
//! peak RSS stays within a stated bound, and every victim request succeeds with bounded
//! latency. The figures (peak RSS, the victim's p99) are printed for BENCHMARKS-style notes:
//! run with `--nocapture` to read them.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::time::{Duration, Instant};

use serde_json::{Value, json};
use support::tenants::{create_tenant, send};
use support::*;

fn x(rows: usize) -> Value {
    let data: Vec<f32> = (0..rows * 64).map(|i| (i % 13) as f32 / 7.0).collect();
    json!({"inputs": [{"name": "x", "datatype": "FP32", "shape": [rows, 64], "data": data}]})
}

/// The repository both tenants draw on: an echo graph for the victim, and one graph per
/// hostile plugin for the attacker.
fn repository() -> Repo {
    let hostile = |name: &str, plugin: &str, extra: &str| {
        transformer_graph(name, 1, "hostile", plugin, 64, "hostile.x", extra)
    };
    Repo::new()
        .with_plugin("runtime_echo", "echo")
        .with_plugin("hostile_tensor_flood", "tensor-flood")
        .with_plugin("hostile_log_flood", "log-flood")
        .with_plugin("runtime_spin", "spin")
        .with_model(&quickstart(), "mlp")
        .with_file("models/mlp-batched/model.toml", MLP_BATCHED.as_bytes())
        .with_file(
            "models/mlp-batched/1/model.onnx",
            &std::fs::read(quickstart().join("models/mlp/1/model.onnx")).unwrap(),
        )
        .with_file(
            "graphs/echo.toml",
            transformer_graph("echo", 1, "echo", "echo", 64, "echo.x", "").as_bytes(),
        )
        .with_file(
            "graphs/tensor-flood.toml",
            hostile("tensor-flood", "tensor-flood", "memory_mb = 16").as_bytes(),
        )
        .with_file(
            "graphs/log-flood.toml",
            hostile("log-flood", "log-flood", "deadline_ms = 1000").as_bytes(),
        )
        .with_file(
            "graphs/spin.toml",
            hostile("spin", "spin", "deadline_ms = 1000").as_bytes(),
        )
}

/// The quickstart's `mlp` behind a dynamic batcher with one session: a model both tenants share.
const MLP_BATCHED: &str = r#"
platform = "onnx"
max_batch_size = 64
[ort]
instance_count = 1
[[input]]
name = "x"
datatype = "FP32"
dims = [64]
[[output]]
name = "y"
datatype = "FP32"
dims = [10]
[dynamic_batching]
max_queue_delay_microseconds = 500
max_queue_size = 64
"#;

struct Tenants {
    server: Server,
    attacker: String,
    victim: String,
}

/// One attack at a time: the tests of this file run in parallel threads, and one test's
/// attacker would otherwise load the machine under another test's victim.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

async fn start() -> Tenants {
    let repo = repository();
    let server = Server::start(repo.path());
    // The repository folder must outlive the server's start only; models are not used here.
    std::mem::forget(repo);
    let attacker = create_tenant(
        &server,
        "attacker",
        json!({"shared_models": ["tensor-flood", "log-flood", "spin", "mlp", "mlp-batched"]}),
    )
    .await;
    let victim = create_tenant(
        &server,
        "victim",
        json!({"shared_models": ["echo", "mlp", "mlp-batched"]}),
    )
    .await;
    Tenants {
        server,
        attacker,
        victim,
    }
}

/// The server's peak resident set (VmHWM), in MiB.
fn peak_rss_mib(server: &Server) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{}/status", server.pid())).unwrap();
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmHWM:"))
        .and_then(|rest| {
            rest.trim()
                .trim_end_matches("kB")
                .trim()
                .parse::<u64>()
                .ok()
        })
        .map(|kib| kib / 1024)
        .unwrap()
}

/// Runs `parallel` attacker loops calling `graph` for `duration` while the victim calls its
/// echo graph one request after another; returns the attacker's answers and the victim's
/// latencies, sorted. Every victim request must succeed.
async fn attack(
    tenants: &Tenants,
    graph: &str,
    parallel: usize,
    duration: Duration,
) -> (Vec<(u16, Value)>, Vec<Duration>) {
    attack_on(tenants, graph, 1, "echo", parallel, duration).await
}

/// [`attack`] with the attacker sending `rows` rows to `target` and the victim calling
/// `victim_target` (a graph or model both may share).
async fn attack_on(
    tenants: &Tenants,
    target: &str,
    rows: usize,
    victim_target: &str,
    parallel: usize,
    duration: Duration,
) -> (Vec<(u16, Value)>, Vec<Duration>) {
    let url = tenants.server.url(&format!("/v2/models/{target}/infer"));
    let until = Instant::now() + duration;
    let mut attackers = Vec::new();
    for _ in 0..parallel {
        let client = client_with_key(&tenants.attacker);
        let url = url.clone();
        attackers.push(tokio::spawn(async move {
            let mut answers = Vec::new();
            let body = x(rows);
            while Instant::now() < until {
                answers.push(send(client.post(&url).json(&body)).await);
            }
            answers
        }));
    }
    let victim = client_with_key(&tenants.victim);
    let echo = tenants
        .server
        .url(&format!("/v2/models/{victim_target}/infer"));
    let mut latencies = Vec::new();
    while Instant::now() < until {
        let started = Instant::now();
        let (status, body) = send(victim.post(&echo).json(&x(1))).await;
        assert_eq!(
            status, 200,
            "the victim's request failed during the attack: {body}"
        );
        latencies.push(started.elapsed());
    }
    let mut answers = Vec::new();
    for attacker in attackers {
        answers.extend(attacker.await.unwrap());
    }
    latencies.sort();
    (answers, latencies)
}

fn p99(latencies: &[Duration]) -> Duration {
    latencies[(latencies.len() * 99 / 100).min(latencies.len() - 1)]
}

/// The server answers health checks and the victim's graph.
async fn still_serving(tenants: &Tenants) {
    let (status, _) = get_json(&tenants.server.url("/v2/health/live")).await;
    assert_eq!(status, 200);
    let (status, body) = send(
        client_with_key(&tenants.victim)
            .post(tenants.server.url("/v2/models/echo/infer"))
            .json(&x(1)),
    )
    .await;
    assert_eq!(status, 200, "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn host_tensor_flood_fails_on_its_budget_and_the_victim_is_served() {
    let _serial = SERIAL.lock().await;
    let tenants = start().await;
    let (answers, latencies) = attack(&tenants, "tensor-flood", 4, Duration::from_secs(4)).await;
    let mut on_budget = 0;
    for (status, body) in &answers {
        let error = body["error"].as_str().unwrap_or_default();
        if *status == 500 && error.contains("host memory limit of 16777216 bytes") {
            on_budget += 1;
        } else {
            // On a loaded machine a call may reach its 2 s deadline before its budget.
            assert!(
                *status == 504 && error.contains("deadline"),
                "{status}: {body}"
            );
        }
    }
    assert!(
        on_budget * 10 >= answers.len() * 9,
        "{on_budget} of {} calls stopped on the host memory budget",
        answers.len()
    );
    let rss = peak_rss_mib(&tenants.server);
    eprintln!(
        "tensor flood: {} attacker calls, peak RSS {rss} MiB, victim p99 {:?} over {} calls",
        answers.len(),
        p99(&latencies),
        latencies.len()
    );
    // 4 calls in flight, each bounded at 16 MiB of linear memory and 16 MiB of host tensors.
    assert!(rss < 1024, "peak RSS {rss} MiB");
    assert!(p99(&latencies) < Duration::from_secs(1));
    let metrics = scrape(&tenants.server).await;
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("weft_plugin_traps_total")
                && l.contains("cause=\"host_memory\"")
                && !l.ends_with(" 0")),
        "{metrics}"
    );
    still_serving(&tenants).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn spinning_plugins_at_the_attackers_quota_leave_the_victim_its_share() {
    let _serial = SERIAL.lock().await;
    let tenants = start().await;
    let (answers, latencies) = attack(&tenants, "spin", 128, Duration::from_secs(4)).await;
    for (status, body) in &answers {
        let error = body["error"].as_str().unwrap_or_default();
        assert!(
            (*status == 504 && error.contains("deadline")) || *status == 429,
            "{status}: {body}"
        );
        assert!(!error.contains("maximum concurrent"), "{body}");
    }
    let rss = peak_rss_mib(&tenants.server);
    eprintln!(
        "spin: {} attacker calls, peak RSS {rss} MiB, victim p99 {:?} over {} calls",
        answers.len(),
        p99(&latencies),
        latencies.len()
    );
    assert!(rss < 1024, "peak RSS {rss} MiB");
    assert!(p99(&latencies) < Duration::from_secs(1));
    still_serving(&tenants).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_logging_loop_writes_a_bounded_log() {
    let _serial = SERIAL.lock().await;
    let tenants = start().await;
    let before = tenants.server.log().len();
    let (answers, latencies) = attack(&tenants, "log-flood", 8, Duration::from_secs(3)).await;
    for (status, body) in &answers {
        assert!(*status == 504, "{status}: {body}");
    }
    let written = tenants.server.log().len() - before;
    let rss = peak_rss_mib(&tenants.server);
    eprintln!(
        "log flood: {} attacker calls wrote {written} log bytes, peak RSS {rss} MiB, victim p99 \
         {:?} over {} calls",
        answers.len(),
        p99(&latencies),
        latencies.len()
    );
    // 100 lines per call and 200 lines per second per plugin, of at most 4 KiB each.
    assert!(written < 4 << 20, "{written} bytes of log");
    assert!(!tenants.server.log().contains("\nFORGED"));
    assert!(rss < 1024, "peak RSS {rss} MiB");
    assert!(p99(&latencies) < Duration::from_secs(1));
    still_serving(&tenants).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn flooding_a_shared_model_leaves_the_other_tenant_its_turns() {
    let _serial = SERIAL.lock().await;
    let tenants = start().await;
    for (model, victim_model) in [("mlp-batched", "mlp-batched"), ("mlp", "mlp")] {
        // Full batches (64 rows) from 64 loops against one session; the victim sends one row.
        let (answers, latencies) = attack_on(
            &tenants,
            model,
            64,
            victim_model,
            64,
            Duration::from_secs(3),
        )
        .await;
        let served = answers.iter().filter(|(status, _)| *status == 200).count();
        for (status, body) in &answers {
            let error = body["error"].as_str().unwrap_or_default();
            assert!(
                *status == 200 || (*status == 503 && error.contains("queue is full")),
                "{status}: {body}"
            );
            assert!(!error.contains("victim"), "{body}");
        }
        let rss = peak_rss_mib(&tenants.server);
        eprintln!(
            "{model} flood: {} attacker calls ({served} served), peak RSS {rss} MiB, victim p99 \
             {:?} over {} calls",
            answers.len(),
            p99(&latencies),
            latencies.len()
        );
        assert!(served > 0, "the attacker is served its share too");
        assert!(rss < 1024, "peak RSS {rss} MiB");
        assert!(p99(&latencies) < Duration::from_secs(1));
    }
    still_serving(&tenants).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn huge_graphs_are_refused_by_their_limits_without_harm() {
    let _serial = SERIAL.lock().await;
    let tenants = start().await;
    let chain = |nodes: usize| {
        let mut toml = String::from(
            "name = \"chain\"\nversion = 1\n[[input]]\nname = \"x\"\ndatatype = \"FP32\"\n\
             shape = [-1, 64]\n[[output]]\nname = \"y\"\ndatatype = \"FP32\"\nshape = [-1, 64]\n",
        );
        toml.push_str(&format!("from = \"n{}.x\"\n", nodes - 1));
        for node in 0..nodes {
            let input = if node == 0 {
                "request".to_string()
            } else {
                format!("n{}", node - 1)
            };
            toml.push_str(&format!(
                "[[node]]\nname = \"n{node}\"\nkind = \"transformer\"\nplugin = \"echo\"\n\
                 inputs = [\"{input}\"]\n"
            ));
        }
        toml
    };
    let attacker = client_with_key(&tenants.attacker);
    // 100,000 nodes are several MiB of TOML: refused at the 1 MiB limit, perhaps before the
    // body is read (then the server closes the connection under the client).
    let refused = attacker
        .put(tenants.server.url("/api/v1/graphs/chain"))
        .header("weft-dry-run", "true")
        .body(chain(100_000))
        .send()
        .await;
    if let Ok(response) = refused {
        let status = response.status().as_u16();
        let body = response.text().await.unwrap();
        assert!(
            (status == 400 || status == 413) && body.contains("limit"),
            "{status} {body}"
        );
    }
    still_serving(&tenants).await;
    // 5,000 nodes fit in 1 MiB: refused by the node limit, by name.
    for nodes in [5_000] {
        let (status, body) = send(
            attacker
                .put(tenants.server.url("/api/v1/graphs/chain"))
                .header("weft-dry-run", "true")
                .body(chain(nodes)),
        )
        .await;
        let error = body["error"].as_str().unwrap_or_default().to_string();
        assert!(
            status == 400 && error.contains("the limit is 1000 (graph.max_nodes)"),
            "{nodes} nodes: {status} {body}"
        );
        still_serving(&tenants).await;
    }
    let rss = peak_rss_mib(&tenants.server);
    eprintln!("huge graphs: peak RSS {rss} MiB");
    assert!(rss < 1024, "peak RSS {rss} MiB");
}
