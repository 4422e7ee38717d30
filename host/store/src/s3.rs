//! Blobs in an S3-compatible object store, shared by every replica (`--blob-url`).
//!
//! Blobs are content-addressed (`<prefix>/sha256/<hex>`), so an object never changes once
//! written: a put of bytes already there is harmless, and readers never need invalidation.
//! Each replica keeps the blobs it used in its own data directory (`store/blobs/sha256/`, the
//! embedded store's layout) as a cache: a read that misses it downloads the object into a
//! temporary file, checks that the bytes hash to the name, and renames it into place, so a
//! damaged or truncated download is never used. Writes go to the local directory first, then
//! to the object store before the metadata that references them is committed (the store's
//! commit checks that every newly referenced blob is in the object store).
//!
//! Credentials, region and endpoint come from the standard `AWS_*` variables
//! (`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_REGION`, `AWS_ENDPOINT_URL`); an
//! `http://` endpoint (a local SeaweedFS or MinIO) is allowed as such.
//!
//! object_store is async and the store is not, so like [`crate::postgres`] this owns a small
//! runtime and waits on a channel.

use std::fs::{self, File};
use std::io::{Read as _, Write as _};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt as _;
use object_store::aws::AmazonS3Builder;
use object_store::path::Path as ObjectPath;
use object_store::{
    GetOptions, ObjectStore, ObjectStoreExt as _, PutMultipartOptions, PutOptions, PutPayload,
    WriteMultipart,
};
use sha2::{Digest as _, Sha256};
use weft_core::{Error, Result};

use crate::postgres::wait_on;
use crate::signing::{hex, is_sha256_hex};

/// Parts of a multipart upload (object_store's default part size is 5 MiB minimum).
const PART_BYTES: usize = 8 << 20;

/// Options for a metadata-only request (HEAD).
fn head() -> GetOptions {
    GetOptions {
        head: true,
        ..GetOptions::default()
    }
}

/// The object store's failure as an error a tenant may see: what failed, not how (the
/// endpoint, bucket and object names stay in the operator's log).
fn object_error(what: &str, error: &object_store::Error) -> Error {
    tracing::warn!(%error, "shared store, object store: {what}");
    Error::unavailable(format!(
        "the shared store's object store is unavailable: {what} (details in the server log)"
    ))
}

/// Where the object store is and who we are to it: the standard `AWS_*` variables.
#[derive(Clone, Debug, Default)]
pub struct S3Settings {
    pub endpoint: Option<String>,
    pub region: Option<String>,
    pub access_key_id: Option<String>,
    pub secret_access_key: Option<String>,
    pub session_token: Option<String>,
}

impl S3Settings {
    /// `AWS_ENDPOINT_URL` (or `AWS_ENDPOINT`), `AWS_REGION` (or `AWS_DEFAULT_REGION`),
    /// `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN`.
    pub fn from_env() -> S3Settings {
        let var = |names: &[&str]| names.iter().find_map(|name| std::env::var(name).ok());
        S3Settings {
            endpoint: var(&["AWS_ENDPOINT_URL", "AWS_ENDPOINT"]),
            region: var(&["AWS_REGION", "AWS_DEFAULT_REGION"]),
            access_key_id: var(&["AWS_ACCESS_KEY_ID"]),
            secret_access_key: var(&["AWS_SECRET_ACCESS_KEY"]),
            session_token: var(&["AWS_SESSION_TOKEN"]),
        }
    }
}

/// The object store holding every replica's blobs.
pub struct S3Blobs {
    runtime: Option<tokio::runtime::Runtime>,
    store: Arc<dyn ObjectStore>,
    prefix: String,
}

impl std::fmt::Debug for S3Blobs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "S3Blobs({})", self.prefix)
    }
}

impl S3Blobs {
    /// Connects to `url` (`s3://bucket` or `s3://bucket/prefix`) with `settings`, and checks
    /// that the bucket answers.
    pub fn connect(url: &str, settings: &S3Settings) -> Result<S3Blobs> {
        let rest = url.strip_prefix("s3://").ok_or_else(|| {
            Error::invalid(format!(
                "--blob-url must be s3://bucket[/prefix], not '{url}'"
            ))
        })?;
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        if bucket.is_empty() {
            return Err(Error::invalid(
                "--blob-url names no bucket (s3://bucket[/prefix])",
            ));
        }
        let mut builder = AmazonS3Builder::new()
            .with_bucket_name(bucket)
            .with_region(settings.region.as_deref().unwrap_or("us-east-1"));
        if let (Some(key), Some(secret)) = (&settings.access_key_id, &settings.secret_access_key) {
            builder = builder
                .with_access_key_id(key)
                .with_secret_access_key(secret);
        }
        if let Some(token) = &settings.session_token {
            builder = builder.with_token(token);
        }
        if let Some(endpoint) = &settings.endpoint {
            builder = builder
                .with_endpoint(endpoint)
                .with_allow_http(endpoint.starts_with("http://"))
                // Path-style requests: a local server has no per-bucket host names.
                .with_virtual_hosted_style_request(false);
        }
        let store = builder.build().map_err(|error| {
            Error::invalid(format!("--blob-url {url}: cannot configure S3: {error}"))
        })?;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("weft-store-s3")
            .enable_all()
            .build()
            .map_err(|error| Error::internal(format!("cannot start the blob runtime: {error}")))?;
        let blobs = S3Blobs {
            runtime: Some(runtime),
            store: Arc::new(store),
            prefix: prefix.trim_matches('/').to_string(),
        };
        // Fail at start, not at the first upload, when the bucket or credentials are wrong.
        let store = Arc::clone(&blobs.store);
        let probe = blobs.object(&"0".repeat(64));
        blobs.run(async move {
            match store.get_opts(&probe, head()).await {
                Ok(_) | Err(object_store::Error::NotFound { .. }) => Ok(()),
                Err(error) => Err(object_error("cannot reach the bucket", &error)),
            }
        })?;
        Ok(blobs)
    }

    fn object(&self, digest: &str) -> ObjectPath {
        if self.prefix.is_empty() {
            ObjectPath::from(format!("sha256/{digest}"))
        } else {
            ObjectPath::from(format!("{}/sha256/{digest}", self.prefix))
        }
    }

    fn run<T: Send + 'static>(
        &self,
        future: impl std::future::Future<Output = Result<T>> + Send + 'static,
    ) -> Result<T> {
        match &self.runtime {
            Some(runtime) => wait_on(runtime, future)?,
            None => Err(Error::unavailable("the shared store is closed")),
        }
    }

    /// Whether the object store holds `digest`.
    pub fn contains(&self, digest: &str) -> Result<bool> {
        let store = Arc::clone(&self.store);
        let object = self.object(digest);
        self.run(async move {
            match store.get_opts(&object, head()).await {
                Ok(_) => Ok(true),
                Err(object_store::Error::NotFound { .. }) => Ok(false),
                Err(error) => Err(object_error("cannot look up a blob", &error)),
            }
        })
    }

    /// Uploads the file at `path` as the blob `digest` (skipped when it is there already).
    pub fn upload(&self, digest: &str, path: &Path) -> Result<()> {
        if self.contains(digest)? {
            return Ok(());
        }
        let mut file = File::open(path)
            .map_err(|error| Error::internal(format!("cannot read a blob to upload: {error}")))?;
        let length = file
            .metadata()
            .map_err(|error| Error::internal(format!("cannot read a blob to upload: {error}")))?
            .len();
        let store = Arc::clone(&self.store);
        let object = self.object(digest);
        if length <= PART_BYTES as u64 {
            let mut bytes = Vec::with_capacity(length as usize);
            file.read_to_end(&mut bytes).map_err(|error| {
                Error::internal(format!("cannot read a blob to upload: {error}"))
            })?;
            return self.run(async move {
                store
                    .put_opts(&object, PutPayload::from(bytes), PutOptions::default())
                    .await
                    .map(|_| ())
                    .map_err(|error| object_error("cannot store a blob", &error))
            });
        }
        // Large blobs go up in parts, read from the file a part at a time.
        let upload = self.run(async move {
            store
                .put_multipart_opts(&object, PutMultipartOptions::default())
                .await
                .map_err(|error| object_error("cannot start storing a blob", &error))
        })?;
        let mut writer = WriteMultipart::new_with_chunk_size(upload, PART_BYTES);
        let mut buffer = vec![0u8; PART_BYTES];
        loop {
            let read = file.read(&mut buffer).map_err(|error| {
                Error::internal(format!("cannot read a blob to upload: {error}"))
            })?;
            if read == 0 {
                break;
            }
            let part = buffer[..read].to_vec();
            writer = self.run(async move {
                writer
                    .wait_for_capacity(2)
                    .await
                    .map_err(|error| object_error("cannot store a blob", &error))?;
                writer.write(&part);
                Ok(writer)
            })?;
        }
        self.run(async move {
            writer
                .finish()
                .await
                .map(|_| ())
                .map_err(|error| object_error("cannot finish storing a blob", &error))
        })
    }

    /// The digests of the blobs the object store says were written more than `age` ago, by
    /// this machine's clock (objects under the prefix that are not blobs are left out).
    pub fn written_before(&self, age: Duration) -> Result<Vec<String>> {
        let cutoff =
            i64::try_from(crate::unix_now().saturating_sub(age.as_secs())).unwrap_or(i64::MAX);
        let store = Arc::clone(&self.store);
        let folder = ObjectPath::from(if self.prefix.is_empty() {
            "sha256".to_string()
        } else {
            format!("{}/sha256", self.prefix)
        });
        self.run(async move {
            let mut listing = store.list(Some(&folder));
            let mut old = Vec::new();
            while let Some(object) = listing.next().await {
                let object =
                    object.map_err(|error| object_error("cannot list the blobs", &error))?;
                if object.last_modified.timestamp() < cutoff
                    && let Some(name) = object.location.filename()
                    && is_sha256_hex(name)
                {
                    old.push(name.to_string());
                }
            }
            Ok(old)
        })
    }

    /// Deletes the blob `digest` (nothing happens when it is not there).
    pub fn delete(&self, digest: &str) -> Result<()> {
        let store = Arc::clone(&self.store);
        let object = self.object(digest);
        self.run(async move {
            match store.delete(&object).await {
                Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
                Err(error) => Err(object_error("cannot delete a blob", &error)),
            }
        })
    }

    /// Downloads the blob `digest` to `path`: streamed into a temporary file next to it and
    /// hashed on the way (never held whole in memory), checked against the digest, then
    /// renamed into place. Returns false when the object store has no such blob.
    pub fn download(&self, digest: &str, path: &Path) -> Result<bool> {
        if !is_sha256_hex(digest) {
            return Err(Error::invalid(format!("'{digest}' is not a blob digest")));
        }
        let mut random = [0u8; 8];
        getrandom::fill(&mut random)
            .map_err(|e| Error::internal(format!("cannot name a download: {e}")))?;
        let temp = path.with_file_name(format!(".tmp-download-{digest}-{}", hex(&random)));
        let store = Arc::clone(&self.store);
        let object = self.object(digest);
        let target = temp.clone();
        let fetched = self.run(async move {
            let result = match store.get_opts(&object, GetOptions::default()).await {
                Ok(result) => result,
                Err(object_store::Error::NotFound { .. }) => return Ok(None),
                Err(error) => return Err(object_error("cannot read a blob", &error)),
            };
            let mut file = File::create(&target)
                .map_err(|e| Error::internal(format!("cannot keep a downloaded blob: {e}")))?;
            let mut hasher = Sha256::new();
            let mut stream = result.into_stream();
            while let Some(chunk) = stream.next().await {
                let chunk = chunk.map_err(|error| object_error("cannot read a blob", &error))?;
                hasher.update(&chunk);
                file.write_all(&chunk)
                    .map_err(|e| Error::internal(format!("cannot keep a downloaded blob: {e}")))?;
            }
            file.sync_all()
                .map_err(|e| Error::internal(format!("cannot keep a downloaded blob: {e}")))?;
            Ok(Some(hex(&hasher.finalize())))
        });
        let kept = match fetched {
            Ok(Some(actual)) if actual == digest => fs::rename(&temp, path)
                .map_err(|e| Error::internal(format!("cannot keep a downloaded blob: {e}"))),
            Ok(Some(_)) => Err(Error::internal(format!(
                "blob {digest} in the object store does not match its digest"
            ))),
            Ok(None) => return Ok(false),
            Err(error) => Err(error),
        };
        if kept.is_err() {
            let _ = fs::remove_file(&temp);
        }
        kept.map(|()| true)
    }
}

impl Drop for S3Blobs {
    fn drop(&mut self) {
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}
