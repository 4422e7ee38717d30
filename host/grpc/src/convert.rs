//! Between the gRPC messages and Weft's protocol types: a `ModelInferRequest` becomes the same
//! [`InferRequest`] an HTTP body decodes to, and an [`InferResponse`] becomes a
//! `ModelInferResponse` with every output in `raw_output_contents`.
//!
//! Why always raw: `tritonclient.grpc` reads outputs only from `raw_output_contents` (typed
//! contents come back to it as empty arrays), and raw bytes are also the cheapest to send.
//! Inputs come either way: all raw (`raw_input_contents`, one entry per input, in order) or
//! each in its typed contents field.

use bytes::Bytes;
use serde_json::{Map, Number, Value};
use weft_core::{DataType, Error, NamedTensor, Result, Tensor, element_count};
use weft_protocol::shared_memory::{SharedMemoryInputs, SharedMemoryRef, in_shared_memory};
use weft_protocol::{InferRequest, InferResponse, Parameters, RequestInput, RequestedOutput};

use crate::inference::infer_parameter::ParameterChoice;
use crate::inference::model_infer_request::InferInputTensor;
use crate::inference::model_infer_response::InferOutputTensor;
use crate::inference::{
    InferParameter, InferTensorContents, ModelInferRequest, ModelInferResponse,
};

/// A gRPC parameter map as JSON values; a non-finite double is refused (JSON has none).
pub fn parameters_from_grpc(
    parameters: std::collections::HashMap<String, InferParameter>,
) -> Result<Parameters> {
    let mut out = Map::new();
    for (name, parameter) in parameters {
        let value = match parameter.parameter_choice {
            None => Value::Null,
            Some(ParameterChoice::BoolParam(value)) => Value::Bool(value),
            Some(ParameterChoice::Int64Param(value)) => Value::from(value),
            Some(ParameterChoice::Uint64Param(value)) => Value::from(value),
            Some(ParameterChoice::StringParam(value)) => Value::String(value),
            Some(ParameterChoice::DoubleParam(value)) => {
                Number::from_f64(value).map(Value::Number).ok_or_else(|| {
                    Error::invalid(format!(
                        "parameter '{name}' is {value}, not a finite number"
                    ))
                })?
            }
        };
        out.insert(name, value);
    }
    Ok(out)
}

/// JSON parameters as a gRPC map: numbers keep their kind (int64, uint64 above it, double),
/// arrays and objects (`provenance`) travel as their JSON text.
pub fn parameters_to_grpc(
    parameters: &Parameters,
) -> std::collections::HashMap<String, InferParameter> {
    parameters
        .iter()
        .map(|(name, value)| {
            let choice = match value {
                Value::Bool(flag) => Some(ParameterChoice::BoolParam(*flag)),
                Value::String(text) => Some(ParameterChoice::StringParam(text.clone())),
                Value::Number(number) => Some(match (number.as_i64(), number.as_u64()) {
                    (Some(signed), _) => ParameterChoice::Int64Param(signed),
                    (None, Some(unsigned)) => ParameterChoice::Uint64Param(unsigned),
                    _ => ParameterChoice::DoubleParam(number.as_f64().unwrap_or_default()),
                }),
                Value::Null => None,
                other => Some(ParameterChoice::StringParam(other.to_string())),
            };
            (
                name.clone(),
                InferParameter {
                    parameter_choice: choice,
                },
            )
        })
        .collect()
}

/// The request as Weft's protocol type. Tensor bytes from `raw_input_contents` are not copied;
/// inputs that name a shared-memory region are read through `shared_memory`.
///
/// As tritonclient sends them, `raw_input_contents` hold the inputs not in shared memory, in
/// order; then every such input takes one, and none may carry typed contents too.
pub fn request_from_grpc(
    request: ModelInferRequest,
    shared_memory: &dyn SharedMemoryInputs,
) -> Result<InferRequest> {
    let ModelInferRequest {
        id,
        parameters,
        inputs,
        outputs,
        raw_input_contents,
        ..
    } = request;
    let raw_count = raw_input_contents.len();
    let mut raw_contents = raw_input_contents.into_iter();
    let mut decoded = Vec::with_capacity(inputs.len());
    let mut wire_inputs = 0;
    for input in inputs {
        let name = input.name.clone();
        let parameters = parameters_from_grpc(input.parameters.clone())?;
        let place = SharedMemoryRef::from_parameters(&format!("input '{name}'"), &parameters)?;
        let source = match place {
            Some(place) => Source::SharedMemory(shared_memory.read(&name, &place)?),
            None if raw_count > 0 => {
                wire_inputs += 1;
                Source::Raw(raw_contents.next())
            }
            None => Source::Typed,
        };
        let tensor = input_tensor(input, parameters, source)
            .map_err(|error| error.context(format!("input '{name}'")))?;
        decoded.push(tensor);
    }
    if raw_count != 0 && raw_count != wire_inputs {
        return Err(Error::invalid(format!(
            "the request has {raw_count} raw_input_contents for {wire_inputs} inputs not in \
             shared memory; send one per such input, in the inputs' order, or none"
        )));
    }
    let outputs = outputs
        .into_iter()
        .map(|output| {
            Ok(RequestedOutput {
                name: output.name,
                // Every gRPC output is binary (raw) anyway.
                binary_data: None,
                parameters: parameters_from_grpc(output.parameters)?,
            })
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(InferRequest {
        id: (!id.is_empty()).then_some(id),
        parameters: parameters_from_grpc(parameters)?,
        inputs: decoded,
        outputs,
        raw_single_input: None,
    })
}

/// Where one input's bytes come from.
enum Source {
    /// The request has raw contents: this input's entry (`None` when they ran out).
    Raw(Option<Bytes>),
    /// The input's typed contents.
    Typed,
    /// Read from a shared-memory region.
    SharedMemory(Bytes),
}

fn input_tensor(
    input: InferInputTensor,
    parameters: Parameters,
    source: Source,
) -> Result<RequestInput> {
    let datatype: DataType = input.datatype.parse()?;
    let shape = input
        .shape
        .iter()
        .map(|&dim| {
            usize::try_from(dim).map_err(|_| {
                Error::invalid(format!("shape {:?} has a negative dimension", input.shape))
            })
        })
        .collect::<Result<Vec<usize>>>()?;
    let typed = input.contents.filter(|contents| !is_empty(contents));
    let data = match (source, typed) {
        (Source::Raw(_) | Source::SharedMemory(_), Some(_)) => {
            return Err(Error::invalid(
                "has typed contents and also raw_input_contents or a shared memory region; \
                 send one",
            ));
        }
        (Source::Raw(Some(raw)), None) => raw,
        (Source::Raw(None), None) => {
            return Err(Error::invalid(
                "has no entry in raw_input_contents (fewer entries than inputs)",
            ));
        }
        (Source::SharedMemory(bytes), None) => bytes,
        (Source::Typed, Some(contents)) => typed_bytes(datatype, element_count(&shape)?, contents)?,
        (Source::Typed, None) => {
            // An empty tensor may come with no contents at all.
            typed_bytes(
                datatype,
                element_count(&shape)?,
                InferTensorContents::default(),
            )
            .map_err(|_| {
                Error::invalid("has no contents and the request has no raw_input_contents")
            })?
        }
    };
    let tensor = Tensor::new(datatype, shape, data)?;
    Ok(RequestInput {
        tensor: NamedTensor::new(input.name, tensor),
        parameters,
    })
}

fn is_empty(contents: &InferTensorContents) -> bool {
    contents.bool_contents.is_empty()
        && contents.int_contents.is_empty()
        && contents.int64_contents.is_empty()
        && contents.uint_contents.is_empty()
        && contents.uint64_contents.is_empty()
        && contents.fp32_contents.is_empty()
        && contents.fp64_contents.is_empty()
        && contents.bytes_contents.is_empty()
}

/// The little-endian bytes of typed contents: the field that matches `datatype` must hold
/// exactly `count` elements, and values must fit the datatype (an INT8 from `int_contents`).
fn typed_bytes(datatype: DataType, count: usize, contents: InferTensorContents) -> Result<Bytes> {
    fn check<T>(field: &str, values: &[T], count: usize) -> Result<()> {
        if values.len() != count {
            return Err(Error::invalid(format!(
                "{field} holds {} elements; the shape needs {count}",
                values.len()
            )));
        }
        Ok(())
    }
    fn narrow<W: Copy + std::fmt::Display, N: TryFrom<W>>(
        value: W,
        datatype: DataType,
    ) -> Result<N> {
        N::try_from(value)
            .map_err(|_| Error::invalid(format!("value {value} does not fit {datatype}")))
    }
    let mut out: Vec<u8> = Vec::new();
    macro_rules! fill {
        ($field:ident, $narrow:ty) => {{
            check(stringify!($field), &contents.$field, count)?;
            out.reserve(count * std::mem::size_of::<$narrow>());
            for &value in &contents.$field {
                let value: $narrow = narrow(value, datatype)?;
                out.extend_from_slice(&value.to_le_bytes());
            }
        }};
    }
    match datatype {
        DataType::Bool => {
            check("bool_contents", &contents.bool_contents, count)?;
            out.extend(contents.bool_contents.iter().map(|&flag| u8::from(flag)));
        }
        DataType::Int8 => fill!(int_contents, i8),
        DataType::Int16 => fill!(int_contents, i16),
        DataType::Int32 => fill!(int_contents, i32),
        DataType::Int64 => fill!(int64_contents, i64),
        DataType::Uint8 => fill!(uint_contents, u8),
        DataType::Uint16 => fill!(uint_contents, u16),
        DataType::Uint32 => fill!(uint_contents, u32),
        DataType::Uint64 => fill!(uint64_contents, u64),
        DataType::Fp32 => {
            check("fp32_contents", &contents.fp32_contents, count)?;
            for value in &contents.fp32_contents {
                out.extend_from_slice(&value.to_le_bytes());
            }
        }
        DataType::Fp64 => {
            check("fp64_contents", &contents.fp64_contents, count)?;
            for value in &contents.fp64_contents {
                out.extend_from_slice(&value.to_le_bytes());
            }
        }
        DataType::Bytes => {
            check("bytes_contents", &contents.bytes_contents, count)?;
            out = weft_core::encode_bytes_elements(
                contents.bytes_contents.iter().map(|element| &element[..]),
            )?;
        }
        DataType::Fp16 | DataType::Bf16 => {
            return Err(Error::invalid(format!(
                "{datatype} has no typed contents field in the gRPC protocol; send it in \
                 raw_input_contents"
            )));
        }
    }
    Ok(Bytes::from(out))
}

/// The response as a gRPC message, every output's bytes in `raw_output_contents` (shared, not
/// copied) in the order of `outputs`.
pub fn response_to_grpc(response: InferResponse) -> ModelInferResponse {
    let mut outputs = Vec::with_capacity(response.outputs.len());
    let mut raw = Vec::with_capacity(response.outputs.len());
    for output in response.outputs {
        let tensor = &output.tensor.tensor;
        outputs.push(InferOutputTensor {
            name: output.tensor.name.clone(),
            datatype: tensor.datatype().as_str().to_string(),
            shape: tensor.shape().iter().map(|&dim| dim as i64).collect(),
            parameters: parameters_to_grpc(&output.parameters),
            contents: None,
        });
        // An output written to shared memory sends no bytes; its entry stays, empty, so the
        // others keep their positions (tritonclient finds outputs by index).
        raw.push(if in_shared_memory(&output.parameters) {
            Bytes::new()
        } else {
            tensor.data().clone()
        });
    }
    ModelInferResponse {
        model_name: response.model_name,
        model_version: response.model_version.unwrap_or_default(),
        id: response.id.unwrap_or_default(),
        parameters: parameters_to_grpc(&response.parameters),
        outputs,
        raw_output_contents: raw,
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;
    use crate::inference::model_infer_request::InferRequestedOutputTensor;
    use weft_protocol::shared_memory::NoSharedMemory;

    fn decode(request: ModelInferRequest) -> Result<InferRequest> {
        request_from_grpc(request, &NoSharedMemory)
    }

    fn input(name: &str, datatype: &str, shape: &[i64]) -> InferInputTensor {
        InferInputTensor {
            name: name.into(),
            datatype: datatype.into(),
            shape: shape.to_vec(),
            ..Default::default()
        }
    }

    #[test]
    fn raw_inputs_are_slices_of_the_message_not_copies() {
        let raw = Bytes::from(vec![0u8; 8]);
        let pointer = raw.as_ptr();
        let request = decode(ModelInferRequest {
            model_name: "mlp".into(),
            id: "r1".into(),
            inputs: vec![input("x", "FP32", &[1, 2])],
            raw_input_contents: vec![raw],
            outputs: vec![InferRequestedOutputTensor {
                name: "y".into(),
                ..Default::default()
            }],
            ..Default::default()
        })
        .unwrap();
        assert_eq!(request.id.as_deref(), Some("r1"));
        assert_eq!(request.inputs[0].tensor.tensor.shape(), &[1, 2]);
        assert_eq!(request.inputs[0].tensor.tensor.data().as_ptr(), pointer);
        assert_eq!(request.outputs[0].name, "y");
    }

    #[test]
    fn typed_contents_become_little_endian_bytes_with_range_checks() {
        let mut int8 = input("a", "INT8", &[3]);
        int8.contents = Some(InferTensorContents {
            int_contents: vec![-1, 0, 127],
            ..Default::default()
        });
        let mut text = input("b", "BYTES", &[2]);
        text.contents = Some(InferTensorContents {
            bytes_contents: vec![Bytes::from_static(b"hi"), Bytes::new()],
            ..Default::default()
        });
        let request = decode(ModelInferRequest {
            inputs: vec![int8, text],
            ..Default::default()
        })
        .unwrap();
        assert_eq!(&request.inputs[0].tensor.tensor.data()[..], &[255, 0, 127]);
        assert_eq!(
            &request.inputs[1].tensor.tensor.data()[..],
            &[2, 0, 0, 0, b'h', b'i', 0, 0, 0, 0]
        );

        let mut too_big = input("a", "INT8", &[1]);
        too_big.contents = Some(InferTensorContents {
            int_contents: vec![128],
            ..Default::default()
        });
        let error = decode(ModelInferRequest {
            inputs: vec![too_big],
            ..Default::default()
        })
        .unwrap_err();
        assert!(error.message().contains("does not fit INT8"), "{error}");
    }

    #[test]
    fn malformed_inputs_are_refused_with_the_input_named() {
        let cases: Vec<(ModelInferRequest, &str)> = vec![
            (
                ModelInferRequest {
                    inputs: vec![input("x", "FP32", &[2])],
                    raw_input_contents: vec![Bytes::from(vec![0u8; 4])],
                    ..Default::default()
                },
                "input 'x': shape [2] of FP32 needs 8 bytes but 4 came",
            ),
            (
                ModelInferRequest {
                    inputs: vec![input("x", "FP32", &[2]), input("z", "FP32", &[2])],
                    raw_input_contents: vec![Bytes::from(vec![0u8; 8])],
                    ..Default::default()
                },
                "input 'z': has no entry in raw_input_contents",
            ),
            (
                ModelInferRequest {
                    inputs: vec![input("x", "FP32", &[-1])],
                    raw_input_contents: vec![Bytes::new()],
                    ..Default::default()
                },
                "input 'x': shape [-1] has a negative dimension",
            ),
            (
                ModelInferRequest {
                    inputs: vec![input("x", "FP16", &[1])],
                    ..Default::default()
                },
                "input 'x': has no contents",
            ),
            (
                ModelInferRequest {
                    inputs: vec![InferInputTensor {
                        contents: Some(InferTensorContents {
                            fp32_contents: vec![1.0],
                            ..Default::default()
                        }),
                        ..input("x", "FP16", &[1])
                    }],
                    ..Default::default()
                },
                "FP16 has no typed contents field",
            ),
            (
                ModelInferRequest {
                    inputs: vec![input("x", "FLOAT", &[1])],
                    raw_input_contents: vec![Bytes::from(vec![0u8; 4])],
                    ..Default::default()
                },
                "input 'x'",
            ),
            (
                ModelInferRequest {
                    inputs: vec![input("x", "FP32", &[i64::MAX, i64::MAX])],
                    raw_input_contents: vec![Bytes::new()],
                    ..Default::default()
                },
                "too",
            ),
        ];
        for (request, expected) in cases {
            let error = decode(request).unwrap_err();
            assert!(
                error.message().contains(expected),
                "{error} lacks {expected}"
            );
            assert_eq!(error.kind(), weft_core::ErrorKind::InvalidArgument);
        }
    }

    #[test]
    fn shared_memory_inputs_take_no_raw_entry_and_outputs_keep_their_positions() {
        struct Regions;
        impl SharedMemoryInputs for Regions {
            fn read(&self, _: &str, place: &SharedMemoryRef) -> Result<Bytes> {
                assert_eq!((place.region.as_str(), place.offset), ("in", 4));
                Ok(Bytes::from(vec![7u8; place.byte_size as usize]))
            }
        }
        let mut in_region = input("a", "UINT8", &[2]);
        for (key, value) in [
            (
                "shared_memory_region",
                ParameterChoice::StringParam("in".into()),
            ),
            ("shared_memory_byte_size", ParameterChoice::Int64Param(2)),
            ("shared_memory_offset", ParameterChoice::Uint64Param(4)),
        ] {
            in_region.parameters.insert(
                key.into(),
                InferParameter {
                    parameter_choice: Some(value),
                },
            );
        }
        let request = ModelInferRequest {
            inputs: vec![in_region.clone(), input("b", "UINT8", &[1])],
            raw_input_contents: vec![Bytes::from_static(&[9])],
            ..Default::default()
        };
        let decoded = request_from_grpc(request, &Regions).unwrap();
        assert_eq!(&decoded.inputs[0].tensor.tensor.data()[..], &[7, 7]);
        assert_eq!(&decoded.inputs[1].tensor.tensor.data()[..], &[9]);
        // Without regions, the same input is refused.
        let request = ModelInferRequest {
            inputs: vec![in_region],
            ..Default::default()
        };
        assert!(decode(request).is_err());
        // Too many raw entries.
        let request = ModelInferRequest {
            inputs: vec![input("b", "UINT8", &[1])],
            raw_input_contents: vec![Bytes::from_static(&[9]), Bytes::from_static(&[9])],
            ..Default::default()
        };
        let error = decode(request).unwrap_err();
        assert!(
            error
                .message()
                .contains("2 raw_input_contents for 1 inputs"),
            "{error}"
        );

        let output = |name: &str, parameters: Parameters| weft_protocol::ResponseOutput {
            tensor: NamedTensor::new(
                name,
                Tensor::new(DataType::Uint8, vec![1], Bytes::from_static(&[5])).unwrap(),
            ),
            binary: true,
            parameters,
        };
        let place = SharedMemoryRef {
            region: "out".into(),
            offset: 0,
            byte_size: 8,
        };
        let response = response_to_grpc(InferResponse {
            model_name: "m".into(),
            model_version: None,
            id: None,
            parameters: Map::new(),
            outputs: vec![output("a", place.to_parameters(1)), output("b", Map::new())],
        });
        assert_eq!(
            response.raw_output_contents,
            vec![Bytes::new(), Bytes::from_static(&[5])]
        );
        assert!(
            response.outputs[0]
                .parameters
                .contains_key("shared_memory_region")
        );
    }

    #[test]
    fn parameters_round_trip_with_their_kinds() {
        let mut json = Map::new();
        json.insert("flag".into(), Value::Bool(true));
        json.insert("count".into(), Value::from(-3));
        json.insert("big".into(), Value::from(u64::MAX));
        json.insert("ratio".into(), Value::from(0.5));
        json.insert("name".into(), Value::from("a"));
        let grpc = parameters_to_grpc(&json);
        assert_eq!(
            grpc["big"].parameter_choice,
            Some(ParameterChoice::Uint64Param(u64::MAX))
        );
        assert_eq!(parameters_from_grpc(grpc).unwrap(), json);

        let mut nested = Map::new();
        nested.insert("provenance".into(), serde_json::json!([{"node": "a"}]));
        assert_eq!(
            parameters_to_grpc(&nested)["provenance"].parameter_choice,
            Some(ParameterChoice::StringParam(r#"[{"node":"a"}]"#.into()))
        );
        let nan = [(
            "x".to_string(),
            InferParameter {
                parameter_choice: Some(ParameterChoice::DoubleParam(f64::NAN)),
            },
        )];
        assert!(parameters_from_grpc(nan.into_iter().collect()).is_err());
    }

    #[test]
    fn every_output_goes_to_raw_output_contents_in_order() {
        let tensor = |name: &str, bytes: &'static [u8]| weft_protocol::ResponseOutput {
            tensor: NamedTensor::new(
                name,
                Tensor::new(
                    DataType::Uint8,
                    vec![bytes.len()],
                    Bytes::from_static(bytes),
                )
                .unwrap(),
            ),
            binary: false,
            parameters: Map::new(),
        };
        let response = response_to_grpc(InferResponse {
            model_name: "m".into(),
            model_version: Some("2".into()),
            id: None,
            parameters: Map::new(),
            outputs: vec![tensor("b", b"\x01\x02"), tensor("a", b"\x03")],
        });
        assert_eq!(response.model_version, "2");
        assert_eq!(response.outputs[0].name, "b");
        assert_eq!(response.outputs[0].shape, vec![2]);
        assert!(response.outputs.iter().all(|o| o.contents.is_none()));
        assert_eq!(
            response.raw_output_contents,
            vec![Bytes::from_static(b"\x01\x02"), Bytes::from_static(b"\x03")]
        );
    }
}
