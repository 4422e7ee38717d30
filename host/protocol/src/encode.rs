//! Encoding inference responses (and, for load generators and tests, requests) in JSON or with
//! the binary tensor data extension.

use serde::Serialize;
use weft_core::{DataType, NamedTensor, Result};

use crate::Parameters;
use crate::decode::RequestInput;
use crate::json_data::{JsonData, check_utf8};
use crate::shared_memory::in_shared_memory;

/// A response ready to encode.
#[derive(Clone, Debug)]
pub struct InferResponse {
    pub model_name: String,
    pub model_version: Option<String>,
    pub id: Option<String>,
    pub parameters: Parameters,
    pub outputs: Vec<ResponseOutput>,
}

#[derive(Clone, Debug)]
pub struct ResponseOutput {
    pub tensor: NamedTensor,
    /// Send the bytes after the JSON header instead of as `data`.
    pub binary: bool,
    pub parameters: Parameters,
}

/// An encoded body. `json_header_length` is set (for the `Inference-Header-Content-Length`
/// header) when binary tensors follow the JSON.
#[derive(Clone, Debug)]
pub struct EncodedResponse {
    pub body: Vec<u8>,
    pub json_header_length: Option<usize>,
}

#[derive(Serialize)]
struct WireTensor<'a> {
    name: &'a str,
    datatype: &'static str,
    shape: &'a [usize],
    #[serde(skip_serializing_if = "Parameters::is_empty")]
    parameters: Parameters,
    #[serde(skip_serializing_if = "Option::is_none")]
    data: Option<JsonData<'a>>,
}

#[derive(Serialize)]
struct WireResponse<'a> {
    model_name: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    model_version: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    id: Option<&'a str>,
    #[serde(skip_serializing_if = "Parameters::is_empty")]
    parameters: &'a Parameters,
    outputs: Vec<WireTensor<'a>>,
}

/// One tensor on the wire: binary ones get `binary_data_size` and no `data`.
fn wire_tensor<'a>(
    tensor: &'a NamedTensor,
    binary: bool,
    mut parameters: Parameters,
) -> Result<WireTensor<'a>> {
    let data = tensor.tensor.data();
    let json = if in_shared_memory(&parameters) {
        // The bytes went to the region the parameters name.
        None
    } else if binary {
        parameters.insert("binary_data_size".into(), data.len().into());
        None
    } else {
        if tensor.tensor.datatype() == DataType::Bytes {
            check_utf8(&tensor.name, data)?;
        }
        Some(JsonData {
            datatype: tensor.tensor.datatype(),
            data,
        })
    };
    Ok(WireTensor {
        name: &tensor.name,
        datatype: tensor.tensor.datatype().as_str(),
        shape: tensor.tensor.shape(),
        parameters,
        data: json,
    })
}

/// One tensor as a V2 JSON output object (`name`, `datatype`, `shape`, `data`), as a graph
/// trace shows intermediate tensors.
pub fn tensor_json(tensor: &NamedTensor) -> Result<serde_json::Value> {
    let wire = wire_tensor(tensor, false, Parameters::new())?;
    serde_json::to_value(&wire)
        .map_err(|error| weft_core::Error::internal(format!("cannot encode JSON: {error}")))
}

/// Tensors as a JSON array of V2 output objects (`name`, `datatype`, `shape`, `data`), ready
/// to serialise straight to text with no `serde_json::Value` tree in between: what a batch
/// job's output lines hold, written thousands of times a second.
pub struct JsonTensors<'a>(Vec<WireTensor<'a>>);

impl<'a> JsonTensors<'a> {
    /// Checks every tensor can be written as JSON (BYTES elements must be UTF-8).
    pub fn new(tensors: impl IntoIterator<Item = &'a NamedTensor>) -> Result<Self> {
        tensors
            .into_iter()
            .map(|tensor| wire_tensor(tensor, false, Parameters::new()))
            .collect::<Result<_>>()
            .map(JsonTensors)
    }
}

impl Serialize for JsonTensors<'_> {
    fn serialize<S: serde::Serializer>(
        &self,
        serializer: S,
    ) -> std::result::Result<S::Ok, S::Error> {
        self.0.serialize(serializer)
    }
}

/// JSON header then the binary tensors, in order.
fn assemble<'a>(
    header: &impl Serialize,
    binary: impl Iterator<Item = &'a [u8]>,
) -> Result<(Vec<u8>, usize)> {
    let binary: Vec<&[u8]> = binary.collect();
    let binary_length: usize = binary.iter().map(|bytes| bytes.len()).sum();
    // One allocation for the usual case: a small JSON header plus the binary tensors.
    let mut body = Vec::with_capacity(binary_length + 1024);
    serde_json::to_writer(&mut body, header)
        .map_err(|error| weft_core::Error::internal(format!("cannot encode JSON: {error}")))?;
    let json_length = body.len();
    for bytes in binary {
        body.extend_from_slice(bytes);
    }
    Ok((body, json_length))
}

/// Encodes a response; outputs marked binary go after the JSON header, outputs written to shared
/// memory (their parameters name the region) carry no bytes at all.
pub fn encode_infer_response(response: &InferResponse) -> Result<EncodedResponse> {
    let outputs = response
        .outputs
        .iter()
        .map(|output| wire_tensor(&output.tensor, output.binary, output.parameters.clone()))
        .collect::<Result<Vec<_>>>()?;
    let wire = WireResponse {
        model_name: &response.model_name,
        model_version: response.model_version.as_deref(),
        id: response.id.as_deref(),
        parameters: &response.parameters,
        outputs,
    };
    let binary_outputs = || {
        response
            .outputs
            .iter()
            .filter(|output| output.binary && !in_shared_memory(&output.parameters))
    };
    let binary = binary_outputs().map(|output| &output.tensor.tensor.data()[..]);
    let (body, json_length) = assemble(&wire, binary)?;
    let any_binary = binary_outputs().next().is_some();
    Ok(EncodedResponse {
        body,
        json_header_length: any_binary.then_some(json_length),
    })
}

#[derive(Serialize)]
struct WireRequest<'a> {
    inputs: Vec<WireTensor<'a>>,
    #[serde(skip_serializing_if = "Parameters::is_empty")]
    parameters: Parameters,
}

/// Encodes a request (for `weft bench` and tests): all inputs as JSON `data`, or all binary with
/// every output requested binary too. Returns the body and, if binary, the JSON header length.
pub fn encode_infer_request(
    inputs: &[RequestInput],
    binary: bool,
) -> Result<(Vec<u8>, Option<usize>)> {
    let wire_inputs = inputs
        .iter()
        .map(|input| wire_tensor(&input.tensor, binary, input.parameters.clone()))
        .collect::<Result<Vec<_>>>()?;
    let mut parameters = Parameters::new();
    if binary {
        parameters.insert("binary_data_output".into(), true.into());
    }
    let wire = WireRequest {
        inputs: wire_inputs,
        parameters,
    };
    let tensors = inputs
        .iter()
        .filter(|_| binary)
        .map(|input| &input.tensor.tensor.data()[..]);
    let (body, json_length) = assemble(&wire, tensors)?;
    Ok((body, binary.then_some(json_length)))
}
