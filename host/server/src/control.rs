//! The control plane under `/api/v1`: the operator's tenant and key administration (admin key)
//! and each tenant's own signing keys, plugins, models and graphs (the tenant's API key).
//!
//! Every change is one store transaction, durable before it is answered, followed by a rebuild
//! of that tenant's namespace (see `tenants.rs`); a change that fails stores nothing. Uploads
//! are checked before anything is written: a plugin's signature and component, a model's
//! configuration and loadability, a graph's validation (the same as `weft graph check`).

use std::path::PathBuf;
use std::sync::Arc;

use axum::Router;
use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use bytes::Bytes;
use serde::Deserialize;
use serde_json::{Value, json};
use weft_core::{Error, ErrorKind, Result};
use weft_store::signing::PublicKey;
use weft_store::{Quotas, Tenant, api_keys, check_name};
use weft_tenancy::lifecycle::{
    ArtifactKind, GraphUpload, ModelUpload, PluginUpload, new_tenant, parse_version, tenant_mut,
    tenant_of,
};

use crate::app::{AppState, Caller, read_body};
use crate::error::{ApiError, Path};
use crate::tenants::{Tenancy, authenticate_admin, graph_path, refused, unix_now};
use crate::uploads::{Limit, MAX_GRAPH_BYTES, MAX_MODEL_CONFIG_BYTES, Received};

/// The OpenAPI description of every route, served at `/api/v1/openapi.json`.
pub const OPENAPI: &str = include_str!("../openapi.json");

/// Header carrying a plugin's detached signature (base64 ed25519).
pub const SIGNATURE_HEADER: &str = "weft-signature";
/// Header naming the registered signing key that made the signature.
pub const SIGNING_KEY_HEADER: &str = "weft-signing-key";
/// Header giving the length of the model.toml that precedes the ONNX bytes of a model push.
pub const CONFIG_LENGTH_HEADER: &str = "weft-config-length";
/// Optional header naming the client's file, so graph errors name it as `weft graph check` does.
pub const FILE_NAME_HEADER: &str = "weft-file-name";
/// `Weft-Dry-Run: true` on a graph apply: validate against the tenant's namespace exactly as an
/// apply would, answer 200, store nothing.
pub const DRY_RUN_HEADER: &str = "weft-dry-run";

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/api/v1/openapi.json", get(openapi))
        .route("/api/v1/tenants", post(create_tenant).get(list_tenants))
        .route(
            "/api/v1/tenants/{tenant}",
            get(get_tenant).patch(update_tenant).delete(delete_tenant),
        )
        .route("/api/v1/tenants/{tenant}/keys", post(issue_key))
        .route(
            "/api/v1/tenants/{tenant}/keys/{id}",
            axum::routing::delete(revoke_key),
        )
        .route("/api/v1/tenant", get(whoami))
        .route(
            "/api/v1/signing-keys",
            post(register_signing_key).get(list_signing_keys),
        )
        .route(
            "/api/v1/signing-keys/challenge",
            post(signing_key_challenge),
        )
        .route(
            "/api/v1/signing-keys/{id}",
            axum::routing::delete(revoke_signing_key),
        )
        .route("/api/v1/plugins", get(list_plugins))
        .route(
            "/api/v1/plugins/{name}",
            get(get_plugin).delete(delete_plugin),
        )
        .route(
            "/api/v1/plugins/{name}/versions/{version}",
            put(push_plugin).delete(delete_plugin),
        )
        .route("/api/v1/models", get(list_models))
        .route("/api/v1/models/{name}", get(get_model).delete(delete_model))
        .route(
            "/api/v1/models/{name}/versions/{version}",
            put(push_model).delete(delete_model),
        )
        .route("/api/v1/graphs", get(list_graphs))
        .route(
            "/api/v1/graphs/{name}",
            put(apply_graph).get(get_graph).delete(delete_graph),
        )
        .route(
            "/api/v1/graphs/{name}/versions/{version}",
            axum::routing::delete(delete_graph),
        )
        .route("/api/v1/rollouts", get(list_rollouts))
        .route(
            "/api/v1/rollouts/{name}",
            put(apply_rollout).get(get_rollout).delete(delete_rollout),
        )
        .route("/api/v1/rollouts/{name}/promote", post(promote_rollout))
        .route("/api/v1/rollouts/{name}/abort", post(abort_rollout))
}

async fn openapi() -> Response {
    ([(header::CONTENT_TYPE, "application/json")], OPENAPI).into_response()
}

/// Runs blocking tenancy work (store writes, model loads, plugin compiles) off the async threads.
async fn blocking<T: Send + 'static>(
    state: &AppState,
    work: impl FnOnce(&Tenancy) -> Result<T> + Send + 'static,
) -> Result<T> {
    let tenancy = Arc::clone(&state.tenancy);
    tokio::task::spawn_blocking(move || work(&tenancy))
        .await
        .map_err(|error| Error::internal(format!("control-plane task failed: {error}")))?
}

/// Largest JSON body of an admin or key request.
const MAX_JSON_BODY: usize = 1 << 20;

/// Reads a small JSON request body, with V2-style errors (413 past [`MAX_JSON_BODY`]).
async fn json_body(headers: &HeaderMap, body: Body) -> Result<Bytes> {
    read_body(MAX_JSON_BODY, headers, body).await
}

fn parse_json<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T> {
    if body.is_empty() {
        return serde_json::from_slice(b"{}")
            .map_err(|error| Error::invalid(format!("a JSON body is required: {error}")));
    }
    serde_json::from_slice(body).map_err(|error| Error::invalid(format!("malformed JSON: {error}")))
}

/// Counts an upload in `weft_uploads_total` by kind and status; answers 201 with its record or
/// the error.
fn answer_upload(
    state: &AppState,
    kind: &str,
    result: Result<Value>,
) -> std::result::Result<Response, ApiError> {
    let status = result
        .as_ref()
        .map_or_else(|e| crate::error::status_of(e.kind()).as_u16(), |_| 201);
    state.metrics.upload(kind, status);
    Ok(created(result?))
}

fn created(value: Value) -> Response {
    (StatusCode::CREATED, axum::Json(value)).into_response()
}

fn ok(value: Value) -> Response {
    axum::Json(value).into_response()
}

/// What a tenant looks like over the API: never a key or a key hash.
fn tenant_view(tenant: &Tenant) -> Value {
    let (plugins, models, graphs) = tenant.counts();
    json!({
        "name": tenant.name,
        "created_unix": tenant.created_unix,
        "quotas": tenant.quotas,
        "shared_models": tenant.shared_models,
        "api_keys": tenant.api_keys.iter().map(|key| json!({
            "id": key.id, "created_unix": key.created_unix, "revoked": key.revoked,
        })).collect::<Vec<_>>(),
        "usage": {
            "plugins": plugins, "models": models, "graphs": graphs,
            "stored_bytes": tenant.stored_bytes(),
            "signing_keys": tenant.signing_keys.len(),
        },
        "revision": tenant.revision,
    })
}

// ---- operator: tenants and API keys ----

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateTenant {
    name: String,
    #[serde(default)]
    quotas: Quotas,
    #[serde(default)]
    shared_models: Vec<String>,
}

async fn create_tenant(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Body,
) -> std::result::Result<Response, ApiError> {
    authenticate_admin(&state.tenancy, &headers)?;
    let request: CreateTenant = parse_json(&json_body(&headers, body).await?)?;
    check_name("tenant", &request.name)?;
    request.quotas.validate()?;
    let (id, key) = api_keys::generate()?;
    let view = blocking(&state, move |tenancy| {
        let name = request.name.clone();
        tenancy.change(Some(&name), move |store| {
            if store.tenants.contains_key(&request.name) {
                return Err(Error::conflict(format!(
                    "tenant '{}' already exists",
                    request.name
                )));
            }
            let mut tenant = new_tenant(&request.name, request.quotas, request.shared_models);
            tenant.api_keys.push(weft_store::ApiKey {
                id: id.clone(),
                hash: api_keys::hash(&key),
                created_unix: unix_now(),
                revoked: false,
            });
            let view = json!({
                "tenant": tenant_view(&tenant),
                "api_key": {"id": id, "key": key},
            });
            store.tenants.insert(request.name.clone(), tenant);
            Ok(view)
        })
    })
    .await?;
    Ok(created(view))
}

async fn list_tenants(
    State(state): State<AppState>,
    headers: HeaderMap,
) -> std::result::Result<Response, ApiError> {
    authenticate_admin(&state.tenancy, &headers)?;
    let store = state.tenancy.store().state();
    let tenants: Vec<Value> = store.tenants.values().map(tenant_view).collect();
    Ok(ok(json!({ "tenants": tenants })))
}

async fn get_tenant(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(name): Path<String>,
) -> std::result::Result<Response, ApiError> {
    authenticate_admin(&state.tenancy, &headers)?;
    let store = state.tenancy.store().state();
    Ok(ok(tenant_view(tenant_of(&store, &name)?)))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct UpdateTenant {
    /// Only the fields given change.
    quotas: Option<Value>,
    shared_models: Option<Vec<String>>,
}

async fn update_tenant(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(name): Path<String>,
    body: Body,
) -> std::result::Result<Response, ApiError> {
    authenticate_admin(&state.tenancy, &headers)?;
    let request: UpdateTenant = parse_json(&json_body(&headers, body).await?)?;
    let view = blocking(&state, move |tenancy| {
        tenancy.change(Some(&name), |store| {
            let tenant = tenant_mut(store, &name)?;
            if let Some(patch) = &request.quotas {
                tenant.quotas = tenant.quotas.patched(patch)?;
            }
            if let Some(shared) = request.shared_models {
                tenant.shared_models = shared;
            }
            Ok(tenant_view(tenant))
        })
    })
    .await?;
    Ok(ok(view))
}

async fn delete_tenant(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(name): Path<String>,
) -> std::result::Result<Response, ApiError> {
    authenticate_admin(&state.tenancy, &headers)?;
    let deleted = name.clone();
    blocking(&state, move |tenancy| {
        tenancy.change(None, |store| {
            store
                .tenants
                .remove(&name)
                .map(|_| ())
                .ok_or_else(|| Error::not_found(format!("unknown tenant '{name}'")))
        })
    })
    .await?;
    state.stats.forget_tenant(&deleted);
    state.tenancy.challenges().forget_tenant(&deleted);
    Ok(ok(json!({ "deleted": deleted })))
}

async fn issue_key(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(name): Path<String>,
) -> std::result::Result<Response, ApiError> {
    authenticate_admin(&state.tenancy, &headers)?;
    let (id, key) = api_keys::generate()?;
    let hash = api_keys::hash(&key);
    let key_id = id.clone();
    blocking(&state, move |tenancy| {
        tenancy.change(Some(&name), |store| {
            tenant_mut(store, &name)?.api_keys.push(weft_store::ApiKey {
                id: key_id,
                hash,
                created_unix: unix_now(),
                revoked: false,
            });
            Ok(())
        })
    })
    .await?;
    Ok(created(json!({ "id": id, "key": key })))
}

async fn revoke_key(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path((name, id)): Path<(String, String)>,
) -> std::result::Result<Response, ApiError> {
    authenticate_admin(&state.tenancy, &headers)?;
    let revoked = id.clone();
    blocking(&state, move |tenancy| {
        tenancy.change(Some(&name), |store| {
            let tenant = tenant_mut(store, &name)?;
            let key = tenant
                .api_keys
                .iter_mut()
                .find(|key| key.id == id)
                .ok_or_else(|| {
                    Error::not_found(format!("tenant '{name}' has no API key '{id}'"))
                })?;
            key.revoked = true;
            Ok(())
        })
    })
    .await?;
    Ok(ok(json!({ "revoked": revoked })))
}

// ---- tenant: identity and signing keys ----

async fn whoami(
    State(state): State<AppState>,
    Caller(scope): Caller,
) -> std::result::Result<Response, ApiError> {
    let store = state.tenancy.store().state();
    Ok(ok(tenant_view(tenant_of(&store, &scope.name)?)))
}

/// `POST /api/v1/signing-keys/challenge`: a single-use nonce, bound to the caller's tenant, that
/// a registration must sign with the key it registers (see `challenges.rs`).
async fn signing_key_challenge(
    State(state): State<AppState>,
    Caller(scope): Caller,
) -> std::result::Result<Response, ApiError> {
    {
        let store = state.tenancy.store().state();
        // A tenant at its key quota hears so now, not after signing (checked again at
        // registration, in the store).
        tenant_of(&store, &scope.name)?.check_room_for_signing_key()?;
    }
    let issued = state.tenancy.challenges().issue(&scope.name)?;
    let ttl = issued.ttl.as_secs();
    Ok(created(json!({
        "challenge": issued.nonce,
        "tenant": scope.name,
        "expires_in_s": ttl,
        "expires_unix": unix_now().saturating_add(ttl),
    })))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RegisterSigningKey {
    public_key: String,
    /// The nonce from `POST /api/v1/signing-keys/challenge`.
    #[serde(default)]
    challenge: Option<String>,
    /// Base64 ed25519 signature by `public_key` over the key registration message.
    #[serde(default)]
    signature: Option<String>,
}

/// `POST /api/v1/signing-keys`: registers a public key for the caller, given proof that the
/// caller holds its secret half (a signature over the tenant, a challenge it was issued and the
/// key). A key belongs to one tenant only, revoked keys included; the tenant's count is bounded by
/// `max_signing_keys`.
async fn register_signing_key(
    State(state): State<AppState>,
    Caller(scope): Caller,
    headers: HeaderMap,
    body: Body,
) -> std::result::Result<Response, ApiError> {
    let request: RegisterSigningKey = parse_json(&json_body(&headers, body).await?)?;
    let public = PublicKey::from_base64(request.public_key.trim())?;
    let (Some(challenge), Some(signature)) = (request.challenge, request.signature) else {
        return Err(Error::invalid(
            "registering a signing key proves possession of its secret key: request a challenge \
             with POST /api/v1/signing-keys/challenge, then send {\"public_key\", \"challenge\", \
             \"signature\"}, the signature by that key over the key registration message for your \
             tenant and the challenge (`weft key register PREFIX.key` does both)",
        )
        .into());
    };
    let challenge = challenge.trim();
    // Spent before the proof is checked, whatever comes of it: one challenge, one attempt.
    state.tenancy.challenges().take(&scope.name, challenge)?;
    public.verify_key_registration(&scope.name, challenge, &signature)?;
    let id = public.key_id();
    let tenant = scope.name.clone();
    let key = weft_store::SigningKey {
        id: id.clone(),
        public_key: public.to_base64(),
        created_unix: unix_now(),
        revoked: false,
    };
    blocking(&state, move |tenancy| {
        // Uniqueness across tenants and the count quota are checked in the same store
        // transaction that adds the key, under the one writer.
        tenancy.change(Some(&tenant), |store| {
            store.register_signing_key(&tenant, key)
        })
    })
    .await?;
    Ok(created(
        json!({ "id": id, "public_key": public.to_base64() }),
    ))
}

async fn list_signing_keys(
    State(state): State<AppState>,
    Caller(scope): Caller,
) -> std::result::Result<Response, ApiError> {
    let store = state.tenancy.store().state();
    let tenant = tenant_of(&store, &scope.name)?;
    let keys: Vec<Value> = tenant
        .signing_keys
        .iter()
        .map(|key| {
            json!({
                "id": key.id, "public_key": key.public_key,
                "created_unix": key.created_unix, "revoked": key.revoked,
            })
        })
        .collect();
    Ok(ok(json!({ "signing_keys": keys })))
}

async fn revoke_signing_key(
    State(state): State<AppState>,
    Caller(scope): Caller,
    Path(id): Path<String>,
) -> std::result::Result<Response, ApiError> {
    let tenant = scope.name.clone();
    let revoked = id.clone();
    blocking(&state, move |tenancy| {
        tenancy.change(Some(&tenant), |store| {
            let key = tenant_mut(store, &tenant)?
                .signing_keys
                .iter_mut()
                .find(|key| key.id == id)
                .ok_or_else(|| Error::not_found(format!("unknown signing key '{id}'")))?;
            key.revoked = true;
            Ok(())
        })
    })
    .await?;
    Ok(ok(json!({ "revoked": revoked })))
}

// ---- tenant: plugins ----

fn header_text<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get(name)
        .and_then(|value| value.to_str().ok())
        .map(str::trim)
        .filter(|value| !value.is_empty())
}

/// The size limit of plugin and model uploads.
fn upload_limit(state: &AppState) -> Limit {
    Limit {
        bytes: state.max_upload_bytes,
        source: "--max-upload-bytes",
    }
}

/// Receives an upload's body into a temporary file of the store (its first `head` bytes into
/// memory), after reserving its size against the tenant's `max_stored_bytes` (everything
/// uploaded is stored): an upload past `limit` is refused with 413 and one that cannot fit the
/// quota with 403 as soon as that is known, before the server reads (let alone holds) the rest.
async fn upload_body(
    state: &AppState,
    tenant: &str,
    kind: &str,
    limit: Limit,
    head: usize,
    headers: &HeaderMap,
    body: Body,
) -> Result<Received> {
    crate::uploads::receive(state, tenant, kind, limit, head, headers, body).await
}

async fn push_plugin(
    State(state): State<AppState>,
    Caller(scope): Caller,
    Path((name, version)): Path<(String, String)>,
    headers: HeaderMap,
    body: Body,
) -> std::result::Result<Response, ApiError> {
    // Uploads count against the tenant's rate and concurrency quotas like inference does.
    let _permit = scope.admit().map_err(refused)?;
    let result = push_plugin_checked(&state, &scope.name, name, version, &headers, body).await;
    answer_upload(&state, "plugin", result)
}

async fn push_plugin_checked(
    state: &AppState,
    tenant: &str,
    name: String,
    version: String,
    headers: &HeaderMap,
    body: Body,
) -> Result<Value> {
    check_name("plugin", &name)?;
    check_name("plugin version", &version)?;
    let unsigned = || {
        Error::invalid(
            "unsigned plugin: send the headers Weft-Signature (base64 ed25519 signature) and \
             Weft-Signing-Key (a registered key id); `weft plugin sign` makes both",
        )
    };
    let signature = header_text(headers, SIGNATURE_HEADER)
        .ok_or_else(unsigned)?
        .to_string();
    let key_id = header_text(headers, SIGNING_KEY_HEADER)
        .ok_or_else(unsigned)?
        .to_string();
    let Received {
        rest: staged,
        size,
        reservation,
        ..
    } = upload_body(
        state,
        tenant,
        "plugin",
        upload_limit(state),
        0,
        headers,
        body,
    )
    .await?;
    let tenant = tenant.to_string();
    let upload = PluginUpload {
        name,
        version,
        signature,
        key_id,
        staged,
        size,
        reservation,
    };
    let pushed = blocking(state, move |tenancy| tenancy.push_plugin(&tenant, upload)).await?;
    to_json(&pushed)
}

/// One kind of the caller's records (plugins, models or graphs) by name.
type Records<T> = std::collections::BTreeMap<String, T>;

/// Lists one kind of the caller's records as `{"<kind>": [view, ...]}`.
fn list_records<T>(
    state: &AppState,
    tenant: &str,
    kind: &str,
    records: impl Fn(&Tenant) -> &Records<T>,
    view: impl Fn(&str, &T) -> Value,
) -> std::result::Result<Response, ApiError> {
    let store = state.tenancy.store().state();
    let tenant = tenant_of(&store, tenant)?;
    let views: Vec<Value> = records(tenant)
        .iter()
        .map(|(name, versions)| view(name, versions))
        .collect();
    Ok(ok(json!({ kind: views })))
}

/// One of the caller's records by name; 404 `unknown <what> '<name>'` otherwise.
fn get_record<T>(
    state: &AppState,
    tenant: &str,
    what: &str,
    name: &str,
    records: impl Fn(&Tenant) -> &Records<T>,
    view: impl Fn(&str, &T) -> Value,
) -> std::result::Result<Response, ApiError> {
    let store = state.tenancy.store().state();
    let tenant = tenant_of(&store, tenant)?;
    let versions = records(tenant)
        .get(name)
        .ok_or_else(|| Error::not_found(format!("unknown {what} '{name}'")))?;
    Ok(ok(view(name, versions)))
}

fn plugin_view(name: &str, versions: &[weft_store::PluginVersion]) -> Value {
    json!({
        "name": name,
        "versions": versions.iter().map(|v| json!({
            "version": v.version, "digest": format!("sha256:{}", v.digest), "size": v.size,
            "key_id": v.key_id, "created_unix": v.created_unix,
        })).collect::<Vec<_>>(),
    })
}

async fn list_plugins(
    State(state): State<AppState>,
    Caller(scope): Caller,
) -> std::result::Result<Response, ApiError> {
    list_records(
        &state,
        &scope.name,
        "plugins",
        |t| &t.plugins,
        |name, versions| plugin_view(name, versions),
    )
}

async fn get_plugin(
    State(state): State<AppState>,
    Caller(scope): Caller,
    Path(name): Path<String>,
) -> std::result::Result<Response, ApiError> {
    get_record(
        &state,
        &scope.name,
        "plugin",
        &name,
        |t| &t.plugins,
        |name, versions| plugin_view(name, versions),
    )
}

/// The path of a delete: a name, and a version when only that version goes.
#[derive(serde::Deserialize)]
struct VersionedName {
    name: String,
    version: Option<String>,
}

/// `DELETE /plugins/{name}` (every version) and `.../versions/{version}` (one).
async fn delete_plugin(
    state: State<AppState>,
    caller: Caller,
    Path(VersionedName { name, version }): Path<VersionedName>,
) -> std::result::Result<Response, ApiError> {
    delete_artifact(state, caller, ArtifactKind::Plugin, name, version).await
}

/// Deletes one version of an artifact, or all of it (see `Tenancy::delete_artifact`).
async fn delete_artifact(
    State(state): State<AppState>,
    Caller(scope): Caller,
    kind: ArtifactKind,
    name: String,
    version: Option<String>,
) -> std::result::Result<Response, ApiError> {
    if kind != ArtifactKind::Plugin
        && let Some(text) = &version
    {
        parse_version(text, kind.what())?;
    }
    let tenant = scope.name.clone();
    let answer = json!({ "deleted": name, "version": version });
    blocking(&state, move |tenancy| {
        tenancy.delete_artifact(&tenant, kind, &name, version.as_deref())
    })
    .await?;
    Ok(ok(answer))
}

// ---- tenant: models ----

async fn push_model(
    State(state): State<AppState>,
    Caller(scope): Caller,
    Path((name, version)): Path<(String, String)>,
    headers: HeaderMap,
    body: Body,
) -> std::result::Result<Response, ApiError> {
    // Uploads count against the tenant's rate and concurrency quotas like inference does.
    let _permit = scope.admit().map_err(refused)?;
    let result = push_model_checked(&state, &scope, name, version, &headers, body).await;
    answer_upload(&state, "model", result)
}

async fn push_model_checked(
    state: &AppState,
    scope: &crate::tenants::TenantScope,
    name: String,
    version: String,
    headers: &HeaderMap,
    body: Body,
) -> Result<Value> {
    check_name("model", &name)?;
    let number = parse_version(&version, "model")?;
    let config_length = header_text(headers, CONFIG_LENGTH_HEADER)
        .and_then(|v| v.parse::<usize>().ok())
        .ok_or_else(|| {
            Error::invalid(
                "send the header Weft-Config-Length: the byte length of the model.toml that \
                 precedes the ONNX bytes in the body",
            )
        })?;
    if config_length > MAX_MODEL_CONFIG_BYTES {
        return Err(Error::new(
            ErrorKind::PayloadTooLarge,
            format!(
                "Weft-Config-Length {config_length} is over the limit of {MAX_MODEL_CONFIG_BYTES} \
                 bytes for a model.toml"
            ),
        ));
    }
    // model.toml (the head) into memory, the ONNX bytes after it into a temporary file.
    let Received {
        head: config_bytes,
        rest: staged,
        size,
        reservation,
    } = upload_body(
        state,
        &scope.name,
        "model",
        upload_limit(state),
        config_length,
        headers,
        body,
    )
    .await?;
    if config_length as u64 > size {
        return Err(Error::invalid(format!(
            "Weft-Config-Length {config_length} is longer than the body ({size} bytes)"
        )));
    }
    let config_text =
        String::from_utf8(config_bytes).map_err(|_| Error::invalid("model.toml is not UTF-8"))?;
    let tenant = scope.name.clone();
    let upload = ModelUpload {
        name,
        version: number,
        config_text,
        staged,
        size,
        reservation,
    };
    let pushed = blocking(state, move |tenancy| tenancy.push_model(&tenant, upload)).await?;
    to_json(&pushed)
}

fn model_view(
    name: &str,
    versions: &std::collections::BTreeMap<u64, weft_store::ModelVersion>,
) -> Value {
    json!({
        "name": name,
        "versions": versions.iter().map(|(number, v)| json!({
            "version": number.to_string(), "onnx_digest": format!("sha256:{}", v.onnx_digest),
            "size": v.size, "created_unix": v.created_unix,
        })).collect::<Vec<_>>(),
    })
}

async fn list_models(
    State(state): State<AppState>,
    Caller(scope): Caller,
) -> std::result::Result<Response, ApiError> {
    list_records(&state, &scope.name, "models", |t| &t.models, model_view)
}

async fn get_model(
    State(state): State<AppState>,
    Caller(scope): Caller,
    Path(name): Path<String>,
) -> std::result::Result<Response, ApiError> {
    get_record(
        &state,
        &scope.name,
        "model",
        &name,
        |t| &t.models,
        model_view,
    )
}

/// `DELETE /models/{name}` (every version) and `.../versions/{version}` (one).
async fn delete_model(
    state: State<AppState>,
    caller: Caller,
    Path(VersionedName { name, version }): Path<VersionedName>,
) -> std::result::Result<Response, ApiError> {
    delete_artifact(state, caller, ArtifactKind::Model, name, version).await
}

// ---- tenant: graphs ----

async fn apply_graph(
    State(state): State<AppState>,
    Caller(scope): Caller,
    Path(name): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> std::result::Result<Response, ApiError> {
    // Uploads count against the tenant's rate and concurrency quotas like inference does.
    let _permit = scope.admit().map_err(refused)?;
    let dry_run = match header_text(&headers, DRY_RUN_HEADER) {
        None | Some("false") => false,
        Some("true") => true,
        Some(other) => {
            return Err(Error::invalid(format!(
                "Weft-Dry-Run must be true or false, not '{other}'"
            ))
            .into());
        }
    };
    let result = apply_graph_checked(&state, &scope, name, &headers, body, dry_run).await;
    if dry_run {
        // Nothing was uploaded: 200 with what would have been applied, no upload counted.
        return Ok(ok(result?));
    }
    answer_upload(&state, "graph", result)
}

async fn apply_graph_checked(
    state: &AppState,
    scope: &crate::tenants::TenantScope,
    name: String,
    headers: &HeaderMap,
    body: Body,
    dry_run: bool,
) -> Result<Value> {
    check_name("graph", &name)?;
    let limit = Limit {
        bytes: MAX_GRAPH_BYTES.min(state.max_upload_bytes),
        source: if MAX_GRAPH_BYTES <= state.max_upload_bytes {
            "the graph size limit"
        } else {
            "--max-upload-bytes"
        },
    };
    let Received {
        rest: staged,
        reservation,
        ..
    } = upload_body(state, &scope.name, "graph", limit, 0, headers, body).await?;
    let file = header_text(headers, FILE_NAME_HEADER)
        .map(PathBuf::from)
        .unwrap_or_else(|| graph_path(&name));
    let tenant = scope.name.clone();
    let upload = GraphUpload {
        name,
        file,
        staged,
        reservation,
        dry_run,
    };
    let applied = blocking(state, move |tenancy| tenancy.apply_graph(&tenant, upload)).await?;
    to_json(&applied)
}

async fn list_graphs(
    State(state): State<AppState>,
    Caller(scope): Caller,
) -> std::result::Result<Response, ApiError> {
    list_records(
        &state,
        &scope.name,
        "graphs",
        |t| &t.graphs,
        |name, versions| {
            json!({
                "name": name,
                "versions": versions.iter().map(|(v, g)| json!({
                    "version": v.to_string(), "size": g.size, "created_unix": g.created_unix,
                })).collect::<Vec<_>>(),
            })
        },
    )
}

async fn get_graph(
    State(state): State<AppState>,
    Caller(scope): Caller,
    Path(name): Path<String>,
) -> std::result::Result<Response, ApiError> {
    let tenant = scope.name.clone();
    let texts = blocking(&state, {
        let name = name.clone();
        move |tenancy| tenancy.graph_texts(&tenant, &name)
    })
    .await?;
    let listed: Vec<Value> = texts
        .into_iter()
        .map(|(version, text, created_unix)| {
            json!({ "version": version.to_string(), "toml": text, "created_unix": created_unix })
        })
        .collect();
    let view = json!({ "name": name, "versions": listed });
    Ok(ok(view))
}

/// `DELETE /graphs/{name}` (every version) and `.../versions/{version}` (one).
async fn delete_graph(
    state: State<AppState>,
    caller: Caller,
    Path(VersionedName { name, version }): Path<VersionedName>,
) -> std::result::Result<Response, ApiError> {
    delete_artifact(state, caller, ArtifactKind::Graph, name, version).await
}

/// A typed answer as JSON.
fn to_json(value: &impl serde::Serialize) -> Result<Value> {
    serde_json::to_value(value)
        .map_err(|error| Error::internal(format!("cannot encode the answer: {error}")))
}

// ---- tenant: rollouts ----

/// Largest rollout file (the engine refuses anything larger with its own message).
const MAX_ROLLOUT_BODY: usize = weft_engine::rollout::spec::MAX_SPEC_BYTES;

/// `PUT /api/v1/rollouts/{name}`: the rollout's TOML. 201 when it started a new generation,
/// 200 when the same text was already applied.
async fn apply_rollout(
    State(state): State<AppState>,
    Caller(scope): Caller,
    Path(name): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> std::result::Result<Response, ApiError> {
    let _permit = scope.admit().map_err(refused)?;
    let body = read_body(MAX_ROLLOUT_BODY, &headers, body)
        .await
        .map_err(|error| match error.kind() {
            ErrorKind::PayloadTooLarge => Error::new(
                ErrorKind::PayloadTooLarge,
                format!("a rollout file may have at most {MAX_ROLLOUT_BODY} bytes"),
            ),
            _ => error,
        })?;
    let text = String::from_utf8(body.to_vec())
        .map_err(|_| Error::invalid("the rollout file is not UTF-8"))?;
    let tenant = scope.name.clone();
    let (view, changed) = blocking(&state, move |tenancy| {
        tenancy.apply_rollout(&tenant, &name, &text)
    })
    .await?;
    Ok(if changed { created(view) } else { ok(view) })
}

async fn list_rollouts(
    State(state): State<AppState>,
    Caller(scope): Caller,
) -> std::result::Result<Response, ApiError> {
    Ok(ok(state.tenancy.list_rollouts(&scope.name)?))
}

async fn get_rollout(
    State(state): State<AppState>,
    Caller(scope): Caller,
    Path(name): Path<String>,
) -> std::result::Result<Response, ApiError> {
    Ok(ok(state.tenancy.rollout(&scope.name, &name)?))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PromoteQuery {
    arm: Option<String>,
}

/// `POST /api/v1/rollouts/{name}/promote[?arm=NAME]`: a canary's candidate, or an
/// experiment's named arm, takes all traffic.
async fn promote_rollout(
    State(state): State<AppState>,
    Caller(scope): Caller,
    Path(name): Path<String>,
    query: axum::extract::Query<PromoteQuery>,
    headers: HeaderMap,
    body: Body,
) -> std::result::Result<Response, ApiError> {
    let _permit = scope.admit().map_err(refused)?;
    let tenant = scope.name.clone();
    // The arm comes as `?arm=` or as a JSON body `{"arm": "..."}`.
    let body: PromoteQuery = parse_json(&json_body(&headers, body).await?)?;
    let arm = query.0.arm.or(body.arm);
    let view = blocking(&state, move |tenancy| {
        tenancy.promote_rollout(&tenant, &name, arm.as_deref())
    })
    .await?;
    Ok(ok(view))
}

/// `POST /api/v1/rollouts/{name}/abort`: the stable (an experiment's first arm) takes all
/// traffic again.
async fn abort_rollout(
    State(state): State<AppState>,
    Caller(scope): Caller,
    Path(name): Path<String>,
) -> std::result::Result<Response, ApiError> {
    let _permit = scope.admit().map_err(refused)?;
    let tenant = scope.name.clone();
    let view = blocking(&state, move |tenancy| tenancy.abort_rollout(&tenant, &name)).await?;
    Ok(ok(view))
}

async fn delete_rollout(
    State(state): State<AppState>,
    Caller(scope): Caller,
    Path(name): Path<String>,
) -> std::result::Result<Response, ApiError> {
    let _permit = scope.admit().map_err(refused)?;
    let tenant = scope.name.clone();
    let answer = json!({ "deleted": name });
    blocking(&state, move |tenancy| {
        tenancy.delete_rollout(&tenant, &name)
    })
    .await?;
    Ok(ok(answer))
}
