//! GPU models where there is no GPU (CI): a model that asks for CUDA is UNAVAILABLE with the
//! reason, never served on the CPU instead; the server goes on serving CPU models; no
//! `nv_gpu_*` series are made up; a tenant needs a `gpu_memory_mb` quota to push a GPU model,
//! and with one its push is refused because tenants' models run in a sandboxed worker, which
//! grants no GPU yet. The device checks that need a GPU
//! are `cargo xtask gpu-check` (BENCHMARKS.md).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use serde_json::{Value, json};
use support::tenants::*;
use support::*;

const CUDA: &str = "platform = \"onnx\"\nmax_batch_size = 64\n[ort]\nexecution = \"cuda\"\n";

async fn index(server: &Server) -> Vec<Value> {
    let (status, body) = send(client().post(server.url("/v2/repository/index")).body("")).await;
    assert_eq!(status, 200, "{body}");
    body.as_array().unwrap().clone()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_cuda_model_without_a_gpu_is_unavailable_with_the_reason_and_cpu_models_serve() {
    let onnx = mlp_onnx();
    let repo = Repo::new()
        .with_model(&quickstart(), "mlp")
        .with_file("models/mlp_gpu/model.toml", CUDA.as_bytes())
        .with_file("models/mlp_gpu/1/model.onnx", &onnx)
        .with_file(
            "models/mlp_gpu_worker/model.toml",
            format!("isolation = \"process\"\n{CUDA}").as_bytes(),
        )
        .with_file("models/mlp_gpu_worker/1/model.onnx", &onnx)
        .with_file(
            "models/mlp_cpu_device/model.toml",
            b"platform = \"onnx\"\n[ort]\ndevice = 1\n",
        )
        .with_file("models/mlp_cpu_device/1/model.onnx", &onnx);
    let server = Server::start_with(repo.path(), &[]);
    let entries = index(&server).await;
    let entry = |name: &str| entries.iter().find(|e| e["name"] == name).unwrap().clone();
    assert_eq!(entry("mlp")["state"], "READY");
    let gpu = entry("mlp_gpu");
    assert_eq!(gpu["state"], "UNAVAILABLE", "{gpu}");
    let reason = gpu["reason"].as_str().unwrap();
    assert!(
        reason.contains("execution = \"cuda\" cannot run here")
            && reason.contains("no NVIDIA driver"),
        "{reason}"
    );
    // The same reason on the model's own routes, and no answer computed on the CPU.
    let (status, body) = infer_json(&server, "mlp_gpu").await;
    assert_eq!(status, 503, "{body}");
    assert!(
        body["error"].as_str().unwrap().contains("no NVIDIA driver"),
        "{body}"
    );
    let (status, _) = send(client().get(server.url("/v2/models/mlp_gpu/ready"))).await;
    assert_ne!(status, 200);
    // A GPU model may not go into a sandboxed model worker (which grants no GPU), and says so.
    let in_worker = entry("mlp_gpu_worker");
    assert_eq!(in_worker["state"], "UNAVAILABLE", "{in_worker}");
    assert!(
        in_worker["reason"]
            .as_str()
            .unwrap()
            .contains("cannot run in a sandboxed model worker yet"),
        "{in_worker}"
    );
    // A device without execution = "cuda" is a configuration error, named as such.
    let misconfigured = entry("mlp_cpu_device");
    assert_eq!(misconfigured["state"], "UNAVAILABLE");
    assert!(
        misconfigured["reason"]
            .as_str()
            .unwrap()
            .contains("needs execution = \"cuda\""),
        "{misconfigured}"
    );
    // CPU models serve beside them.
    let (status, body) = infer_json(&server, "mlp").await;
    assert_eq!(status, 200, "{body}");
    // No GPU, no GPU series (made-up zeros would read as an idle GPU).
    let metrics = reqwest::get(server.url("/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(!metrics.contains("nv_gpu_"), "{metrics}");
    assert!(server.log().contains("no GPU"), "{}", server.log());

    // Tenants: no GPU models without a quota for them; with one, the push's load is refused
    // with the reason (nothing is stored).
    let key = create_tenant(&server, "acme", json!({})).await;
    let (status, body) = push_model(&server, &key, "g", 1, CUDA, &onnx).await;
    assert_eq!(status, 403, "{body}");
    assert!(
        body["error"]
            .as_str()
            .unwrap()
            .contains("gpu_memory_mb quota is 0"),
        "{body}"
    );
    let allowed = create_tenant(&server, "bolt", json!({"quotas": {"gpu_memory_mb": 1024}})).await;
    let (status, body) = push_model(&server, &allowed, "g", 1, CUDA, &onnx).await;
    assert_eq!(status, 503, "{body}");
    assert!(
        body["error"]
            .as_str()
            .unwrap()
            .contains("cannot run in a sandboxed model worker yet"),
        "{body}"
    );
    let (status, body) = send(client_with_key(&allowed).get(server.url("/api/v1/models"))).await;
    assert_eq!(status, 200, "{body}");
    assert!(!body.to_string().contains("\"g\""), "{body}");
}

async fn infer_json(server: &Server, model: &str) -> (u16, Value) {
    send(
        client()
            .post(server.url(&format!("/v2/models/{model}/infer")))
            .json(&row()),
    )
    .await
}
