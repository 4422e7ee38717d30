//! Every V2 endpoint over real HTTP: health, metadata, readiness, repository index, and
//! inference in JSON and with the binary tensor data extension.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::type_complexity)]

mod support;

use serde_json::json;
use support::*;

fn mlp_input(rows: usize) -> Vec<f32> {
    (0..rows * 64)
        .map(|i| (i % 64) as f32 / 64.0 + (i / 64) as f32)
        .collect()
}

#[tokio::test]
async fn health_and_server_metadata_answer() {
    let server = Server::start(Repo::standard().path());
    assert_eq!(
        get_json(&server.url("/v2/health/live")).await,
        (200, json!({"live": true}))
    );
    assert_eq!(
        get_json(&server.url("/v2/health/ready")).await,
        (200, json!({"ready": true}))
    );
    let (status, metadata) = get_json(&server.url("/v2")).await;
    assert_eq!(status, 200);
    assert_eq!(metadata["name"], "weft");
    assert!(
        metadata["extensions"]
            .as_array()
            .unwrap()
            .contains(&json!("binary_tensor_data"))
    );
}

#[tokio::test]
async fn model_metadata_reports_inputs_outputs_and_versions() {
    let server = Server::start(Repo::standard().path());
    let expected = json!({
        "name": "mlp",
        "versions": ["1"],
        "platform": "onnxruntime_onnx",
        "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 64]}],
        "outputs": [{"name": "y", "datatype": "FP32", "shape": [-1, 10]}],
    });
    assert_eq!(
        get_json(&server.url("/v2/models/mlp")).await,
        (200, expected.clone())
    );
    assert_eq!(
        get_json(&server.url("/v2/models/mlp/versions/1")).await,
        (200, expected)
    );
    let (status, labeler) = get_json(&server.url("/v2/models/labeler")).await;
    assert_eq!(status, 200);
    assert_eq!(
        labeler["outputs"][0],
        json!({"name": "labels", "datatype": "BYTES", "shape": [-1]})
    );
    let (status, body) = get_json(&server.url("/v2/models/mlp/versions/2")).await;
    assert_eq!(status, 404);
    assert_eq!(
        body["error"],
        "Request for unknown model: 'mlp' version 2 is not found"
    );
}

#[tokio::test]
async fn readiness_of_models_and_versions() {
    let server = Server::start(Repo::standard().path());
    assert_eq!(get_json(&server.url("/v2/models/mlp/ready")).await.0, 200);
    assert_eq!(
        get_json(&server.url("/v2/models/mlp/versions/1/ready"))
            .await
            .0,
        200
    );
    assert_eq!(get_json(&server.url("/v2/models/nope/ready")).await.0, 404);
    assert_eq!(
        get_json(&server.url("/v2/models/mlp/versions/9/ready"))
            .await
            .0,
        404
    );
}

#[tokio::test]
async fn broken_model_is_unavailable_with_its_reason_and_the_rest_serve() {
    let repo = Repo::standard()
        .with_file("models/broken/model.toml", b"platform = \"onnx\"\n")
        .with_file("models/broken/1/model.onnx", b"this is not a protobuf")
        .with_file(
            "models/badconfig/model.toml",
            b"platform = \"onnx\"\nmax_batch = 4\n",
        );
    let server = Server::start(repo.path());

    let (status, body) = get_json(&server.url("/v2/models/broken/ready")).await;
    assert_eq!(status, 503);
    assert!(
        body["error"]
            .as_str()
            .unwrap()
            .contains("not a valid ONNX model"),
        "{body}"
    );
    let (status, body) = get_json(&server.url("/v2/models/badconfig")).await;
    assert_eq!(status, 503);
    let message = body["error"].as_str().unwrap();
    assert!(
        message.contains("model.toml")
            && message.contains("line 2")
            && message.contains("max_batch"),
        "{message}"
    );

    let response = client()
        .post(server.url("/v2/repository/index"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let index: serde_json::Value = response.json().await.unwrap();
    let entry = |name: &str| {
        index
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["name"] == name)
            .cloned()
            .unwrap()
    };
    assert_eq!(
        entry("mlp"),
        json!({"name": "mlp", "version": "1", "state": "READY", "reason": ""})
    );
    assert_eq!(entry("broken")["state"], "UNAVAILABLE");
    assert!(
        entry("broken")["reason"]
            .as_str()
            .unwrap()
            .contains("not a valid ONNX model")
    );
    assert_eq!(entry("badconfig")["state"], "UNAVAILABLE");
    assert!(!server.log().is_empty() && server.log().contains("model unavailable"));

    let (status, ready_only) =
        post_json(&server.url("/v2/repository/index"), &json!({"ready": true})).await;
    assert_eq!(status, 200);
    assert!(
        ready_only
            .as_array()
            .unwrap()
            .iter()
            .all(|e| e["state"] == "READY")
    );

    let (status, _) = post_json(
        &server.url("/v2/models/mlp/infer"),
        &json!({"inputs": [{"name": "x", "shape": [1, 64], "datatype": "FP32", "data": mlp_input(1)}]}),
    )
    .await;
    assert_eq!(status, 200);
}

#[tokio::test]
async fn strict_mode_refuses_to_start_with_a_broken_model() {
    let repo = Repo::new()
        .with_model(&quickstart(), "mlp")
        .with_file("models/broken/model.toml", b"platform = \"onnx\"\n")
        .with_file("models/broken/1/model.onnx", b"garbage");
    let log = Server::try_start(repo.path(), &["--strict"])
        .err()
        .expect("--strict must refuse to start");
    assert!(
        log.contains("--strict: 1 model(s) or graph(s) failed to load") && log.contains("broken"),
        "{log}"
    );

    // A graph that cannot serve is a failure too.
    let repo = Repo::new()
        .with_model(&quickstart(), "mlp")
        .with_file("graphs/lost.toml", b"name = \"lost\"\nnodes = 3\n");
    let log = Server::try_start(repo.path(), &["--strict"])
        .err()
        .expect("--strict must refuse to start with a broken graph");
    assert!(
        log.contains("failed to load") && log.contains("lost.toml") && log.contains("nodes"),
        "{log}"
    );
}

#[tokio::test]
async fn missing_onnxruntime_library_exits_with_how_to_get_it() {
    let repo = Repo::new().with_model(&quickstart(), "mlp");
    for bogus in ["/nonexistent/libonnxruntime.so", "Cargo.toml"] {
        let log = Server::try_start(repo.path(), &["--ort-library", bogus])
            .err()
            .expect("must not start");
        assert!(log.contains("cargo xtask setup"), "{log}");
        assert!(!log.contains("panicked"), "{log}");
    }
}

#[tokio::test]
async fn json_infer_flat_and_nested_data_agree_and_echo_the_id() {
    let server = Server::start(Repo::standard().path());
    let input = mlp_input(2);
    let nested: Vec<Vec<f32>> = input.chunks(64).map(<[f32]>::to_vec).collect();
    let url = server.url("/v2/models/mlp/infer");
    let (status, flat) = post_json(
        &url,
        &json!({"id": "req-7", "parameters": {"anything": 1},
                "inputs": [{"name": "x", "shape": [2, 64], "datatype": "FP32", "data": input}]}),
    )
    .await;
    assert_eq!(status, 200, "{flat}");
    assert_eq!(flat["id"], "req-7");
    assert_eq!(flat["model_name"], "mlp");
    assert_eq!(flat["model_version"], "1");
    assert_eq!(flat["outputs"][0]["name"], "y");
    assert_eq!(flat["outputs"][0]["datatype"], "FP32");
    assert_eq!(flat["outputs"][0]["shape"], json!([2, 10]));
    assert_eq!(flat["outputs"][0]["data"].as_array().unwrap().len(), 20);
    let (_, nested) = post_json(
        &server.url("/v2/models/mlp/versions/1/infer"),
        &json!({"inputs": [{"name": "x", "shape": [2, 64], "datatype": "FP32", "data": nested}]}),
    )
    .await;
    assert_eq!(nested["outputs"], flat["outputs"]);
    assert!(nested.get("id").is_none());
}

#[tokio::test]
async fn binary_request_and_response_match_json() {
    let server = Server::start(Repo::standard().path());
    let url = server.url("/v2/models/mlp/infer");
    let input = mlp_input(3);
    let (_, json_reply) = post_json(
        &url,
        &json!({"inputs": [{"name": "x", "shape": [3, 64], "datatype": "FP32", "data": input}]}),
    )
    .await;
    let expected: Vec<f32> = json_reply["outputs"][0]["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap() as f32)
        .collect();

    let header = json!({
        "inputs": [{"name": "x", "shape": [3, 64], "datatype": "FP32", "parameters": {"binary_data_size": 3 * 64 * 4}}],
        "outputs": [{"name": "y", "parameters": {"binary_data": true}}],
    });
    let response = post_binary(&url, &header, &[&f32_bytes(&input)]).await;
    assert_eq!(response.status(), 200);
    assert_eq!(
        response.headers()["content-type"],
        "application/octet-stream"
    );
    let (reply, raw) = split_binary(response).await;
    assert_eq!(
        reply["outputs"][0]["parameters"]["binary_data_size"],
        3 * 10 * 4
    );
    assert!(reply["outputs"][0].get("data").is_none());
    assert_eq!(f32s(&raw), expected);

    // Binary request, JSON response; and binary_data_output for all outputs.
    let header = json!({"inputs": [{"name": "x", "shape": [3, 64], "datatype": "FP32", "parameters": {"binary_data_size": 768}}]});
    let response = post_binary(&url, &header, &[&f32_bytes(&input)]).await;
    assert_eq!(response.headers()["content-type"], "application/json");
    let reply: serde_json::Value = response.json().await.unwrap();
    assert_eq!(reply["outputs"], json_reply["outputs"]);
    let header = json!({"parameters": {"binary_data_output": true},
        "inputs": [{"name": "x", "shape": [3, 64], "datatype": "FP32", "data": input}]});
    let (_, raw) = split_binary(post_binary(&url, &header, &[]).await).await;
    assert_eq!(f32s(&raw), expected);
}

#[tokio::test]
async fn headerless_binary_body_is_the_single_input() {
    let server = Server::start(Repo::standard().path());
    let input = mlp_input(2);
    let response = client()
        .post(server.url("/v2/models/mlp/infer"))
        .header("Inference-Header-Content-Length", "0")
        .body(f32_bytes(&input))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let reply: serde_json::Value = response.json().await.unwrap();
    assert_eq!(reply["outputs"][0]["shape"], json!([2, 10]));
}

#[tokio::test]
async fn requested_outputs_subset_and_non_float_types() {
    let server = Server::start(Repo::standard().path());
    let url = server.url("/v2/models/labeler/infer");
    let request = json!({
        "inputs": [
            {"name": "class_ids", "shape": [4], "datatype": "INT64", "data": [0, 3, 9, 42]},
            {"name": "keep", "shape": [4], "datatype": "BOOL", "data": [true, false, true, false]},
        ],
        "outputs": [{"name": "labels"}],
    });
    let (status, reply) = post_json(&url, &request).await;
    assert_eq!(status, 200, "{reply}");
    assert_eq!(reply["outputs"].as_array().unwrap().len(), 1);
    assert_eq!(reply["outputs"][0]["datatype"], "BYTES");
    assert_eq!(
        reply["outputs"][0]["data"],
        json!(["zero", "three", "nine", "unknown"])
    );
    let mut all = request.clone();
    all.as_object_mut().unwrap().remove("outputs");
    let (_, reply) = post_json(&url, &all).await;
    assert_eq!(reply["outputs"][1]["name"], "dropped");
    assert_eq!(
        reply["outputs"][1]["data"],
        json!([false, true, false, true])
    );
}

#[tokio::test]
async fn model_config_answers_in_tritons_shape_for_models_batchers_and_graphs() {
    let onnx = std::fs::read(quickstart().join("models/mlp/1/model.onnx")).unwrap();
    let repo = Repo::standard()
        .with_file("models/batched/model.toml", BATCHED_MLP.as_bytes())
        .with_file("models/batched/1/model.onnx", &onnx)
        .with_file("graphs/g.toml", mlp_model_graph("g", 1).as_bytes());
    let server = Server::start(repo.path());
    let (_, metadata) = get_json(&server.url("/v2")).await;
    assert!(
        metadata["extensions"]
            .as_array()
            .unwrap()
            .contains(&json!("model_configuration")),
        "{metadata}"
    );

    // A plain model: dims without the batch dimension, its sessions as the instance group.
    let (status, config) = get_json(&server.url("/v2/models/mlp/config")).await;
    assert_eq!(status, 200, "{config}");
    assert_eq!(config["name"], "mlp");
    assert_eq!(config["platform"], "onnxruntime_onnx");
    assert_eq!(config["backend"], "onnxruntime");
    assert_eq!(config["max_batch_size"], 64);
    assert_eq!(
        config["input"],
        json!([{"name": "x", "data_type": "TYPE_FP32", "dims": [64]}])
    );
    assert_eq!(
        config["output"],
        json!([{"name": "y", "data_type": "TYPE_FP32", "dims": [10]}])
    );
    assert_eq!(config["instance_group"][0]["kind"], "KIND_CPU");
    assert!(config["instance_group"][0]["count"].as_u64().unwrap() >= 1);
    assert!(config.get("dynamic_batching").is_none(), "{config}");
    assert_eq!(
        get_json(&server.url("/v2/models/mlp/versions/1/config")).await,
        (200, config)
    );
    // BYTES is TYPE_STRING in Triton's names.
    let (_, labeler) = get_json(&server.url("/v2/models/labeler/config")).await;
    assert_eq!(
        labeler["output"][0]["data_type"], "TYPE_STRING",
        "{labeler}"
    );

    // Behind the dynamic batcher: its settings, one instance.
    let (status, batched) = get_json(&server.url("/v2/models/batched/config")).await;
    assert_eq!(status, 200, "{batched}");
    assert_eq!(batched["max_batch_size"], 16);
    assert_eq!(
        batched["dynamic_batching"],
        json!({"preferred_batch_size": [8, 16], "max_queue_delay_microseconds": 2000})
    );
    assert_eq!(
        batched["instance_group"],
        json!([{"name": "batched", "kind": "KIND_CPU", "count": 1}])
    );

    // A graph answers too: it does not batch, so its dims are whole.
    let (status, graph) = get_json(&server.url("/v2/models/g/config")).await;
    assert_eq!(status, 200, "{graph}");
    assert_eq!(graph["platform"], "weft_graph");
    assert_eq!(graph["max_batch_size"], 0);
    assert_eq!(
        graph["input"],
        json!([{"name": "x", "data_type": "TYPE_FP32", "dims": [-1, 64]}])
    );

    // Unknown names and versions in Triton's words.
    let (status, body) = get_json(&server.url("/v2/models/nope/config")).await;
    assert_eq!(status, 404);
    assert_eq!(
        body["error"],
        "Request for unknown model: 'nope' is not found"
    );
    let (status, body) = get_json(&server.url("/v2/models/mlp/versions/4/config")).await;
    assert_eq!(status, 404);
    assert_eq!(
        body["error"],
        "Request for unknown model: 'mlp' version 4 is not found"
    );
}
