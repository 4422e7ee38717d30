//! The HTTP application: the Open Inference Protocol (KServe V2) REST routes over axum.
//!
//! `app(state)` builds the whole router so tests serve exactly what `weft serve` serves. Each
//! handler is thin: authenticate the caller (its API key selects its tenant's namespace, see
//! `tenants.rs`), decode with `weft-protocol`, resolve in that namespace, run the model, encode.
//! Errors flow as `weft_core::Error` and become HTTP once, in `error.rs`. Health, server
//! metadata and `/metrics` need no key; the control plane lives in `control.rs`.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderName, HeaderValue, Request, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use bytes::Bytes;
use http_body_util::{BodyExt, LengthLimitError, Limited};
use serde_json::json;
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};
use tower_http::trace::TraceLayer;
use weft_core::RequestContext;
use weft_core::{Error, ErrorKind, Model, NamedTensor, Tensor};
use weft_engine::ModelState;
use weft_engine::graph::GRAPH_PLATFORM;
use weft_protocol::shared_memory::SharedMemoryRef;
use weft_protocol::{
    InferRequest, InferResponse, MetadataTensor, ModelMetadataResponse, RepositoryIndexEntry,
    ResponseOutput, ServerMetadataResponse, decode_infer_request_with, encode_infer_response,
};
use weft_tenancy::inflight::SharedPermit;

use crate::error::{ApiError, Path, status_of};
use crate::metrics::{Metrics, ScrapeSources};
use crate::stats::{Outcome, StatsStore};
use crate::tenants::{Tenancy, TenantScope};

/// The binary tensor data extension's header: length of the JSON part of the body.
pub const HEADER_LENGTH: &str = "inference-header-content-length";
const REQUEST_ID: &str = "x-request-id";

/// Uploads larger than this get 413, unless set otherwise.
pub const DEFAULT_MAX_UPLOAD_BYTES: usize = 1 << 30;

/// Requests slower than this get a warning log line, unless set otherwise.
pub const DEFAULT_SLOW_REQUEST: Duration = Duration::from_secs(1);

/// What every handler shares.
#[derive(Clone)]
pub struct AppState {
    /// Tenants: keys, namespaces, quotas, and the store behind them.
    pub tenancy: Arc<Tenancy>,
    /// Largest request body accepted; larger gets 413.
    pub max_request_bytes: usize,
    /// Largest control-plane upload (plugin, model, graph) accepted; larger gets 413.
    pub max_upload_bytes: usize,
    /// Cleared when shutdown starts, so readiness turns 503 while in-flight requests finish.
    pub accepting: Arc<AtomicBool>,
    pub metrics: Arc<Metrics>,
    /// What `/metrics` reads at scrape time (the plugin runtime and the loaded plugins).
    pub scrape: ScrapeSources,
    pub stats: Arc<StatsStore>,
    /// Requests slower than this are logged at warn level.
    pub slow_request: Duration,
    /// Storage held by each tenant's uploads in progress (see `weft_tenancy::storage`).
    pub uploads: Arc<weft_tenancy::storage::StorageLedger>,
    /// Each tenant's budget of request bytes in flight on the inference path (see
    /// `weft_tenancy::inflight`).
    pub body_budget: Arc<weft_tenancy::inflight::BodyBudget>,
    /// A request body that sends nothing for this long fails with 408 (see `body_timeout.rs`).
    pub body_idle_timeout: Duration,
    /// Spinners that keep the cores awake while requests arrive (`--busy-poll-us`).
    pub busy_poll: Option<Arc<crate::busy_poll::BusyPoll>>,
    /// Inference requests in flight, which batch jobs yield to.
    pub realtime: Arc<weft_engine::jobs::RealtimeLoad>,
    /// Tenants' registered shared memory regions (`--system-shared-memory`).
    pub shared_memory: Arc<crate::shared_memory::SystemSharedMemory>,
    /// Inference requests in flight against the replica's capacity (`load.rs`).
    pub load: Arc<crate::load::ReplicaLoad>,
    /// `/metrics` on the main listener; off when `--metrics-listen` gives it its own.
    pub metrics_on_main: bool,
}

impl AppState {
    pub fn new(tenancy: Arc<Tenancy>, max_request_bytes: usize) -> Self {
        AppState {
            tenancy,
            max_request_bytes,
            max_upload_bytes: DEFAULT_MAX_UPLOAD_BYTES,
            accepting: Arc::new(AtomicBool::new(true)),
            metrics: Arc::default(),
            scrape: ScrapeSources::default(),
            stats: Arc::default(),
            slow_request: DEFAULT_SLOW_REQUEST,
            uploads: Arc::default(),
            body_budget: Arc::default(),
            body_idle_timeout: crate::body_timeout::DEFAULT_BODY_IDLE_TIMEOUT,
            busy_poll: None,
            realtime: Arc::default(),
            shared_memory: Arc::default(),
            load: Arc::default(),
            metrics_on_main: true,
        }
    }
}

/// Builds the router with request ids, tracing spans and a JSON 404 for unknown routes.
pub fn app(state: AppState) -> Router {
    let request_id = HeaderName::from_static(REQUEST_ID);
    let idle = state.body_idle_timeout;
    let busy_poll = state.busy_poll.clone();
    let metrics_route = if state.metrics_on_main {
        Router::new().route("/metrics", get(metrics))
    } else {
        Router::new()
    };
    Router::new()
        .route("/v2/health/live", get(live))
        .route("/v2/health/ready", get(ready))
        .route("/v2", get(server_metadata))
        .route("/v2/models/{model}", get(model_metadata))
        .route("/v2/models/{model}/versions/{version}", get(model_version_metadata))
        .route("/v2/models/{model}/ready", get(model_ready))
        .route("/v2/models/{model}/config", get(model_config))
        .route("/v2/models/{model}/versions/{version}/config", get(model_version_config))
        .route("/v2/models/{model}/versions/{version}/ready", get(model_version_ready))
        .route("/v2/models/{model}/infer", post(infer))
        .route("/v2/models/{model}/versions/{version}/infer", post(infer_version))
        .route("/v2/repository/index", post(repository_index))
        .route("/v2/repository/models/{model}/load", post(repository_load))
        .route("/v2/repository/models/{model}/unload", post(repository_unload))
        .route("/v2/models/stats", get(all_stats))
        .route("/v2/models/{model}/stats", get(model_stats))
        .route("/v2/models/{model}/versions/{version}/stats", get(model_version_stats))
        .merge(metrics_route)
        .merge(crate::control::routes())
        .merge(crate::jobs::routes())
        .merge(crate::shared_memory::routes())
        .fallback(unknown_route)
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(state)
        // Every body fails with 408 once its client stops sending (see `body_timeout.rs`), and
        // every request keeps the busy-poll spinners going (see `busy_poll.rs`).
        .layer(axum::middleware::map_request(
            move |request: Request<Body>| {
                if let Some(busy_poll) = &busy_poll {
                    busy_poll.touch();
                }
                async move {
                    request.map(|body| Body::new(crate::body_timeout::IdleBody::new(body, idle)))
                }
            },
        ))
        .layer(PropagateRequestIdLayer::new(request_id.clone()))
        .layer(
            TraceLayer::new_for_http().make_span_with(|request: &Request<Body>| {
                let id = request
                    .headers()
                    .get(REQUEST_ID)
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("-");
                tracing::info_span!("request", id, method = %request.method(), path = %request.uri().path())
            }),
        )
        .layer(SetRequestIdLayer::new(request_id, MakeRequestUuid))
}

/// `/metrics` and the health routes, for `--metrics-listen`: a plaintext port a network policy
/// can open to monitoring alone, and where probes reach health even when the main listeners
/// demand client certificates.
pub fn metrics_app(state: AppState) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/v2/health/live", get(live))
        .route("/v2/health/ready", get(ready))
        .fallback(unknown_route)
        .with_state(state)
}

/// The tenant whose API key a request carries; 401 without a valid one, 429 when the tenant is
/// over its rate quota.
pub struct Caller(pub Arc<TenantScope>);

impl axum::extract::FromRequestParts<AppState> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        state: &AppState,
    ) -> Result<Self, Self::Rejection> {
        let scope = crate::tenants::authenticate(&state.tenancy, &parts.headers)?;
        // Every authenticated request pays the tenant's rate quota: metadata, statistics and
        // control-plane reads included, not only inference.
        scope.charge().map_err(crate::tenants::refused)?;
        Ok(Caller(scope))
    }
}

async fn live() -> Json<serde_json::Value> {
    Json(json!({ "live": true }))
}

async fn ready(State(state): State<AppState>) -> Response {
    match readiness(&state) {
        Ok(()) => Json(json!({ "ready": true })).into_response(),
        Err(error) => ApiError::from(error).into_response(),
    }
}

/// Whether this replica takes new requests: not when shutting down, nor while it sheds load.
pub fn readiness(state: &AppState) -> Result<(), Error> {
    if !state.accepting.load(Ordering::Relaxed) {
        return Err(Error::unavailable("server is shutting down"));
    }
    if state.load.shedding() {
        return Err(Error::unavailable(format!(
            "this replica is at capacity ({} inference requests in flight, \
             --max-inflight-requests)",
            state.load.capacity()
        )));
    }
    Ok(())
}

/// The protocol extensions Weft serves, as server metadata lists them (HTTP and gRPC).
pub const EXTENSIONS: &[&str] = &[
    "binary_tensor_data",
    "statistics",
    "model_configuration",
    "system_shared_memory",
    "model_repository",
];

async fn server_metadata() -> Json<ServerMetadataResponse> {
    Json(ServerMetadataResponse {
        name: "weft".to_string(),
        version: env!("CARGO_PKG_VERSION").to_string(),
        extensions: EXTENSIONS.iter().map(|name| name.to_string()).collect(),
    })
}

async fn method_not_allowed(request: Request<Body>) -> Response {
    let body = weft_protocol::ErrorResponse {
        error: format!(
            "method {} is not allowed on {}",
            request.method(),
            request.uri().path()
        ),
    };
    (StatusCode::METHOD_NOT_ALLOWED, Json(body)).into_response()
}

async fn unknown_route(request: Request<Body>) -> ApiError {
    ApiError::from(Error::not_found(format!(
        "no route for {} {}",
        request.method(),
        request.uri().path()
    )))
}

fn metadata_response(
    scope: &TenantScope,
    name: &str,
    version: Option<&str>,
) -> Result<Response, ApiError> {
    Ok(Json(model_metadata_of(scope, name, version)?).into_response())
}

/// A model's (or graph's) metadata in the caller's namespace.
pub fn model_metadata_of(
    scope: &TenantScope,
    name: &str,
    version: Option<&str>,
) -> Result<ModelMetadataResponse, Error> {
    let (_, model) = scope.registry.resolve(name, version)?;
    let metadata = model.metadata();
    let tensors = |specs: &[weft_core::TensorSpec]| {
        specs
            .iter()
            .map(|spec| MetadataTensor {
                name: spec.name.clone(),
                datatype: spec.datatype.as_str().to_string(),
                shape: spec.shape.clone(),
            })
            .collect()
    };
    let versions = scope
        .registry
        .versions(name)
        .unwrap_or_default()
        .iter()
        .map(u64::to_string)
        .collect();
    Ok(ModelMetadataResponse {
        name: name.to_string(),
        versions,
        platform: metadata.platform.clone(),
        inputs: tensors(&metadata.inputs),
        outputs: tensors(&metadata.outputs),
    })
}

async fn model_metadata(
    Caller(scope): Caller,
    Path(model): Path<String>,
) -> Result<Response, ApiError> {
    metadata_response(&scope, &model, None)
}

async fn model_version_metadata(
    Caller(scope): Caller,
    Path((model, version)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    metadata_response(&scope, &model, Some(&version))
}

/// Triton's `model_configuration` extension: the model's (or graph's) configuration in
/// Triton's JSON shape, which `get_model_config`, perf_analyzer and the like read for
/// `max_batch_size`, the tensors' `data_type` and `dims` (without the batch dimension when
/// the model batches), `dynamic_batching` and `instance_group`.
fn config_response(
    scope: &TenantScope,
    name: &str,
    version: Option<&str>,
) -> Result<Response, ApiError> {
    let (_, model) = scope.registry.resolve(name, version)?;
    Ok(Json(triton_config(name, model.as_ref())).into_response())
}

/// A model's configuration as Triton writes it (`config.pbtxt` as JSON).
pub fn triton_config(name: &str, model: &dyn weft_core::Model) -> serde_json::Value {
    let metadata = model.metadata();
    let batches = metadata.max_batch_size > 0;
    let tensors = |specs: &[weft_core::TensorSpec]| -> Vec<serde_json::Value> {
        specs
            .iter()
            .map(|spec| {
                json!({
                    "name": spec.name,
                    "data_type": triton_data_type(spec.datatype),
                    "dims": config_dims(&spec.shape, batches),
                })
            })
            .collect()
    };
    let backend = config_backend(&metadata.platform);
    let mut config = json!({
        "name": name,
        "platform": metadata.platform,
        "backend": backend,
        "max_batch_size": metadata.max_batch_size,
        "input": tensors(&metadata.inputs),
        "output": tensors(&metadata.outputs),
    });
    let serving = model.serving();
    if let Some(batching) = serving.dynamic_batching {
        config["dynamic_batching"] = json!({
            "preferred_batch_size": batching.preferred_batch_size,
            "max_queue_delay_microseconds": batching.max_queue_delay_microseconds,
        });
    }
    if serving.instances > 0 {
        config["instance_group"] = match serving.gpu {
            None => json!([{ "name": name, "kind": "KIND_CPU", "count": serving.instances }]),
            Some(device) => json!([{
                "name": name,
                "kind": "KIND_GPU",
                "count": serving.instances,
                "gpus": [device],
            }]),
        };
    }
    config
}

/// A tensor's dims as Triton's configuration gives them: without the batch dimension when the
/// model batches.
pub fn config_dims(shape: &[i64], batches: bool) -> &[i64] {
    match shape.split_first() {
        Some((_, rest)) if batches => rest,
        _ => shape,
    }
}

/// Triton's backend name for a platform.
pub fn config_backend(platform: &str) -> &str {
    match platform {
        "onnxruntime_onnx" => "onnxruntime",
        other => other,
    }
}

/// Triton's `TYPE_*` name of a V2 datatype (BYTES is `TYPE_STRING` there).
pub fn triton_data_type(datatype: weft_core::DataType) -> String {
    match datatype {
        weft_core::DataType::Bytes => "TYPE_STRING".to_string(),
        other => format!("TYPE_{}", other.as_str()),
    }
}

async fn model_config(
    Caller(scope): Caller,
    Path(model): Path<String>,
) -> Result<Response, ApiError> {
    config_response(&scope, &model, None)
}

async fn model_version_config(
    Caller(scope): Caller,
    Path((model, version)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    config_response(&scope, &model, Some(&version))
}

fn ready_response(
    scope: &TenantScope,
    name: &str,
    version: Option<&str>,
) -> Result<Response, ApiError> {
    let number = ready_version(scope, name, version)?;
    Ok(Json(json!({ "name": name, "version": number.to_string(), "ready": true })).into_response())
}

/// The version that `name` (at `version`, or its latest) resolves to, if it can serve now.
pub fn ready_version(scope: &TenantScope, name: &str, version: Option<&str>) -> Result<u64, Error> {
    let (number, model) = scope.registry.resolve(name, version)?;
    // A worker-backed model that is restarting is loaded but cannot serve: not ready.
    model.health().map_err(|reason| {
        Error::unavailable(format!(
            "model '{name}' version {number} is not ready: {reason}"
        ))
    })?;
    Ok(number)
}

async fn model_ready(
    Caller(scope): Caller,
    Path(model): Path<String>,
) -> Result<Response, ApiError> {
    ready_response(&scope, &model, None)
}

async fn model_version_ready(
    Caller(scope): Caller,
    Path((model, version)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    ready_response(&scope, &model, Some(&version))
}

async fn repository_index(
    Caller(scope): Caller,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let body = read_body(1 << 20, &headers, body).await?;
    // Triton's optional body: {"ready": true} lists only ready models.
    let only_ready = if body.is_empty() {
        false
    } else {
        let request: serde_json::Value = serde_json::from_slice(&body)
            .map_err(|error| Error::invalid(format!("malformed JSON in index request: {error}")))?;
        request
            .get("ready")
            .and_then(|v| v.as_bool())
            .unwrap_or(false)
    };
    Ok(Json(repository_entries(&scope, only_ready)).into_response())
}

/// Every version of `name` in the caller's namespace (unknown: Triton's 404).
fn every_version(scope: &TenantScope, name: &str) -> Result<Vec<Arc<dyn Model>>, Error> {
    let versions = scope
        .registry
        .versions(name)
        .ok_or_else(|| weft_engine::registry::unknown_model(name))?;
    versions
        .into_iter()
        .map(|number| Ok(scope.registry.resolve(name, Some(&number.to_string()))?.1))
        .collect()
}

/// Triton's model repository extension, `POST /v2/repository/models/{m}/load`: loads every
/// version of a model that loads on demand now (a warm-up); models that stay loaded (the
/// repository's, graphs) are loaded already.
async fn repository_load(
    Caller(scope): Caller,
    Path(name): Path<String>,
) -> Result<Response, ApiError> {
    load_model(&scope, &name).await?;
    Ok(Json(json!({})).into_response())
}

/// Loads every version of `name` that loads on demand (HTTP and gRPC `load`).
pub async fn load_model(scope: &TenantScope, name: &str) -> Result<(), ApiError> {
    // A load is work: it takes a concurrency slot like an inference.
    let _permit = scope.admit().map_err(crate::tenants::refused)?;
    for model in every_version(scope, name)? {
        if let Some(control) = model.on_demand() {
            control.load().await?;
        }
    }
    Ok(())
}

/// `POST /v2/repository/models/{m}/unload`: unloads every version of a model that loads on
/// demand (the next request loads it again); refused while one serves a request, for a pinned
/// one, and for models that stay loaded.
async fn repository_unload(
    Caller(scope): Caller,
    Path(name): Path<String>,
) -> Result<Response, ApiError> {
    unload_model(&scope, &name)?;
    Ok(Json(json!({})).into_response())
}

/// Unloads every version of `name` that loads on demand (HTTP and gRPC `unload`).
pub fn unload_model(scope: &TenantScope, name: &str) -> Result<(), Error> {
    for model in every_version(scope, name)? {
        match model.on_demand() {
            Some(control) => control.unload()?,
            None => {
                return Err(Error::new(
                    ErrorKind::Conflict,
                    format!(
                        "'{name}' stays loaded (a repository model or a graph); only tenant \
                         models load and unload on demand"
                    ),
                ));
            }
        }
    }
    Ok(())
}

/// The caller's models and graphs with their state, only the ready ones if `only_ready`.
pub fn repository_entries(scope: &TenantScope, only_ready: bool) -> Vec<RepositoryIndexEntry> {
    scope
        .registry
        .index()
        .into_iter()
        .filter(|entry| !only_ready || matches!(entry.state, ModelState::Ready(_)))
        .map(|entry| {
            let (state, reason) = match entry.state {
                // A model loaded on demand serves whether or not it is loaded now; the reason
                // says which.
                ModelState::Ready(model) => {
                    let reason = match model.on_demand().map(|control| control.residence()) {
                        Some(weft_core::Residence::Registered) => "not loaded: it loads on its \
                                                                   first request"
                            .to_string(),
                        Some(weft_core::Residence::Loading) => "loading".to_string(),
                        _ => String::new(),
                    };
                    ("READY", reason)
                }
                ModelState::Unavailable(reason) => ("UNAVAILABLE", reason),
            };
            RepositoryIndexEntry {
                name: entry.name,
                version: entry.version.map(|v| v.to_string()),
                state: state.to_string(),
                reason,
            }
        })
        .collect()
}

async fn infer(
    State(state): State<AppState>,
    Caller(scope): Caller,
    Path(model): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let source = InferSource::Http(body);
    run_infer(
        &state,
        &scope,
        &model,
        None,
        &headers,
        source,
        http_response,
    )
    .await
}

async fn infer_version(
    State(state): State<AppState>,
    Caller(scope): Caller,
    Path((model, version)): Path<(String, String)>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let source = InferSource::Http(body);
    run_infer(
        &state,
        &scope,
        &model,
        Some(&version),
        &headers,
        source,
        http_response,
    )
    .await
}

/// A V2 response body: JSON, or JSON then binary tensors with the header giving its length.
fn http_response(response: InferResponse) -> Result<Response, Error> {
    let encoded = encode_infer_response(&response)?;
    let mut reply = Response::new(Body::from(encoded.body));
    *reply.status_mut() = StatusCode::OK;
    let content_type = match encoded.json_header_length {
        Some(length) => {
            if let Ok(value) = HeaderValue::from_str(&length.to_string()) {
                reply.headers_mut().insert(HEADER_LENGTH, value);
            }
            "application/octet-stream"
        }
        None => "application/json",
    };
    reply
        .headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    Ok(reply)
}

/// Where an inference request's tensors come from.
pub enum InferSource {
    /// An HTTP body, read here within the tenant's in-flight budget, then decoded.
    Http(Body),
    /// A request decoded already (a gRPC message): its `wire_bytes` are charged to `charge`,
    /// which this request holds until its response is built.
    Decoded {
        request: InferRequest,
        wire_bytes: usize,
        charge: Arc<SharedPermit>,
    },
}

/// Reads the body up to `limit`; a larger body (declared or actual) is 413.
pub async fn read_body(limit: usize, headers: &HeaderMap, body: Body) -> Result<Bytes, Error> {
    let too_large = || {
        Error::new(
            ErrorKind::PayloadTooLarge,
            format!(
                "request body exceeds the limit of {limit} bytes (--max-request-bytes or the \
                 tenant's max_request_bytes quota)"
            ),
        )
    };
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    if declared.is_some_and(|length| length > limit) {
        return Err(too_large());
    }
    match Limited::new(body, limit).collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(error) if error.downcast_ref::<LengthLimitError>().is_some() => Err(too_large()),
        Err(error) => Err(crate::body_timeout::read_error(error.as_ref())),
    }
}

fn header_length(headers: &HeaderMap) -> Result<Option<usize>, Error> {
    let Some(value) = headers.get(HEADER_LENGTH) else {
        return Ok(None);
    };
    value
        .to_str()
        .ok()
        .and_then(|v| v.trim().parse::<usize>().ok())
        .map(Some)
        .ok_or_else(|| {
            Error::invalid("Inference-Header-Content-Length must be a non-negative integer")
        })
}

/// What a request resolved to, for metrics and statistics.
#[derive(Default)]
struct Served {
    version: Option<u64>,
    rows: u64,
}

/// Runs one inference request inside its cost account, encodes its response with `encode`
/// (HTTP or gRPC), then records metrics, statistics and a slow-request line.
pub async fn run_infer<R>(
    state: &AppState,
    scope: &TenantScope,
    name: &str,
    version: Option<&str>,
    headers: &HeaderMap,
    source: InferSource,
    encode: impl FnOnce(InferResponse) -> Result<R, Error>,
) -> Result<R, ApiError> {
    let started = Instant::now();
    let request = RequestContext::for_tenant(&scope.name);
    let mut served = Served::default();
    // The replica's capacity first (shedding answers 503 before any tenant quota is spent),
    // then the tenant's concurrency quota; both are held until the response is built.
    let replica = state.load.admit();
    let tenant = match &replica {
        Ok(_) => scope.admit().map_err(crate::tenants::refused),
        Err(error) => Err(ApiError::retry_after(error.clone(), 1)),
    };
    let result = match tenant {
        Ok(permit) => {
            let admitted = Arc::new(permit);
            let response = infer_accounted(
                state,
                scope,
                name,
                version,
                headers,
                source,
                &request,
                &mut served,
                &admitted,
            )
            .await;
            // The request's bytes stay charged until its response is encoded.
            response.and_then(|(response, _charge)| encode(response).map_err(ApiError::from))
        }
        Err(refusal) => Err(refusal),
    };
    let duration = started.elapsed();
    let status = match &result {
        Ok(_) => 200,
        Err(error) => status_of(error.error.kind()).as_u16(),
    };
    let version_label = served.version.map(|v| v.to_string()).unwrap_or_default();
    // Only names that resolved become label values, so unknown names cannot grow the series.
    let model_label = if served.version.is_some() { name } else { "" };
    state
        .metrics
        .request(&scope.name, model_label, &version_label, status, duration);
    if served.version.is_some() {
        let micros = |counter: &std::sync::atomic::AtomicU64| {
            Duration::from_micros(counter.load(std::sync::atomic::Ordering::Relaxed))
        };
        state.stats.record(
            &scope.name,
            name,
            &version_label,
            &Outcome {
                ok: result.is_ok(),
                duration,
                rows: served.rows,
                queue: micros(&request.cost().queue_us),
                compute: micros(&request.cost().compute_us),
            },
        );
    }
    if duration > state.slow_request {
        tracing::warn!(
            tenant = %scope.name,
            model = name,
            version = %version_label,
            status,
            duration_ms = duration.as_millis() as u64,
            "slow request"
        );
    }
    result
}

#[allow(clippy::too_many_arguments)]
async fn infer_accounted(
    state: &AppState,
    scope: &TenantScope,
    name: &str,
    version: Option<&str>,
    headers: &HeaderMap,
    source: InferSource,
    context: &RequestContext,
    served: &mut Served,
    admitted: &Arc<tokio::sync::OwnedSemaphorePermit>,
) -> Result<(InferResponse, Held), ApiError> {
    let (mut request, wire_bytes, charge) = match source {
        InferSource::Http(body) => read_http_request(state, scope, headers, body).await?,
        InferSource::Decoded {
            request,
            wire_bytes,
            charge,
        } => (request, wire_bytes, charge),
    };
    // From here on the request costs CPU: batch jobs yield to it until it is answered (a
    // body still arriving, however slowly, makes them wait for nothing).
    let _realtime = state.realtime.enter();
    // JSON numbers can decode into more bytes than their text (`0,` is 8 bytes of FP64), and
    // typed gRPC contents into more than their varints: the decoded tensors count too,
    // beyond what the request's bytes already hold.
    let decoded: usize = request
        .inputs
        .iter()
        .map(|input| input.tensor.tensor.data().len())
        .fold(0, usize::saturating_add);
    let grown = decoded.saturating_sub(wire_bytes);
    if grown > 0 {
        charge
            .grow_by(grown)
            .await
            .map_err(crate::tenants::refused)?;
    }
    // Held until the response is encoded (see `run_infer`), then the growth goes back: a gRPC
    // stream's charge outlives its requests.
    let charge = Held { charge, grown };
    let (number, model) = scope.registry.resolve(name, version)?;
    served.version = Some(number);
    let inputs = request_inputs(&mut request, model.as_ref())?;
    served.rows = inputs
        .first()
        .and_then(|input| input.tensor.shape().first().copied())
        .unwrap_or(1) as u64;
    model.metadata().validate_inputs(&inputs)?;
    let selected = select_outputs(&request, model.as_ref())?;
    let what = if model.metadata().platform == GRAPH_PLATFORM {
        "graph"
    } else {
        "model"
    };
    // The work runs in its own task holding the tenant's concurrency permit, so a client that
    // disconnects does not free its slot while the models and plugins it started still run.
    // The request's share of the in-flight budget goes with the inputs into that task too, and
    // stays with this handler until the response is built: it is back only when both are done.
    let work = {
        let admitted = Arc::clone(admitted);
        let permit = Arc::clone(&charge.charge);
        let model = Arc::clone(&model);
        let parameters = request.parameters.clone();
        // A rollout keeps a client on its arm by a header: hand its value to the rollout.
        let sticky = model
            .sticky_header()
            .and_then(|name| headers.get(name))
            .and_then(|value| value.to_str().ok());
        let context = match sticky {
            Some(key) => context.clone().with_sticky_key(key),
            None => context.clone(),
        };
        tokio::spawn(async move {
            let result = model
                .infer_with_parameters(&context, inputs, &parameters)
                .await;
            drop((admitted, permit));
            result
        })
    };
    let (outputs, mut parameters) = work
        .await
        .map_err(|error| Error::internal(format!("the inference task failed: {error}")))?
        .map_err(|error| error.context(format!("{what} '{name}' version {number}")))?;
    // What the request cost, so a tenant can see it.
    let cost = context.cost();
    let load =
        |counter: &std::sync::atomic::AtomicU64| counter.load(std::sync::atomic::Ordering::Relaxed);
    parameters.insert("compute_us".into(), load(&cost.compute_us).into());
    parameters.insert("queue_us".into(), load(&cost.queue_us).into());
    parameters.insert("plugin_us".into(), load(&cost.plugin_us).into());
    let fuel = load(&cost.fuel);
    if fuel > 0 {
        parameters.insert("fuel".into(), fuel.into());
    }
    if let Ok(mut provenance) = cost.provenance.lock()
        && !provenance.is_empty()
    {
        parameters.insert("provenance".into(), std::mem::take(&mut *provenance).into());
    }
    let response = InferResponse {
        model_name: name.to_string(),
        model_version: Some(number.to_string()),
        id: request.id.clone(),
        parameters,
        outputs: pick_outputs(state, &scope.name, outputs, &selected)?,
    };
    Ok((response, charge))
}

/// A request's share of its tenant's in-flight budget, held until its response is encoded; the
/// bytes its decoded tensors added beyond its wire bytes go back when it is dropped.
pub struct Held {
    charge: Arc<SharedPermit>,
    grown: usize,
}

impl Drop for Held {
    fn drop(&mut self) {
        if self.grown == 0 {
            return;
        }
        let (charge, grown) = (Arc::clone(&self.charge), self.grown);
        // The permit's lock is async; the release runs on its own (an HTTP request's permit
        // goes with the last Arc anyway, a stream's must not keep the growth).
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move { charge.release(grown).await });
        }
    }
}

/// Reads and decodes an HTTP inference body within the tenant's request-size limit, taking its
/// bytes from the tenant's in-flight budget before they are read.
async fn read_http_request(
    state: &AppState,
    scope: &TenantScope,
    headers: &HeaderMap,
    body: Body,
) -> Result<(InferRequest, usize, Arc<SharedPermit>), ApiError> {
    let header_length = header_length(headers)?;
    let limit = state
        .max_request_bytes
        .min(usize::try_from(scope.quotas.max_request_bytes).unwrap_or(usize::MAX));
    // The body's bytes count against the tenant's in-flight budget from before they are read
    // until the response is built (the permit lives to the end of this function).
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    let budget = state.body_budget.per_tenant();
    // Without a declared length the body may be as large as the limit: take that (or the
    // whole budget, which then bounds the body) and give back the rest once it is read.
    let (want, read_limit) = match declared {
        Some(length) if length > limit => (0, limit),
        Some(length) => (length, limit),
        None => (limit.min(budget), limit.min(budget)),
    };
    let mut permit = state
        .body_budget
        .admit(&scope.name, want)
        .await
        .map_err(crate::tenants::refused)?;
    let body = match read_body(read_limit, headers, body).await {
        Err(error) if error.kind() == ErrorKind::PayloadTooLarge && read_limit < limit => {
            return Err(Error::new(
                ErrorKind::PayloadTooLarge,
                format!(
                    "request body exceeds the limit of {read_limit} bytes (a body without \
                     Content-Length may be no larger than the tenant's in-flight budget, \
                     --max-tenant-inflight-bytes)"
                ),
            )
            .into());
        }
        other => other?,
    };
    permit.shrink_to(body.len());
    let body_len = body.len();
    // Tensors read from shared memory count against the same size limit as the body.
    let regions = state
        .shared_memory
        .inputs(&scope.name, limit.saturating_sub(body_len));
    let request = decode_infer_request_with(body, header_length, &regions)?;
    Ok((
        request,
        body_len,
        Arc::new(SharedPermit::new(permit, body_len)),
    ))
}

async fn metrics(State(state): State<AppState>) -> Response {
    let scopes = state.tenancy.scopes();
    let live = crate::metrics::Live {
        plugins: scopes
            .iter()
            .flat_map(|scope| scope.plugin_labels.clone())
            .filter_map(|(label, plugin)| {
                Some((label, crate::graphs::WasmPlugin::of(plugin.as_ref())?))
            })
            .collect(),
        tenants: scopes
            .iter()
            .map(|scope| {
                let names = scope.registry.names().map(str::to_owned).collect();
                (scope.name.clone(), names)
            })
            .collect(),
    };
    let mut text = state.metrics.render(&state.scrape, &live);
    text.push_str(&crate::metrics::render_rollouts(
        &state.tenancy.rollout_metrics(),
    ));
    if let Some(gpus) = &state.scrape.gpus {
        text.push_str(&crate::metrics::render_gpus(&gpus.sample()));
    }
    text.push_str(&state.load.render());
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        text,
    )
        .into_response()
}

fn stats_response(
    state: &AppState,
    scope: &TenantScope,
    name: Option<&str>,
    version: Option<&str>,
) -> Result<Response, ApiError> {
    let model_stats = model_stats_of(state, scope, name, version)?;
    Ok(Json(json!({ "model_stats": model_stats })).into_response())
}

/// Triton's statistics for the names and versions asked, zeros for those not yet used.
pub fn model_stats_of(
    state: &AppState,
    scope: &TenantScope,
    name: Option<&str>,
    version: Option<&str>,
) -> Result<Vec<crate::stats::ModelStat>, Error> {
    let names: Vec<String> = match name {
        Some(name) => {
            scope
                .registry
                .versions(name)
                .ok_or_else(|| weft_engine::registry::unknown_model(name))?;
            vec![name.to_string()]
        }
        None => {
            let mut names: Vec<String> =
                scope.registry.index().into_iter().map(|e| e.name).collect();
            names.dedup();
            names
        }
    };
    let mut model_stats = Vec::new();
    for name in &names {
        let mut versions: Vec<String> = scope
            .registry
            .versions(name)
            .unwrap_or_default()
            .iter()
            .map(u64::to_string)
            .collect();
        if let Some(version) = version {
            if !versions.iter().any(|v| v == version) {
                return Err(weft_engine::registry::unknown_version(name, version));
            }
            versions = vec![version.to_string()];
        }
        let recorded = state.stats.snapshot(&scope.name, Some(name), None);
        for version in versions {
            model_stats.push(
                recorded
                    .iter()
                    .find(|stat| stat.version == version)
                    .cloned()
                    .unwrap_or_else(|| crate::stats::empty(name, &version)),
            );
        }
    }
    Ok(model_stats)
}

async fn all_stats(
    State(state): State<AppState>,
    Caller(scope): Caller,
) -> Result<Response, ApiError> {
    stats_response(&state, &scope, None, None)
}

async fn model_stats(
    State(state): State<AppState>,
    Caller(scope): Caller,
    Path(model): Path<String>,
) -> Result<Response, ApiError> {
    stats_response(&state, &scope, Some(&model), None)
}

async fn model_version_stats(
    State(state): State<AppState>,
    Caller(scope): Caller,
    Path((model, version)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    stats_response(&state, &scope, Some(&model), Some(&version))
}

/// The request's tensors; a headerless binary body (`Inference-Header-Content-Length: 0`) is the
/// model's single input, shaped by its metadata with the one variable dimension inferred.
/// The tensors move out of the request; the rest of it (id, outputs, parameters) stays.
fn request_inputs(
    request: &mut InferRequest,
    model: &dyn Model,
) -> Result<Vec<NamedTensor>, Error> {
    let Some(raw) = &request.raw_single_input else {
        let inputs = std::mem::take(&mut request.inputs);
        return Ok(inputs.into_iter().map(|input| input.tensor).collect());
    };
    let metadata = model.metadata();
    let [spec] = metadata.inputs.as_slice() else {
        return Err(Error::invalid(format!(
            "a body without a JSON header (Inference-Header-Content-Length: 0) needs a model with \
             exactly one input; this model has {}",
            metadata.inputs.len()
        )));
    };
    let size = spec
        .datatype
        .element_size()
        .ok_or_else(|| Error::invalid("a body without a JSON header cannot carry a BYTES input"))?;
    let fixed: usize = spec
        .shape
        .iter()
        .filter(|&&d| d >= 0)
        .map(|&d| d as usize)
        .product();
    let variable = spec.shape.iter().filter(|&&d| d < 0).count();
    let row_bytes = fixed * size;
    let inferred = raw
        .len()
        .checked_div(row_bytes)
        .filter(|rows| rows * row_bytes == raw.len());
    let fits = matches!((variable, inferred), (0, Some(1)) | (1, Some(_)));
    let inferred = inferred.unwrap_or(0);
    if !fits {
        return Err(Error::invalid(format!(
            "a body of {} bytes cannot be shaped as input '{}' ({} {:?})",
            raw.len(),
            spec.name,
            spec.datatype,
            spec.shape
        )));
    }
    let shape = spec
        .shape
        .iter()
        .map(|&d| if d < 0 { inferred } else { d as usize })
        .collect();
    let tensor = Tensor::new(spec.datatype, shape, raw.clone())?;
    Ok(vec![NamedTensor::new(spec.name.clone(), tensor)])
}

/// One output to return.
struct Selected {
    name: String,
    binary: bool,
    /// Where the client asked for it in shared memory, if it did.
    shared_memory: Option<SharedMemoryRef>,
}

/// The outputs to return; all outputs if none were requested.
fn select_outputs(request: &InferRequest, model: &dyn Model) -> Result<Vec<Selected>, Error> {
    let binary_default = request.binary_output_default();
    let metadata = model.metadata();
    if request.outputs.is_empty() {
        return Ok(metadata
            .outputs
            .iter()
            .map(|spec| Selected {
                name: spec.name.clone(),
                binary: binary_default,
                shared_memory: None,
            })
            .collect());
    }
    request
        .outputs
        .iter()
        .map(|wanted| {
            if metadata.output(&wanted.name).is_none() {
                let names: Vec<&str> = metadata.outputs.iter().map(|s| s.name.as_str()).collect();
                return Err(Error::invalid(format!(
                    "unknown output '{}' requested; the model's outputs are {names:?}",
                    wanted.name
                )));
            }
            Ok(Selected {
                name: wanted.name.clone(),
                binary: wanted.binary_data.unwrap_or(binary_default),
                shared_memory: SharedMemoryRef::from_parameters(
                    &format!("output '{}'", wanted.name),
                    &wanted.parameters,
                )?,
            })
        })
        .collect()
}

/// The selected outputs in order; those asked for in shared memory are written there.
fn pick_outputs(
    state: &AppState,
    tenant: &str,
    outputs: Vec<NamedTensor>,
    selected: &[Selected],
) -> Result<Vec<ResponseOutput>, Error> {
    selected
        .iter()
        .map(|wanted| {
            let tensor = outputs
                .iter()
                .find(|output| output.name == wanted.name)
                .cloned()
                .ok_or_else(|| {
                    Error::internal(format!("the model produced no output '{}'", wanted.name))
                })?;
            let parameters = match &wanted.shared_memory {
                Some(place) => state.shared_memory.write_output(tenant, &tensor, place)?,
                None => serde_json::Map::new(),
            };
            Ok(ResponseOutput {
                tensor,
                binary: wanted.binary,
                parameters,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    #[tokio::test]
    async fn what_decoding_added_goes_back_when_the_request_is_done() {
        let budget = weft_tenancy::inflight::BodyBudget::new(1 << 20);
        let charge = Arc::new(SharedPermit::new(
            budget.admit("acme", 100).await.unwrap(),
            100,
        ));
        // A stream's message: 100 bytes on the wire, 4,000 once decoded.
        charge.grow_by(3_900).await.unwrap();
        drop(Held {
            charge: Arc::clone(&charge),
            grown: 3_900,
        });
        for _ in 0..100 {
            if charge.bytes().await == 100 {
                return;
            }
            tokio::task::yield_now().await;
        }
        panic!("the growth stayed charged: {} bytes", charge.bytes().await);
    }
}
