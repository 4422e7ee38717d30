//! The crash-safe store: one atomically rewritten `state.json` plus content-addressed blobs.
//!
//! Layout under `<data-dir>/store/`: `state.json` holds all metadata; `blobs/sha256/<hex>` holds
//! the bytes the metadata points at. Every file is written to a temporary file in the same
//! directory, fsynced, renamed over its final name, and then the directory is fsynced, so after a
//! crash each file is either entirely old or entirely new. Writers put blobs first and commit
//! metadata that references them second; a crash in between leaves an unreferenced blob, which the
//! next [`Store::open`] deletes together with temporary leftovers. Blobs dropped by a delete are
//! removed by the next open or, while serving, by [`Store::collect_unreferenced_blobs`], which
//! the server's single writer calls after each commit. [`Store::transact`] is the only way to change the state: one
//! writer at a time, all or nothing; readers take a cheap [`Arc`] snapshot and never block on a
//! writer's disk I/O. One process at a time: `open` takes an exclusive lock on `store/lock` for the
//! store's lifetime, because a second process's `open` would collect the first one's blobs that are
//! written but not yet committed (and two writers would overwrite each other's `state.json`).
//!
//! Uploads are not buffered whole: [`Store::blob_writer`] streams bytes into a fresh file under
//! `store/tmp/` (created with `create_new`, hashed as it is written, removed when dropped), and
//! [`Store::put_staged`] moves the finished, fsynced file into `blobs/sha256/` by rename followed
//! by a directory fsync — the same crash-safety as [`Store::put_blob`]. `open` empties
//! `store/tmp/` of what a crash left there.

use std::collections::BTreeSet;
use std::fs::{self, File, OpenOptions};
use std::io::{ErrorKind as IoErrorKind, Write as _};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use sha2::{Digest as _, Sha256};
use weft_core::{Error, Result};

use crate::postgres::PostgresMeta;
use crate::records::State;
use crate::s3::S3Blobs;
use crate::signing::{hex, is_sha256_hex, sha256_hex};

const STATE_FILE: &str = "state.json";
const STATE_TEMP: &str = "state.json.tmp";
/// Locked exclusively (advisory `flock`) while a [`Store`] is open; the kernel drops the lock
/// when the process dies, so a SIGKILLed server never leaves a stale lock behind.
const LOCK_FILE: &str = "lock";
/// Prefix of temporary blob files; never a valid digest, so never mistaken for a blob.
const BLOB_TEMP_PREFIX: &str = ".tmp-";
/// Prefix of scratch files in [`Store::scratch_dir`] (a temp prefix, so `open` removes them).
pub const SCRATCH_PREFIX: &str = ".tmp-scratch-";
/// Directory (under `store/`) of uploads being received; emptied by [`Store::open`].
const UPLOAD_DIR: &str = "tmp";
/// Prefix of an upload's temporary file in [`UPLOAD_DIR`].
const UPLOAD_PREFIX: &str = ".tmp-upload-";

/// Most object-store blobs one [`Store::collect_shared_blobs`] deletes, so one round holds the
/// cluster-wide writer lock for a bounded time; the rest wait for the next round.
pub const MAX_COLLECTED_PER_ROUND: usize = 1000;

/// Durable tenant state and blobs under `<data-dir>/store/`.
#[derive(Debug)]
pub struct Store {
    dir: PathBuf,
    blob_dir: PathBuf,
    /// `store/tmp/`: uploads being received ([`Store::blob_writer`]).
    upload_dir: PathBuf,
    state: RwLock<Arc<State>>,
    writer: Mutex<()>,
    /// Set for a shared store: metadata lives in PostgreSQL, not in `state.json`.
    shared: Option<PostgresMeta>,
    /// Set for a shared store: blobs live in an object store; `blob_dir` is this replica's
    /// cache of them.
    remote: Option<S3Blobs>,
    temp_counter: AtomicU64,
    /// Holds the exclusive lock on `store/lock` until the store is dropped.
    _lock: File,
}

impl Store {
    /// Opens (creating if needed) the store under `data_dir/store`: loads `state.json` (missing
    /// means empty; unreadable or unparsable is an error — existing data is never silently
    /// replaced), then deletes temporary leftovers and blobs no record references.
    pub fn open(data_dir: &Path) -> Result<Store> {
        Self::open_with(data_dir, None, None)
    }

    /// Opens a store shared with other replicas: metadata in the PostgreSQL database at
    /// `database_url` ([`crate::postgres`]; the schema is created or upgraded first) and blobs
    /// in the object store `remote` ([`crate::s3`]). `data_dir` holds this replica's
    /// cache of blobs, its uploads in progress and its lock.
    pub fn open_shared(data_dir: &Path, database_url: &str, remote: S3Blobs) -> Result<Store> {
        let meta = PostgresMeta::connect(database_url)?;
        Self::open_with(data_dir, Some(meta), Some(remote))
    }

    fn open_with(
        data_dir: &Path,
        shared: Option<PostgresMeta>,
        remote: Option<S3Blobs>,
    ) -> Result<Store> {
        let dir = data_dir.join("store");
        let blob_dir = dir.join("blobs").join("sha256");
        let upload_dir = dir.join(UPLOAD_DIR);
        for created in [&blob_dir, &upload_dir] {
            fs::create_dir_all(created)
                .map_err(|e| io_error("cannot create directory", created, &e))?;
        }
        // Make the (possibly just created) directory entries themselves durable.
        for parent in [data_dir, dir.as_path(), blob_dir.parent().unwrap_or(&dir)] {
            sync_dir(parent)?;
        }

        let lock = lock_exclusively(&dir.join(LOCK_FILE))?;

        let state_path = dir.join(STATE_FILE);
        let state = match fs::read(&state_path) {
            _ if shared.is_some() => State::default(),
            Ok(bytes) => serde_json::from_slice::<State>(&bytes).map_err(|e| {
                Error::internal(format!(
                    "cannot parse {}: {e}; refusing to start over existing data (restore the file \
                     from a backup, or move it aside to start with an empty store)",
                    state_path.display()
                ))
            })?,
            Err(e) if e.kind() == IoErrorKind::NotFound => State::default(),
            Err(e) => return Err(io_error("cannot read", &state_path, &e)),
        };

        let store = Store {
            dir,
            blob_dir,
            upload_dir,
            state: RwLock::new(Arc::new(state)),
            writer: Mutex::new(()),
            shared,
            remote,
            temp_counter: AtomicU64::new(0),
            _lock: lock,
        };
        store.collect_garbage()?;
        Ok(store)
    }

    /// The directory holding `state.json` and `blobs/`.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The committed state: a cheap snapshot that later commits do not change.
    pub fn state(&self) -> Arc<State> {
        if let Some(shared) = &self.shared {
            return shared.state();
        }
        // A poisoned lock still holds a fully committed state: the Arc is replaced atomically.
        Arc::clone(&self.state.read().unwrap_or_else(|e| e.into_inner()))
    }

    /// The shared metadata, when this store has one (to refresh it and listen for changes).
    pub fn shared(&self) -> Option<&PostgresMeta> {
        self.shared.as_ref()
    }

    /// Stores `bytes` durably as a blob and returns its sha256 hex digest. Storing bytes that are
    /// already stored writes nothing.
    pub fn put_blob(&self, bytes: &[u8]) -> Result<String> {
        let digest = sha256_hex(bytes);
        let path = self.blob_dir.join(&digest);
        match fs::metadata(&path) {
            // Same name and same length: the same bytes, unless the disk damaged them, which
            // read_blob detects.
            Ok(meta) if meta.is_file() && meta.len() == bytes.len() as u64 => {
                self.upload(&digest)?;
                return Ok(digest);
            }
            _ => {}
        }
        let n = self.temp_counter.fetch_add(1, Ordering::Relaxed);
        let temp = self.blob_dir.join(format!(
            "{BLOB_TEMP_PREFIX}{digest}-{}-{n}",
            std::process::id()
        ));
        write_durably(&temp, &path, &self.blob_dir, bytes)?;
        self.upload(&digest)?;
        Ok(digest)
    }

    /// Copies a locally stored blob to the object store, when there is one.
    fn upload(&self, digest: &str) -> Result<()> {
        match &self.remote {
            Some(remote) => remote.upload(digest, &self.blob_dir.join(digest)),
            None => Ok(()),
        }
    }

    /// Makes sure the blob `digest` is in the local directory, downloading it from the object
    /// store when it is only there. Returns false when it is stored nowhere.
    fn ensure_local(&self, digest: &str) -> Result<bool> {
        let path = self.blob_dir.join(digest);
        if path.is_file() {
            return Ok(true);
        }
        match &self.remote {
            Some(remote) => remote.download(digest, &path),
            None => Ok(false),
        }
    }

    /// Starts receiving a blob whose size is not known yet (an upload): a new file, created with
    /// `create_new` under a unique name in `store/tmp/`, that the bytes are written to and
    /// hashed as they come. Dropping the writer (or the [`StagedBlob`] it finishes into) removes
    /// the file; [`Store::put_staged`] stores it. Blocking (file I/O): call it off async threads.
    pub fn blob_writer(&self) -> Result<BlobWriter> {
        let mut random = [0u8; 8];
        getrandom::fill(&mut random)
            .map_err(|e| Error::internal(format!("cannot name an upload's temporary file: {e}")))?;
        let n = self.temp_counter.fetch_add(1, Ordering::Relaxed);
        let path = self.upload_dir.join(format!(
            "{UPLOAD_PREFIX}{}-{n}-{}",
            std::process::id(),
            hex(&random)
        ));
        let file = OpenOptions::new()
            .write(true)
            .read(true)
            .create_new(true)
            .open(&path)
            .map_err(|e| upload_error("create", &e))?;
        Ok(BlobWriter {
            file,
            temp: TempFile { path, armed: true },
            hasher: Sha256::new(),
            len: 0,
        })
    }

    /// Stores a finished upload under its digest: renamed into `blobs/sha256/` (it was fsynced
    /// by [`BlobWriter::finish`]), then the directory is fsynced, so after a crash the blob is
    /// either whole or absent. A blob already stored with that digest and length is kept and the
    /// upload's file removed. Returns the digest. Blocking.
    pub fn put_staged(&self, staged: StagedBlob) -> Result<String> {
        let StagedBlob {
            mut temp,
            digest,
            len,
        } = staged;
        let path = self.blob_dir.join(&digest);
        match fs::metadata(&path) {
            // As in put_blob: same name and length, the same bytes (read_blob detects damage).
            Ok(meta) if meta.is_file() && meta.len() == len => {
                self.upload(&digest)?;
                return Ok(digest);
            }
            _ => {}
        }
        fs::rename(&temp.path, &path).map_err(|e| upload_error("store", &e))?;
        temp.armed = false;
        sync_dir_io(&self.blob_dir)
            .map_err(|e| Error::internal(format!("cannot make a stored upload durable: {e}")))?;
        self.upload(&digest)?;
        Ok(digest)
    }

    /// Copies a received upload to the shared object store ahead of [`Store::put_staged`], so
    /// the slow part (up to the upload size limit over the network) runs before the caller
    /// takes its writer lock and holds up no one else's change; `put_staged` then finds it
    /// there. Nothing happens for the embedded store. Blocking.
    pub fn share_staged(&self, staged: &StagedBlob) -> Result<()> {
        match &self.remote {
            Some(remote) => remote.upload(&staged.digest, &staged.temp.path),
            None => Ok(()),
        }
    }

    /// Where a stored blob lives, for a reader that needs a path (a model backend). Check the
    /// bytes with [`Store::read_blob`] first: the file itself is not verified.
    pub fn blob_path(&self, digest: &str) -> PathBuf {
        self.blob_dir.join(digest)
    }

    /// A directory for scratch files named with [`SCRATCH_PREFIX`]: whatever a crash leaves
    /// there is removed by the next [`Store::open`].
    pub fn scratch_dir(&self) -> &Path {
        &self.blob_dir
    }

    /// Whether a blob with this digest is stored (its contents are not checked).
    pub fn has_blob(&self, digest: &str) -> bool {
        if !is_sha256_hex(digest) {
            return false;
        }
        match &self.remote {
            // Shared: what counts is that every replica can get it.
            Some(remote) => remote.contains(digest).unwrap_or(false),
            None => self.blob_dir.join(digest).is_file(),
        }
    }

    /// Opens the blob `digest` for streaming (a batch job's input or output), fetching it from
    /// the object store first when only that has it. The bytes are not re-hashed: readers of
    /// large files stream them once. Blocking.
    pub fn open_blob(&self, digest: &str) -> Result<File> {
        if !is_sha256_hex(digest) {
            return Err(Error::invalid(format!(
                "{digest:?} is not a sha256 digest (64 lowercase hex characters)"
            )));
        }
        if !self.ensure_local(digest)? {
            return Err(Error::not_found(format!("blob {digest} is not stored")));
        }
        let path = self.blob_dir.join(digest);
        File::open(&path).map_err(|e| Error::internal(format!("cannot open a stored file: {e}")))
    }

    /// Reads the blob `digest`, checking that its bytes still hash to it.
    pub fn read_blob(&self, digest: &str) -> Result<Vec<u8>> {
        if !is_sha256_hex(digest) {
            return Err(Error::invalid(format!(
                "{digest:?} is not a sha256 digest (64 lowercase hex characters)"
            )));
        }
        let path = self.blob_dir.join(digest);
        self.ensure_local(digest)?;
        let bytes = fs::read(&path).map_err(|e| {
            if e.kind() == IoErrorKind::NotFound {
                Error::not_found(format!("blob {digest} is not stored"))
            } else {
                io_error("cannot read", &path, &e)
            }
        })?;
        let actual = sha256_hex(&bytes);
        if actual != digest {
            return Err(Error::internal(format!(
                "blob {} is corrupt: its bytes hash to {actual}",
                path.display()
            )));
        }
        Ok(bytes)
    }

    /// Runs `change` on a copy of the state. On `Ok` bumps `revision`, writes the new state
    /// durably and publishes it; on `Err` — from `change`, or from writing — the committed state
    /// is unchanged. One writer runs at a time.
    ///
    /// Every blob the new state references for the first time must already be stored (with
    /// [`Store::put_blob`]); otherwise the commit fails, since a crash could not be recovered.
    ///
    /// If writing fails after the rename (only the final directory fsync can), the new state may
    /// or may not survive a crash; the caller gets the error and the published state stays old.
    pub fn transact<T>(&self, change: impl FnOnce(&mut State) -> Result<T>) -> Result<T> {
        if let Some(shared) = &self.shared {
            return shared.transact(change, |current, next| self.check_new_blobs(current, next));
        }
        // A writer that panicked left nothing half-done: it only ever mutated its own copy.
        let _writer = self.writer.lock().unwrap_or_else(|e| e.into_inner());
        let current = self.state();
        let mut next = State::clone(&current);
        let out = change(&mut next)?;
        next.revision = current.revision.saturating_add(1);
        self.check_new_blobs(&current, &next)?;

        let mut text = serde_json::to_vec_pretty(&next)
            .map_err(|e| Error::internal(format!("cannot serialize the store's state: {e}")))?;
        text.push(b'\n');
        write_durably(
            &self.dir.join(STATE_TEMP),
            &self.dir.join(STATE_FILE),
            &self.dir,
            &text,
        )?;

        *self.state.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(next);
        Ok(out)
    }

    fn check_new_blobs(&self, current: &State, next: &State) -> Result<()> {
        let old = current.referenced_digests();
        for digest in next.referenced_digests() {
            if old.contains(digest) || self.has_blob(digest) {
                continue;
            }
            // Shared: the upload found the blob in the object store and skipped it, and then
            // [`Store::collect_shared_blobs`] took it (it was unreferenced past its grace).
            // This runs under the cluster-wide writer lock, so putting it back from the local
            // copy cannot race another collection.
            if self.remote.is_some() && self.blob_dir.join(digest).is_file() {
                self.upload(digest)?;
                continue;
            }
            return Err(Error::internal(format!(
                "refusing to commit a record that references blob {digest:?}, which is not stored"
            )));
        }
        Ok(())
    }

    /// Shared store only: deletes from the object store the blobs no tenant references that
    /// were written more than `grace` ago (deleted versions), at most [`MAX_COLLECTED_PER_ROUND`]
    /// per call; returns how many. The decision and the deletes happen under the cluster-wide
    /// writer lock, so no replica commits a reference to a blob meanwhile. The grace protects
    /// uploads that are in the object store but not committed yet: it must be longer than an
    /// upload takes from its first byte to its commit (a commit that still finds its blob gone
    /// puts it back from its local copy, so a too-short grace costs time, not data). Blocking.
    pub fn collect_shared_blobs(&self, grace: std::time::Duration) -> Result<usize> {
        let (Some(shared), Some(remote)) = (&self.shared, &self.remote) else {
            return Ok(0);
        };
        shared.while_writing(|state| {
            let referenced = state.referenced_digests();
            let mut removed = 0;
            for digest in remote.written_before(grace)? {
                if removed == MAX_COLLECTED_PER_ROUND {
                    break;
                }
                if !referenced.contains(digest.as_str()) {
                    remote.delete(&digest)?;
                    removed += 1;
                }
            }
            Ok(removed)
        })
    }

    /// Deletes temporary leftovers and blobs the state does not reference. Runs only in `open`,
    /// before anyone else can see the store.
    fn collect_garbage(&self) -> Result<()> {
        remove_if_present(&self.dir.join(STATE_TEMP))?;
        self.remove_blobs(true)?;
        self.remove_uploads()?;
        Ok(())
    }

    /// Removes what uploads in progress at a crash left in `store/tmp/` (only names we write).
    fn remove_uploads(&self) -> Result<()> {
        let entries = fs::read_dir(&self.upload_dir)
            .map_err(|e| io_error("cannot list", &self.upload_dir, &e))?;
        let mut removed = false;
        for entry in entries {
            let entry = entry.map_err(|e| io_error("cannot list", &self.upload_dir, &e))?;
            if entry
                .file_name()
                .to_str()
                .is_some_and(|name| name.starts_with(UPLOAD_PREFIX))
            {
                remove_if_present(&entry.path())?;
                removed = true;
            }
        }
        if removed {
            sync_dir(&self.upload_dir)?;
        }
        Ok(())
    }

    /// Removes the blobs the committed state no longer references (deleted versions), so that
    /// deleting frees disk space at once rather than at the next [`Store::open`]; returns how
    /// many. Temporary files are left alone. Call it only while no writer is between
    /// [`Store::put_blob`] and the [`Store::transact`] that references the blob (the server
    /// calls it under its single writer lock, right after a commit), and only once nothing
    /// still needs to read a dropped version's bytes.
    pub fn collect_unreferenced_blobs(&self) -> Result<usize> {
        self.remove_blobs(false)
    }

    fn remove_blobs(&self, temps_too: bool) -> Result<usize> {
        let state = self.state();
        let referenced: BTreeSet<&str> = state.referenced_digests();
        let mut removed = 0;
        let entries = fs::read_dir(&self.blob_dir)
            .map_err(|e| io_error("cannot list", &self.blob_dir, &e))?;
        for entry in entries {
            let entry = entry.map_err(|e| io_error("cannot list", &self.blob_dir, &e))?;
            let name = entry.file_name();
            // Names we did not write (not UTF-8, not a digest or temp file) are left alone.
            let Some(name) = name.to_str() else { continue };
            let garbage = (temps_too && name.starts_with(BLOB_TEMP_PREFIX))
                || (is_sha256_hex(name) && !referenced.contains(name));
            if garbage {
                remove_if_present(&entry.path())?;
                removed += 1;
            }
        }
        if removed > 0 {
            sync_dir(&self.blob_dir)?;
        }
        Ok(removed)
    }
}

/// A file that is removed when dropped, unless disarmed (stored).
#[derive(Debug)]
struct TempFile {
    path: PathBuf,
    armed: bool,
}

impl Drop for TempFile {
    fn drop(&mut self) {
        if self.armed {
            // Best effort: what this misses, the next open removes.
            let _ = fs::remove_file(&self.path);
        }
    }
}

/// An upload being received into `store/tmp/` ([`Store::blob_writer`]): written and hashed
/// chunk by chunk. Dropped unfinished, its file is removed.
#[derive(Debug)]
pub struct BlobWriter {
    file: File,
    temp: TempFile,
    hasher: Sha256,
    len: u64,
}

impl BlobWriter {
    /// Appends `bytes` to the file and the hash. Blocking.
    pub fn write(&mut self, bytes: &[u8]) -> Result<()> {
        self.file
            .write_all(bytes)
            .map_err(|e| upload_error("write", &e))?;
        self.hasher.update(bytes);
        self.len = self.len.saturating_add(bytes.len() as u64);
        Ok(())
    }

    /// Bytes written so far.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether nothing was written yet.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Fsyncs the file and returns it as a [`StagedBlob`] with its sha256 digest. Blocking.
    pub fn finish(self) -> Result<StagedBlob> {
        let BlobWriter {
            file,
            temp,
            hasher,
            len,
        } = self;
        file.sync_all().map_err(|e| upload_error("sync", &e))?;
        drop(file);
        Ok(StagedBlob {
            temp,
            digest: hex(&hasher.finalize()),
            len,
        })
    }
}

/// A received upload, durable in `store/tmp/` but not stored yet: checks read it with
/// [`StagedBlob::read`], then [`Store::put_staged`] stores it. Dropped, its file is removed.
#[derive(Debug)]
pub struct StagedBlob {
    temp: TempFile,
    digest: String,
    len: u64,
}

impl StagedBlob {
    /// The sha256 hex digest of the bytes, computed while they were received.
    pub fn digest(&self) -> &str {
        &self.digest
    }

    /// Its length in bytes.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether it holds no bytes.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Opens the file for reading from its start (for checks that stream it). Blocking.
    pub fn open(&self) -> Result<File> {
        File::open(&self.temp.path).map_err(|e| upload_error("open", &e))
    }

    /// Reads the bytes back into memory (for checks that need them whole: a component to
    /// compile, an ONNX model to inspect), refusing a file whose length changed. Blocking.
    pub fn read(&self) -> Result<Vec<u8>> {
        let bytes = fs::read(&self.temp.path).map_err(|e| upload_error("read", &e))?;
        if bytes.len() as u64 != self.len {
            return Err(Error::internal(format!(
                "an upload's temporary file changed size: {} bytes received, {} bytes read back",
                self.len,
                bytes.len()
            )));
        }
        Ok(bytes)
    }
}

/// An I/O error on an upload's temporary file. The message names no server path: it may reach
/// the tenant that sent the upload.
fn upload_error(what: &str, err: &std::io::Error) -> Error {
    Error::internal(format!("cannot {what} an upload's temporary file: {err}"))
}

/// Replaces the file `path` with `bytes` so that after a crash it is either entirely old or
/// entirely new (through `<path>.tmp`, fsynced, renamed, the directory fsynced): the batch
/// job runner's chunk files use it. Blocking. Errors name the path: keep them in the
/// operator's log.
pub fn write_file_durably(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = path
        .parent()
        .ok_or_else(|| Error::internal("a durable file needs a parent directory"))?;
    let mut temp = path.as_os_str().to_owned();
    temp.push(".tmp");
    write_durably(Path::new(&temp), path, dir, bytes)
}

/// Writes `bytes` to `temp`, fsyncs it, renames it to `path` and fsyncs `dir` (their parent).
/// On failure the temporary file is removed (best effort) and `path` is untouched.
fn write_durably(temp: &Path, path: &Path, dir: &Path, bytes: &[u8]) -> Result<()> {
    let result = (|| {
        let mut file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(temp)
            .map_err(|e| io_error("cannot create", temp, &e))?;
        file.write_all(bytes)
            .map_err(|e| io_error("cannot write", temp, &e))?;
        file.sync_all()
            .map_err(|e| io_error("cannot sync", temp, &e))?;
        drop(file);
        fs::rename(temp, path).map_err(|e| {
            Error::internal(format!(
                "cannot rename {} to {}: {e}",
                temp.display(),
                path.display()
            ))
        })
    })();
    if let Err(err) = result {
        let _ = fs::remove_file(temp);
        return Err(err);
    }
    sync_dir(dir)
}

/// Makes renames and deletions in `dir` durable.
fn sync_dir(dir: &Path) -> Result<()> {
    sync_dir_io(dir).map_err(|e| io_error("cannot sync directory", dir, &e))
}

fn sync_dir_io(dir: &Path) -> std::io::Result<()> {
    #[cfg(unix)]
    {
        File::open(dir).and_then(|d| d.sync_all())
    }
    #[cfg(not(unix))]
    {
        // Directories cannot be opened for syncing here; renames are durable on their own.
        let _ = (dir, File::open);
        Ok(())
    }
}

fn remove_if_present(path: &Path) -> Result<()> {
    match fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == IoErrorKind::NotFound => Ok(()),
        Err(e) => Err(io_error("cannot remove", path, &e)),
    }
}

/// Opens `path` and takes an exclusive advisory lock on it, or explains who holds it.
fn lock_exclusively(path: &Path) -> Result<File> {
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)
        .map_err(|e| io_error("cannot open", path, &e))?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(fs::TryLockError::WouldBlock) => Err(Error::conflict(format!(
            "the store {} is in use by another weft process (one store serves one process): \
             stop that process or give this one another --data-dir",
            path.parent().unwrap_or(path).display()
        ))),
        Err(fs::TryLockError::Error(e)) => Err(io_error("cannot lock", path, &e)),
    }
}

fn io_error(what: &str, path: &Path, err: &std::io::Error) -> Error {
    Error::internal(format!("{what} {}: {err}", path.display()))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;
    use crate::records::{GraphVersion, PluginVersion, Quotas, Tenant};
    use weft_core::ErrorKind;

    fn add_tenant(store: &Store, name: &str) -> Result<()> {
        store.transact(|state| {
            state
                .tenants
                .insert(name.into(), Tenant::new(name, 7, Quotas::default()));
            Ok(())
        })
    }

    fn blob_names(store: &Store) -> Vec<String> {
        let mut names: Vec<_> = fs::read_dir(&store.blob_dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        names
    }

    fn plugin(digest: &str, size: u64) -> PluginVersion {
        PluginVersion {
            version: "1.0".into(),
            digest: digest.into(),
            size,
            signature: "sig".into(),
            signature_scheme: Default::default(),
            key_id: "kid".into(),
            created_unix: 1,
            served: None,
        }
    }

    #[test]
    fn open_empty_creates_layout() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        assert_eq!(*store.state(), State::default());
        assert!(dir.path().join("store/blobs/sha256").is_dir());
        assert_eq!(store.dir(), dir.path().join("store"));
        // Nothing committed yet: no state file.
        assert!(!dir.path().join("store/state.json").exists());
    }

    #[test]
    fn committed_transaction_survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = Store::open(dir.path()).unwrap();
            let out = store
                .transact(|state| {
                    state
                        .tenants
                        .insert("acme".into(), Tenant::new("acme", 7, Quotas::default()));
                    Ok(42)
                })
                .unwrap();
            assert_eq!(out, 42);
            assert_eq!(store.state().revision, 1);
            add_tenant(&store, "beta").unwrap();
            assert_eq!(store.state().revision, 2);
        }
        assert!(!dir.path().join("store/state.json.tmp").exists());
        let store = Store::open(dir.path()).unwrap();
        let state = store.state();
        assert_eq!(state.revision, 2);
        assert_eq!(state.tenants.keys().collect::<Vec<_>>(), ["acme", "beta"]);
        assert_eq!(state.tenants["acme"].created_unix, 7);
    }

    #[test]
    fn failing_closure_changes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        add_tenant(&store, "acme").unwrap();
        let before = store.state();
        let on_disk = fs::read(dir.path().join("store/state.json")).unwrap();

        let err = store
            .transact(|state| -> Result<()> {
                state.tenants.clear();
                state.revision = 99;
                Err(Error::conflict("no"))
            })
            .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Conflict);
        assert_eq!(store.state(), before);
        assert_eq!(
            fs::read(dir.path().join("store/state.json")).unwrap(),
            on_disk
        );
        // The closure cannot set the revision either.
        store
            .transact(|state| {
                state.revision = 1000;
                Ok(())
            })
            .unwrap();
        assert_eq!(store.state().revision, 2);
    }

    #[test]
    fn write_failure_changes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        add_tenant(&store, "acme").unwrap();
        let before = store.state();
        let on_disk = fs::read(dir.path().join("store/state.json")).unwrap();

        // A directory where the temp file must go makes the write fail (even as root).
        let temp = dir.path().join("store/state.json.tmp");
        fs::create_dir(&temp).unwrap();
        let err = add_tenant(&store, "beta").unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Internal);
        assert!(err.message().contains("state.json.tmp"), "{err}");
        assert_eq!(store.state(), before);
        assert_eq!(
            fs::read(dir.path().join("store/state.json")).unwrap(),
            on_disk
        );

        fs::remove_dir(&temp).unwrap();
        add_tenant(&store, "beta").unwrap();
        assert_eq!(store.state().revision, 2);
        let committed = store.state();
        drop(store);
        assert_eq!(Store::open(dir.path()).unwrap().state(), committed);
    }

    #[test]
    fn panicking_closure_changes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        add_tenant(&store, "acme").unwrap();
        let before = store.state();
        let caught = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            store.transact(|state| -> Result<()> {
                state.tenants.clear();
                panic!("boom");
            })
        }));
        assert!(caught.is_err());
        assert_eq!(store.state(), before);
        // The store stays usable.
        add_tenant(&store, "beta").unwrap();
        assert_eq!(store.state().tenants.len(), 2);
    }

    #[test]
    fn snapshots_are_stable() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let old = store.state();
        add_tenant(&store, "acme").unwrap();
        assert!(old.tenants.is_empty());
        assert_eq!(old.revision, 0);
        assert_eq!(store.state().tenants.len(), 1);
    }

    #[test]
    fn concurrent_writers_are_serialised() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        std::thread::scope(|scope| {
            for t in 0..4 {
                let store = &store;
                scope.spawn(move || {
                    for i in 0..10 {
                        add_tenant(store, &format!("t{t}-{i}")).unwrap();
                    }
                });
            }
        });
        assert_eq!(store.state().revision, 40);
        assert_eq!(store.state().tenants.len(), 40);
        let committed = store.state();
        drop(store);
        assert_eq!(Store::open(dir.path()).unwrap().state(), committed);
    }

    #[test]
    fn unreferenced_blobs_go_while_open_but_temps_and_live_blobs_stay() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let kept = store.put_blob(b"kept").unwrap();
        let dropped = store.put_blob(b"dropped").unwrap();
        add_tenant(&store, "acme").unwrap();
        store
            .transact(|state| {
                let t = state.tenants.get_mut("acme").unwrap();
                t.plugins.insert("p".into(), vec![plugin(&kept, 4)]);
                Ok(())
            })
            .unwrap();
        let temp = dir
            .path()
            .join("store/blobs/sha256")
            .join(format!("{BLOB_TEMP_PREFIX}in-flight"));
        fs::write(&temp, b"partial").unwrap();
        assert_eq!(store.collect_unreferenced_blobs().unwrap(), 1);
        assert!(store.has_blob(&kept));
        assert!(!store.has_blob(&dropped));
        assert!(
            temp.exists(),
            "a temporary file of a writer in progress stays"
        );
        assert_eq!(store.collect_unreferenced_blobs().unwrap(), 0);
    }

    #[test]
    fn a_second_open_is_refused_while_the_first_lives() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        // An uncommitted blob the second open's garbage collection would otherwise delete.
        let digest = store.put_blob(b"in flight").unwrap();
        let err = Store::open(dir.path()).unwrap_err();
        assert_eq!(err.kind(), weft_core::ErrorKind::Conflict);
        assert!(
            err.message().contains("in use by another weft process"),
            "{err}"
        );
        assert!(store.has_blob(&digest));
        drop(store);
        // The lock goes with the store; the next open collects the orphan.
        let store = Store::open(dir.path()).unwrap();
        assert!(!store.has_blob(&digest));
    }

    #[test]
    fn blob_round_trip_and_dedup() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let digest = store.put_blob(b"hello").unwrap();
        assert_eq!(digest, sha256_hex(b"hello"));
        assert!(store.has_blob(&digest));
        assert_eq!(store.read_blob(&digest).unwrap(), b"hello");
        assert_eq!(store.put_blob(b"hello").unwrap(), digest);
        assert_eq!(blob_names(&store), std::slice::from_ref(&digest));
        let empty = store.put_blob(b"").unwrap();
        assert_eq!(store.read_blob(&empty).unwrap(), b"");
        assert_eq!(blob_names(&store).len(), 2);
    }

    #[test]
    fn blob_corruption_is_detected() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let digest = store.put_blob(b"hello").unwrap();
        let path = store.blob_dir.join(&digest);
        fs::write(&path, b"jello").unwrap();
        let err = store.read_blob(&digest).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Internal);
        assert!(err.message().contains("corrupt"), "{err}");
        // A truncated blob is rewritten by the next put of the same bytes.
        fs::write(&path, b"hell").unwrap();
        store.put_blob(b"hello").unwrap();
        assert_eq!(store.read_blob(&digest).unwrap(), b"hello");
    }

    #[test]
    fn bad_or_missing_digests() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        for bad in ["", "abc", "../state.json", &"A".repeat(64), ".tmp-x"] {
            let err = store.read_blob(bad).unwrap_err();
            assert_eq!(err.kind(), ErrorKind::InvalidArgument, "{bad:?}");
            assert!(!store.has_blob(bad));
        }
        let err = store.read_blob(&sha256_hex(b"absent")).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::NotFound);
    }

    #[test]
    fn commit_requires_new_blobs_to_be_stored() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        add_tenant(&store, "acme").unwrap();
        let missing = sha256_hex(b"never stored");
        let err = store
            .transact(|state| {
                let tenant = state.tenants.get_mut("acme").unwrap();
                tenant.plugins.insert("p".into(), vec![plugin(&missing, 1)]);
                Ok(())
            })
            .unwrap_err();
        assert!(err.message().contains(&missing), "{err}");
        assert!(store.state().tenants["acme"].plugins.is_empty());

        let digest = store.put_blob(b"component").unwrap();
        store
            .transact(|state| {
                let tenant = state.tenants.get_mut("acme").unwrap();
                tenant.plugins.insert("p".into(), vec![plugin(&digest, 9)]);
                Ok(())
            })
            .unwrap();
        assert_eq!(store.state().tenants["acme"].stored_bytes(), 9);
    }

    #[test]
    fn open_removes_orphans_and_temp_files_but_keeps_referenced_blobs() {
        let dir = tempfile::tempdir().unwrap();
        let (kept, graph, orphan);
        {
            let store = Store::open(dir.path()).unwrap();
            add_tenant(&store, "acme").unwrap();
            kept = store.put_blob(b"component").unwrap();
            graph = store.put_blob(b"name = 'g'").unwrap();
            store
                .transact(|state| {
                    let tenant = state.tenants.get_mut("acme").unwrap();
                    tenant.plugins.insert("p".into(), vec![plugin(&kept, 9)]);
                    tenant.graphs.entry("g".into()).or_default().insert(
                        1,
                        GraphVersion {
                            toml_digest: graph.clone(),
                            size: 10,
                            created_unix: 1,
                        },
                    );
                    Ok(())
                })
                .unwrap();
            // A crash between writing a blob and committing the state that references it.
            orphan = store.put_blob(b"pushed but never committed").unwrap();
        }
        let store_dir = dir.path().join("store");
        let blob_dir = store_dir.join("blobs/sha256");
        fs::write(store_dir.join("state.json.tmp"), b"{half written").unwrap();
        fs::write(blob_dir.join(format!(".tmp-{orphan}-1-0")), b"half").unwrap();
        fs::write(blob_dir.join("README"), b"not ours").unwrap();

        let store = Store::open(dir.path()).unwrap();
        assert!(!store_dir.join("state.json.tmp").exists());
        let mut expected = vec![kept.clone(), graph.clone(), "README".to_owned()];
        expected.sort();
        assert_eq!(blob_names(&store), expected);
        assert_eq!(store.read_blob(&kept).unwrap(), b"component");
        assert_eq!(
            store.read_blob(&orphan).unwrap_err().kind(),
            ErrorKind::NotFound
        );

        // Deleting the record makes the blob garbage at the next open, not before.
        store
            .transact(|state| {
                state.tenants.get_mut("acme").unwrap().plugins.clear();
                Ok(())
            })
            .unwrap();
        assert!(store.has_blob(&kept));
        drop(store);
        let store = Store::open(dir.path()).unwrap();
        assert!(!store.has_blob(&kept));
        assert!(store.has_blob(&graph));
    }

    fn upload_names(store: &Store) -> Vec<String> {
        let mut names: Vec<_> = fs::read_dir(&store.upload_dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        names
    }

    #[test]
    fn a_streamed_blob_is_hashed_as_written_and_stored_by_rename() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let mut writer = store.blob_writer().unwrap();
        writer.write(b"hello ").unwrap();
        writer.write(b"world").unwrap();
        assert_eq!(writer.len(), 11);
        assert_eq!(upload_names(&store).len(), 1);
        let staged = writer.finish().unwrap();
        assert_eq!(staged.digest(), sha256_hex(b"hello world"));
        assert_eq!(staged.read().unwrap(), b"hello world");
        let digest = store.put_staged(staged).unwrap();
        assert_eq!(store.read_blob(&digest).unwrap(), b"hello world");
        assert!(upload_names(&store).is_empty(), "the upload file was moved");
        // The same bytes again: the stored blob stays, the new upload's file goes.
        let mut again = store.blob_writer().unwrap();
        again.write(b"hello world").unwrap();
        assert_eq!(store.put_staged(again.finish().unwrap()).unwrap(), digest);
        assert!(upload_names(&store).is_empty());
        assert_eq!(blob_names(&store), [digest]);
    }

    #[test]
    fn dropped_uploads_leave_no_file_and_names_are_unique() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let mut a = store.blob_writer().unwrap();
        let b = store.blob_writer().unwrap();
        a.write(b"partial").unwrap();
        assert_eq!(upload_names(&store).len(), 2);
        drop(a);
        let staged = b.finish().unwrap();
        assert_eq!(upload_names(&store).len(), 1);
        drop(staged);
        assert!(upload_names(&store).is_empty());
        assert!(blob_names(&store).is_empty());
    }

    #[test]
    fn open_removes_uploads_a_crash_left_behind() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = Store::open(dir.path()).unwrap();
            let mut writer = store.blob_writer().unwrap();
            writer.write(b"half an upload").unwrap();
            // A crash: the writer never runs its drop.
            std::mem::forget(writer);
            assert_eq!(upload_names(&store).len(), 1);
        }
        let tmp = dir.path().join("store/tmp");
        fs::write(tmp.join("not-ours"), b"x").unwrap();
        let store = Store::open(dir.path()).unwrap();
        assert_eq!(upload_names(&store), ["not-ours"]);
    }

    #[test]
    fn upload_errors_name_no_server_path() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let writer = store.blob_writer().unwrap();
        let staged = writer.finish().unwrap();
        // The blob's final name is taken by a directory: the rename fails.
        fs::create_dir(store.blob_dir.join(staged.digest())).unwrap();
        let err = store.put_staged(staged).unwrap_err();
        let root = dir.path().to_string_lossy().to_string();
        assert!(!err.message().contains(&root), "{err}");
        assert!(err.message().contains("upload"), "{err}");
        assert!(
            upload_names(&store).is_empty(),
            "a failed store removes the upload"
        );
    }

    #[test]
    fn corrupt_state_file_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = Store::open(dir.path()).unwrap();
            add_tenant(&store, "acme").unwrap();
        }
        let path = dir.path().join("store/state.json");
        let good = fs::read(&path).unwrap();
        for bad in [
            &b"{not json"[..],
            b"",
            b"[]",
            &good[..good.len() / 2],
            b"{\"revision\": 1, \"tenants\": {\"a\": {\"name\": \"a\", \"created_unix\": 0, \
               \"quotas\": {\"brust\": 1}}}}",
        ] {
            fs::write(&path, bad).unwrap();
            let err = Store::open(dir.path()).unwrap_err();
            assert!(err.message().contains("state.json"), "{err}");
            assert!(err.message().contains("refusing"), "{err}");
            // The bad file is left for the operator, not replaced.
            assert_eq!(fs::read(&path).unwrap(), bad);
        }
        fs::write(&path, &good).unwrap();
        assert_eq!(Store::open(dir.path()).unwrap().state().tenants.len(), 1);
    }

    #[test]
    fn corrupt_state_file_does_not_lose_blobs() {
        let dir = tempfile::tempdir().unwrap();
        let digest;
        {
            let store = Store::open(dir.path()).unwrap();
            digest = store.put_blob(b"precious").unwrap();
            add_tenant(&store, "acme").unwrap();
            store
                .transact(|state| {
                    let t = state.tenants.get_mut("acme").unwrap();
                    t.plugins.insert("p".into(), vec![plugin(&digest, 8)]);
                    Ok(())
                })
                .unwrap();
        }
        let path = dir.path().join("store/state.json");
        let good = fs::read(&path).unwrap();
        fs::write(&path, b"garbage").unwrap();
        assert!(Store::open(dir.path()).is_err());
        // Refusing to open must not have garbage-collected the (now unreadable) references.
        assert!(dir.path().join("store/blobs/sha256").join(&digest).exists());
        fs::write(&path, good).unwrap();
        let store = Store::open(dir.path()).unwrap();
        assert_eq!(store.read_blob(&digest).unwrap(), b"precious");
    }
}
