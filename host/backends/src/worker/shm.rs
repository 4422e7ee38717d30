//! The shared tensor arena: one memfd mapped by the server and by one model worker, cut into
//! equal slots, one per call in flight.
//!
//! This is the only module of Weft's host that uses `unsafe`: copying bytes in and out of a
//! mapping needs raw pointers. Every access is bounds-checked against the slot first. The
//! server creates the memfd and seals it against shrinking and growing before the worker ever
//! sees it, so a hostile worker cannot truncate the file under the server's mapping (which would
//! make the server's next access fault). The server only ever copies out of the arena; the
//! worker (which trusts the server) may hand ONNX Runtime views of a slot in place.
#![allow(unsafe_code)]

use std::fs::File;
use std::os::fd::OwnedFd;
use std::sync::Arc;

use bytes::Bytes;
use memmap2::{MmapOptions, MmapRaw};
use rustix::fs::{MemfdFlags, SealFlags};
use weft_core::{Error, Result};

/// A mapped arena of `slots` slots of `slot_bytes` bytes each.
pub struct SharedArena {
    map: MmapRaw,
    slots: usize,
    slot_bytes: usize,
}

// SAFETY: the mapping is plain shared memory; all access goes through bounds-checked copies.
unsafe impl Send for SharedArena {}
unsafe impl Sync for SharedArena {}

impl SharedArena {
    /// Creates a sealed memfd of `slots × slot_bytes` and maps it; returns the arena and the fd
    /// to hand to the worker.
    pub fn create(slots: usize, slot_bytes: usize) -> Result<(Self, OwnedFd)> {
        let len = slots
            .checked_mul(slot_bytes)
            .filter(|len| *len > 0)
            .ok_or_else(|| Error::invalid("the model worker arena size is out of range"))?;
        let fd = rustix::fs::memfd_create(
            "weft-model-worker",
            MemfdFlags::CLOEXEC | MemfdFlags::ALLOW_SEALING,
        )
        .map_err(|error| Error::internal(format!("memfd_create failed: {error}")))?;
        rustix::fs::ftruncate(&fd, len as u64)
            .map_err(|error| Error::internal(format!("cannot size the worker arena: {error}")))?;
        rustix::fs::fcntl_add_seals(&fd, SealFlags::SHRINK | SealFlags::GROW | SealFlags::SEAL)
            .map_err(|error| Error::internal(format!("cannot seal the worker arena: {error}")))?;
        let file = File::from(fd);
        let map = MmapOptions::new()
            .len(len)
            .map_raw(&file)
            .map_err(|error| Error::internal(format!("cannot map the worker arena: {error}")))?;
        Ok((
            SharedArena {
                map,
                slots,
                slot_bytes,
            },
            OwnedFd::from(file),
        ))
    }

    /// Maps an arena the server created (worker side). The size must be what was announced
    /// and the file sealed against shrinking.
    pub fn open(fd: OwnedFd, slots: usize, slot_bytes: usize) -> Result<Self> {
        let len = slots
            .checked_mul(slot_bytes)
            .ok_or_else(|| Error::invalid("arena size overflows"))?;
        let stat = rustix::fs::fstat(&fd)
            .map_err(|error| Error::internal(format!("cannot stat the arena: {error}")))?;
        if stat.st_size as u64 != len as u64 {
            return Err(Error::internal("the arena has an unexpected size"));
        }
        let seals = rustix::fs::fcntl_get_seals(&fd)
            .map_err(|error| Error::internal(format!("cannot read the arena seals: {error}")))?;
        if !seals.contains(SealFlags::SHRINK) {
            return Err(Error::internal("the arena is not sealed"));
        }
        let file = File::from(fd);
        let map = MmapOptions::new()
            .len(len)
            .map_raw(&file)
            .map_err(|error| Error::internal(format!("cannot map the arena: {error}")))?;
        Ok(SharedArena {
            map,
            slots,
            slot_bytes,
        })
    }

    pub fn slots(&self) -> usize {
        self.slots
    }

    pub fn slot_bytes(&self) -> usize {
        self.slot_bytes
    }

    /// The absolute start of `len` bytes at `offset` in `slot`, if they lie inside the slot.
    fn start(&self, slot: u32, offset: u64, len: u64) -> Result<usize> {
        let slot = slot as usize;
        let end = offset.checked_add(len);
        if slot >= self.slots || end.is_none_or(|end| end > self.slot_bytes as u64) {
            return Err(Error::internal(format!(
                "a tensor at offset {offset} of {len} bytes does not fit slot {slot}"
            )));
        }
        Ok(slot * self.slot_bytes + offset as usize)
    }

    /// Copies `bytes` into `slot` at `offset`.
    pub fn write(&self, slot: u32, offset: u64, bytes: &[u8]) -> Result<()> {
        let start = self.start(slot, offset, bytes.len() as u64)?;
        // SAFETY: `start + len` is within the mapping (checked above); the region belongs to
        // this call's slot, which no one else writes while the call is in flight.
        unsafe {
            std::ptr::copy_nonoverlapping(
                bytes.as_ptr(),
                self.map.as_mut_ptr().add(start),
                bytes.len(),
            );
        }
        Ok(())
    }

    /// Copies `len` bytes out of `slot` at `offset`.
    pub fn read(&self, slot: u32, offset: u64, len: u64) -> Result<Vec<u8>> {
        let start = self.start(slot, offset, len)?;
        let len = len as usize;
        let mut out = Vec::with_capacity(len);
        // SAFETY: the source range is inside the mapping (checked above) and `out` has `len`
        // bytes of capacity; bytes are plain data, so any value the peer left there is valid.
        unsafe {
            std::ptr::copy_nonoverlapping(self.map.as_ptr().add(start), out.as_mut_ptr(), len);
            out.set_len(len);
        }
        Ok(out)
    }

    /// `len` bytes of `slot` at `offset` as [`Bytes`] that borrow the mapping (no copy). Worker
    /// side only: the server does not touch a slot while its call is in flight.
    pub fn view(self: &Arc<Self>, slot: u32, offset: u64, len: u64) -> Result<Bytes> {
        let start = self.start(slot, offset, len)?;
        Ok(Bytes::from_owner(SlotView {
            arena: Arc::clone(self),
            start,
            len: len as usize,
        }))
    }
}

struct SlotView {
    arena: Arc<SharedArena>,
    start: usize,
    len: usize,
}

impl AsRef<[u8]> for SlotView {
    fn as_ref(&self) -> &[u8] {
        // SAFETY: the range was bounds-checked when the view was made and the mapping lives as
        // long as `arena`; the server leaves the slot alone until the worker answers the call.
        unsafe { std::slice::from_raw_parts(self.arena.map.as_ptr().add(self.start), self.len) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_read_back_and_out_of_slot_access_is_refused() {
        let (arena, fd) = SharedArena::create(4, 4096).unwrap();
        arena.write(2, 100, b"hello").unwrap();
        assert_eq!(arena.read(2, 100, 5).unwrap(), b"hello");
        assert!(arena.write(2, 4094, b"abc").is_err());
        assert!(arena.read(4, 0, 1).is_err());
        assert!(arena.read(0, u64::MAX, 2).is_err());
        // The worker's mapping of the same fd sees the bytes, and cannot shrink the file.
        let worker = Arc::new(SharedArena::open(fd.try_clone().unwrap(), 4, 4096).unwrap());
        assert_eq!(&worker.view(2, 100, 5).unwrap()[..], b"hello");
        assert!(rustix::fs::ftruncate(&fd, 0).is_err());
        assert!(SharedArena::open(fd, 8, 4096).is_err());
    }
}
