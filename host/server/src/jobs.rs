//! The batch jobs API under `/api/v1/jobs`, for the tenant's API key: submit a JSON Lines file
//! of V2 inference requests (or a file the tenant's jobs already hold) against one of its
//! models or graphs, watch its progress, cancel it, download its output and error files,
//! delete it. The rules (quotas, the runner, durability) are `weft_tenancy::jobs`; this module
//! only moves bytes between HTTP and there.
//!
//! An input is received like every upload (streamed into a temporary file of the store,
//! hashed, within `--max-upload-bytes` and the tenant's storage quota, never held in memory),
//! and files are streamed back in blocks read off the async threads.

use std::io::Read as _;

use axum::Router;
use axum::body::Body;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use bytes::Bytes;
use serde_json::Value;
use weft_core::{Error, Result};
use weft_tenancy::jobs::{JobFileKind, JobInput, JobRequest};

use crate::app::{AppState, Caller};
use crate::error::{ApiError, Path};
use crate::tenants::{Tenancy, refused};
use crate::uploads::Limit;

/// Bytes read from a job file per block of a download.
const DOWNLOAD_BLOCK: usize = 256 << 10;

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/api/v1/jobs", post(submit_job).get(list_jobs))
        .route("/api/v1/jobs/{id}", get(get_job).delete(delete_job))
        .route("/api/v1/jobs/{id}/cancel", post(cancel_job))
        .route("/api/v1/jobs/{id}/{file}", get(download))
}

/// Runs blocking tenancy work off the async threads.
async fn blocking<T: Send + 'static>(
    state: &AppState,
    work: impl FnOnce(&Tenancy) -> Result<T> + Send + 'static,
) -> Result<T> {
    let tenancy = std::sync::Arc::clone(&state.tenancy);
    tokio::task::spawn_blocking(move || work(&tenancy))
        .await
        .map_err(|error| Error::internal(format!("job task failed: {error}")))?
}

/// `POST /api/v1/jobs?target=NAME[&version=N][&chunk_rows=N][&deadline_seconds=N]` with the
/// input file as the body, or `...&input=DIGEST` and no body to run a file the tenant's jobs
/// already hold. 201 with the job.
async fn submit_job(
    State(state): State<AppState>,
    Caller(scope): Caller,
    query: std::result::Result<Query<JobRequest>, axum::extract::rejection::QueryRejection>,
    headers: HeaderMap,
    body: Body,
) -> std::result::Result<Response, ApiError> {
    let _permit = scope.admit().map_err(refused)?;
    let Query(request) = query.map_err(|rejection| {
        Error::invalid(format!(
            "bad job parameters ({}); expected target=NAME and optionally version, \
             chunk_rows, deadline_seconds, input",
            rejection.body_text()
        ))
    })?;
    let input = match request.input.clone() {
        Some(digest) => {
            let has_body = crate::app::read_body(0, &headers, body)
                .await
                .map_or(true, |bytes| !bytes.is_empty());
            if has_body {
                return Err(Error::invalid(
                    "send either an input file as the body or input=DIGEST, not both",
                )
                .into());
            }
            let digest = digest
                .strip_prefix("sha256:")
                .unwrap_or(&digest)
                .to_string();
            JobInput::Stored(digest)
        }
        None => {
            let limit = Limit {
                bytes: state.max_upload_bytes,
                source: "--max-upload-bytes",
            };
            let received =
                crate::uploads::receive(&state, &scope.name, "job input", limit, 0, &headers, body)
                    .await?;
            // The reservation is dropped after the commit below counts the bytes.
            let reservation = received.reservation;
            let staged = received.rest;
            let tenant = scope.name.clone();
            let view = blocking(&state, move |tenancy| {
                let view = tenancy.submit_job(&tenant, request, JobInput::Uploaded(staged));
                drop(reservation);
                view
            })
            .await?;
            return Ok((StatusCode::CREATED, axum::Json(view)).into_response());
        }
    };
    let tenant = scope.name.clone();
    let view = blocking(&state, move |tenancy| {
        tenancy.submit_job(&tenant, request, input)
    })
    .await?;
    Ok((StatusCode::CREATED, axum::Json(view)).into_response())
}

async fn list_jobs(
    State(state): State<AppState>,
    Caller(scope): Caller,
) -> std::result::Result<Response, ApiError> {
    Ok(axum::Json(state.tenancy.list_jobs(&scope.name)?).into_response())
}

async fn get_job(
    State(state): State<AppState>,
    Caller(scope): Caller,
    Path(id): Path<String>,
) -> std::result::Result<Response, ApiError> {
    Ok(axum::Json(state.tenancy.job(&scope.name, &id)?).into_response())
}

async fn cancel_job(
    State(state): State<AppState>,
    Caller(scope): Caller,
    Path(id): Path<String>,
) -> std::result::Result<Response, ApiError> {
    let tenant = scope.name.clone();
    let view: Value = blocking(&state, move |tenancy| tenancy.cancel_job(&tenant, &id)).await?;
    Ok(axum::Json(view).into_response())
}

async fn delete_job(
    State(state): State<AppState>,
    Caller(scope): Caller,
    Path(id): Path<String>,
) -> std::result::Result<Response, ApiError> {
    let _permit = scope.admit().map_err(refused)?;
    let tenant = scope.name.clone();
    let answer = serde_json::json!({ "deleted": id });
    blocking(&state, move |tenancy| tenancy.delete_job(&tenant, &id)).await?;
    Ok(axum::Json(answer).into_response())
}

/// `GET /api/v1/jobs/{id}/output|errors|input`: the file as JSON Lines, streamed.
async fn download(
    State(state): State<AppState>,
    Caller(scope): Caller,
    Path((id, file)): Path<(String, String)>,
) -> std::result::Result<Response, ApiError> {
    let kind = match file.as_str() {
        "output" => JobFileKind::Output,
        "errors" => JobFileKind::Errors,
        "input" => JobFileKind::Input,
        _ => {
            return Err(Error::not_found(format!(
                "a job has no file '{file}': ask for output, errors or input"
            ))
            .into());
        }
    };
    let tenant = scope.name.clone();
    let (file, length) = blocking(&state, move |tenancy| {
        tenancy.open_job_file(&tenant, &id, kind)
    })
    .await?;
    let blocks = futures_util::stream::unfold(Some(file), |file| async move {
        let mut file = file?;
        let read = tokio::task::spawn_blocking(move || {
            let mut block = vec![0u8; DOWNLOAD_BLOCK];
            let n = file.read(&mut block)?;
            block.truncate(n);
            Ok::<_, std::io::Error>((file, block))
        })
        .await;
        match read {
            Ok(Ok((_, block))) if block.is_empty() => None,
            Ok(Ok((file, block))) => Some((Ok(Bytes::from(block)), Some(file))),
            Ok(Err(error)) => Some((Err(error), None)),
            Err(error) => Some((Err(std::io::Error::other(error)), None)),
        }
    });
    Ok((
        [
            (header::CONTENT_TYPE, "application/jsonl".to_string()),
            (header::CONTENT_LENGTH, length.to_string()),
        ],
        Body::from_stream(blocks),
    )
        .into_response())
}
