//! `weft bench --grpc` and `--shared-memory`: the same load as over HTTP, sent as gRPC
//! `ModelInfer` calls (raw tensor contents, as tritonclient sends them), or with the tensors
//! in a POSIX shared memory object the bench registers as regions (Triton's system shared
//! memory extension), so BENCHMARKS.md can compare the transports on one workload.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use anyhow::{Context, bail};
use bytes::Bytes;
use serde_json::json;
use tonic::metadata::MetadataValue;
use tonic::transport::{Channel, Endpoint};
use weft_core::{DataType, NamedTensor, TensorSpec};
use weft_grpc::grpc_inference_service_client::GrpcInferenceServiceClient;
use weft_grpc::inference as pb;

type Client = GrpcInferenceServiceClient<Channel>;

/// Where the tensors of a shared-memory load lie: one object under /dev/shm, one region per
/// tensor. The object is removed when the plan is dropped.
pub struct SharedMemoryPlan {
    key: String,
    path: PathBuf,
    pub inputs: Vec<Place>,
    pub outputs: Vec<Place>,
}

/// One tensor's region.
pub struct Place {
    pub tensor: String,
    pub datatype: DataType,
    pub shape: Vec<usize>,
    pub region: String,
    pub offset: u64,
    pub byte_size: u64,
}

impl SharedMemoryPlan {
    /// Lays out `inputs` (written now) and room for `outputs` of `rows` rows in a new object.
    pub fn create(
        inputs: &[NamedTensor],
        outputs: &[TensorSpec],
        rows: usize,
    ) -> anyhow::Result<Self> {
        let key = format!("/weft-bench-{}", std::process::id());
        let path = PathBuf::from(format!("/dev/shm{key}"));
        let mut bytes = Vec::new();
        let mut place = |tensor: &str, datatype: DataType, shape: Vec<usize>, size: usize| {
            let at = bytes.len() as u64;
            bytes.resize(bytes.len() + size, 0);
            Place {
                tensor: tensor.to_string(),
                datatype,
                shape,
                region: format!("weft-bench-{}-{tensor}", std::process::id()),
                offset: at,
                byte_size: size as u64,
            }
        };
        let mut input_places = Vec::new();
        for input in inputs {
            let data = input.tensor.data();
            let at = place(
                &input.name,
                input.tensor.datatype(),
                input.tensor.shape().to_vec(),
                data.len(),
            );
            input_places.push(at);
        }
        let mut output_places = Vec::new();
        for output in outputs {
            let size = output.datatype.element_size().with_context(|| {
                format!("--shared-memory cannot size BYTES output '{}'", output.name)
            })?;
            let shape: Vec<usize> = output
                .shape
                .iter()
                .map(|&d| if d < 0 { rows } else { d as usize })
                .collect();
            let count: usize = shape.iter().product();
            output_places.push(place(&output.name, output.datatype, shape, count * size));
        }
        for (input, at) in inputs.iter().zip(&input_places) {
            let start = at.offset as usize;
            bytes[start..start + input.tensor.data().len()].copy_from_slice(input.tensor.data());
        }
        std::fs::write(&path, &bytes)
            .with_context(|| format!("cannot create shared memory {}", path.display()))?;
        Ok(SharedMemoryPlan {
            key,
            path,
            inputs: input_places,
            outputs: output_places,
        })
    }

    fn places(&self) -> impl Iterator<Item = &Place> {
        self.inputs.iter().chain(&self.outputs)
    }

    /// Registers every region with the server over HTTP.
    pub async fn register_http(&self, client: &reqwest::Client, url: &str) -> anyhow::Result<()> {
        for place in self.places() {
            let response = client
                .post(format!(
                    "{url}/v2/systemsharedmemory/region/{}/register",
                    place.region
                ))
                .json(
                    &json!({"key": self.key, "offset": place.offset, "byte_size": place.byte_size}),
                )
                .send()
                .await
                .context("cannot register a shared memory region")?;
            if !response.status().is_success() {
                bail!(
                    "registering shared memory failed (is the tenant in the server's \
                     --system-shared-memory?): {}",
                    response.text().await.unwrap_or_default()
                );
            }
        }
        Ok(())
    }

    /// A V2 JSON request naming the regions instead of carrying data.
    pub fn http_body(&self) -> Bytes {
        let parameters = |place: &Place| json!({"shared_memory_region": place.region, "shared_memory_byte_size": place.byte_size});
        let body = json!({
            "inputs": self.inputs.iter().map(|place| json!({
                "name": place.tensor,
                "datatype": place.datatype.as_str(),
                "shape": place.shape,
                "parameters": parameters(place),
            })).collect::<Vec<_>>(),
            "outputs": self.outputs.iter().map(|place| json!({
                "name": place.tensor,
                "parameters": parameters(place),
            })).collect::<Vec<_>>(),
        });
        Bytes::from(body.to_string())
    }
}

impl Drop for SharedMemoryPlan {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// What one gRPC load sends.
pub struct GrpcTarget<'a> {
    /// `http://host:port` of the gRPC listener.
    pub url: &'a str,
    pub model: &'a str,
    pub api_key: Option<&'a str>,
    /// HTTP/2 connections to spread the calls over.
    pub connections: usize,
    pub rows: usize,
    pub inputs: Option<Vec<TensorSpec>>,
    /// Tensors through shared memory regions instead of the messages.
    pub shared_memory: bool,
}

/// Sends the same `ModelInfer` call again and again over a few HTTP/2 connections.
#[derive(Clone)]
pub struct GrpcCaller {
    clients: Arc<Vec<Client>>,
    next: Arc<AtomicUsize>,
    request: pb::ModelInferRequest,
    authorization: Option<MetadataValue<tonic::metadata::Ascii>>,
    _plan: Option<Arc<SharedMemoryPlan>>,
}

impl GrpcCaller {
    /// Connects, reads the model's metadata (for its inputs and outputs) and builds the call.
    pub async fn new(target: &GrpcTarget<'_>) -> anyhow::Result<Self> {
        let authorization = target
            .api_key
            .map(|key| format!("Bearer {key}").parse())
            .transpose()
            .context("--api-key is not a valid metadata value")?;
        let mut clients = Vec::new();
        for _ in 0..target.connections.max(1) {
            let channel = Endpoint::from_shared(target.url.to_string())
                .context("--grpc-url is not a URL")?
                .tcp_nodelay(true)
                .initial_stream_window_size(4 << 20)
                .initial_connection_window_size(16 << 20)
                .connect()
                .await
                .with_context(|| format!("cannot connect to {}", target.url))?;
            clients.push(
                GrpcInferenceServiceClient::new(channel)
                    .max_decoding_message_size(usize::MAX)
                    .max_encoding_message_size(usize::MAX),
            );
        }
        let caller = GrpcCaller {
            clients: Arc::new(clients),
            next: Arc::default(),
            request: pb::ModelInferRequest::default(),
            authorization,
            _plan: None,
        };
        let (inputs, outputs) = caller.metadata(target.model).await?;
        let specs = target.inputs.clone().unwrap_or(inputs);
        let tensors = crate::bench::sample_inputs(&specs, target.rows)?;
        let mut request = pb::ModelInferRequest {
            model_name: target.model.to_string(),
            ..Default::default()
        };
        let mut plan = None;
        if target.shared_memory {
            let layout = SharedMemoryPlan::create(&tensors, &outputs, target.rows)?;
            for place in layout.places() {
                caller.clients[0]
                    .clone()
                    .system_shared_memory_register(caller.with_key(
                        pb::SystemSharedMemoryRegisterRequest {
                            name: place.region.clone(),
                            key: layout.key.clone(),
                            offset: place.offset,
                            byte_size: place.byte_size,
                        },
                    ))
                    .await
                    .context(
                        "registering shared memory failed (is the tenant in the server's \
                         --system-shared-memory?)",
                    )?;
            }
            let parameters = |place: &Place| {
                [
                    (
                        "shared_memory_region".to_string(),
                        string_parameter(&place.region),
                    ),
                    (
                        "shared_memory_byte_size".to_string(),
                        pb::InferParameter {
                            parameter_choice: Some(
                                pb::infer_parameter::ParameterChoice::Int64Param(
                                    place.byte_size as i64,
                                ),
                            ),
                        },
                    ),
                ]
                .into_iter()
                .collect()
            };
            request.inputs = layout
                .inputs
                .iter()
                .map(|place| pb::model_infer_request::InferInputTensor {
                    name: place.tensor.clone(),
                    datatype: place.datatype.as_str().to_string(),
                    shape: place.shape.iter().map(|&d| d as i64).collect(),
                    parameters: parameters(place),
                    contents: None,
                })
                .collect();
            request.outputs = layout
                .outputs
                .iter()
                .map(
                    |place| pb::model_infer_request::InferRequestedOutputTensor {
                        name: place.tensor.clone(),
                        parameters: parameters(place),
                    },
                )
                .collect();
            plan = Some(Arc::new(layout));
        } else {
            for tensor in &tensors {
                request
                    .inputs
                    .push(pb::model_infer_request::InferInputTensor {
                        name: tensor.name.clone(),
                        datatype: tensor.tensor.datatype().as_str().to_string(),
                        shape: tensor.tensor.shape().iter().map(|&d| d as i64).collect(),
                        ..Default::default()
                    });
                request
                    .raw_input_contents
                    .push(tensor.tensor.data().clone());
            }
        }
        Ok(GrpcCaller {
            request,
            _plan: plan,
            ..caller
        })
    }

    fn with_key<T>(&self, message: T) -> tonic::Request<T> {
        let mut request = tonic::Request::new(message);
        if let Some(value) = &self.authorization {
            request
                .metadata_mut()
                .insert("authorization", value.clone());
        }
        request
    }

    async fn metadata(&self, model: &str) -> anyhow::Result<(Vec<TensorSpec>, Vec<TensorSpec>)> {
        let metadata = self.clients[0]
            .clone()
            .model_metadata(self.with_key(pb::ModelMetadataRequest {
                name: model.to_string(),
                version: String::new(),
            }))
            .await
            .with_context(|| format!("cannot read metadata of '{model}' over gRPC"))?
            .into_inner();
        let specs = |tensors: Vec<pb::model_metadata_response::TensorMetadata>| {
            tensors
                .into_iter()
                .map(|tensor| {
                    Ok(TensorSpec {
                        datatype: tensor.datatype.parse()?,
                        name: tensor.name,
                        shape: tensor.shape,
                    })
                })
                .collect::<anyhow::Result<Vec<_>>>()
        };
        Ok((specs(metadata.inputs)?, specs(metadata.outputs)?))
    }

    /// One call; whether it succeeded.
    pub fn call(&self) -> impl std::future::Future<Output = bool> + Send + use<> {
        let index = self.next.fetch_add(1, Ordering::Relaxed) % self.clients.len();
        let mut client = self.clients[index].clone();
        let request = self.with_key(self.request.clone());
        async move { client.model_infer(request).await.is_ok() }
    }
}

fn string_parameter(value: &str) -> pb::InferParameter {
    pb::InferParameter {
        parameter_choice: Some(pb::infer_parameter::ParameterChoice::StringParam(
            value.to_string(),
        )),
    }
}
