//! The CUDA driver through cudarc, loaded at run time: device discovery and a bounded pool of
//! page-locked host buffers per device.
//!
//! cudarc's loader panics when `libcuda.so.1` is missing, so every entry point first checks
//! that the library loads ([`driver_present`]) and runs the driver calls under `catch_unwind`:
//! a machine without a GPU gets [`GpuAbsent::NoDriver`], never a crash.

// cudarc marks its library probe and its pinned allocation `unsafe`; both are used as the
// comments at each call say.
#![allow(unsafe_code)]

use std::collections::HashMap;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::{Arc, Mutex, OnceLock, Weak};

use cudarc::driver::{CudaContext, PinnedHostSlice};

use crate::{GpuAbsent, GpuDevices, GpuInfo, PinnedBuffer, format_uuid};

/// Page-locked bytes one process keeps at most, per device, by default: pinned memory cannot
/// be swapped, so it is bounded like any pool.
pub const DEFAULT_PINNED_BYTES: usize = 256 << 20;

/// Whether the CUDA driver library loads in this process (checked once).
pub fn driver_present() -> bool {
    static PRESENT: OnceLock<bool> = OnceLock::new();
    *PRESENT.get_or_init(|| {
        // SAFETY: only tries to dlopen libcuda by its usual names and drops the handle; no
        // symbol is called.
        catch_unwind(|| unsafe { cudarc::driver::sys::is_culib_present() }).unwrap_or(false)
    })
}

/// Runs a driver call, turning a panic inside cudarc into the driver's failure.
fn guarded<T>(call: impl FnOnce() -> Result<T, GpuAbsent>) -> Result<T, GpuAbsent> {
    if !driver_present() {
        return Err(GpuAbsent::NoDriver);
    }
    catch_unwind(AssertUnwindSafe(call))
        .unwrap_or_else(|_| Err(GpuAbsent::Driver("the CUDA driver call panicked".into())))
}

fn driver(error: cudarc::driver::DriverError) -> GpuAbsent {
    GpuAbsent::Driver(error.to_string())
}

/// The machine's CUDA devices.
pub struct CudaDevices {
    contexts: Mutex<HashMap<u32, Arc<CudaContext>>>,
    pools: Mutex<HashMap<u32, Arc<PinnedPool>>>,
    pinned_limit: usize,
}

impl Default for CudaDevices {
    fn default() -> Self {
        Self::with_pinned_limit(DEFAULT_PINNED_BYTES)
    }
}

impl std::fmt::Debug for CudaDevices {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CudaDevices")
            .field("pinned_limit", &self.pinned_limit)
            .finish()
    }
}

impl CudaDevices {
    /// Devices whose pinned pools each hold at most `pinned_limit` bytes.
    pub fn with_pinned_limit(pinned_limit: usize) -> Self {
        CudaDevices {
            contexts: Mutex::default(),
            pools: Mutex::default(),
            pinned_limit,
        }
    }

    /// The primary context of device `index` (the one ONNX Runtime's CUDA provider uses too).
    fn context(&self, index: u32) -> Result<Arc<CudaContext>, GpuAbsent> {
        let mut contexts = self
            .contexts
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(context) = contexts.get(&index) {
            return Ok(Arc::clone(context));
        }
        let context = guarded(|| CudaContext::new(index as usize).map_err(driver))?;
        contexts.insert(index, Arc::clone(&context));
        Ok(context)
    }

    fn info(&self, index: u32) -> Result<GpuInfo, GpuAbsent> {
        let context = self.context(index)?;
        guarded(|| {
            let uuid = context.uuid().map_err(driver)?;
            let bytes: [u8; 16] = uuid.bytes.map(|byte| byte as u8);
            let (free, total) = context.mem_get_info().map_err(driver)?;
            Ok(GpuInfo {
                index,
                name: context.name().map_err(driver)?,
                uuid: format_uuid(&bytes),
                compute_capability: context.compute_capability().map_err(driver)?,
                memory_total_bytes: total as u64,
                memory_free_bytes: free as u64,
            })
        })
    }
}

impl GpuDevices for CudaDevices {
    fn discover(&self) -> Result<Vec<GpuInfo>, GpuAbsent> {
        let count = guarded(|| CudaContext::device_count().map_err(driver))?;
        if count <= 0 {
            return Err(GpuAbsent::NoDevices);
        }
        (0..count as u32).map(|index| self.info(index)).collect()
    }

    fn pinned(&self, device: u32, len: usize) -> Option<Box<dyn PinnedBuffer>> {
        let pool = {
            let mut pools = self
                .pools
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            match pools.get(&device) {
                Some(pool) => Arc::clone(pool),
                None => {
                    let context = self.context(device).ok()?;
                    let pool = Arc::new(PinnedPool {
                        context,
                        free: Mutex::default(),
                        held: Mutex::new(0),
                        limit: self.pinned_limit,
                    });
                    pools.insert(device, Arc::clone(&pool));
                    pool
                }
            }
        };
        pool.take(len)
    }
}

/// One device's page-locked buffers, by capacity (powers of two), bounded in bytes.
struct PinnedPool {
    context: Arc<CudaContext>,
    free: Mutex<HashMap<usize, Vec<PinnedHostSlice<u8>>>>,
    /// Bytes allocated (in use or free).
    held: Mutex<usize>,
    limit: usize,
}

impl PinnedPool {
    fn take(self: &Arc<Self>, len: usize) -> Option<Box<dyn PinnedBuffer>> {
        let capacity = len.max(4096).checked_next_power_of_two()?;
        let reused = self
            .free
            .lock()
            .ok()
            .and_then(|mut free| free.get_mut(&capacity)?.pop());
        let slice = match reused {
            Some(slice) => slice,
            None => {
                {
                    let mut held = self.held.lock().ok()?;
                    if held.saturating_add(capacity) > self.limit {
                        return None;
                    }
                    *held += capacity;
                }
                let allocated = guarded(|| {
                    // SAFETY: the memory is uninitialised when allocated; it is zeroed right
                    // here, before any byte of it can be read.
                    let mut slice =
                        unsafe { self.context.alloc_pinned_with_flags::<u8>(capacity, 0) }
                            .map_err(driver)?;
                    slice.as_mut_slice().map_err(driver)?.fill(0);
                    Ok(slice)
                });
                match allocated {
                    Ok(slice) => slice,
                    Err(error) => {
                        tracing::debug!(%error, "no pinned buffer; staging in ordinary memory");
                        if let Ok(mut held) = self.held.lock() {
                            *held = held.saturating_sub(capacity);
                        }
                        return None;
                    }
                }
            }
        };
        Some(Box::new(Pinned {
            slice: Some(slice),
            len,
            pool: Arc::downgrade(self),
        }))
    }
}

/// A pooled page-locked buffer of `len` bytes (its capacity may be more).
struct Pinned {
    slice: Option<PinnedHostSlice<u8>>,
    len: usize,
    pool: Weak<PinnedPool>,
}

impl AsRef<[u8]> for Pinned {
    fn as_ref(&self) -> &[u8] {
        match &self.slice {
            // `as_slice` waits for the buffer's last copy; a failed wait reads as empty, which
            // the tensor's size check then refuses.
            Some(slice) => slice
                .as_slice()
                .map(|bytes| &bytes[..self.len])
                .unwrap_or(&[]),
            None => &[],
        }
    }
}

impl AsMut<[u8]> for Pinned {
    fn as_mut(&mut self) -> &mut [u8] {
        let len = self.len;
        match &mut self.slice {
            Some(slice) => match slice.as_mut_slice() {
                Ok(bytes) => &mut bytes[..len],
                Err(_) => &mut [],
            },
            None => &mut [],
        }
    }
}

impl PinnedBuffer for Pinned {}

impl Drop for Pinned {
    fn drop(&mut self) {
        let (Some(slice), Some(pool)) = (self.slice.take(), self.pool.upgrade()) else {
            return;
        };
        let capacity = slice.len();
        if let Ok(mut free) = pool.free.lock() {
            free.entry(capacity).or_default().push(slice);
        }
    }
}
