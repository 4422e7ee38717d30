//! Codec tests on byte strings: round trips for every datatype, and each malformed-body error.

use bytes::Bytes;
use serde_json::{Value, json};
use weft_core::{DataType, NamedTensor, Tensor, encode_bytes_elements};

use crate::*;

fn decode_json(value: Value) -> weft_core::Result<InferRequest> {
    decode_infer_request(Bytes::from(serde_json::to_vec(&value).unwrap()), None)
}

fn error_of(result: weft_core::Result<InferRequest>) -> String {
    result.err().map(|e| e.to_string()).unwrap_or_default()
}

fn binary(header: Value, tail: &[u8]) -> (Bytes, usize) {
    let mut body = serde_json::to_vec(&header).unwrap();
    let length = body.len();
    body.extend_from_slice(tail);
    (Bytes::from(body), length)
}

fn samples() -> Vec<(DataType, Value)> {
    vec![
        (DataType::Bool, json!([true, false])),
        (DataType::Uint8, json!([0, 255])),
        (DataType::Uint16, json!([0, 65535])),
        (DataType::Uint32, json!([0, u32::MAX])),
        (DataType::Uint64, json!([0, u64::MAX])),
        (DataType::Int8, json!([-128, 127])),
        (DataType::Int16, json!([-32768, 32767])),
        (DataType::Int32, json!([i32::MIN, i32::MAX])),
        (DataType::Int64, json!([i64::MIN, i64::MAX])),
        (DataType::Fp16, json!([1.5, -0.25])),
        (DataType::Bf16, json!([1.5, -0.25])),
        (DataType::Fp32, json!([1.5, -0.25])),
        (DataType::Fp64, json!([1.5, -0.25])),
        (DataType::Bytes, json!(["", "héllo ✓"])),
    ]
}

fn response_of(tensors: Vec<NamedTensor>, binary: bool) -> EncodedResponse {
    let outputs = tensors
        .into_iter()
        .map(|tensor| ResponseOutput {
            tensor,
            binary,
            parameters: Parameters::new(),
        })
        .collect();
    let response = InferResponse {
        model_name: "m".into(),
        model_version: Some("1".into()),
        id: Some("x".into()),
        parameters: Parameters::new(),
        outputs,
    };
    encode_infer_response(&response).unwrap()
}

#[test]
fn every_datatype_round_trips_through_json() {
    for (datatype, data) in samples() {
        let request = decode_json(json!({"inputs": [{"name": "t", "shape": [2], "datatype": datatype.as_str(), "data": data}]})).unwrap();
        let tensor = request.inputs[0].tensor.clone();
        let encoded = response_of(vec![tensor], false);
        assert_eq!(encoded.json_header_length, None);
        let reply: Value = serde_json::from_slice(&encoded.body).unwrap();
        assert_eq!(reply["outputs"][0]["data"], data, "{datatype}");
        assert_eq!(reply["outputs"][0]["datatype"], datatype.as_str());
        assert_eq!(reply["id"], "x");
    }
}

#[test]
fn every_datatype_round_trips_through_binary() {
    for (datatype, data) in samples() {
        let from_json = decode_json(json!({"inputs": [{"name": "t", "shape": [2], "datatype": datatype.as_str(), "data": data}]})).unwrap();
        let raw = from_json.inputs[0].tensor.tensor.data().clone();
        let (body, length) = binary(
            json!({"inputs": [{"name": "t", "shape": [2], "datatype": datatype.as_str(), "parameters": {"binary_data_size": raw.len()}}]}),
            &raw,
        );
        let request = decode_infer_request(body, Some(length)).unwrap();
        assert_eq!(
            request.inputs[0].tensor, from_json.inputs[0].tensor,
            "{datatype}"
        );
        let encoded = response_of(vec![request.inputs[0].tensor.clone()], true);
        let header_length = encoded.json_header_length.unwrap();
        let header: Value = serde_json::from_slice(&encoded.body[..header_length]).unwrap();
        assert_eq!(
            header["outputs"][0]["parameters"]["binary_data_size"],
            raw.len()
        );
        assert!(header["outputs"][0].get("data").is_none());
        assert_eq!(&encoded.body[header_length..], &raw[..], "{datatype}");
    }
}

#[test]
fn nested_data_equals_flat_data() {
    let flat = decode_json(json!({"inputs": [{"name": "t", "shape": [2, 2], "datatype": "INT32", "data": [1, 2, 3, 4]}]})).unwrap();
    let nested = decode_json(json!({"inputs": [{"name": "t", "shape": [2, 2], "datatype": "INT32", "data": [[1, 2], [3, 4]]}]})).unwrap();
    assert_eq!(flat.inputs[0].tensor, nested.inputs[0].tensor);
}

#[test]
fn binary_input_is_a_slice_of_the_body() {
    let (body, length) = binary(
        json!({"inputs": [{"name": "t", "shape": [2], "datatype": "FP32", "parameters": {"binary_data_size": 8}}]}),
        &[0u8; 8],
    );
    let start = body.as_ptr() as usize + length;
    let request = decode_infer_request(body, Some(length)).unwrap();
    assert_eq!(
        request.inputs[0].tensor.tensor.data().as_ptr() as usize,
        start
    );
}

#[test]
fn mixed_json_and_binary_inputs() {
    let (body, length) = binary(
        json!({"id": "m", "inputs": [
            {"name": "a", "shape": [1], "datatype": "INT64", "data": [7]},
            {"name": "b", "shape": [1], "datatype": "UINT8", "parameters": {"binary_data_size": 1}},
        ], "outputs": [{"name": "y", "parameters": {"binary_data": true}}], "parameters": {"binary_data_output": true}}),
        &[9],
    );
    let request = decode_infer_request(body, Some(length)).unwrap();
    assert_eq!(request.id.as_deref(), Some("m"));
    assert_eq!(
        &request.inputs[0].tensor.tensor.data()[..],
        &7i64.to_le_bytes()
    );
    assert_eq!(&request.inputs[1].tensor.tensor.data()[..], &[9]);
    assert_eq!(request.outputs[0].binary_data, Some(true));
    assert!(request.binary_output_default());
}

#[test]
fn zero_header_length_means_raw_single_input() {
    let request = decode_infer_request(Bytes::from_static(&[1, 2, 3, 4]), Some(0)).unwrap();
    assert_eq!(
        request.raw_single_input.as_deref(),
        Some(&[1u8, 2, 3, 4][..])
    );
    assert!(request.inputs.is_empty());
}

#[test]
fn malformed_bodies_are_named() {
    let cases: Vec<(weft_core::Result<InferRequest>, &str)> = vec![
        (
            decode_infer_request(Bytes::from_static(b"{\"inputs\": ["), None),
            "malformed JSON in request",
        ),
        (
            decode_infer_request(Bytes::from_static(b"{}"), Some(50)),
            "Inference-Header-Content-Length 50 exceeds the body's 2 bytes",
        ),
        (
            decode_json(
                json!({"inputs": [{"name": "t", "shape": [3], "datatype": "FP32", "data": [1.0]}]}),
            ),
            "input 't': shape needs 3 elements but data has 1",
        ),
        (
            decode_json(
                json!({"inputs": [{"name": "t", "shape": [1], "datatype": "UINT8", "data": [300]}]}),
            ),
            "input 't': element 0 (300) is not a valid UINT8 value",
        ),
        (
            decode_json(
                json!({"inputs": [{"name": "t", "shape": [1], "datatype": "INT32", "data": [1.5]}]}),
            ),
            "element 0 (1.5) is not a valid INT32",
        ),
        (
            decode_json(
                json!({"inputs": [{"name": "t", "shape": [1], "datatype": "BOOL", "data": [1]}]}),
            ),
            "not a valid BOOL",
        ),
        (
            decode_json(
                json!({"inputs": [{"name": "t", "shape": [-1], "datatype": "FP32", "data": []}]}),
            ),
            "negative dimension",
        ),
        (
            decode_json(
                json!({"inputs": [{"name": "t", "shape": [1], "datatype": "FLOAT", "data": [1]}]}),
            ),
            "input 't': unknown datatype 'FLOAT'",
        ),
        (
            decode_json(json!({"inputs": [{"name": "t", "shape": [1], "datatype": "FP32"}]})),
            "input 't' has neither data nor binary_data_size",
        ),
        (
            decode_json(
                json!({"inputs": [{"name": "t", "shape": [1], "datatype": "FP32", "parameters": {"binary_data_size": 4}}]}),
            ),
            "no Inference-Header-Content-Length",
        ),
        (
            decode_json(
                json!({"inputs": [{"name": "t", "shape": [1], "datatype": "FP32", "data": [1], "parameters": {"binary_data_size": 4}}]}),
            ),
            "has both data and binary_data_size",
        ),
    ];
    for (result, needle) in cases {
        let message = error_of(result);
        assert!(
            message.contains(needle),
            "'{message}' should contain '{needle}'"
        );
    }
    let (body, length) = binary(
        json!({"inputs": [{"name": "t", "shape": [2], "datatype": "FP32", "parameters": {"binary_data_size": 8}}]}),
        &[0; 4],
    );
    assert!(
        error_of(decode_infer_request(body, Some(length)))
            .contains("input 't': binary_data_size 8 reaches past the end")
    );
    let (body, length) = binary(
        json!({"inputs": [{"name": "t", "shape": [1], "datatype": "FP32", "parameters": {"binary_data_size": 4}}]}),
        &[0; 6],
    );
    assert!(error_of(decode_infer_request(body, Some(length))).contains("2 bytes of binary data"));
    let (body, length) = binary(
        json!({"inputs": [{"name": "t", "shape": [2], "datatype": "FP32", "parameters": {"binary_data_size": 4}}]}),
        &[0; 4],
    );
    assert!(
        error_of(decode_infer_request(body, Some(length)))
            .contains("input 't': shape [2] of FP32 needs 8 bytes but 4 came")
    );
}

#[test]
fn non_utf8_bytes_output_in_json_is_an_error_that_suggests_binary() {
    let data = encode_bytes_elements([&[0xffu8, 0xfe][..]]).unwrap();
    let tensor = NamedTensor::new(
        "y",
        Tensor::new(DataType::Bytes, vec![1], Bytes::from(data)).unwrap(),
    );
    let response = InferResponse {
        model_name: "m".into(),
        model_version: None,
        id: None,
        parameters: Parameters::new(),
        outputs: vec![ResponseOutput {
            tensor: tensor.clone(),
            binary: false,
            parameters: Parameters::new(),
        }],
    };
    let message = encode_infer_response(&response).err().unwrap().to_string();
    assert!(
        message.contains("output 'y' element 0") && message.contains("binary_data: true"),
        "{message}"
    );
    assert!(response_of(vec![tensor], true).json_header_length.is_some());
}

#[test]
fn non_finite_floats_become_null_in_json() {
    let data: Vec<u8> = [f32::NAN, 1.0]
        .iter()
        .flat_map(|v| v.to_le_bytes())
        .collect();
    let tensor = NamedTensor::new(
        "y",
        Tensor::new(DataType::Fp32, vec![2], Bytes::from(data)).unwrap(),
    );
    let reply: Value = serde_json::from_slice(&response_of(vec![tensor], false).body).unwrap();
    assert_eq!(reply["outputs"][0]["data"], json!([null, 1.0]));
}

#[test]
fn encoded_requests_decode_back() {
    let tensor = NamedTensor::new(
        "x",
        Tensor::new(DataType::Int16, vec![2], Bytes::from_static(&[1, 0, 2, 0])).unwrap(),
    );
    let inputs = vec![RequestInput {
        tensor: tensor.clone(),
        parameters: Parameters::new(),
    }];
    for binary in [false, true] {
        let (body, length) = encode_infer_request(&inputs, binary).unwrap();
        let request = decode_infer_request(Bytes::from(body), length).unwrap();
        assert_eq!(request.inputs[0].tensor, tensor);
        assert_eq!(request.binary_output_default(), binary);
    }
}
