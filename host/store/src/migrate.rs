//! `weft migrate`: copies every tenant and every blob they reference from one store into
//! another — embedded to shared (PostgreSQL + S3) or back — and verifies the copy.
//!
//! Blobs first (each read back and checked against its digest on the way out), then the
//! metadata in one transaction, then every blob is read again from the destination (a shared
//! destination downloads it from the object store) and checked against its digest, and the
//! destination's tenants are compared with the source's. The destination must hold no tenants:
//! a migration never merges or overwrites. The source is only read (and an embedded source is
//! locked for the duration, so no server can change it meanwhile).

use weft_core::{Error, Result};

use crate::Store;

/// What a migration copied.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Migrated {
    pub tenants: usize,
    pub blobs: usize,
    pub bytes: u64,
}

/// Copies `from` into the empty store `to`, then verifies it (see the module documentation).
pub fn migrate(from: &Store, to: &Store) -> Result<Migrated> {
    let source = from.state();
    let existing = to.state().tenants.len();
    if existing > 0 {
        return Err(Error::conflict(format!(
            "the destination already holds {existing} tenant(s); migrate into an empty store"
        )));
    }
    let digests: Vec<String> = source
        .referenced_digests()
        .into_iter()
        .map(str::to_owned)
        .collect();
    let mut migrated = Migrated {
        tenants: source.tenants.len(),
        ..Migrated::default()
    };
    for digest in &digests {
        let bytes = from.read_blob(digest)?;
        let stored = to.put_blob(&bytes)?;
        if stored != *digest {
            return Err(Error::internal(format!(
                "blob {digest} was stored as {stored}: the copy differs"
            )));
        }
        migrated.blobs += 1;
        migrated.bytes += bytes.len() as u64;
    }
    to.transact(|state| {
        if !state.tenants.is_empty() {
            return Err(Error::conflict(
                "the destination gained tenants during the migration; nothing was copied",
            ));
        }
        state.tenants = source.tenants.clone();
        Ok(())
    })?;
    for digest in &digests {
        // read_blob checks the bytes against the digest (and downloads them when shared).
        to.read_blob(digest)
            .map_err(|error| Error::internal(format!("verifying blob {digest}: {error}")))?;
    }
    if to.state().tenants != source.tenants {
        return Err(Error::internal(
            "the destination's tenants differ from the source's after the copy",
        ));
    }
    Ok(migrated)
}
