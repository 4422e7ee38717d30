//! Decoding an inference request body, JSON or binary extension, into named tensors.

use bytes::Bytes;
use serde::Deserialize;
use serde_json::Value;
use serde_json::value::RawValue;
use weft_core::{DataType, Error, NamedTensor, Result, Tensor, element_count};

use crate::Parameters;
use crate::json_data;
use crate::shared_memory::{self, NoSharedMemory, SharedMemoryInputs, SharedMemoryRef};

/// A decoded inference request.
#[derive(Clone, Debug, Default)]
pub struct InferRequest {
    pub id: Option<String>,
    pub parameters: Parameters,
    pub inputs: Vec<RequestInput>,
    /// Outputs the client asked for; empty means all.
    pub outputs: Vec<RequestedOutput>,
    /// Set when `Inference-Header-Content-Length: 0`: the whole body is the raw bytes of the
    /// model's single input, whose name and shape come from the model's metadata.
    pub raw_single_input: Option<Bytes>,
}

#[derive(Clone, Debug)]
pub struct RequestInput {
    pub tensor: NamedTensor,
    pub parameters: Parameters,
}

#[derive(Clone, Debug)]
pub struct RequestedOutput {
    pub name: String,
    /// `parameters.binary_data`, if the client said.
    pub binary_data: Option<bool>,
    pub parameters: Parameters,
}

impl InferRequest {
    /// The request parameter `binary_data_output: true` makes every output binary by default.
    pub fn binary_output_default(&self) -> bool {
        self.parameters
            .get("binary_data_output")
            .and_then(Value::as_bool)
            .unwrap_or(false)
    }
}

/// `null` reads as the default, as if the key were absent; some clients write `"parameters": null`.
fn nullable<'de, D: serde::Deserializer<'de>, T: Default + Deserialize<'de>>(
    deserializer: D,
) -> std::result::Result<T, D::Error> {
    Ok(Option::<T>::deserialize(deserializer)?.unwrap_or_default())
}

/// The request as serde_json reads it in one pass. Tensor `data` is only borrowed as raw text
/// (checked for syntax, nothing allocated), because its datatype and shape may come after it in
/// the object; it is decoded once the whole input is known, straight into bytes.
#[derive(Deserialize)]
struct WireRequest<'a> {
    #[serde(default)]
    id: Option<String>,
    #[serde(default, deserialize_with = "nullable")]
    parameters: Parameters,
    #[serde(borrow)]
    inputs: Vec<WireInput<'a>>,
    #[serde(default, deserialize_with = "nullable")]
    outputs: Vec<WireOutput>,
}

#[derive(Deserialize)]
struct WireInput<'a> {
    name: String,
    shape: Vec<i64>,
    datatype: String,
    #[serde(default, deserialize_with = "nullable")]
    parameters: Parameters,
    /// `null` reads as absent.
    #[serde(default, borrow)]
    data: Option<&'a RawValue>,
}

#[derive(Deserialize)]
struct WireOutput {
    name: String,
    #[serde(default, deserialize_with = "nullable")]
    parameters: Parameters,
}

/// Decodes a request body. `header_length` is the `Inference-Header-Content-Length` header:
/// `None` means the body is all JSON; `Some(n)` means the first `n` bytes are the JSON header and
/// the rest are binary tensors in the order of the inputs that declare `binary_data_size`;
/// `Some(0)` means the body is the raw bytes of the model's single input.
pub fn decode_infer_request(body: Bytes, header_length: Option<usize>) -> Result<InferRequest> {
    decode_infer_request_with(body, header_length, &NoSharedMemory)
}

/// [`decode_infer_request`], with inputs that name a shared-memory region read through
/// `shared_memory`.
pub fn decode_infer_request_with(
    body: Bytes,
    header_length: Option<usize>,
    shared_memory: &dyn SharedMemoryInputs,
) -> Result<InferRequest> {
    if header_length == Some(0) {
        return Ok(InferRequest {
            raw_single_input: Some(body),
            ..InferRequest::default()
        });
    }
    let json_end = header_length.unwrap_or(body.len());
    if json_end > body.len() {
        return Err(Error::invalid(format!(
            "Inference-Header-Content-Length {json_end} exceeds the body's {} bytes",
            body.len()
        )));
    }
    let json = &body[..json_end];
    let wire: WireRequest =
        serde_json::from_slice(json).map_err(|error| match std::str::from_utf8(json) {
            Err(utf8) => Error::invalid(format!(
                "malformed JSON in request: the JSON is not valid UTF-8 (byte {}); send non-UTF-8 \
             BYTES elements as binary data",
                utf8.valid_up_to()
            )),
            Ok(_) => Error::invalid(format!("malformed JSON in request: {error}")),
        })?;
    let mut binary_offset = json_end;
    let mut inputs = Vec::with_capacity(wire.inputs.len());
    for input in wire.inputs {
        inputs.push(decode_input(
            input,
            &body,
            json,
            header_length.is_some(),
            &mut binary_offset,
            shared_memory,
        )?);
    }
    if binary_offset != body.len() {
        return Err(Error::invalid(format!(
            "{} bytes of binary data follow the JSON header but no input's binary_data_size \
             claims them",
            body.len() - binary_offset
        )));
    }
    let outputs = wire
        .outputs
        .into_iter()
        .map(|output| {
            let binary_data = match output.parameters.get("binary_data") {
                None => None,
                Some(Value::Bool(flag)) => Some(*flag),
                Some(other) => {
                    return Err(Error::invalid(format!(
                        "output '{}': parameter binary_data must be true or false, not {other}",
                        output.name
                    )));
                }
            };
            Ok(RequestedOutput {
                name: output.name,
                binary_data,
                parameters: output.parameters,
            })
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(InferRequest {
        id: wire.id,
        parameters: wire.parameters,
        inputs,
        outputs,
        raw_single_input: None,
    })
}

fn decode_input(
    input: WireInput<'_>,
    body: &Bytes,
    json: &[u8],
    has_binary: bool,
    offset: &mut usize,
    shared_memory: &dyn SharedMemoryInputs,
) -> Result<RequestInput> {
    let name = input.name;
    let datatype: DataType = input
        .datatype
        .parse()
        .map_err(|error: Error| error.context(format!("input '{name}'")))?;
    let shape = input
        .shape
        .iter()
        .map(|&dim| {
            usize::try_from(dim).map_err(|_| {
                Error::invalid(format!(
                    "input '{name}': shape {:?} has a negative dimension",
                    input.shape
                ))
            })
        })
        .collect::<Result<Vec<usize>>>()?;
    let binary_size = match input.parameters.get("binary_data_size") {
        None => None,
        Some(value) => Some(value.as_u64().map(|n| n as usize).ok_or_else(|| {
            Error::invalid(format!(
                "input '{name}': binary_data_size must be a non-negative integer"
            ))
        })?),
    };
    let place = SharedMemoryRef::from_parameters(&format!("input '{name}'"), &input.parameters)?;
    let data = if let Some(place) = place {
        if binary_size.is_some() || input.data.is_some() {
            return Err(Error::invalid(format!(
                "input '{name}' has both data and {}; send one",
                shared_memory::REGION
            )));
        }
        shared_memory.read(&name, &place)?
    } else {
        match (binary_size, input.data) {
            (Some(_), Some(_)) => {
                return Err(Error::invalid(format!(
                    "input '{name}' has both data and binary_data_size; send one"
                )));
            }
            (None, None) => {
                return Err(Error::invalid(format!(
                    "input '{name}' has neither data nor binary_data_size"
                )));
            }
            (Some(size), None) => {
                if !has_binary {
                    return Err(Error::invalid(format!(
                        "input '{name}' has binary_data_size but the request has no \
                     Inference-Header-Content-Length header"
                    )));
                }
                let end = offset.checked_add(size).filter(|&end| end <= body.len()).ok_or_else(|| {
                Error::invalid(format!(
                    "input '{name}': binary_data_size {size} reaches past the end of the body \
                     ({} bytes of binary data remain)",
                    body.len() - *offset
                ))
            })?;
                let slice = body.slice(*offset..end);
                *offset = end;
                slice
            }
            (None, Some(data)) => {
                let count = element_count(&shape)
                    .map_err(|error| error.context(format!("input '{name}'")))?;
                Bytes::from(json_data::parse(&name, datatype, data, json, count)?)
            }
        }
    };
    let tensor = Tensor::new(datatype, shape, data)
        .map_err(|error| error.context(format!("input '{name}'")))?;
    Ok(RequestInput {
        tensor: NamedTensor::new(name, tensor),
        parameters: input.parameters,
    })
}
