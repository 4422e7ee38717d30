//! Triton's system shared memory extension: clients on the same host register POSIX shared
//! memory objects (`/dev/shm/<key>`) as named regions, then send inputs and receive outputs
//! through them instead of through the socket.
//!
//! Off unless the operator enables it for a tenant (`--system-shared-memory TENANT,...`): a key
//! is global to the host, so a tenant that may register regions may open any shared memory
//! object the server's user can open; the operator decides which tenants' clients share the
//! host with it. Region names are the tenant's own (another tenant's are unknown, as missing
//! ones are), at most [`MAX_REGIONS`] each.
//!
//! Regions are read and written with `pread`/`pwrite` on the file held open since
//! registration, not mapped: no `unsafe`, no SIGBUS if a client truncates the object under
//! the server (a short read is an error of that one request), and inputs are copied once, so a
//! client changing the region mid-request cannot change what was validated.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::File;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::sync::{Arc, Mutex};

use axum::Json;
use axum::body::Body;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use weft_core::{Error, ErrorKind, NamedTensor, Result};
use weft_protocol::shared_memory::{SharedMemoryInputs, SharedMemoryRef};

use crate::app::{AppState, Caller};
use crate::error::{ApiError, Path};

/// Regions one tenant may have registered at once (each holds a file open).
pub const MAX_REGIONS: usize = 64;
/// Where POSIX shared memory objects live on Linux.
const SHM_DIR: &str = "/dev/shm";

/// A registered region, as status reports it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegionStatus {
    pub name: String,
    pub key: String,
    pub offset: u64,
    pub byte_size: u64,
}

struct Region {
    status: RegionStatus,
    file: File,
}

/// Every tenant's registered regions, and which tenants may have any.
#[derive(Default)]
pub struct SystemSharedMemory {
    enabled: HashSet<String>,
    regions: Mutex<HashMap<String, BTreeMap<String, Arc<Region>>>>,
}

impl SystemSharedMemory {
    /// Shared memory for the tenants named.
    pub fn for_tenants(tenants: impl IntoIterator<Item = String>) -> Self {
        SystemSharedMemory {
            enabled: tenants.into_iter().collect(),
            regions: Mutex::default(),
        }
    }

    fn check_enabled(&self, tenant: &str) -> Result<()> {
        if self.enabled.contains(tenant) {
            return Ok(());
        }
        Err(Error::new(
            ErrorKind::PermissionDenied,
            format!(
                "system shared memory is not enabled for tenant '{tenant}'; the operator \
                 enables it per tenant (--system-shared-memory), for clients on the server's \
                 host"
            ),
        ))
    }

    fn tenant_regions<T>(
        &self,
        tenant: &str,
        f: impl FnOnce(&mut BTreeMap<String, Arc<Region>>) -> T,
    ) -> T {
        // Every update inserts or removes whole entries: a poisoned map is still consistent.
        let mut regions = self
            .regions
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let mine = regions.entry(tenant.to_string()).or_default();
        let result = f(mine);
        if mine.is_empty() {
            regions.remove(tenant);
        }
        result
    }

    /// Registers `key` (a POSIX shared memory name, `/something`) from `offset` for
    /// `byte_size` bytes as the tenant's region `name`.
    pub fn register(&self, tenant: &str, status: RegionStatus) -> Result<()> {
        self.check_enabled(tenant)?;
        let name = &status.name;
        if name.is_empty() || name.len() > 256 {
            return Err(Error::invalid(
                "a region's name must be 1 to 256 bytes long",
            ));
        }
        let file = open_key(&status.key)?;
        let length = file
            .metadata()
            .map_err(|error| Error::invalid(format!("cannot read '{}': {error}", status.key)))?
            .len();
        let end = status.offset.checked_add(status.byte_size);
        if status.byte_size == 0 || end.is_none_or(|end| end > length) {
            return Err(Error::invalid(format!(
                "region '{name}' of {} bytes from offset {} does not fit shared memory '{}' of \
                 {length} bytes",
                status.byte_size, status.offset, status.key
            )));
        }
        self.tenant_regions(tenant, |regions| {
            if regions.contains_key(name) {
                return Err(Error::new(
                    ErrorKind::Conflict,
                    format!(
                        "shared memory region '{name}' is already registered; unregister it first"
                    ),
                ));
            }
            if regions.len() >= MAX_REGIONS {
                return Err(Error::new(
                    ErrorKind::ResourceExhausted,
                    format!(
                        "tenant '{tenant}' has {MAX_REGIONS} shared memory regions registered, \
                         the most it may; unregister some first"
                    ),
                ));
            }
            regions.insert(
                name.clone(),
                Arc::new(Region {
                    status: status.clone(),
                    file,
                }),
            );
            Ok(())
        })
    }

    /// Unregisters the tenant's region `name`, or all of them; an unknown name is no error
    /// (as in Triton: the region is unregistered either way).
    pub fn unregister(&self, tenant: &str, name: Option<&str>) -> Result<()> {
        self.check_enabled(tenant)?;
        self.tenant_regions(tenant, |regions| match name {
            Some(name) => {
                regions.remove(name);
            }
            None => regions.clear(),
        });
        Ok(())
    }

    /// The tenant's regions, or only `name` (unknown: 404).
    pub fn status(&self, tenant: &str, name: Option<&str>) -> Result<Vec<RegionStatus>> {
        self.check_enabled(tenant)?;
        self.tenant_regions(tenant, |regions| match name {
            Some(name) => regions
                .get(name)
                .map(|region| vec![region.status.clone()])
                .ok_or_else(|| unknown_region(name)),
            None => Ok(regions
                .values()
                .map(|region| region.status.clone())
                .collect()),
        })
    }

    fn region(&self, tenant: &str, name: &str) -> Result<Arc<Region>> {
        self.check_enabled(tenant)?;
        self.tenant_regions(tenant, |regions| regions.get(name).cloned())
            .ok_or_else(|| unknown_region(name))
    }

    /// What decodes a request's inputs for `tenant`, with at most `budget` bytes read from
    /// regions in all (the request's size limit).
    pub fn inputs<'a>(&'a self, tenant: &'a str, budget: usize) -> TenantInputs<'a> {
        TenantInputs {
            shared_memory: self,
            tenant,
            left: Mutex::new(budget),
        }
    }

    /// Writes `output` into the place its request named; the parameters the response gives it.
    pub fn write_output(
        &self,
        tenant: &str,
        output: &NamedTensor,
        place: &SharedMemoryRef,
    ) -> Result<weft_protocol::Parameters> {
        let region = self.region(tenant, &place.region)?;
        let bytes = output.tensor.data();
        let span = region.span(&format!("output '{}'", output.name), place)?;
        if bytes.len() as u64 > place.byte_size {
            return Err(Error::invalid(format!(
                "output '{}' is {} bytes, more than the {} bytes given for it in shared memory \
                 region '{}'",
                output.name,
                bytes.len(),
                place.byte_size,
                place.region
            )));
        }
        region.file.write_all_at(bytes, span).map_err(|error| {
            Error::internal(format!(
                "cannot write output '{}' to shared memory region '{}': {error}",
                output.name, place.region
            ))
        })?;
        Ok(place.to_parameters(bytes.len()))
    }
}

impl Region {
    /// The absolute offset in the object of `place`, checked against the region's bounds.
    fn span(&self, what: &str, place: &SharedMemoryRef) -> Result<u64> {
        let end = place.offset.checked_add(place.byte_size);
        if end.is_none_or(|end| end > self.status.byte_size) {
            return Err(Error::invalid(format!(
                "{what}: {} bytes at offset {} lie outside shared memory region '{}' of {} bytes",
                place.byte_size, place.offset, place.region, self.status.byte_size
            )));
        }
        Ok(self.status.offset + place.offset)
    }
}

fn unknown_region(name: &str) -> Error {
    Error::not_found(format!(
        "Unable to find system shared memory region: '{name}'"
    ))
}

/// Opens `/dev/shm/<key without its slash>` for reading and writing, refusing names that could
/// leave that folder or follow a link.
fn open_key(key: &str) -> Result<File> {
    let name = key.strip_prefix('/').unwrap_or(key);
    if name.is_empty()
        || name.len() > 255
        || name.contains('/')
        || name == "."
        || name == ".."
        || name.contains('\0')
    {
        return Err(Error::invalid(format!(
            "'{key}' is not a POSIX shared memory name ('/name', no other '/')"
        )));
    }
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC | libc::O_NONBLOCK)
        .open(std::path::Path::new(SHM_DIR).join(name))
        .map_err(|error| match error.kind() {
            std::io::ErrorKind::NotFound => Error::not_found(format!(
                "no shared memory object '{key}' on the server's host (create it with \
                 shm_open before registering it)"
            )),
            _ => Error::invalid(format!("cannot open shared memory '{key}': {error}")),
        })?;
    let is_file = file
        .metadata()
        .map(|metadata| metadata.file_type().is_file())
        .unwrap_or(false);
    if !is_file {
        return Err(Error::invalid(format!(
            "'{key}' is not a shared memory object"
        )));
    }
    Ok(file)
}

/// One request's view of its tenant's regions, reading at most a budget of bytes.
pub struct TenantInputs<'a> {
    shared_memory: &'a SystemSharedMemory,
    tenant: &'a str,
    left: Mutex<usize>,
}

impl SharedMemoryInputs for TenantInputs<'_> {
    fn read(&self, input: &str, place: &SharedMemoryRef) -> Result<Bytes> {
        let region = self.shared_memory.region(self.tenant, &place.region)?;
        let at = region.span(&format!("input '{input}'"), place)?;
        let size = usize::try_from(place.byte_size).unwrap_or(usize::MAX);
        {
            let mut left = self
                .left
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            *left = left.checked_sub(size).ok_or_else(|| {
                Error::new(
                    ErrorKind::PayloadTooLarge,
                    format!(
                        "input '{input}': the request's tensors exceed its size limit \
                         (--max-request-bytes or the tenant's max_request_bytes quota), shared \
                         memory included"
                    ),
                )
            })?;
        }
        let mut bytes = vec![0u8; size];
        region.file.read_exact_at(&mut bytes, at).map_err(|error| {
            Error::invalid(format!(
                "input '{input}': cannot read {size} bytes of shared memory region '{}' (was \
                 the object truncated?): {error}",
                place.region
            ))
        })?;
        Ok(Bytes::from(bytes))
    }
}

// --- HTTP: Triton's /v2/systemsharedmemory routes ---------------------------------------------

/// The extension's routes.
pub fn routes() -> axum::Router<AppState> {
    axum::Router::new()
        .route("/v2/systemsharedmemory/status", get(all_status))
        .route(
            "/v2/systemsharedmemory/region/{name}/status",
            get(region_status),
        )
        .route(
            "/v2/systemsharedmemory/region/{name}/register",
            post(register),
        )
        .route(
            "/v2/systemsharedmemory/region/{name}/unregister",
            post(unregister),
        )
        .route("/v2/systemsharedmemory/unregister", post(unregister_all))
}

async fn all_status(
    State(state): State<AppState>,
    Caller(scope): Caller,
) -> std::result::Result<Json<Vec<RegionStatus>>, ApiError> {
    Ok(Json(state.shared_memory.status(&scope.name, None)?))
}

async fn region_status(
    State(state): State<AppState>,
    Caller(scope): Caller,
    Path(name): Path<String>,
) -> std::result::Result<Json<Vec<RegionStatus>>, ApiError> {
    Ok(Json(state.shared_memory.status(&scope.name, Some(&name))?))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RegisterBody {
    key: String,
    #[serde(default)]
    offset: u64,
    byte_size: u64,
}

async fn register(
    State(state): State<AppState>,
    Caller(scope): Caller,
    Path(name): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> std::result::Result<Response, ApiError> {
    let body = crate::app::read_body(64 << 10, &headers, body).await?;
    let request: RegisterBody = serde_json::from_slice(&body).map_err(|error| {
        Error::invalid(format!(
            "malformed register request (want {{\"key\": \"/name\", \"offset\": 0, \
             \"byte_size\": n}}): {error}"
        ))
    })?;
    state.shared_memory.register(
        &scope.name,
        RegionStatus {
            name,
            key: request.key,
            offset: request.offset,
            byte_size: request.byte_size,
        },
    )?;
    Ok(Json(serde_json::json!({})).into_response())
}

async fn unregister(
    State(state): State<AppState>,
    Caller(scope): Caller,
    Path(name): Path<String>,
) -> std::result::Result<Response, ApiError> {
    state.shared_memory.unregister(&scope.name, Some(&name))?;
    Ok(Json(serde_json::json!({})).into_response())
}

async fn unregister_all(
    State(state): State<AppState>,
    Caller(scope): Caller,
) -> std::result::Result<Response, ApiError> {
    state.shared_memory.unregister(&scope.name, None)?;
    Ok(Json(serde_json::json!({})).into_response())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;
    use weft_core::{DataType, Tensor};

    /// A shared memory object of `size` bytes that is removed when dropped.
    struct Object(String);

    impl Object {
        fn new(size: usize) -> Object {
            let key = format!("/weft-test-{}-{}", std::process::id(), uuid::Uuid::new_v4());
            std::fs::write(format!("{SHM_DIR}{key}"), vec![0u8; size]).unwrap();
            Object(key)
        }
    }

    impl Drop for Object {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(format!("{SHM_DIR}{}", self.0));
        }
    }

    fn status(name: &str, key: &str, offset: u64, byte_size: u64) -> RegionStatus {
        RegionStatus {
            name: name.into(),
            key: key.into(),
            offset,
            byte_size,
        }
    }

    fn place(region: &str, offset: u64, byte_size: u64) -> SharedMemoryRef {
        SharedMemoryRef {
            region: region.into(),
            offset,
            byte_size,
        }
    }

    #[test]
    fn outputs_written_are_inputs_read_within_the_region() {
        let object = Object::new(64);
        let memory = SystemSharedMemory::for_tenants(["acme".to_string()]);
        memory
            .register("acme", status("r", &object.0, 16, 32))
            .unwrap();
        let tensor = NamedTensor::new(
            "y",
            Tensor::new(DataType::Uint8, vec![4], Bytes::from_static(&[1, 2, 3, 4])).unwrap(),
        );
        let parameters = memory
            .write_output("acme", &tensor, &place("r", 8, 8))
            .unwrap();
        assert_eq!(parameters["shared_memory_byte_size"], 4);
        // Offsets are the region's: 16 + 8 in the object.
        let raw = std::fs::read(format!("{SHM_DIR}{}", object.0)).unwrap();
        assert_eq!(&raw[24..28], &[1, 2, 3, 4]);
        let inputs = memory.inputs("acme", 1024);
        let read = inputs.read("x", &place("r", 8, 4)).unwrap();
        assert_eq!(&read[..], &[1, 2, 3, 4]);

        // Outside the region, too big for its place, over the request's budget.
        let error = inputs.read("x", &place("r", 30, 4)).unwrap_err();
        assert!(
            error.message().contains("outside shared memory region 'r'"),
            "{error}"
        );
        let error = memory
            .write_output("acme", &tensor, &place("r", 0, 2))
            .unwrap_err();
        assert!(error.message().contains("more than the 2 bytes"), "{error}");
        let small = memory.inputs("acme", 3);
        let error = small.read("x", &place("r", 0, 4)).unwrap_err();
        assert_eq!(error.kind(), ErrorKind::PayloadTooLarge);
    }

    #[test]
    fn regions_are_each_tenants_own_and_off_unless_enabled() {
        let object = Object::new(8);
        let memory = SystemSharedMemory::for_tenants(["acme".to_string(), "bolt".to_string()]);
        memory
            .register("acme", status("r", &object.0, 0, 8))
            .unwrap();
        let error = memory
            .register("acme", status("r", &object.0, 0, 8))
            .unwrap_err();
        assert_eq!(error.kind(), ErrorKind::Conflict);
        // Another tenant does not see acme's region: unknown, as a missing one.
        let hidden = memory.status("bolt", Some("r")).unwrap_err();
        let missing = memory.status("acme", Some("nope")).unwrap_err();
        assert_eq!(hidden.kind(), ErrorKind::NotFound);
        assert_eq!(
            hidden.message().replace("'r'", "'x'"),
            missing.message().replace("'nope'", "'x'")
        );
        assert!(
            memory
                .inputs("bolt", 64)
                .read("x", &place("r", 0, 4))
                .is_err()
        );
        // A tenant not enabled gets a clear refusal for everything.
        let refused = memory
            .register("carl", status("r", &object.0, 0, 8))
            .unwrap_err();
        assert_eq!(refused.kind(), ErrorKind::PermissionDenied);
        assert!(refused.message().contains("--system-shared-memory"));
        assert_eq!(
            memory.status("carl", None).unwrap_err().kind(),
            ErrorKind::PermissionDenied
        );
        memory.unregister("acme", None).unwrap();
        assert!(memory.status("acme", None).unwrap().is_empty());
    }

    #[test]
    fn keys_that_are_not_shared_memory_names_are_refused() {
        let memory = SystemSharedMemory::for_tenants(["acme".to_string()]);
        for key in ["/../etc/passwd", "/a/b", "/", "", "/.."] {
            let error = memory.register("acme", status("r", key, 0, 1)).unwrap_err();
            assert_eq!(error.kind(), ErrorKind::InvalidArgument, "{key}: {error}");
        }
        let error = memory
            .register("acme", status("r", "/weft-test-does-not-exist", 0, 1))
            .unwrap_err();
        assert_eq!(error.kind(), ErrorKind::NotFound);
        let object = Object::new(8);
        let error = memory
            .register("acme", status("r", &object.0, 4, 8))
            .unwrap_err();
        assert!(error.message().contains("does not fit"), "{error}");
        // A symbolic link in /dev/shm is not followed.
        let link = format!("/weft-test-link-{}", std::process::id());
        let _ = std::fs::remove_file(format!("{SHM_DIR}{link}"));
        std::os::unix::fs::symlink("/etc/hostname", format!("{SHM_DIR}{link}")).unwrap();
        let error = memory
            .register("acme", status("r", &link, 0, 1))
            .unwrap_err();
        let _ = std::fs::remove_file(format!("{SHM_DIR}{link}"));
        assert_eq!(error.kind(), ErrorKind::InvalidArgument, "{error}");
    }

    #[test]
    fn a_tenant_may_hold_a_bounded_number_of_regions() {
        let object = Object::new(8);
        let memory = SystemSharedMemory::for_tenants(["acme".to_string()]);
        for i in 0..MAX_REGIONS {
            memory
                .register("acme", status(&format!("r{i}"), &object.0, 0, 8))
                .unwrap();
        }
        let error = memory
            .register("acme", status("one-more", &object.0, 0, 8))
            .unwrap_err();
        assert_eq!(error.kind(), ErrorKind::ResourceExhausted);
    }
}
