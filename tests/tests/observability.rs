//! Observability against a real server: `/metrics` moves as expected after known requests
//! (counts, a histogram bucket, trap counters by cause after hostile plugins, batch sizes), the V2
//! statistics extension matches the requests made, every response carries its cost, slow
//! requests are logged, and the Grafana dashboard and alert rules name only exported metrics.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::collections::BTreeSet;

use serde_json::{Value, json};
use support::*;

const BATCHED_MLP: &str = r#"
platform = "onnx"
max_batch_size = 16
[dynamic_batching]
max_queue_delay_microseconds = 20000
preferred_batch_size = [6]
[ort]
instance_count = 1
"#;

fn repository() -> Repo {
    let repo = Repo::new()
        .with_model(&quickstart(), "mlp")
        .with_file("models/batched/model.toml", BATCHED_MLP.as_bytes())
        .with_graph("classify", "classify.toml")
        .with_plugin("normalize", "normalize")
        .with_plugin("softmax", "softmax")
        .with_plugin("runtime_trap", "trap")
        .with_file(
            "graphs/trapping.toml",
            transformer_graph("trapping", 1, "explode", "trap", 64, "explode.x", "").as_bytes(),
        );
    std::os::unix::fs::symlink(
        quickstart().join("models/mlp/1"),
        repo.path().join("models/batched/1"),
    )
    .unwrap();
    repo
}

fn x(rows: usize) -> Value {
    let data: Vec<f32> = (0..rows * 64).map(|i| (i % 13) as f32 / 7.0).collect();
    json!({"inputs": [{"name": "x", "datatype": "FP32", "shape": [rows, 64], "data": data}]})
}

/// The value of the series `name` whose labels include all of `labels` (0 if absent).
fn value(metrics: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    metrics
        .lines()
        .filter(|line| !line.starts_with('#'))
        .filter_map(|line| {
            let (series, number) = line.rsplit_once(' ')?;
            let (series_name, series_labels) = match series.split_once('{') {
                Some((n, rest)) => (n, rest.trim_end_matches('}')),
                None => (series, ""),
            };
            let matches = series_name == name
                && labels.iter().all(|(k, v)| {
                    series_labels
                        .split(',')
                        .any(|l| l == format!("{k}=\"{v}\""))
                });
            matches.then(|| number.parse::<f64>().ok()).flatten()
        })
        .sum()
}

/// Metric family names the server declares (`# TYPE name kind`).
fn families(metrics: &str) -> BTreeSet<String> {
    metrics
        .lines()
        .filter_map(|line| line.strip_prefix("# TYPE "))
        .filter_map(|rest| rest.split_whitespace().next())
        .map(str::to_string)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn metrics_follow_known_requests() {
    let repo = repository();
    let server = Server::start(repo.path());
    let before = scrape(&server).await;
    let infer = |model: &str| server.url(&format!("/v2/models/{model}/infer"));

    for _ in 0..3 {
        let (status, _) = post_json(&infer("mlp"), &x(2)).await;
        assert_eq!(status, 200);
    }
    let (status, _) = post_json(&infer("mlp"), &json!({"inputs": []})).await;
    assert_eq!(status, 400);
    let (status, _) = post_json(&infer("no-such-model"), &x(1)).await;
    assert_eq!(status, 404);
    let (status, body) = post_json(&infer("trapping"), &x(1)).await;
    assert_eq!(status, 500, "{body}");
    let (status, _) = post_json(&infer("classify"), &x(1)).await;
    assert_eq!(status, 200);
    // Six single-row requests at once to the batched model: fewer executions than requests.
    let batched: Vec<_> = (0..6)
        .map(|_| {
            let url = infer("batched");
            tokio::spawn(async move { post_json(&url, &x(1)).await.0 })
        })
        .collect();
    for task in batched {
        assert_eq!(task.await.unwrap(), 200);
    }

    let after = scrape(&server).await;
    let delta = |name: &str, labels: &[(&str, &str)]| {
        value(&after, name, labels) - value(&before, name, labels)
    };
    let mlp = [("tenant", "default"), ("model", "mlp")];
    assert_eq!(
        delta("weft_requests_total", &[mlp[0], mlp[1], ("status", "200")]),
        3.0
    );
    assert_eq!(
        delta("weft_requests_total", &[mlp[0], mlp[1], ("status", "400")]),
        1.0
    );
    assert_eq!(
        delta("weft_requests_total", &[("model", ""), ("status", "404")]),
        1.0,
        "an unknown name is counted without becoming a label value"
    );
    assert!(!after.contains("no-such-model"));
    assert_eq!(delta("weft_request_duration_seconds_count", &mlp), 4.0);
    assert_eq!(
        delta(
            "weft_request_duration_seconds_bucket",
            &[mlp[1], ("le", "10")]
        ),
        4.0
    );
    assert_eq!(
        delta(
            "weft_plugin_traps_total",
            &[("plugin", "trap"), ("cause", "trap")]
        ),
        1.0
    );
    assert_eq!(
        delta("weft_plugin_calls_total", &[("plugin", "normalize")]),
        1.0
    );
    assert!(delta("weft_plugin_instantiations_total", &[]) >= 3.0);
    assert!(
        value(
            &after,
            "weft_plugin_memory_peak_bytes",
            &[("plugin", "softmax")]
        ) > 0.0
    );
    assert!(
        value(
            &after,
            "weft_compile_cache_lookups_total",
            &[("result", "miss")]
        ) >= 3.0
    );
    for node in ["normalize", "mlp", "softmax"] {
        assert_eq!(
            delta(
                "weft_graph_node_duration_seconds_count",
                &[("graph", "classify"), ("node", node)]
            ),
            1.0,
            "{node}"
        );
    }
    let batched = [("model", "batched")];
    assert_eq!(delta("weft_batch_size_rows_sum", &batched), 6.0);
    let executions = delta("weft_batch_size_rows_count", &batched);
    assert!((1.0..6.0).contains(&executions), "{executions} executions");
    assert_eq!(delta("weft_queue_duration_seconds_count", &batched), 6.0);
    assert_eq!(value(&after, "weft_queue_depth_requests", &batched), 0.0);
    assert!(delta("weft_compute_duration_seconds_count", &[("model", "mlp")]) >= 4.0);
    assert!(value(&after, "weft_process_resident_memory_bytes", &[]) > 1e6);
}

#[tokio::test]
async fn statistics_extension_matches_the_requests_made() {
    let repo = repository();
    let server = Server::start(repo.path());
    let (_, untouched) = get_json(&server.url("/v2/models/mlp/stats")).await;
    assert_eq!(untouched["model_stats"][0]["inference_count"], 0);
    for rows in [1, 2, 3] {
        let (status, _) = post_json(&server.url("/v2/models/mlp/infer"), &x(rows)).await;
        assert_eq!(status, 200);
    }
    let (status, _) = post_json(
        &server.url("/v2/models/mlp/infer"),
        &json!({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 2], "data": [1, 2]}]}),
    )
    .await;
    assert_eq!(status, 400);

    let (status, body) = get_json(&server.url("/v2/models/mlp/versions/1/stats")).await;
    assert_eq!(status, 200, "{body}");
    let stats = &body["model_stats"][0];
    assert_eq!(stats["name"], "mlp");
    assert_eq!(stats["version"], "1");
    assert_eq!(stats["inference_count"], 6);
    assert_eq!(stats["execution_count"], 3);
    let inference = &stats["inference_stats"];
    assert_eq!(inference["success"]["count"], 3);
    assert_eq!(inference["fail"]["count"], 1);
    assert!(inference["success"]["ns"].as_u64().unwrap() > 0);
    assert!(inference["compute_infer"]["ns"].as_u64().unwrap() > 0);
    assert_eq!(inference["queue"]["count"], 3);
    let sizes: Vec<u64> = stats["batch_stats"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["batch_size"].as_u64().unwrap())
        .collect();
    assert_eq!(sizes, vec![1, 2, 3]);
    assert!(stats["last_inference"].as_u64().unwrap() > 1_600_000_000_000);

    let (status, all) = get_json(&server.url("/v2/models/stats")).await;
    assert_eq!(status, 200);
    let names: Vec<&str> = all["model_stats"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["name"].as_str().unwrap())
        .collect();
    assert!(
        names.contains(&"mlp") && names.contains(&"classify"),
        "{names:?}"
    );
    let (status, _) = get_json(&server.url("/v2/models/nope/stats")).await;
    assert_eq!(status, 404);
    let (status, _) = get_json(&server.url("/v2/models/mlp/versions/9/stats")).await;
    assert_eq!(status, 404);
    let (_, metadata) = get_json(&server.url("/v2")).await;
    assert!(
        metadata["extensions"]
            .as_array()
            .unwrap()
            .contains(&json!("statistics"))
    );
}

#[tokio::test]
async fn every_response_says_what_the_request_cost() {
    let repo = repository();
    let server = Server::start(repo.path());
    let (_, mlp) = post_json(&server.url("/v2/models/mlp/infer"), &x(1)).await;
    let cost = &mlp["parameters"];
    assert!(cost["compute_us"].as_u64().unwrap() > 0, "{cost}");
    assert_eq!(cost["plugin_us"], 0);
    assert_eq!(cost["queue_us"], 0);

    let (_, graph) = post_json(&server.url("/v2/models/classify/infer"), &x(1)).await;
    let cost = &graph["parameters"];
    assert!(cost["compute_us"].as_u64().unwrap() > 0, "{cost}");
    assert!(cost["plugin_us"].as_u64().unwrap() > 0, "{cost}");
    assert!(
        cost.get("fuel").is_none(),
        "fuel is metered only with --meter-fuel: {cost}"
    );

    let (_, batched) = post_json(&server.url("/v2/models/batched/infer"), &x(1)).await;
    let cost = &batched["parameters"];
    // Its time in the batch queue is reported; alone (nothing else in flight that could join
    // its batch), it does not wait out the 20 ms batch delay.
    assert!(cost["queue_us"].as_u64().unwrap() < 15_000, "{cost}");
    assert!(cost["compute_us"].as_u64().unwrap() > 0, "{cost}");
}

#[tokio::test]
async fn with_fuel_metering_responses_and_metrics_count_plugin_fuel() {
    let repo = repository();
    let server = Server::start_with(repo.path(), &["--meter-fuel"]);
    let (status, graph) = post_json(&server.url("/v2/models/classify/infer"), &x(1)).await;
    assert_eq!(status, 200, "{graph}");
    let fuel = graph["parameters"]["fuel"].as_u64().unwrap_or(0);
    assert!(
        fuel > 1000,
        "two plugin calls run thousands of instructions: {graph}"
    );
    let (_, again) = post_json(&server.url("/v2/models/classify/infer"), &x(1)).await;
    let metrics = scrape(&server).await;
    let total: f64 = metrics
        .lines()
        .filter(|line| line.starts_with("weft_plugin_fuel_consumed_total{"))
        .filter_map(|line| line.rsplit_once(' ')?.1.parse::<f64>().ok())
        .sum();
    let both = fuel + again["parameters"]["fuel"].as_u64().unwrap();
    assert_eq!(total as u64, both, "{metrics}");
}

#[tokio::test]
async fn slow_requests_get_a_log_line() {
    let repo = repository();
    let server = Server::start_with(repo.path(), &["--slow-request-ms", "0"]);
    let (status, _) = post_json(&server.url("/v2/models/mlp/infer"), &x(1)).await;
    assert_eq!(status, 200);
    let log = server.log();
    let line = log
        .lines()
        .find(|l| l.contains("slow request"))
        .unwrap_or_else(|| panic!("no slow-request line in:\n{log}"));
    assert!(
        line.contains("model=\"mlp\"") || line.contains("model=mlp"),
        "{line}"
    );
    assert!(line.contains("duration_ms"), "{line}");
}

/// `--log-format json`: one JSON object per line, and a line logged inside a request carries the
/// request id the client sent (and the response echoes it).
#[tokio::test]
async fn json_logs_carry_the_request_id() {
    let repo = repository();
    let server = Server::start_with(
        repo.path(),
        &["--slow-request-ms", "0", "--log-format", "json"],
    );
    let response = client()
        .post(server.url("/v2/models/mlp/infer"))
        .header("x-request-id", "trace-me-42")
        .json(&x(1))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["x-request-id"], "trace-me-42");
    let log = server.log();
    for line in log.lines().filter(|l| !l.trim().is_empty()) {
        serde_json::from_str::<Value>(line)
            .unwrap_or_else(|e| panic!("not a JSON log line ({e}): {line}"));
    }
    let slow = log
        .lines()
        .find(|l| l.contains("slow request"))
        .unwrap_or_else(|| panic!("no slow-request line in:\n{log}"));
    assert!(slow.contains("trace-me-42"), "{slow}");
}

/// `weft_*` names in a dashboard or rules file, with histogram suffixes folded into their family.
fn referenced(text: &str, exported: &BTreeSet<String>) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let bytes = text.as_bytes();
    let mut start = 0;
    while let Some(found) = text[start..].find("weft_") {
        let begin = start + found;
        let mut end = begin;
        while end < bytes.len()
            && (bytes[end].is_ascii_lowercase()
                || bytes[end] == b'_'
                || bytes[end].is_ascii_digit())
        {
            end += 1;
        }
        let name = &text[begin..end];
        let family = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|suffix| {
                name.strip_suffix(suffix)
                    .filter(|base| exported.contains(*base))
            })
            .unwrap_or(name);
        names.insert(family.to_string());
        start = end;
    }
    names
}

#[tokio::test]
async fn dashboard_and_alert_rules_use_only_exported_metrics() {
    let repo = repository();
    let server = Server::start(repo.path());
    let metrics = scrape(&server).await;
    let exported = families(&metrics);
    for wanted in [
        "weft_requests_total",
        "weft_request_duration_seconds",
        "weft_queue_duration_seconds",
        "weft_compute_duration_seconds",
        "weft_graph_node_duration_seconds",
        "weft_batch_size_rows",
        "weft_queue_depth_requests",
        "weft_queue_rejected_total",
        "weft_batch_retries_total",
        "weft_plugin_instantiations_total",
        "weft_plugin_call_duration_seconds",
        "weft_plugin_calls_total",
        "weft_plugin_errors_total",
        "weft_plugin_traps_total",
        "weft_plugin_fuel_consumed_total",
        "weft_plugin_memory_peak_bytes",
        "weft_compile_cache_lookups_total",
        "weft_uploads_total",
        "weft_process_resident_memory_bytes",
        "weft_model_worker_restarts_total",
    ] {
        assert!(
            exported.contains(wanted),
            "{wanted} not exported:\n{metrics}"
        );
    }
    let deploy = workspace_root().join("deploy");
    let dashboard = std::fs::read_to_string(deploy.join("grafana/weft-dashboard.json")).unwrap();
    let parsed: Value = serde_json::from_str(&dashboard).expect("the dashboard is valid JSON");
    assert!(parsed["panels"].as_array().unwrap().len() >= 10);
    let rules = std::fs::read_to_string(deploy.join("prometheus/weft-alerts.yml")).unwrap();
    for alert in [
        "WeftHighErrorRate",
        "WeftHighP99Latency",
        "WeftQueueBacklog",
        "WeftPluginTrapRate",
    ] {
        assert!(rules.contains(&format!("alert: {alert}")), "{alert}");
    }
    for (file, text) in [("dashboard", &dashboard), ("alert rules", &rules)] {
        let names = referenced(text, &exported);
        assert!(names.len() >= 4, "{file}: {names:?}");
        let unknown: Vec<&String> = names.iter().filter(|n| !exported.contains(*n)).collect();
        assert!(
            unknown.is_empty(),
            "{file} uses metrics weft does not export: {unknown:?}"
        );
    }
}

/// One hostile plugin per cause: each stops only its own call, and `weft_plugin_traps_total`
/// counts it under the right `cause` (deadline, memory, output; fuel is covered by the runtime's
/// unit tests, since a fuel limit is not a graph setting).
#[tokio::test]
async fn each_trap_cause_is_counted_under_its_own_label() {
    let hostile = |name: &str, plugin: &str, limits: &str, output: &str| {
        transformer_graph(
            name,
            1,
            "hostile",
            plugin,
            64,
            &format!("hostile.{output}"),
            limits,
        )
    };
    let repo = repository()
        .with_plugin("runtime_spin", "spin")
        .with_plugin("runtime_allocate", "allocate")
        .with_plugin("runtime_huge_output", "huge-output")
        .with_file(
            "graphs/spin.toml",
            hostile("spin", "spin", "deadline_ms = 100", "x").as_bytes(),
        )
        .with_file(
            "graphs/allocate.toml",
            hostile("allocate", "allocate", "memory_mb = 16", "x").as_bytes(),
        )
        .with_file(
            "graphs/huge-output.toml",
            hostile(
                "huge-output",
                "huge-output",
                // 300 copies of a 256 KiB input pass the 64 MiB output limit with few host
                // calls, so a loaded machine does not reach the 2 s deadline first.
                // memory_mb 128: the call's host budget (its memory_mb) is then above the
                // 64 MiB output limit, which is what this case counts.
                "memory_mb = 128\nparams = { copies = \"300\" }",
                "copy0",
            )
            .as_bytes(),
        );
    let server = Server::start(repo.path());
    for (graph, plugin, cause, rows) in [
        ("spin", "spin", "deadline", 64),
        ("allocate", "allocate", "memory", 64),
        ("huge-output", "huge-output", "output", 1024),
    ] {
        let before = scrape(&server).await;
        let (status, body) =
            post_json(&server.url(&format!("/v2/models/{graph}/infer")), &x(rows)).await;
        assert!(status >= 400, "{graph}: {body}");
        assert!(
            body["error"].as_str().unwrap().contains("node 'hostile'"),
            "{graph}: {body}"
        );
        let after = scrape(&server).await;
        let labels = [("plugin", plugin), ("cause", cause)];
        assert_eq!(
            value(&after, "weft_plugin_traps_total", &labels)
                - value(&before, "weft_plugin_traps_total", &labels),
            1.0,
            "{graph}: {body}\n{after}"
        );
        // The server keeps serving.
        let (status, _) = post_json(&server.url("/v2/models/classify/infer"), &x(1)).await;
        assert_eq!(status, 200);
    }
}
