//! Tenant models load on demand under `--model-memory-budget`: a push leaves its version
//! loaded while the budget has room, the least recently used idle model is unloaded to make
//! room, an unloaded model loads again on its next request (the wait in `queue_us`), pinned
//! models stay, Triton's repository extension loads and unloads by name (tenant-scoped), and a
//! restart registers every stored model without loading one.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use serde_json::{Value, json};
use support::tenants::*;
use support::*;

const CONFIG: &str = "platform = \"onnx\"\nmax_batch_size = 64\n[ort]\ninstance_count = 1\n";
const PINNED: &str =
    "platform = \"onnx\"\nmax_batch_size = 64\npin = true\n[ort]\ninstance_count = 1\n";

/// A metric's value from `/metrics` (the first series whose line starts with `series `).
async fn metric(server: &Server, series: &str) -> f64 {
    let text = reqwest::get(server.url("/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    text.lines()
        .find_map(|line| line.strip_prefix(&format!("{series} ")))
        .map(|value| value.parse().unwrap())
        .unwrap_or_else(|| panic!("no {series} in /metrics"))
}

/// The index entries' reasons by model name.
async fn reasons(server: &Server, key: &str) -> std::collections::HashMap<String, String> {
    let (status, index) = send(
        client_with_key(key)
            .post(server.url("/v2/repository/index"))
            .body(""),
    )
    .await;
    assert_eq!(status, 200, "{index}");
    index
        .as_array()
        .unwrap()
        .iter()
        .map(|entry| {
            assert_eq!(entry["state"], "READY", "{entry}");
            (
                entry["name"].as_str().unwrap().to_string(),
                entry["reason"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect()
}

async fn queue_us(server: &Server, key: &str, model: &str) -> u64 {
    let (status, body) = infer(server, key, model).await;
    assert_eq!(status, 200, "{model}: {body}");
    body["parameters"]["queue_us"].as_u64().unwrap()
}

async fn post(server: &Server, key: &str, path: &str) -> (u16, Value) {
    send(client_with_key(key).post(server.url(path)).body("")).await
}

#[tokio::test(flavor = "multi_thread")]
async fn tenant_models_load_on_demand_and_give_way_under_the_budget() {
    let onnx = mlp_onnx();
    // Room for two loaded models (each costs its file size, one instance), not three.
    let cost = (onnx.len() + CONFIG.len()) as u64;
    let budget = (cost * 5 / 2).to_string();
    let repo = Repo::new().with_model(&quickstart(), "mlp");
    let data = tempfile::tempdir().unwrap();
    let server = Server::try_start_in(repo.path(), &["--model-memory-budget", &budget], data)
        .unwrap_or_else(|log| panic!("{log}"));
    let key = create_tenant(&server, "acme", json!({ "shared_models": ["mlp"] })).await;
    let other = create_tenant(&server, "bolt", json!({})).await;
    for (name, config) in [("a", CONFIG), ("b", CONFIG), ("c", CONFIG), ("p", PINNED)] {
        let (status, body) = push_model(&server, &key, name, 1, config, &onnx).await;
        assert_eq!(status, 201, "{name}: {body}");
    }
    // Every push loaded its version; the budget kept two: the pinned one and the newest.
    let resident = metric(&server, "weft_model_resident_bytes{kind=\"resident\"}").await;
    assert!(
        resident <= (cost * 5 / 2) as f64,
        "{resident} over the budget"
    );
    assert!(metric(&server, "weft_model_evictions_total").await >= 2.0);
    let index = reasons(&server, &key).await;
    assert_eq!(index["p"], "", "pinned stays loaded: {index:?}");
    assert!(
        index["a"].contains("loads on its first request"),
        "{index:?}"
    );

    // An unloaded model answers its next request after loading again, the wait as queue time;
    // then it is loaded and waits no more.
    let loads_before = metric(&server, "weft_model_loads_total{result=\"ok\"}").await;
    assert!(queue_us(&server, &key, "a").await > 0);
    assert_eq!(queue_us(&server, &key, "a").await, 0);
    assert_eq!(
        metric(&server, "weft_model_loads_total{result=\"ok\"}").await,
        loads_before + 1.0
    );
    // Every model keeps answering, each in turn evicting another; the pinned one stays.
    for name in ["b", "c", "a", "b", "p", "c"] {
        let (status, body) = infer(&server, &key, name).await;
        assert_eq!(status, 200, "{name}: {body}");
    }
    assert_eq!(reasons(&server, &key).await["p"], "");

    // Triton's repository extension, in the tenant's namespace.
    let (status, body) = post(&server, &key, "/v2/repository/models/a/unload").await;
    assert_eq!(status, 200, "{body}");
    assert!(reasons(&server, &key).await["a"].contains("first request"));
    let (status, body) = post(&server, &key, "/v2/repository/models/a/load").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(reasons(&server, &key).await["a"], "");
    let (status, body) = post(&server, &key, "/v2/repository/models/p/unload").await;
    assert_eq!(status, 409, "{body}");
    assert!(body["error"].as_str().unwrap().contains("pinned"), "{body}");
    let (status, body) = post(&server, &key, "/v2/repository/models/mlp/unload").await;
    assert_eq!(status, 409, "{body}");
    for (caller, name) in [(&key, "nope"), (&other, "a")] {
        let (status, body) = post(
            &server,
            caller,
            &format!("/v2/repository/models/{name}/load"),
        )
        .await;
        assert_eq!(status, 404, "{body}");
        assert_eq!(
            body["error"],
            format!("Request for unknown model: '{name}' is not found")
        );
    }

    // A restart registers every stored model and loads none until asked.
    let data = server.crash();
    let server = Server::try_start_in(repo.path(), &["--model-memory-budget", &budget], data)
        .unwrap_or_else(|log| panic!("{log}"));
    assert_eq!(
        metric(&server, "weft_model_resident_bytes{kind=\"resident\"}").await,
        0.0
    );
    assert_eq!(
        metric(&server, "weft_model_loads_total{result=\"ok\"}").await,
        0.0
    );
    let index = reasons(&server, &key).await;
    for name in ["a", "b", "c", "p"] {
        assert!(index[name].contains("first request"), "{name}: {index:?}");
    }
    assert!(queue_us(&server, &key, "c").await > 0);
    let (status, body) = infer(&server, &key, "p").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        metric(&server, "weft_model_loads_total{result=\"ok\"}").await,
        2.0
    );
}
