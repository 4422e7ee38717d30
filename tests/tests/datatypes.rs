//! Every Open Inference Protocol datatype round-trips bit-exactly through an ONNX identity model,
//! in JSON and in the binary extension, and a mixed-type model computes across types.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::type_complexity)]

mod support;

use serde_json::{Value, json};
use support::*;

/// (datatype, JSON values, their little-endian bytes) with extremes for each type.
fn samples() -> Vec<(&'static str, Value, Vec<u8>)> {
    let le = |parts: Vec<Vec<u8>>| parts.concat();
    let f16 = |v: f32| half::f16::from_f32(v).to_le_bytes().to_vec();
    let bf16 = |v: f32| half::bf16::from_f32(v).to_le_bytes().to_vec();
    let bytes_element = |s: &str| {
        let mut out = (s.len() as u32).to_le_bytes().to_vec();
        out.extend_from_slice(s.as_bytes());
        out
    };
    vec![
        ("BOOL", json!([true, false, true]), vec![1, 0, 1]),
        ("UINT8", json!([0, 255, 7]), vec![0, 255, 7]),
        (
            "UINT16",
            json!([0, 65535, 7]),
            le(vec![
                0u16.to_le_bytes().into(),
                65535u16.to_le_bytes().into(),
                7u16.to_le_bytes().into(),
            ]),
        ),
        (
            "UINT32",
            json!([0, 4294967295u32, 7]),
            le(vec![
                0u32.to_le_bytes().into(),
                u32::MAX.to_le_bytes().into(),
                7u32.to_le_bytes().into(),
            ]),
        ),
        (
            "UINT64",
            json!([0, u64::MAX, 7]),
            le(vec![
                0u64.to_le_bytes().into(),
                u64::MAX.to_le_bytes().into(),
                7u64.to_le_bytes().into(),
            ]),
        ),
        ("INT8", json!([-128, 127, 0]), vec![0x80, 0x7f, 0]),
        (
            "INT16",
            json!([-32768, 32767, -1]),
            le(vec![
                i16::MIN.to_le_bytes().into(),
                i16::MAX.to_le_bytes().into(),
                (-1i16).to_le_bytes().into(),
            ]),
        ),
        (
            "INT32",
            json!([i32::MIN, i32::MAX, -1]),
            le(vec![
                i32::MIN.to_le_bytes().into(),
                i32::MAX.to_le_bytes().into(),
                (-1i32).to_le_bytes().into(),
            ]),
        ),
        (
            "INT64",
            json!([i64::MIN, i64::MAX, -1]),
            le(vec![
                i64::MIN.to_le_bytes().into(),
                i64::MAX.to_le_bytes().into(),
                (-1i64).to_le_bytes().into(),
            ]),
        ),
        (
            "FP16",
            json!([1.5, -0.25, 65504.0]),
            le(vec![f16(1.5), f16(-0.25), f16(65504.0)]),
        ),
        (
            "BF16",
            json!([1.5, -0.25, 3.0]),
            le(vec![bf16(1.5), bf16(-0.25), bf16(3.0)]),
        ),
        (
            "FP32",
            json!([1.5, -0.25, 3.4028234663852886e38]),
            le(vec![
                1.5f32.to_le_bytes().into(),
                (-0.25f32).to_le_bytes().into(),
                f32::MAX.to_le_bytes().into(),
            ]),
        ),
        (
            "FP64",
            json!([1.5, -0.25, 1e300]),
            le(vec![
                1.5f64.to_le_bytes().into(),
                (-0.25f64).to_le_bytes().into(),
                1e300f64.to_le_bytes().into(),
            ]),
        ),
        // ONNX string tensors are C strings inside ONNX Runtime, so no NUL bytes here.
        (
            "BYTES",
            json!(["", "héllo", "tab\tnew\nline"]),
            le(vec![
                bytes_element(""),
                bytes_element("héllo"),
                bytes_element("tab\tnew\nline"),
            ]),
        ),
    ]
}

#[tokio::test]
async fn every_datatype_round_trips_in_json() {
    let server = Server::start(Repo::standard().path());
    let url = server.url("/v2/models/all_types/infer");
    let samples = samples();
    let inputs: Vec<Value> = samples
        .iter()
        .map(|(dt, data, _)| json!({"name": format!("in_{}", dt.to_lowercase()), "shape": [1, 3], "datatype": dt, "data": data}))
        .collect();
    let (status, reply) = post_json(&url, &json!({"inputs": inputs})).await;
    assert_eq!(status, 200, "{reply}");
    for (datatype, data, _) in &samples {
        let name = format!("out_{}", datatype.to_lowercase());
        let output = reply["outputs"]
            .as_array()
            .unwrap()
            .iter()
            .find(|o| o["name"] == name.as_str())
            .unwrap();
        assert_eq!(output["datatype"], *datatype, "{name}");
        assert_eq!(output["shape"], json!([1, 3]), "{name}");
        if *datatype == "FP32" {
            // JSON carries the shortest text that round-trips the f32, so compare as f32.
            let as_f32 = |v: &Value| {
                v.as_array()
                    .unwrap()
                    .iter()
                    .map(|x| x.as_f64().unwrap() as f32)
                    .collect::<Vec<_>>()
            };
            assert_eq!(as_f32(&output["data"]), as_f32(data), "{name}");
        } else {
            assert_eq!(&output["data"], data, "{name}");
        }
    }
}

#[tokio::test]
async fn every_datatype_round_trips_bit_exactly_in_binary() {
    let server = Server::start(Repo::standard().path());
    let url = server.url("/v2/models/all_types/infer");
    let samples = samples();
    let inputs: Vec<Value> = samples
        .iter()
        .map(|(dt, _, bytes)| {
            json!({"name": format!("in_{}", dt.to_lowercase()), "shape": [1, 3], "datatype": dt,
                   "parameters": {"binary_data_size": bytes.len()}})
        })
        .collect();
    let header = json!({"inputs": inputs, "parameters": {"binary_data_output": true}});
    let tensors: Vec<&[u8]> = samples
        .iter()
        .map(|(_, _, bytes)| bytes.as_slice())
        .collect();
    let response = post_binary(&url, &header, &tensors).await;
    assert_eq!(response.status(), 200);
    let (reply, raw) = split_binary(response).await;
    let mut offset = 0;
    for output in reply["outputs"].as_array().unwrap() {
        let size = output["parameters"]["binary_data_size"].as_u64().unwrap() as usize;
        let datatype = output["datatype"].as_str().unwrap();
        let (_, _, expected) = samples.iter().find(|(dt, _, _)| *dt == datatype).unwrap();
        assert_eq!(
            &raw[offset..offset + size],
            expected.as_slice(),
            "{datatype}"
        );
        offset += size;
    }
    assert_eq!(offset, raw.len());
    assert_eq!(reply["outputs"].as_array().unwrap().len(), 14);
}

#[tokio::test]
async fn mixed_type_model_computes_across_types() {
    let server = Server::start(Repo::standard().path());
    let (status, reply) = post_json(
        &server.url("/v2/models/cast_add/infer"),
        &json!({"inputs": [
            {"name": "a", "shape": [3], "datatype": "INT32", "data": [-2, 0, 5]},
            {"name": "b", "shape": [3], "datatype": "FP16", "data": [0.5, 1.25, -1.0]},
        ]}),
    )
    .await;
    assert_eq!(status, 200, "{reply}");
    let output = |name: &str| {
        reply["outputs"]
            .as_array()
            .unwrap()
            .iter()
            .find(|o| o["name"] == name)
            .unwrap()["data"]
            .clone()
    };
    assert_eq!(output("sum_fp64"), json!([-1.5, 1.25, 4.0]));
    assert_eq!(output("a_is_positive"), json!([false, false, true]));
}
