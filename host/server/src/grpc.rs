//! The Open Inference Protocol over gRPC, served from Triton's `GRPCInferenceService` (a
//! superset of the OIP service), on its own listener (`--grpc-listen`, 8001 as in Triton).
//!
//! It is the HTTP API's twin, not a second implementation: every RPC resolves names in the
//! caller's namespace and runs inference through the same `app::run_infer` (quotas, batching,
//! graphs, cost parameters, metrics, statistics). What is gRPC's own lives here:
//! - **The gate** ([`GrpcGate`]): before tonic decodes a message, a call is authenticated from
//!   its `authorization: Bearer` metadata and charged the tenant's rate quota, and its body is
//!   charged to the tenant's in-flight byte budget frame by frame as it arrives, so an
//!   unauthenticated or over-budget client never gets a message decoded. Only ServerLive,
//!   ServerReady and ServerMetadata need no key, as their HTTP twins.
//! - **Streams**: `ModelStreamInfer` answers each request in order, errors in-band
//!   (`error_message`), so one bad request does not end the stream.
//! - **System shared memory**: the Register/Unregister/Status RPCs share `shared_memory.rs`
//!   with the HTTP routes; inputs and outputs name regions in their parameters, as over HTTP.
//! - **Errors** become gRPC status codes; another tenant's name is NOT_FOUND in the same words
//!   as a missing one, because resolution is the same.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use axum::http::{HeaderMap, Request, Response};
use bytes::Bytes;
use http_body::{Frame, SizeHint};
use prost::Message as _;
use tonic::codec::CompressionEncoding;
use tonic::{Code, Status};
use weft_core::{Error, ErrorKind};
use weft_grpc::grpc_inference_service_server::{GrpcInferenceService, GrpcInferenceServiceServer};
use weft_grpc::inference as pb;
use weft_tenancy::TenantScope;
use weft_tenancy::inflight::SharedPermit;

use crate::app::{AppState, InferSource};
use crate::error::ApiError;

/// The service's path prefix; RPCs are `/inference.GRPCInferenceService/<Method>`.
const SERVICE: &str = "/inference.GRPCInferenceService/";
/// RPCs that need no API key, like their HTTP twins (health and server metadata).
const KEYLESS: [&str; 3] = ["ServerLive", "ServerReady", "ServerMetadata"];
/// Streamed responses waiting for a slow reader before the stream stops reading requests.
const STREAM_QUEUE: usize = 16;
/// The one streaming RPC.
const STREAM_METHOD: &str = "ModelStreamInfer";
/// gRPC's length-prefixed message framing: a compression flag and a 4-byte length.
const FRAME_HEADER: usize = 5;

/// The gRPC endpoint as one service: the gate in front of tonic's generated server.
pub fn service(state: AppState) -> GrpcGate {
    let server = GrpcInferenceServiceServer::new(Inference {
        state: state.clone(),
    })
    .max_decoding_message_size(state.max_request_bytes)
    .max_encoding_message_size(usize::MAX)
    .accept_compressed(CompressionEncoding::Gzip)
    .accept_compressed(CompressionEncoding::Deflate);
    GrpcGate { state, server }
}

/// What the gate found out about a call: whose it is and what its bytes are charged to.
#[derive(Clone)]
struct Caller {
    scope: Arc<TenantScope>,
    charge: Arc<SharedPermit>,
}

/// Authenticates calls and charges their bytes before tonic decodes them (see the module doc).
#[derive(Clone)]
pub struct GrpcGate {
    state: AppState,
    server: GrpcInferenceServiceServer<Inference>,
}

type GateFuture =
    Pin<Box<dyn Future<Output = Result<Response<tonic::body::Body>, Infallible>> + Send>>;

impl tower::Service<Request<hyper::body::Incoming>> for GrpcGate {
    type Response = Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = GateFuture;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<hyper::body::Incoming>) -> GateFuture {
        if let Some(busy_poll) = &self.state.busy_poll {
            busy_poll.touch();
        }
        let method = request
            .uri()
            .path()
            .strip_prefix(SERVICE)
            .unwrap_or_default();
        let keyless = KEYLESS.contains(&method);
        // A unary call's body that stalls fails as an HTTP body does (`body_timeout.rs`); a
        // stream may rightly wait between its requests.
        let idle = (method != STREAM_METHOD).then_some(self.state.body_idle_timeout);
        let mut server = self.server.clone();
        let state = self.state.clone();
        Box::pin(async move {
            if keyless {
                let request = request.map(|body| ChargedBody::new(body, idle, None));
                return tower::Service::call(&mut server, request).await;
            }
            let scope = match crate::tenants::authenticate(&state.tenancy, request.headers())
                .map_err(ApiError::from)
                .and_then(|scope| {
                    scope.charge().map_err(crate::tenants::refused)?;
                    Ok(scope)
                }) {
                Ok(scope) => scope,
                Err(error) => return Ok(status_of(error).into_http()),
            };
            let charge = match state.body_budget.admit(&scope.name, 0).await {
                Ok(permit) => Arc::new(SharedPermit::new(permit, 0)),
                Err(refusal) => return Ok(status_of(crate::tenants::refused(refusal)).into_http()),
            };
            let mut request =
                request.map(|body| ChargedBody::new(body, idle, Some(Arc::clone(&charge))));
            request.extensions_mut().insert(Caller { scope, charge });
            tower::Service::call(&mut server, request).await
        })
    }
}

/// A request body that charges each data frame to the caller's in-flight budget before tonic
/// sees it, waiting (and so holding back the client through HTTP/2 flow control) while the
/// budget is full, and failing the call with RESOURCE_EXHAUSTED when it stays full.
struct ChargedBody {
    body: axum::body::Body,
    charge: Option<Arc<SharedPermit>>,
    /// A frame that arrived and waits for its charge to be granted.
    waiting: Option<(Frame<Bytes>, ChargeFuture)>,
}

type ChargeFuture = Pin<Box<dyn Future<Output = Result<(), weft_tenancy::Refusal>> + Send>>;

impl ChargedBody {
    fn new(
        body: impl http_body::Body<Data = Bytes, Error = impl Into<axum::BoxError>> + Send + 'static,
        idle: Option<std::time::Duration>,
        charge: Option<Arc<SharedPermit>>,
    ) -> Self {
        let body = axum::body::Body::new(body);
        let body = match idle {
            Some(idle) => axum::body::Body::new(crate::body_timeout::IdleBody::new(body, idle)),
            None => body,
        };
        ChargedBody {
            body,
            charge,
            waiting: None,
        }
    }
}

impl http_body::Body for ChargedBody {
    type Data = Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = self.get_mut();
        loop {
            if let Some((_, granted)) = &mut this.waiting {
                let granted = ready!(granted.as_mut().poll(cx));
                let Some((frame, _)) = this.waiting.take() else {
                    return Poll::Ready(None);
                };
                return Poll::Ready(Some(match granted {
                    Ok(()) => Ok(frame),
                    Err(refusal) => Err(Box::new(status_of(crate::tenants::refused(refusal)))),
                }));
            }
            let frame = match ready!(Pin::new(&mut this.body).poll_frame(cx)) {
                Some(Ok(frame)) => frame,
                Some(Err(error)) => {
                    // A stalled body is DEADLINE_EXCEEDED in words that say why.
                    let error = crate::body_timeout::read_error(&error);
                    return Poll::Ready(Some(Err(Box::new(status_of(error.into())))));
                }
                None => return Poll::Ready(None),
            };
            let (Some(charge), Some(data)) = (&this.charge, frame.data_ref()) else {
                return Poll::Ready(Some(Ok(frame)));
            };
            let charge = Arc::clone(charge);
            let bytes = data.len();
            this.waiting = Some((frame, Box::pin(async move { charge.grow_by(bytes).await })));
        }
    }

    fn is_end_stream(&self) -> bool {
        self.waiting.is_none() && self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// The gRPC status of an error: Triton's mapping of error kinds to codes, the message as is,
/// and `retry-after` metadata on a quota refusal.
pub fn status_of(error: ApiError) -> Status {
    let kind = error.error.kind();
    let code = match kind {
        ErrorKind::InvalidArgument => Code::InvalidArgument,
        ErrorKind::NotFound => Code::NotFound,
        ErrorKind::PayloadTooLarge | ErrorKind::ResourceExhausted => Code::ResourceExhausted,
        ErrorKind::Unavailable => Code::Unavailable,
        ErrorKind::Unsupported => Code::Unimplemented,
        ErrorKind::DeadlineExceeded | ErrorKind::RequestTimeout => Code::DeadlineExceeded,
        ErrorKind::Internal => Code::Internal,
        ErrorKind::Unauthenticated => Code::Unauthenticated,
        ErrorKind::PermissionDenied => Code::PermissionDenied,
        ErrorKind::Conflict => Code::AlreadyExists,
    };
    if code == Code::Internal || code == Code::Unavailable {
        tracing::error!(kind = kind.as_str(), error = %error.error, "gRPC call failed");
    } else {
        tracing::info!(kind = kind.as_str(), error = %error.error, "gRPC call refused");
    }
    let mut status = Status::new(code, error.error.message());
    if let Some(seconds) = error.retry_after
        && let Ok(value) = seconds.to_string().parse()
    {
        status.metadata_mut().insert("retry-after", value);
    }
    status
}

fn status(error: impl Into<ApiError>) -> Status {
    status_of(error.into())
}

/// The caller the gate attached; a call that reached a keyed RPC without one is a bug, said so.
fn caller<T>(request: &tonic::Request<T>) -> Result<Caller, Status> {
    request
        .extensions()
        .get::<Caller>()
        .cloned()
        .ok_or_else(|| Status::internal("the call was not authenticated by the gRPC gate"))
}

/// `""` (the protocol's "latest") as no version.
fn version_of(version: &str) -> Option<&str> {
    (!version.is_empty()).then_some(version)
}

/// The RPCs.
struct Inference {
    state: AppState,
}

impl Inference {
    /// One inference request through the same path as HTTP's, `wire_bytes` of it charged.
    async fn infer(
        &self,
        caller: &Caller,
        headers: &HeaderMap,
        message: pb::ModelInferRequest,
        wire_bytes: usize,
    ) -> Result<pb::ModelInferResponse, ApiError> {
        let quota = usize::try_from(caller.scope.quotas.max_request_bytes).unwrap_or(usize::MAX);
        if wire_bytes > quota {
            return Err(Error::new(
                ErrorKind::PayloadTooLarge,
                format!(
                    "the request message of {wire_bytes} bytes exceeds the tenant's \
                     max_request_bytes quota of {quota} bytes"
                ),
            )
            .into());
        }
        let name = message.model_name.clone();
        let version = message.model_version.clone();
        // Tensors read from shared memory count against the same size limit as the message.
        let limit = quota.min(self.state.max_request_bytes);
        let regions = self
            .state
            .shared_memory
            .inputs(&caller.scope.name, limit.saturating_sub(wire_bytes));
        let request = weft_grpc::convert::request_from_grpc(message, &regions)?;
        let source = InferSource::Decoded {
            request,
            wire_bytes,
            charge: Arc::clone(&caller.charge),
        };
        crate::app::run_infer(
            &self.state,
            &caller.scope,
            &name,
            version_of(&version),
            headers,
            source,
            |response| Ok(weft_grpc::convert::response_to_grpc(response)),
        )
        .await
    }
}

#[tonic::async_trait]
impl GrpcInferenceService for Inference {
    async fn server_live(
        &self,
        _: tonic::Request<pb::ServerLiveRequest>,
    ) -> Result<tonic::Response<pb::ServerLiveResponse>, Status> {
        Ok(tonic::Response::new(pb::ServerLiveResponse { live: true }))
    }

    async fn server_ready(
        &self,
        _: tonic::Request<pb::ServerReadyRequest>,
    ) -> Result<tonic::Response<pb::ServerReadyResponse>, Status> {
        // Not ready while shutting down or shedding load, as `GET /v2/health/ready`.
        let ready = crate::app::readiness(&self.state).is_ok();
        Ok(tonic::Response::new(pb::ServerReadyResponse { ready }))
    }

    async fn model_ready(
        &self,
        request: tonic::Request<pb::ModelReadyRequest>,
    ) -> Result<tonic::Response<pb::ModelReadyResponse>, Status> {
        let caller = caller(&request)?;
        let request = request.into_inner();
        // As Triton: a model that is not ready (or not known) answers `ready: false`.
        let ready =
            crate::app::ready_version(&caller.scope, &request.name, version_of(&request.version))
                .is_ok();
        Ok(tonic::Response::new(pb::ModelReadyResponse { ready }))
    }

    async fn server_metadata(
        &self,
        _: tonic::Request<pb::ServerMetadataRequest>,
    ) -> Result<tonic::Response<pb::ServerMetadataResponse>, Status> {
        Ok(tonic::Response::new(pb::ServerMetadataResponse {
            name: "weft".to_string(),
            version: env!("CARGO_PKG_VERSION").to_string(),
            extensions: crate::app::EXTENSIONS
                .iter()
                .map(|e| e.to_string())
                .collect(),
        }))
    }

    async fn model_metadata(
        &self,
        request: tonic::Request<pb::ModelMetadataRequest>,
    ) -> Result<tonic::Response<pb::ModelMetadataResponse>, Status> {
        let caller = caller(&request)?;
        let request = request.into_inner();
        let metadata = crate::app::model_metadata_of(
            &caller.scope,
            &request.name,
            version_of(&request.version),
        )
        .map_err(status)?;
        let tensors = |tensors: Vec<weft_protocol::MetadataTensor>| {
            tensors
                .into_iter()
                .map(|tensor| pb::model_metadata_response::TensorMetadata {
                    name: tensor.name,
                    datatype: tensor.datatype,
                    shape: tensor.shape,
                })
                .collect()
        };
        Ok(tonic::Response::new(pb::ModelMetadataResponse {
            name: metadata.name,
            versions: metadata.versions,
            platform: metadata.platform,
            inputs: tensors(metadata.inputs),
            outputs: tensors(metadata.outputs),
        }))
    }

    async fn model_infer(
        &self,
        request: tonic::Request<pb::ModelInferRequest>,
    ) -> Result<tonic::Response<pb::ModelInferResponse>, Status> {
        let caller = caller(&request)?;
        // The metadata moves out as headers (a rollout's sticky header), not copied.
        let (metadata, _, message) = request.into_parts();
        let headers = metadata.into_headers();
        // The body charged every byte it brought (compressed, if it was); the decoded tensors
        // are compared with that.
        let charged = caller.charge.bytes().await;
        let response = self
            .infer(&caller, &headers, message, charged)
            .await
            .map_err(status_of)?;
        Ok(tonic::Response::new(response))
    }

    async fn model_stream_infer(
        &self,
        request: tonic::Request<tonic::Streaming<pb::ModelInferRequest>>,
    ) -> Result<tonic::Response<tonic::codegen::BoxStream<pb::ModelStreamInferResponse>>, Status>
    {
        let caller = caller(&request)?;
        let (metadata, _, mut requests) = request.into_parts();
        let headers = metadata.into_headers();
        let (sender, receiver) = tokio::sync::mpsc::channel(STREAM_QUEUE);
        let this = Inference {
            state: self.state.clone(),
        };
        tokio::spawn(async move {
            loop {
                let message = match requests.message().await {
                    Ok(Some(message)) => message,
                    Ok(None) => break,
                    // A broken stream (oversized message, bad framing, budget refused) ends
                    // with its status.
                    Err(status) => {
                        let _ = sender.send(Err(status)).await;
                        break;
                    }
                };
                let wire_bytes = message.encoded_len() + FRAME_HEADER;
                let id = message.id.clone();
                // Each request in the stream pays the rate quota, as a unary call does.
                let result = match caller.scope.charge() {
                    Ok(()) => this.infer(&caller, &headers, message, wire_bytes).await,
                    Err(refusal) => Err(crate::tenants::refused(refusal)),
                };
                caller.charge.release(wire_bytes).await;
                let reply = match result {
                    Ok(response) => pb::ModelStreamInferResponse {
                        error_message: String::new(),
                        infer_response: Some(response),
                    },
                    Err(error) => {
                        let status = status_of(error);
                        pb::ModelStreamInferResponse {
                            error_message: status.message().to_string(),
                            // The id tells the client which request failed.
                            infer_response: Some(pb::ModelInferResponse {
                                id,
                                ..Default::default()
                            }),
                        }
                    }
                };
                if sender.send(Ok(reply)).await.is_err() {
                    break;
                }
            }
        });
        let responses = futures_util::stream::unfold(receiver, |mut receiver| async move {
            receiver.recv().await.map(|item| (item, receiver))
        });
        Ok(tonic::Response::new(Box::pin(responses)))
    }

    async fn model_config(
        &self,
        request: tonic::Request<pb::ModelConfigRequest>,
    ) -> Result<tonic::Response<pb::ModelConfigResponse>, Status> {
        let caller = caller(&request)?;
        let request = request.into_inner();
        let (_, model) = caller
            .scope
            .registry
            .resolve(&request.name, version_of(&request.version))
            .map_err(status)?;
        Ok(tonic::Response::new(pb::ModelConfigResponse {
            config: Some(model_config(&request.name, model.as_ref())),
        }))
    }

    async fn model_statistics(
        &self,
        request: tonic::Request<pb::ModelStatisticsRequest>,
    ) -> Result<tonic::Response<pb::ModelStatisticsResponse>, Status> {
        let caller = caller(&request)?;
        let request = request.into_inner();
        let name = (!request.name.is_empty()).then_some(request.name.as_str());
        let stats = crate::app::model_stats_of(
            &self.state,
            &caller.scope,
            name,
            version_of(&request.version),
        )
        .map_err(status)?;
        let duration = |stat: crate::stats::DurationStat| {
            Some(pb::StatisticDuration {
                count: stat.count,
                ns: stat.ns,
            })
        };
        let model_stats = stats
            .into_iter()
            .map(|stat| {
                let inference = stat.inference_stats;
                pb::ModelStatistics {
                    name: stat.name,
                    version: stat.version,
                    last_inference: stat.last_inference,
                    inference_count: stat.inference_count,
                    execution_count: stat.execution_count,
                    inference_stats: Some(pb::InferStatistics {
                        success: duration(inference.success),
                        fail: duration(inference.fail),
                        queue: duration(inference.queue),
                        compute_input: duration(inference.compute_input),
                        compute_infer: duration(inference.compute_infer),
                        compute_output: duration(inference.compute_output),
                        cache_hit: duration(inference.cache_hit),
                        cache_miss: duration(inference.cache_miss),
                    }),
                    batch_stats: stat
                        .batch_stats
                        .into_iter()
                        .map(|batch| pb::InferBatchStatistics {
                            batch_size: batch.batch_size,
                            compute_input: duration(batch.compute_input),
                            compute_infer: duration(batch.compute_infer),
                            compute_output: duration(batch.compute_output),
                        })
                        .collect(),
                    ..Default::default()
                }
            })
            .collect();
        Ok(tonic::Response::new(pb::ModelStatisticsResponse {
            model_stats,
        }))
    }

    async fn system_shared_memory_status(
        &self,
        request: tonic::Request<pb::SystemSharedMemoryStatusRequest>,
    ) -> Result<tonic::Response<pb::SystemSharedMemoryStatusResponse>, Status> {
        let caller = caller(&request)?;
        let name = request.into_inner().name;
        let regions = self
            .state
            .shared_memory
            .status(
                &caller.scope.name,
                (!name.is_empty()).then_some(name.as_str()),
            )
            .map_err(status)?
            .into_iter()
            .map(|region| {
                (
                    region.name.clone(),
                    pb::system_shared_memory_status_response::RegionStatus {
                        name: region.name,
                        key: region.key,
                        offset: region.offset,
                        byte_size: region.byte_size,
                    },
                )
            })
            .collect();
        Ok(tonic::Response::new(pb::SystemSharedMemoryStatusResponse {
            regions,
        }))
    }

    async fn system_shared_memory_register(
        &self,
        request: tonic::Request<pb::SystemSharedMemoryRegisterRequest>,
    ) -> Result<tonic::Response<pb::SystemSharedMemoryRegisterResponse>, Status> {
        let caller = caller(&request)?;
        let request = request.into_inner();
        self.state
            .shared_memory
            .register(
                &caller.scope.name,
                crate::shared_memory::RegionStatus {
                    name: request.name,
                    key: request.key,
                    offset: request.offset,
                    byte_size: request.byte_size,
                },
            )
            .map_err(status)?;
        Ok(tonic::Response::new(
            pb::SystemSharedMemoryRegisterResponse {},
        ))
    }

    async fn system_shared_memory_unregister(
        &self,
        request: tonic::Request<pb::SystemSharedMemoryUnregisterRequest>,
    ) -> Result<tonic::Response<pb::SystemSharedMemoryUnregisterResponse>, Status> {
        let caller = caller(&request)?;
        let name = request.into_inner().name;
        self.state
            .shared_memory
            .unregister(
                &caller.scope.name,
                (!name.is_empty()).then_some(name.as_str()),
            )
            .map_err(status)?;
        Ok(tonic::Response::new(
            pb::SystemSharedMemoryUnregisterResponse {},
        ))
    }

    async fn repository_model_load(
        &self,
        request: tonic::Request<pb::RepositoryModelLoadRequest>,
    ) -> Result<tonic::Response<pb::RepositoryModelLoadResponse>, Status> {
        let caller = caller(&request)?;
        let name = request.into_inner().model_name;
        crate::app::load_model(&caller.scope, &name)
            .await
            .map_err(status_of)?;
        Ok(tonic::Response::new(pb::RepositoryModelLoadResponse {}))
    }

    async fn repository_model_unload(
        &self,
        request: tonic::Request<pb::RepositoryModelUnloadRequest>,
    ) -> Result<tonic::Response<pb::RepositoryModelUnloadResponse>, Status> {
        let caller = caller(&request)?;
        let name = request.into_inner().model_name;
        crate::app::unload_model(&caller.scope, &name).map_err(status)?;
        Ok(tonic::Response::new(pb::RepositoryModelUnloadResponse {}))
    }

    async fn repository_index(
        &self,
        request: tonic::Request<pb::RepositoryIndexRequest>,
    ) -> Result<tonic::Response<pb::RepositoryIndexResponse>, Status> {
        let caller = caller(&request)?;
        let request = request.into_inner();
        // One repository per tenant: any name but the empty one is unknown.
        if !request.repository_name.is_empty() {
            return Err(Status::not_found(format!(
                "unknown repository '{}'; Weft has one repository per tenant, named ''",
                request.repository_name
            )));
        }
        let models = crate::app::repository_entries(&caller.scope, request.ready)
            .into_iter()
            .map(|entry| pb::repository_index_response::ModelIndex {
                name: entry.name,
                version: entry.version.unwrap_or_default(),
                state: entry.state,
                reason: entry.reason,
            })
            .collect();
        Ok(tonic::Response::new(pb::RepositoryIndexResponse { models }))
    }
}

/// A model's configuration as Triton's `ModelConfig` message; the same content as the HTTP
/// `model_configuration` JSON (`app::triton_config`).
fn model_config(name: &str, model: &dyn weft_core::Model) -> pb::ModelConfig {
    let metadata = model.metadata();
    let batches = metadata.max_batch_size > 0;
    let data_type = |datatype| {
        pb::DataType::from_str_name(&crate::app::triton_data_type(datatype))
            .unwrap_or(pb::DataType::TypeInvalid) as i32
    };
    let serving = model.serving();
    pb::ModelConfig {
        name: name.to_string(),
        platform: metadata.platform.clone(),
        backend: crate::app::config_backend(&metadata.platform).to_string(),
        max_batch_size: i32::try_from(metadata.max_batch_size).unwrap_or(i32::MAX),
        input: metadata
            .inputs
            .iter()
            .map(|spec| pb::ModelInput {
                name: spec.name.clone(),
                data_type: data_type(spec.datatype),
                dims: crate::app::config_dims(&spec.shape, batches).to_vec(),
                ..Default::default()
            })
            .collect(),
        output: metadata
            .outputs
            .iter()
            .map(|spec| pb::ModelOutput {
                name: spec.name.clone(),
                data_type: data_type(spec.datatype),
                dims: crate::app::config_dims(&spec.shape, batches).to_vec(),
                ..Default::default()
            })
            .collect(),
        scheduling_choice: serving.dynamic_batching.map(|batching| {
            pb::model_config::SchedulingChoice::DynamicBatching(pb::ModelDynamicBatching {
                preferred_batch_size: batching
                    .preferred_batch_size
                    .iter()
                    .map(|&size| i32::try_from(size).unwrap_or(i32::MAX))
                    .collect(),
                max_queue_delay_microseconds: batching.max_queue_delay_microseconds,
                ..Default::default()
            })
        }),
        instance_group: if serving.instances > 0 {
            vec![pb::ModelInstanceGroup {
                name: name.to_string(),
                kind: match serving.gpu {
                    None => pb::model_instance_group::Kind::Cpu as i32,
                    Some(_) => pb::model_instance_group::Kind::Gpu as i32,
                },
                gpus: serving
                    .gpu
                    .map(|device| vec![i32::try_from(device).unwrap_or(i32::MAX)])
                    .unwrap_or_default(),
                count: i32::try_from(serving.instances).unwrap_or(i32::MAX),
                ..Default::default()
            }]
        } else {
            Vec::new()
        },
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use std::time::Duration;

    use http_body_util::BodyExt;
    use weft_tenancy::inflight::BodyBudget;

    use super::*;

    /// A body whose frames the test sends when it wants.
    fn channel_body() -> (
        tokio::sync::mpsc::Sender<Bytes>,
        impl http_body::Body<Data = Bytes, Error = Infallible> + Send + 'static,
    ) {
        let (sender, receiver) = tokio::sync::mpsc::channel::<Bytes>(8);
        let frames = futures_util::stream::unfold(receiver, |mut receiver| async move {
            let frame = receiver.recv().await?;
            Some((Ok::<_, Infallible>(Frame::data(frame)), receiver))
        });
        (sender, http_body_util::StreamBody::new(frames))
    }

    #[tokio::test]
    async fn frames_are_charged_as_they_arrive_and_a_full_budget_fails_the_call() {
        let budget = BodyBudget::new(8 << 10);
        let held = budget.admit("acme", 6 << 10).await.unwrap();
        let charge = Arc::new(SharedPermit::new(budget.admit("acme", 0).await.unwrap(), 0));
        let (sender, inner) = channel_body();
        let mut body = ChargedBody::new(inner, None, Some(Arc::clone(&charge)));
        sender.send(Bytes::from(vec![0u8; 1024])).await.unwrap();
        let frame = body.frame().await.unwrap().unwrap();
        assert_eq!(frame.into_data().unwrap().len(), 1024);
        assert_eq!(charge.bytes().await, 1024);
        // 6 KiB held elsewhere + 1 KiB + 2 KiB more is over the 8 KiB budget: after the
        // budget's wait the call fails with RESOURCE_EXHAUSTED.
        sender.send(Bytes::from(vec![0u8; 2048])).await.unwrap();
        let error = body.frame().await.unwrap().unwrap_err();
        let status = error.downcast::<Status>().unwrap();
        assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
        assert!(status.metadata().get("retry-after").is_some());
        drop(held);
    }

    #[tokio::test(start_paused = true)]
    async fn a_stalled_unary_body_fails_with_deadline_exceeded() {
        let (sender, inner) = channel_body();
        let mut body = ChargedBody::new(inner, Some(Duration::from_secs(30)), None);
        sender.send(Bytes::from_static(b"partial")).await.unwrap();
        assert!(body.frame().await.unwrap().is_ok());
        // Nothing more arrives.
        let error = body.frame().await.unwrap().unwrap_err();
        let status = error.downcast::<Status>().unwrap();
        assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
        assert!(
            status.message().contains("--body-idle-timeout-seconds"),
            "{status:?}"
        );
        drop(sender);
    }
}
