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

/// Decodes `data` as one input of `datatype`, encodes it back as a JSON output, and returns the
/// decoded bytes and the re-encoded `data`.
fn json_round_trip(datatype: DataType, data: Value) -> (Bytes, Value) {
    let count = data.as_array().map_or(1, Vec::len);
    let request = decode_json(json!({"inputs": [{"name": "t", "shape": [count], "datatype": datatype.as_str(), "data": data}]})).unwrap();
    let tensor = request.inputs[0].tensor.clone();
    let bytes = tensor.tensor.data().clone();
    let reply: Value = serde_json::from_slice(&response_of(vec![tensor], false).body).unwrap();
    (bytes, reply["outputs"][0]["data"].clone())
}

#[test]
fn floats_round_trip_bit_exactly_through_json_text() {
    let f64s = [
        0.1,
        1e-300,
        5e-324,
        f64::MAX,
        f64::MIN_POSITIVE,
        -2.2250738585072014e-308,
        1.0 / 3.0,
    ];
    let bits: Vec<u8> = f64s.iter().flat_map(|v| v.to_le_bytes()).collect();
    let (decoded, reply) = json_round_trip(DataType::Fp64, json!(f64s));
    assert_eq!(&decoded[..], &bits[..]);
    assert_eq!(json_round_trip(DataType::Fp64, reply).0, decoded);

    let f32s = [
        0.1f32,
        f32::MAX,
        f32::MIN_POSITIVE,
        1e-45,
        16_777_217.0,
        1.0 / 3.0,
    ];
    let bits: Vec<u8> = f32s.iter().flat_map(|v| v.to_le_bytes()).collect();
    let (decoded, reply) = json_round_trip(DataType::Fp32, json!(f32s));
    assert_eq!(&decoded[..], &bits[..]);
    assert_eq!(json_round_trip(DataType::Fp32, reply).0, decoded);

    // Every finite FP16 and BF16 value survives encode -> JSON text -> decode.
    for datatype in [DataType::Fp16, DataType::Bf16] {
        let raw: Vec<u8> = (0..=u16::MAX)
            .filter(|&bits| match datatype {
                DataType::Fp16 => half::f16::from_bits(bits).is_finite(),
                _ => half::bf16::from_bits(bits).is_finite(),
            })
            .flat_map(u16::to_le_bytes)
            .collect();
        let tensor = NamedTensor::new(
            "t",
            Tensor::new(datatype, vec![raw.len() / 2], Bytes::from(raw.clone())).unwrap(),
        );
        let reply: Value = serde_json::from_slice(&response_of(vec![tensor], false).body).unwrap();
        let (decoded, _) = json_round_trip(datatype, reply["outputs"][0]["data"].clone());
        assert!(decoded[..] == raw[..], "{datatype}");
    }
}

#[test]
fn half_precision_values_are_written_short() {
    let (_, reply) = json_round_trip(DataType::Fp16, json!([0.1, 1.5]));
    let text = reply.to_string();
    assert!(text.len() < 20, "{text}");
}

#[test]
fn finite_numbers_that_overflow_a_narrow_float_are_refused() {
    for (datatype, value) in [
        (DataType::Fp16, 70000.0),
        (DataType::Bf16, 1e39),
        (DataType::Fp32, 1e39),
    ] {
        let message = error_of(decode_json(
            json!({"inputs": [{"name": "t", "shape": [1], "datatype": datatype.as_str(), "data": [value]}]}),
        ));
        assert!(
            message.contains(&format!(
                "element 0 ({}) is not a valid {datatype}",
                json!(value)
            )),
            "{message}"
        );
    }
}

#[test]
fn integer_ranges_are_checked_per_type() {
    let cases = [
        (DataType::Int8, json!(128)),
        (DataType::Int8, json!(-129)),
        (DataType::Uint16, json!(-1)),
        (DataType::Int64, json!(u64::MAX)),
        (DataType::Uint64, json!(-1)),
        (DataType::Uint32, json!(1u64 << 32)),
    ];
    for (datatype, value) in cases {
        let message = error_of(decode_json(
            json!({"inputs": [{"name": "t", "shape": [2], "datatype": datatype.as_str(), "data": [0, value]}]}),
        ));
        assert_eq!(
            message,
            format!("input 't': element 1 ({value}) is not a valid {datatype} value")
        );
    }
}

#[test]
fn bytes_json_round_trip_keeps_unicode() {
    let strings = json!(["héllo", "日本語", "🦀", "", "tab\tquote\""]);
    let (decoded, reply) = json_round_trip(DataType::Bytes, strings.clone());
    assert_eq!(reply, strings);
    let elements: Vec<&[u8]> = weft_core::bytes_elements(&decoded).unwrap().collect();
    assert_eq!(elements[2], "🦀".as_bytes());
}

#[test]
fn nested_data_with_the_wrong_count_names_both_counts() {
    let message = error_of(decode_json(
        json!({"inputs": [{"name": "t", "shape": [2, 2], "datatype": "FP32", "data": [[1, 2], [3]]}]}),
    ));
    assert_eq!(message, "input 't': shape needs 4 elements but data has 3");
}

#[test]
fn json_that_is_not_utf8_or_has_wrong_types_is_invalid_argument() {
    let mut body = br#"{"inputs": [{"name": ""#.to_vec();
    body.extend_from_slice(&[0xff, 0xfe]);
    body.extend_from_slice(br#"", "shape": [1], "datatype": "BYTES", "data": ["a"]}]}"#);
    let error = decode_infer_request(Bytes::from(body), None).err().unwrap();
    assert_eq!(error.kind(), weft_core::ErrorKind::InvalidArgument);
    assert!(error.message().contains("not valid UTF-8"), "{error}");

    let error = decode_json(
        json!({"inputs": [{"name": "t", "shape": "2", "datatype": "FP32", "data": [1]}]}),
    )
    .err()
    .unwrap();
    assert_eq!(error.kind(), weft_core::ErrorKind::InvalidArgument);
    assert!(
        error
            .message()
            .starts_with("malformed JSON in request: invalid type: string \"2\"")
            && error.message().contains("line 1 column"),
        "{error}"
    );
    assert!(error_of(decode_json(json!({"id": "x"}))).contains("missing field `inputs`"));
    let message = error_of(decode_json(
        json!({"inputs": [], "outputs": [{"name": "y", "parameters": {"binary_data": "yes"}}]}),
    ));
    assert!(
        message.contains("output 'y': parameter binary_data must be true or false"),
        "{message}"
    );
}

#[test]
fn unknown_keys_and_null_optionals_are_accepted() {
    let request = decode_json(json!({
        "id": null, "parameters": null, "outputs": null, "extra": {"anything": 1},
        "inputs": [{"name": "t", "shape": [1], "datatype": "INT8", "parameters": null, "data": [-1], "extra": 2}]
    }))
    .unwrap();
    assert!(request.id.is_none() && request.outputs.is_empty() && !request.binary_output_default());
    assert_eq!(&request.inputs[0].tensor.tensor.data()[..], &[0xff]);
}

#[test]
fn requested_outputs_keep_their_parameters() {
    let request = decode_json(json!({"inputs": [], "outputs": [
        {"name": "a", "parameters": {"binary_data": false, "classification": 3}},
        {"name": "b"},
    ]}))
    .unwrap();
    assert_eq!(request.outputs[0].binary_data, Some(false));
    assert_eq!(request.outputs[0].parameters["classification"], 3);
    assert_eq!(request.outputs[1].name, "b");
    assert_eq!(request.outputs[1].binary_data, None);
}

#[test]
fn header_length_exceeding_the_body_gives_the_exact_message() {
    let error = decode_infer_request(Bytes::from(vec![b' '; 120]), Some(500))
        .err()
        .unwrap();
    assert_eq!(error.kind(), weft_core::ErrorKind::InvalidArgument);
    assert_eq!(
        error.message(),
        "Inference-Header-Content-Length 500 exceeds the body's 120 bytes"
    );
}

#[test]
fn binary_inputs_take_their_bytes_in_input_order() {
    let (body, length) = binary(
        json!({"inputs": [
            {"name": "a", "shape": [2], "datatype": "UINT8", "parameters": {"binary_data_size": 2}},
            {"name": "j", "shape": [1], "datatype": "BOOL", "data": [[true]]},
            {"name": "b", "shape": [1], "datatype": "UINT16", "parameters": {"binary_data_size": 2}},
        ]}),
        &[1, 2, 3, 4],
    );
    let request = decode_infer_request(body, Some(length)).unwrap();
    let data: Vec<&[u8]> = request
        .inputs
        .iter()
        .map(|i| &i.tensor.tensor.data()[..])
        .collect();
    assert_eq!(data, [&[1u8, 2][..], &[1], &[3, 4]]);
    assert_eq!(request.inputs[0].parameters["binary_data_size"], 2);
}

#[test]
fn response_mixes_json_and_binary_outputs_in_order() {
    let tensor = |name: &str, data: &'static [u8]| {
        NamedTensor::new(
            name,
            Tensor::new(DataType::Uint8, vec![data.len()], Bytes::from_static(data)).unwrap(),
        )
    };
    let mut parameters = Parameters::new();
    parameters.insert("note".into(), json!("kept"));
    let response = InferResponse {
        model_name: "m".into(),
        model_version: None,
        id: None,
        parameters: Parameters::new(),
        outputs: vec![
            ResponseOutput {
                tensor: tensor("a", &[1, 2]),
                binary: true,
                parameters: Parameters::new(),
            },
            ResponseOutput {
                tensor: tensor("j", &[7]),
                binary: false,
                parameters,
            },
            ResponseOutput {
                tensor: tensor("b", &[3]),
                binary: true,
                parameters: Parameters::new(),
            },
        ],
    };
    let encoded = encode_infer_response(&response).unwrap();
    let length = encoded.json_header_length.unwrap();
    assert_eq!(&encoded.body[length..], &[1, 2, 3]);
    let header: Value = serde_json::from_slice(&encoded.body[..length]).unwrap();
    assert_eq!(
        header,
        json!({"model_name": "m", "outputs": [
            {"name": "a", "datatype": "UINT8", "shape": [2], "parameters": {"binary_data_size": 2}},
            {"name": "j", "datatype": "UINT8", "shape": [1], "parameters": {"note": "kept"}, "data": [7]},
            {"name": "b", "datatype": "UINT8", "shape": [1], "parameters": {"binary_data_size": 1}},
        ]})
    );
}

#[test]
fn non_utf8_bytes_output_message_is_exact() {
    let data = encode_bytes_elements([&b"ok"[..], &[0xc3][..]]).unwrap();
    let tensor = NamedTensor::new(
        "y",
        Tensor::new(DataType::Bytes, vec![2], Bytes::from(data)).unwrap(),
    );
    let response = InferResponse {
        model_name: "m".into(),
        model_version: None,
        id: None,
        parameters: Parameters::new(),
        outputs: vec![ResponseOutput {
            tensor,
            binary: false,
            parameters: Parameters::new(),
        }],
    };
    let error = encode_infer_response(&response).err().unwrap();
    assert_eq!(error.kind(), weft_core::ErrorKind::InvalidArgument);
    assert_eq!(
        error.message(),
        "output 'y' element 1 is BYTES that is not valid UTF-8; request the output with binary_data: true"
    );
}

#[test]
fn plain_response_types_have_the_v2_shapes() {
    let entry = RepositoryIndexEntry {
        name: "m".into(),
        version: None,
        state: "READY".into(),
        reason: String::new(),
    };
    assert_eq!(
        serde_json::to_value(&entry).unwrap(),
        json!({"name": "m", "state": "READY", "reason": ""})
    );
    let metadata = ModelMetadataResponse {
        name: "m".into(),
        versions: vec!["1".into()],
        platform: "onnxruntime_onnx".into(),
        inputs: vec![MetadataTensor {
            name: "x".into(),
            datatype: "FP32".into(),
            shape: vec![-1, 4],
        }],
        outputs: vec![],
    };
    let text = serde_json::to_string(&metadata).unwrap();
    assert_eq!(
        serde_json::from_str::<ModelMetadataResponse>(&text).unwrap(),
        metadata
    );
    assert_eq!(
        serde_json::to_value(ErrorResponse { error: "no".into() }).unwrap(),
        json!({"error": "no"})
    );
    let server = ServerMetadataResponse {
        name: "weft".into(),
        version: "0.1.0".into(),
        extensions: vec!["binary_tensor_data".into()],
    };
    assert_eq!(
        serde_json::to_value(&server).unwrap()["extensions"][0],
        "binary_tensor_data"
    );
}

#[test]
fn a_huge_claimed_shape_with_little_data_is_an_error_not_an_allocation() {
    let request = json!({"inputs": [{"name": "t", "shape": [1_000_000_000_000u64, 64], "datatype": "FP32", "data": [1.0]}]});
    let message = error_of(decode_json(request));
    assert!(message.contains("input 't'"), "{message}");
    let overflow = json!({"inputs": [{"name": "t", "shape": [i64::MAX, i64::MAX], "datatype": "FP64", "data": [1.0]}]});
    assert!(error_of(decode_json(overflow)).contains("input 't'"));
}

/// Decodes one input whose JSON object is given as text, so key order and odd nesting are exact.
fn decode_input_text(input: &str) -> weft_core::Result<InferRequest> {
    let body = format!(r#"{{"inputs": [{input}]}}"#);
    decode_infer_request(Bytes::from(body), None)
}

fn nested(depth: usize, leaf: &str) -> String {
    format!("{}{leaf}{}", "[".repeat(depth), "]".repeat(depth))
}

#[test]
fn arbitrarily_nested_and_ragged_data_flattens_row_major() {
    let flat = decode_json(json!({"inputs": [{"name": "t", "shape": [2, 2, 2], "datatype": "INT16", "data": [1, 2, 3, 4, 5, 6, 7, 8]}]})).unwrap();
    for data in [
        json!([[[1, 2], [3, 4]], [[5, 6], [7, 8]]]),
        json!([[1, [2]], 3, [[[4, 5]]], [], [6, [7, [8]]]]),
    ] {
        let request = decode_json(json!({"inputs": [{"name": "t", "shape": [2, 2, 2], "datatype": "INT16", "data": data}]})).unwrap();
        assert_eq!(request.inputs[0].tensor, flat.inputs[0].tensor, "{data}");
    }
    // A scalar tensor may send its one element bare.
    let scalar = decode_json(
        json!({"inputs": [{"name": "t", "shape": [], "datatype": "FP64", "data": 2.5}]}),
    )
    .unwrap();
    assert_eq!(
        &scalar.inputs[0].tensor.tensor.data()[..],
        &2.5f64.to_le_bytes()
    );
}

#[test]
fn data_may_come_before_or_after_datatype_and_shape() {
    let expected: Vec<u8> = [1.5f32, -2.0, 3.25]
        .iter()
        .flat_map(|v| v.to_le_bytes())
        .collect();
    for input in [
        r#"{"data": [[1.5], [-2], [3.25]], "name": "t", "datatype": "FP32", "shape": [3, 1]}"#,
        r#"{"name": "t", "data": [[1.5], [-2], [3.25]], "shape": [3, 1], "datatype": "FP32"}"#,
        r#"{"shape": [3, 1], "datatype": "FP32", "name": "t", "data": [[1.5], [-2], [3.25]]}"#,
    ] {
        let request = decode_input_text(input).unwrap();
        let tensor = &request.inputs[0].tensor;
        assert_eq!(tensor.name, "t");
        assert_eq!(tensor.tensor.shape(), &[3, 1]);
        assert_eq!(&tensor.tensor.data()[..], &expected[..], "{input}");
    }
    let message = error_of(decode_input_text(
        r#"{"data": [1, 2, 3], "name": "t", "datatype": "UINT8", "shape": [2]}"#,
    ));
    assert_eq!(
        message,
        "input 't': shape needs 2 elements but data has more"
    );
}

#[test]
fn too_many_elements_stop_the_decode_at_the_first_extra_one() {
    // Had the decode gone on, element 3 would be refused for its type; it stops at element 2.
    let message = error_of(decode_json(
        json!({"inputs": [{"name": "t", "shape": [2], "datatype": "UINT8", "data": [1, 2, 3, "x"]}]}),
    ));
    assert_eq!(
        message,
        "input 't': shape needs 2 elements but data has more"
    );
    let message = error_of(decode_json(
        json!({"inputs": [{"name": "t", "shape": [1, 2], "datatype": "FP32", "data": [[1, 2], [3]]}]}),
    ));
    assert_eq!(
        message,
        "input 't': shape needs 2 elements but data has more"
    );
    let many = format!("[{}0]", "0,".repeat(1_000_000));
    let message = error_of(decode_input_text(&format!(
        r#"{{"name": "t", "shape": [1], "datatype": "FP64", "data": {many}}}"#
    )));
    assert_eq!(
        message,
        "input 't': shape needs 1 elements but data has more"
    );
}

#[test]
fn data_nested_deeper_than_serde_json_allows_is_invalid_argument() {
    let limit = crate::json_data::MAX_NESTING;
    let ok = decode_input_text(&format!(
        r#"{{"name": "t", "shape": [1], "datatype": "INT8", "data": {}}}"#,
        nested(limit, "7")
    ))
    .unwrap();
    assert_eq!(&ok.inputs[0].tensor.tensor.data()[..], &[7]);
    for depth in [limit + 1, 1_000, 200_000] {
        for input in [
            format!(
                r#"{{"name": "t", "shape": [1], "datatype": "INT8", "data": {}}}"#,
                nested(depth, "7")
            ),
            // Before the datatype is known, and unbalanced: still no crash.
            format!(
                r#"{{"data": {}, "name": "t", "shape": [1], "datatype": "INT8"}}"#,
                nested(depth, "7")
            ),
        ] {
            let error = decode_input_text(&input).err().unwrap();
            assert_eq!(error.kind(), weft_core::ErrorKind::InvalidArgument);
            assert_eq!(
                error.message(),
                format!("input 't': data nests arrays more than {limit} levels deep")
            );
        }
        let unbalanced = format!(r#"{{"name": "t", "data": {}"#, "[".repeat(depth));
        let error = decode_input_text(&unbalanced).err().unwrap();
        assert_eq!(error.kind(), weft_core::ErrorKind::InvalidArgument);
        assert!(
            error.message().starts_with("malformed JSON in request"),
            "{error}"
        );
    }
}

#[test]
fn each_element_must_have_its_datatypes_json_type() {
    let cases = [
        (
            "FP32",
            r#"[1, "1.0"]"#,
            r#"element 1 ("1.0") is not a valid FP32 value"#,
        ),
        (
            "FP64",
            "[null]",
            "element 0 (null) is not a valid FP64 value",
        ),
        (
            "INT64",
            "[true]",
            "element 0 (true) is not a valid INT64 value",
        ),
        (
            "INT32",
            "[1, 2.0]",
            "element 1 (2.0) is not a valid INT32 value",
        ),
        (
            "UINT64",
            "[-5]",
            "element 0 (-5) is not a valid UINT64 value",
        ),
        (
            "BOOL",
            "[true, 0]",
            "element 1 (0) is not a valid BOOL value",
        ),
        (
            "BOOL",
            r#"["true"]"#,
            r#"element 0 ("true") is not a valid BOOL value"#,
        ),
        (
            "BYTES",
            r#"["a", 5]"#,
            "element 1 (5) is not a valid BYTES value",
        ),
        (
            "BYTES",
            r#"[["a"], [{"b": 1}]]"#,
            "element 1 (an object) is not a valid BYTES value",
        ),
        (
            "FP16",
            r#"[{}]"#,
            "element 0 (an object) is not a valid FP16 value",
        ),
    ];
    for (datatype, data, needle) in cases {
        let message = error_of(decode_input_text(&format!(
            r#"{{"name": "t", "shape": [2], "datatype": "{datatype}", "data": {data}}}"#
        )));
        assert_eq!(message, format!("input 't': {needle}"), "{datatype} {data}");
    }
    // A long string is quoted back cut short.
    let long = "x".repeat(10_000);
    let message = error_of(decode_input_text(&format!(
        r#"{{"name": "t", "shape": [1], "datatype": "FP32", "data": ["{long}"]}}"#
    )));
    assert!(message.len() < 200, "{message}");
    assert!(
        message.contains(r#"("xxxx"#) && message.contains(r#"x..."#),
        "{message}"
    );
}

#[test]
fn bytes_elements_decode_from_nested_and_escaped_strings() {
    let request = decode_input_text(
        r#"{"data": [["caf\u00e9", ""], ["tab\tq\"", "🦀"]], "datatype": "BYTES", "shape": [2, 2], "name": "s"}"#,
    )
    .unwrap();
    let tensor = &request.inputs[0].tensor.tensor;
    let elements: Vec<&[u8]> = weft_core::bytes_elements(tensor.data()).unwrap().collect();
    assert_eq!(
        elements,
        [
            "café".as_bytes(),
            b"",
            "tab\tq\"".as_bytes(),
            "🦀".as_bytes()
        ]
    );
    assert_eq!(
        error_of(decode_input_text(
            r#"{"name": "s", "shape": [3], "datatype": "BYTES", "data": ["a", "b"]}"#
        )),
        "input 's': shape needs 3 elements but data has 2"
    );
}

#[test]
fn numbers_out_of_range_are_malformed_json_placed_in_the_request() {
    let body = "{\"inputs\": [\n  {\"name\": \"t\", \"shape\": [2], \"datatype\": \"FP64\",\n   \"data\": [1, 1e400]}]}";
    let error = decode_infer_request(Bytes::from(body), None).err().unwrap();
    assert_eq!(error.kind(), weft_core::ErrorKind::InvalidArgument);
    // The same place serde_json gives when it reads the whole body as a value.
    let whole = serde_json::from_str::<Value>(body).err().unwrap();
    assert_eq!(
        error.message(),
        format!(
            "malformed JSON in request: input 't' data: number out of range at line {} column {}",
            whole.line(),
            whole.column()
        )
    );
}

/// Regions of the test: `inputs` holds 8 bytes, 1.0 and 2.0 as FP32.
struct TestRegions;

impl crate::shared_memory::SharedMemoryInputs for TestRegions {
    fn read(
        &self,
        _input: &str,
        place: &crate::shared_memory::SharedMemoryRef,
    ) -> weft_core::Result<Bytes> {
        let region: Vec<u8> = [1.0f32, 2.0].iter().flat_map(|v| v.to_le_bytes()).collect();
        if place.region != "inputs" {
            return Err(weft_core::Error::not_found("no such region"));
        }
        let start = place.offset as usize;
        let end = start + place.byte_size as usize;
        Ok(Bytes::copy_from_slice(&region[start..end]))
    }
}

fn decode_with_regions(body: &Value) -> weft_core::Result<InferRequest> {
    crate::decode_infer_request_with(
        Bytes::from(serde_json::to_vec(body).unwrap()),
        None,
        &TestRegions,
    )
}

#[test]
fn inputs_in_shared_memory_are_read_through_the_caller_s_regions() {
    let body = json!({"inputs": [{
        "name": "x", "datatype": "FP32", "shape": [1],
        "parameters": {"shared_memory_region": "inputs", "shared_memory_byte_size": 4,
                       "shared_memory_offset": 4}
    }]});
    let request = decode_with_regions(&body).unwrap();
    assert_eq!(
        &request.inputs[0].tensor.tensor.data()[..],
        &2.0f32.to_le_bytes()
    );
    // Without regions (a batch job, say) the same input is refused, not crashed on.
    let error = decode_json(body).unwrap_err();
    assert!(error.message().contains("not available here"), "{error}");

    for (parameters, expected) in [
        (
            json!({"shared_memory_region": "inputs"}),
            "needs shared_memory_byte_size",
        ),
        (
            json!({"shared_memory_region": 7, "shared_memory_byte_size": 4}),
            "must be a region's name",
        ),
        (
            json!({"shared_memory_region": "inputs", "shared_memory_byte_size": -4}),
            "non-negative integer",
        ),
        (
            json!({"shared_memory_region": "elsewhere", "shared_memory_byte_size": 4}),
            "no such region",
        ),
    ] {
        let body = json!({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "parameters": parameters}]});
        let error = decode_with_regions(&body).unwrap_err();
        assert!(
            error.message().contains(expected),
            "{error} lacks {expected}"
        );
    }
    let both = json!({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "data": [1.0],
        "parameters": {"shared_memory_region": "inputs", "shared_memory_byte_size": 4}}]});
    let error = decode_with_regions(&both).unwrap_err();
    assert!(
        error
            .message()
            .contains("both data and shared_memory_region"),
        "{error}"
    );
}

#[test]
fn outputs_written_to_shared_memory_carry_no_bytes() {
    let tensor = NamedTensor::new(
        "y",
        Tensor::new(
            DataType::Fp32,
            vec![1],
            Bytes::from(1.0f32.to_le_bytes().to_vec()),
        )
        .unwrap(),
    );
    let place = crate::shared_memory::SharedMemoryRef {
        region: "out".into(),
        offset: 0,
        byte_size: 64,
    };
    for binary in [true, false] {
        let response = InferResponse {
            model_name: "m".into(),
            model_version: None,
            id: None,
            parameters: Parameters::new(),
            outputs: vec![ResponseOutput {
                tensor: tensor.clone(),
                binary,
                parameters: place.to_parameters(4),
            }],
        };
        let encoded = encode_infer_response(&response).unwrap();
        assert_eq!(encoded.json_header_length, None);
        let body: serde_json::Value = serde_json::from_slice(&encoded.body).unwrap();
        let output = &body["outputs"][0];
        assert_eq!(output["shape"], json!([1]));
        assert!(output.get("data").is_none(), "{body}");
        assert_eq!(
            output["parameters"],
            json!({"shared_memory_region": "out", "shared_memory_byte_size": 4})
        );
    }
}
