//! The bad-input matrix: each malformed request gets a 4xx with a V2 error body naming the
//! problem, and the server keeps serving afterwards.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::type_complexity)]

mod support;

use serde_json::json;
use support::*;

/// Sends one raw request and returns (status, error message).
async fn refused(
    server: &Server,
    path: &str,
    header_length: Option<usize>,
    body: Vec<u8>,
) -> (u16, String) {
    let mut request = client().post(server.url(path)).body(body);
    if let Some(length) = header_length {
        request = request.header("Inference-Header-Content-Length", length.to_string());
    }
    let response = request.send().await.unwrap();
    let status = response.status().as_u16();
    let body: serde_json::Value = response.json().await.expect("error bodies are JSON");
    let message = body["error"]
        .as_str()
        .expect("error bodies have an \"error\" string")
        .to_string();
    (status, message)
}

fn json_body(value: serde_json::Value) -> Vec<u8> {
    serde_json::to_vec(&value).unwrap()
}

fn binary_body(header: serde_json::Value, tail: &[u8]) -> (Option<usize>, Vec<u8>) {
    let mut body = serde_json::to_vec(&header).unwrap();
    let length = body.len();
    body.extend_from_slice(tail);
    (Some(length), body)
}

#[tokio::test]
async fn bad_inputs_get_clear_4xx_errors_and_the_server_keeps_serving() {
    let server = Server::start_with(Repo::standard().path(), &["--max-request-bytes", "100000"]);
    let mlp = "/v2/models/mlp/infer";
    let x = |shape: serde_json::Value, datatype: &str, data: serde_json::Value| {
        json_body(
            json!({"inputs": [{"name": "x", "shape": shape, "datatype": datatype, "data": data}]}),
        )
    };
    let floats = |n: usize| json!(vec![0.5f32; n]);

    let mut cases: Vec<(&str, &str, Option<usize>, Vec<u8>, u16, &str)> = vec![
        (
            "malformed JSON",
            mlp,
            None,
            b"{\"inputs\": [".to_vec(),
            400,
            "malformed JSON",
        ),
        (
            "unknown model",
            "/v2/models/nope/infer",
            None,
            x(json!([1, 64]), "FP32", floats(64)),
            404,
            "Request for unknown model: 'nope' is not found",
        ),
        (
            "model name not UTF-8",
            "/v2/models/%FF/infer",
            None,
            x(json!([1, 64]), "FP32", floats(64)),
            400,
            "bad request path",
        ),
        (
            "unknown version",
            "/v2/models/mlp/versions/3/infer",
            None,
            x(json!([1, 64]), "FP32", floats(64)),
            404,
            "Request for unknown model: 'mlp' version 3 is not found",
        ),
        (
            "wrong datatype",
            mlp,
            None,
            x(json!([1, 64]), "FP64", floats(64)),
            400,
            "input 'x': expected datatype FP32 but got FP64",
        ),
        (
            "wrong rank",
            mlp,
            None,
            x(json!([64]), "FP32", floats(64)),
            400,
            "input 'x': expected shape [-1, 64] but got [64]",
        ),
        (
            "wrong fixed dim",
            mlp,
            None,
            x(json!([2, 32]), "FP32", floats(64)),
            400,
            "input 'x': expected shape [-1, 64] but got [2, 32]",
        ),
        (
            "data length mismatch",
            mlp,
            None,
            x(json!([2, 64]), "FP32", floats(100)),
            400,
            "'x'",
        ),
        (
            "unknown datatype",
            mlp,
            None,
            x(json!([1, 64]), "FLOAT", floats(64)),
            400,
            "FLOAT",
        ),
        (
            "missing input",
            mlp,
            None,
            json_body(json!({"inputs": []})),
            400,
            "missing input 'x'",
        ),
        (
            "unexpected input",
            mlp,
            None,
            json_body(json!({"inputs": [
            {"name": "x", "shape": [1, 64], "datatype": "FP32", "data": vec![0.5f32; 64]},
            {"name": "z", "shape": [1], "datatype": "FP32", "data": [1.0]}]})),
            400,
            "unexpected input 'z'",
        ),
        (
            "unknown output",
            mlp,
            None,
            json_body(json!({
            "inputs": [{"name": "x", "shape": [1, 64], "datatype": "FP32", "data": vec![0.5f32; 64]}],
            "outputs": [{"name": "nope"}]})),
            400,
            "unknown output 'nope'",
        ),
        (
            "batch over max_batch_size",
            mlp,
            None,
            x(json!([65, 64]), "FP32", floats(65 * 64)),
            400,
            "exceeds the model's max_batch_size 64",
        ),
        (
            "value out of range",
            "/v2/models/all_types/infer",
            None,
            json_body(json!({"inputs": [
            {"name": "in_uint8", "shape": [1, 3], "datatype": "UINT8", "data": [1, 300, 2]}]})),
            400,
            "in_uint8",
        ),
    ];

    let (length, body) = binary_body(
        json!({"inputs": [{"name": "x", "shape": [1, 64], "datatype": "FP32", "parameters": {"binary_data_size": 256}}]}),
        &[0u8; 100],
    );
    cases.push(("binary size past the body", mlp, length, body, 400, "'x'"));
    let (length, body) = binary_body(
        json!({"inputs": [{"name": "x", "shape": [1, 64], "datatype": "FP32", "parameters": {"binary_data_size": 256}}]}),
        &[],
    );
    cases.push(("missing binary part", mlp, length, body, 400, "'x'"));
    let header = json_body(json!({"inputs": []}));
    cases.push((
        "header length past the body",
        mlp,
        Some(header.len() + 50),
        header,
        400,
        "Inference-Header-Content-Length",
    ));
    let (length, body) = binary_body(
        json!({"inputs": [{"name": "x", "shape": [1, 64], "datatype": "FP32", "data": vec![0.5f32; 64]}]}),
        &[1, 2, 3, 4],
    );
    cases.push(("unclaimed binary bytes", mlp, length, body, 400, "4"));
    cases.push((
        "oversized body",
        mlp,
        None,
        vec![b' '; 200_000],
        413,
        "exceeds the limit of 100000 bytes",
    ));
    let mut bad_bytes = Vec::new();
    for element in [&b"ok"[..], &[0xff, 0xfe], b"fine"] {
        bad_bytes.extend_from_slice(&(element.len() as u32).to_le_bytes());
        bad_bytes.extend_from_slice(element);
    }
    let (length, body) = binary_body(
        json!({"inputs": [
            {"name": "text", "shape": [1, 3], "datatype": "BYTES", "parameters": {"binary_data_size": bad_bytes.len()}}]}),
        &bad_bytes,
    );
    cases.push((
        "non-UTF-8 BYTES for an ONNX string input",
        "/v2/models/strings/infer",
        length,
        body,
        400,
        "UTF-8",
    ));

    let mut raw_json =
        br#"{"inputs": [{"name": "text", "shape": [1, 3], "datatype": "BYTES", "data": ["a", "b", ""#
            .to_vec();
    raw_json.extend_from_slice(&[0xff, 0xfe]);
    raw_json.extend_from_slice(br#""]}]}"#);
    cases.push((
        "non-UTF-8 BYTES in a JSON body",
        "/v2/models/strings/infer",
        None,
        raw_json,
        400,
        "UTF-8",
    ));

    for (case, path, header_length, body, status, needle) in cases {
        let (got_status, message) = refused(&server, path, header_length, body).await;
        assert_eq!(got_status, status, "{case}: {message}");
        assert!(
            message.contains(needle),
            "{case}: '{message}' should mention '{needle}'"
        );
    }

    // Still serving.
    let (status, _) = post_json(
        &server.url(mlp),
        &json!({"inputs": [{"name": "x", "shape": [1, 64], "datatype": "FP32", "data": vec![0.5f32; 64]}]}),
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(get_json(&server.url("/v2/nope")).await.0, 404);
}
