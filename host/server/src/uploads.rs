//! Receiving control-plane uploads (plugin components, models, graphs) without holding them in
//! memory, inside the tenant's storage reservation (the ledger itself is
//! `weft_tenancy::storage`, where the quota decisions live).
//!
//! Why this shape: every tenant is hostile and uploads are the largest bodies the server takes
//! (up to `--max-upload-bytes`, 1 GiB by default), so an upload is streamed chunk by chunk into a
//! temporary file of the store ([`weft_store::Store::blob_writer`]), hashed as it goes, and
//! refused (413, the limit named) the moment it passes its limit — nothing more is read. The
//! checks that follow read the file back once (a component must be compiled, an ONNX model
//! inspected and loaded), and a version that passes is moved into the store by rename, so the
//! body is never held twice and never beyond its limit.
//!
//! Before a byte is read, the upload reserves its declared `Content-Length` (or, without one,
//! what is left of the quota up to the size limit) in a [`StorageLedger`]: what the tenant has
//! stored plus what its uploads in progress hold can never pass its quota, so N parallel
//! uploads that each fit but together do not are refused up front (403, the quota named, as
//! every storage-quota refusal is) instead of all being received and stored. The reservation is
//! an RAII guard: shrunk to the actual size once the body is in, released when dropped, which
//! the upload does after its commit (the committed state then counts the bytes).

use std::sync::Arc;

use axum::body::Body;
use axum::http::{HeaderMap, header};
use bytes::Bytes;
use http_body_util::BodyExt;
use weft_core::{Error, ErrorKind, Result};
use weft_store::{BlobWriter, StagedBlob, Store};

use crate::app::AppState;
use crate::tenants::Tenancy;
use weft_tenancy::storage::{Reservation, Want, over_quota};

/// Largest graph TOML a tenant may apply (far above any real graph; a graph is text).
pub const MAX_GRAPH_BYTES: usize = 1 << 20;
/// Largest model.toml at the head of a model upload (it is held in memory).
pub const MAX_MODEL_CONFIG_BYTES: usize = 1 << 20;
/// Bytes gathered from the body before one blocking write to the temporary file: bounds what
/// one upload holds in memory while it streams.
const WRITE_BATCH: usize = 256 << 10;

/// The size limit of one kind of upload and where it comes from, for the 413 message.
#[derive(Clone, Copy, Debug)]
pub struct Limit {
    pub bytes: usize,
    /// What sets it: a flag (`--max-upload-bytes`) or a fixed limit.
    pub source: &'static str,
}

/// A received upload: the head held in memory, the rest in a temporary file of the store.
#[derive(Debug)]
pub struct Received {
    /// The body's first bytes, up to the `head` asked for (a model's model.toml).
    pub head: Vec<u8>,
    /// The rest of the body, fsynced in `store/tmp/`, with its sha256 digest.
    pub rest: StagedBlob,
    /// The whole body's length.
    pub size: u64,
    /// The upload's storage reservation, shrunk to `size`: drop it after the commit.
    pub reservation: Reservation,
}

/// The declared `Content-Length`, if any (a malformed one is left to the HTTP layer).
fn declared_length(headers: &HeaderMap) -> Option<u64> {
    headers
        .get(header::CONTENT_LENGTH)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.trim().parse::<u64>().ok())
}

/// Runs blocking store I/O off the async threads.
async fn blocking_io<T: Send + 'static>(
    tenancy: &Arc<Tenancy>,
    work: impl FnOnce(&Store) -> Result<T> + Send + 'static,
) -> Result<T> {
    let tenancy = Arc::clone(tenancy);
    tokio::task::spawn_blocking(move || work(tenancy.store()))
        .await
        .map_err(|error| Error::internal(format!("upload task failed: {error}")))?
}

/// Writes a batch of chunks to the upload's file (and hash), off the async threads.
async fn write_batch(mut writer: BlobWriter, batch: Vec<Bytes>) -> Result<BlobWriter> {
    tokio::task::spawn_blocking(move || {
        for chunk in &batch {
            writer.write(chunk)?;
        }
        Ok(writer)
    })
    .await
    .map_err(|error| Error::internal(format!("upload task failed: {error}")))?
}

/// Receives one upload of `tenant`: reserves its storage, then streams the body — its first
/// `head` bytes into memory, the rest into a temporary file, hashed as it goes — refusing it
/// (413 naming `limit`, or 403 naming the storage quota) as soon as it is too large, without
/// reading further. On any error the temporary file is already gone.
pub async fn receive(
    state: &AppState,
    tenant: &str,
    kind: &str,
    limit: Limit,
    head: usize,
    headers: &HeaderMap,
    body: Body,
) -> Result<Received> {
    let too_large = || {
        Error::new(
            ErrorKind::PayloadTooLarge,
            format!(
                "the {kind} upload exceeds the limit of {} bytes ({})",
                limit.bytes, limit.source
            ),
        )
    };
    let (tenancy, ledger) = (&state.tenancy, &state.uploads);
    let limit_bytes = limit.bytes as u64;
    let declared = declared_length(headers);
    if declared.is_some_and(|length| length > limit_bytes) {
        return Err(too_large());
    }
    let want = declared.map_or(Want::UpTo(limit_bytes), Want::Exactly);
    let mut reservation = ledger.reserve(tenancy.store(), tenant, want)?;
    // Past the size limit: 413; past what the quota left this upload: 403 naming the quota.
    let allowed = reservation.bytes();
    let over = |received: u64| {
        if received > limit_bytes || allowed >= limit_bytes {
            too_large()
        } else {
            let quota = tenancy
                .store()
                .state()
                .tenants
                .get(tenant)
                .map_or(0, |record| record.quotas.max_stored_bytes);
            over_quota(
                tenant,
                quota,
                allowed,
                ledger.reserved(tenant).saturating_sub(allowed),
            )
        }
    };

    let mut writer = blocking_io(tenancy, Store::blob_writer).await?;
    let mut head_bytes = Vec::new();
    let mut received = 0u64;
    let mut batch = Vec::new();
    let mut batched = 0usize;
    let mut body = body;
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|error| crate::body_timeout::read_error(&error))?;
        let Ok(mut chunk) = frame.into_data() else {
            continue;
        };
        received = received.saturating_add(chunk.len() as u64);
        if received > allowed {
            // Dropping the writer removes the file; the rest of the body is never read.
            return Err(over(received));
        }
        if head_bytes.len() < head {
            let take = (head - head_bytes.len()).min(chunk.len());
            head_bytes.extend_from_slice(&chunk.split_to(take));
        }
        if chunk.is_empty() {
            continue;
        }
        batched += chunk.len();
        batch.push(chunk);
        if batched >= WRITE_BATCH {
            writer = write_batch(writer, std::mem::take(&mut batch)).await?;
            batched = 0;
        }
    }
    if !batch.is_empty() {
        writer = write_batch(writer, batch).await?;
    }
    let rest = tokio::task::spawn_blocking(move || writer.finish())
        .await
        .map_err(|error| Error::internal(format!("upload task failed: {error}")))??;
    reservation.shrink_to(received);
    Ok(Received {
        head: head_bytes,
        rest,
        size: received,
        reservation,
    })
}
