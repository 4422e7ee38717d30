//! Dynamic batching over HTTP against the real ONNX mlp: many concurrent requests with mixed
//! batch sizes, some straight to the batched model and some through a plugin's `wasi:nn`
//! `compute` in a graph, half in JSON and half in the binary extension with binary outputs, each
//! get exactly what unbatched inference gives for their own rows, in their own encoding
//! (MLServer #1306, #903, #1718: responses mixed up, shapes wrong, ids and parameters lost).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use serde_json::{Value, json};
use support::*;

fn rows_of(seed: usize, rows: usize) -> Vec<f32> {
    (0..rows * 64)
        .map(|i| (((seed * 7919 + i * 31) % 997) as f32) / 97.0 - 5.0)
        .collect()
}

async fn infer(server: &Server, model: &str, values: &[f32], id: &str) -> Value {
    let rows = values.len() / 64;
    let (status, body) = post_json(
        &server.url(&format!("/v2/models/{model}/infer")),
        &json!({"id": id, "inputs": [{"name": "x", "datatype": "FP32", "shape": [rows, 64], "data": values}]}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    body
}

/// The same request in the binary extension, asking for a binary output; the answer comes back
/// in the JSON shape of [`infer`] (the raw output decoded into `data`), with the output's
/// `binary_data_size` checked against its shape.
async fn infer_binary(server: &Server, model: &str, values: &[f32], id: &str) -> Value {
    let rows = values.len() / 64;
    let header = json!({
        "id": id,
        "inputs": [{"name": "x", "datatype": "FP32", "shape": [rows, 64],
                    "parameters": {"binary_data_size": values.len() * 4}}],
        "outputs": [{"name": "y", "parameters": {"binary_data": true}}],
    });
    let url = server.url(&format!("/v2/models/{model}/infer"));
    let response = post_binary(&url, &header, &[&f32_bytes(values)]).await;
    assert_eq!(response.status(), 200);
    let (mut body, raw) = split_binary(response).await;
    assert_eq!(
        body["outputs"][0]["parameters"]["binary_data_size"],
        rows * 10 * 4,
        "{body}"
    );
    body["outputs"][0]["data"] = json!(f32s(&raw));
    body
}

fn y(body: &Value) -> Vec<f32> {
    body["outputs"][0]["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap() as f32)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_mixed_requests_get_exactly_their_own_rows() {
    mixed_requests_get_their_own_rows(&[]).await;
}

/// The same with every session on one process-wide ONNX Runtime thread pool (`--ort-threads`):
/// sessions sharing threads still answer each request with its own rows.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_mixed_requests_get_their_own_rows_on_a_shared_onnx_runtime_pool() {
    let server = mixed_requests_get_their_own_rows(&["--ort-threads", "2"]).await;
    let log = server.log();
    assert!(
        log.lines()
            .any(|l| l.contains("ONNX Runtime loaded") && l.contains("shared_threads=2")),
        "{log}"
    );
}

async fn mixed_requests_get_their_own_rows(extra: &[&str]) -> std::sync::Arc<Server> {
    let quickstart_mlp = quickstart().join("models/mlp/1");
    let repo = Repo::new()
        .with_model(&quickstart(), "mlp")
        .with_file("models/batched/model.toml", BATCHED_MLP.as_bytes())
        .with_plugin("runtime_call_model", "call_model")
        .with_file(
            "graphs/via-plugin.toml",
            call_model_graph("via-plugin", 1, "call_model", "batched", "batched").as_bytes(),
        );
    std::os::unix::fs::symlink(&quickstart_mlp, repo.path().join("models/batched/1")).unwrap();
    let server = Server::start_with(repo.path(), extra);

    // The reference: the unbatched model, one request at a time.
    let cases: Vec<(String, Vec<f32>)> = (0..48)
        .map(|i| {
            let model = if i % 3 == 2 { "via-plugin" } else { "batched" };
            (model.to_string(), rows_of(i, 1 + i % 4))
        })
        .collect();
    let mut expected = Vec::new();
    for (i, (_, values)) in cases.iter().enumerate() {
        expected.push(y(&infer(&server, "mlp", values, &format!("ref-{i}")).await));
    }

    let server = std::sync::Arc::new(server);
    let tasks: Vec<_> = cases
        .iter()
        .cloned()
        .enumerate()
        .map(|(i, (model, values))| {
            let server = std::sync::Arc::clone(&server);
            tokio::spawn(async move {
                // JSON and binary-extension requests share batches; each gets its own encoding.
                let id = format!("req-{i}");
                if i % 2 == 0 {
                    infer(&server, &model, &values, &id).await
                } else {
                    infer_binary(&server, &model, &values, &id).await
                }
            })
        })
        .collect();
    let mut batched_rows = 0;
    for (i, task) in tasks.into_iter().enumerate() {
        let body = task.await.unwrap();
        batched_rows += cases[i].1.len() / 64;
        let rows = cases[i].1.len() / 64;
        assert_eq!(
            body["id"],
            format!("req-{i}"),
            "ids stay with their requests"
        );
        assert_eq!(
            body["outputs"][0]["shape"],
            json!([rows, 10]),
            "request {i}"
        );
        let got = y(&body);
        for (j, (a, e)) in got.iter().zip(&expected[i]).enumerate() {
            assert!(
                (a - e).abs() <= 1e-4 * e.abs().max(1.0),
                "request {i} ({}), element {j}: {a} vs unbatched {e}",
                cases[i].0
            );
        }
    }

    // Every row went through the one batcher, HTTP and wasi:nn alike, in fewer executions.
    let metrics = scrape(&server).await;
    let series = |name: &str| -> f64 {
        metrics
            .lines()
            .find(|l| l.starts_with(&format!("{name}{{model=\"batched\"}}")))
            .and_then(|l| l.rsplit_once(' '))
            .map(|(_, v)| v.parse().unwrap())
            .unwrap_or_else(|| panic!("no {name} for batched in:\n{metrics}"))
    };
    assert_eq!(series("weft_batch_size_rows_sum") as usize, batched_rows);
    let executions = series("weft_batch_size_rows_count");
    assert!(
        executions < cases.len() as f64,
        "{executions} executions for {} requests: nothing was batched",
        cases.len()
    );
    server
}

/// Two tenants' own signed plugins call one shared, batched platform model through `wasi:nn`
/// at the same time: their calls batch together and each gets exactly its own answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_tenants_plugins_share_one_batched_model_and_get_their_own_answers() {
    let quickstart_mlp = quickstart().join("models/mlp/1");
    let repo = Repo::new()
        .with_model(&quickstart(), "mlp")
        .with_file("models/batched/model.toml", BATCHED_MLP.as_bytes());
    std::os::unix::fs::symlink(&quickstart_mlp, repo.path().join("models/batched/1")).unwrap();
    let server = Server::start(repo.path());
    let plugin = tenants::guest("runtime_call_model");
    let graph = call_model_graph("via-plugin", 1, "call_model", "batched", "batched");
    let mut keys = Vec::new();
    for tenant in ["acme", "bolt"] {
        let key =
            tenants::create_tenant(&server, tenant, json!({"shared_models": ["batched"]})).await;
        let secret = tenants::signing_key(&server, &key).await;
        let (status, body) =
            tenants::push_plugin(&server, &key, &secret, "call_model", "1", plugin.clone()).await;
        assert_eq!(status, 201, "{body}");
        let (status, body) = tenants::apply_graph(&server, &key, "via-plugin", &graph).await;
        assert_eq!(status, 201, "{body}");
        keys.push(key);
    }
    // References: the unbatched platform mlp, one request at a time (tenant `default`).
    let cases: Vec<(usize, Vec<f32>)> = (0..32)
        .map(|i| (i % 2, rows_of(100 + i, 1 + i % 3)))
        .collect();
    let mut expected = Vec::new();
    for (i, (_, values)) in cases.iter().enumerate() {
        expected.push(y(&infer(&server, "mlp", values, &format!("ref-{i}")).await));
    }
    let tasks: Vec<_> = cases
        .iter()
        .cloned()
        .enumerate()
        .map(|(i, (tenant, values))| {
            let url = server.url("/v2/models/via-plugin/infer");
            let key = keys[tenant].clone();
            tokio::spawn(async move {
                let rows = values.len() / 64;
                let response = client_with_key(&key)
                    .post(url)
                    .json(&json!({"id": format!("req-{i}"), "inputs": [{"name": "x", "datatype": "FP32", "shape": [rows, 64], "data": values}]}))
                    .send()
                    .await
                    .unwrap();
                assert_eq!(response.status(), 200);
                response.json::<Value>().await.unwrap()
            })
        })
        .collect();
    for (i, task) in tasks.into_iter().enumerate() {
        let body = task.await.unwrap();
        assert_eq!(body["id"], format!("req-{i}"));
        let got = y(&body);
        assert_eq!(got.len(), expected[i].len(), "request {i}");
        for (a, e) in got.iter().zip(&expected[i]) {
            assert!(
                (a - e).abs() <= 1e-4 * e.abs().max(1.0),
                "request {i} (tenant {}): {a} vs {e}",
                cases[i].0
            );
        }
    }
    let metrics = scrape(&server).await;
    let executions: f64 = metrics
        .lines()
        .find(|l| l.starts_with("weft_batch_size_rows_count{model=\"batched\"}"))
        .and_then(|l| l.rsplit_once(' '))
        .map(|(_, v)| v.parse().unwrap())
        .unwrap();
    assert!(
        executions < cases.len() as f64,
        "{executions} executions for {} calls",
        cases.len()
    );
    for tenant in ["acme", "bolt"] {
        assert!(
            metrics.contains(&format!(
                "weft_requests_total{{model=\"via-plugin\",status=\"200\",tenant=\"{tenant}\""
            )),
            "per-tenant request series for {tenant}"
        );
    }
}
