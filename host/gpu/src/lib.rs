//! NVIDIA GPUs as Weft sees them, behind two small traits so that everything that uses them is
//! tested without a GPU:
//!
//! - [`GpuDevices`]: discovery (count, name, UUID, compute capability, memory) and page-locked
//!   host buffers for staging batches ([`cuda::CudaDevices`], through cudarc's driver API).
//! - [`GpuTelemetry`]: utilization, memory and power for Triton's `nv_gpu_*` metrics
//!   ([`nvml::NvmlTelemetry`], through NVML).
//!
//! Both libraries (`libcuda.so.1`, `libnvidia-ml.so.1`) are loaded at run time, so the binary
//! builds and starts on a machine without CUDA and serves CPU models there; asking for a GPU
//! then gets the reason it cannot have one ([`GpuAbsent`]). [`fake::FakeGpus`] stands in for
//! both in tests.

pub mod cuda;
pub mod fake;
pub mod nvml;

use std::fmt;

/// One CUDA device as discovery found it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GpuInfo {
    /// The CUDA device ordinal (what `[ort] device = N` names).
    pub index: u32,
    pub name: String,
    /// `GPU-xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx`, as NVML and `nvidia-smi -L` print it.
    pub uuid: String,
    /// (major, minor).
    pub compute_capability: (i32, i32),
    pub memory_total_bytes: u64,
    pub memory_free_bytes: u64,
}

/// Why no GPU can be had, in words an operator can act on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum GpuAbsent {
    /// `libcuda.so.1` cannot be loaded: no NVIDIA driver on this machine (or not visible to
    /// this process, as in a container started without the GPU).
    NoDriver,
    /// The driver loads but reports no device.
    NoDevices,
    /// The driver failed (its error).
    Driver(String),
    /// A device was asked for that does not exist.
    NoSuchDevice { index: u32, count: usize },
}

impl fmt::Display for GpuAbsent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            GpuAbsent::NoDriver => write!(
                f,
                "no NVIDIA driver on this machine (libcuda.so.1 cannot be loaded); run on a GPU \
                 node, or in a container started with the GPU (--gpus / the NVIDIA device \
                 plugin)"
            ),
            GpuAbsent::NoDevices => write!(f, "the NVIDIA driver reports no CUDA device"),
            GpuAbsent::Driver(error) => write!(f, "the NVIDIA driver failed: {error}"),
            GpuAbsent::NoSuchDevice { index, count } => write!(
                f,
                "CUDA device {index} does not exist; this machine has {count} (devices 0 to {})",
                count.saturating_sub(1)
            ),
        }
    }
}

impl std::error::Error for GpuAbsent {}

/// A page-locked host buffer: the device copies from it by DMA, without the driver first
/// copying it into a pinned bounce buffer of its own. Returned to its pool when dropped.
pub trait PinnedBuffer: AsRef<[u8]> + AsMut<[u8]> + Send + Sync + 'static {}

/// The CUDA devices of this machine.
pub trait GpuDevices: Send + Sync {
    /// Every device, or why there are none.
    fn discover(&self) -> Result<Vec<GpuInfo>, GpuAbsent>;

    /// A page-locked buffer of exactly `len` bytes for staging inputs bound for `device`, or
    /// `None` when none can be had (no GPU, or the pool's bound is reached): the caller then
    /// stages in ordinary memory.
    fn pinned(&self, device: u32, len: usize) -> Option<Box<dyn PinnedBuffer>>;

    /// The device `index`, or why it cannot be used.
    fn device(&self, index: u32) -> Result<GpuInfo, GpuAbsent> {
        let devices = self.discover()?;
        let count = devices.len();
        devices
            .into_iter()
            .find(|device| device.index == index)
            .ok_or(GpuAbsent::NoSuchDevice { index, count })
    }
}

/// One device's readings for the `nv_gpu_*` metrics.
#[derive(Clone, Debug, PartialEq)]
pub struct GpuSample {
    pub uuid: String,
    /// Fraction of the last sample period a kernel ran, 0.0 to 1.0.
    pub utilization: f64,
    pub memory_total_bytes: u64,
    pub memory_used_bytes: u64,
    /// Watts.
    pub power_usage: f64,
    /// Watts.
    pub power_limit: f64,
    /// Joules since the driver loaded, where the device reports it.
    pub energy_consumption: Option<f64>,
}

/// Reads every device's utilization, memory and power.
pub trait GpuTelemetry: Send + Sync {
    /// One sample per device; a device that fails to answer is left out (and logged once).
    fn sample(&self) -> Vec<GpuSample>;
}

/// Formats a CUDA UUID's 16 bytes as NVML does: `GPU-` then 8-4-4-4-12 hex digits.
pub fn format_uuid(bytes: &[u8; 16]) -> String {
    let hex: Vec<String> = bytes.iter().map(|byte| format!("{byte:02x}")).collect();
    format!(
        "GPU-{}-{}-{}-{}-{}",
        hex[0..4].concat(),
        hex[4..6].concat(),
        hex[6..8].concat(),
        hex[8..10].concat(),
        hex[10..16].concat()
    )
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn uuids_read_like_nvml() {
        let bytes: [u8; 16] = core::array::from_fn(|i| (i * 17) as u8);
        assert_eq!(
            format_uuid(&bytes),
            "GPU-00112233-4455-6677-8899-aabbccddeeff"
        );
    }

    #[test]
    fn a_missing_device_names_what_exists() {
        let gpus = fake::FakeGpus::with_devices(2);
        assert_eq!(gpus.device(1).unwrap().index, 1);
        let error = gpus.device(2).unwrap_err();
        assert_eq!(error, GpuAbsent::NoSuchDevice { index: 2, count: 2 });
        assert_eq!(
            error.to_string(),
            "CUDA device 2 does not exist; this machine has 2 (devices 0 to 1)"
        );
        let none = fake::FakeGpus::absent(GpuAbsent::NoDriver);
        assert!(
            none.device(0)
                .unwrap_err()
                .to_string()
                .contains("libcuda.so.1")
        );
    }

    /// On a machine without the NVIDIA driver (CI), discovery says so instead of panicking as
    /// cudarc's loader would; with one, it never claims there is none.
    #[test]
    fn discovery_tells_a_missing_driver_from_a_present_one() {
        let devices = cuda::CudaDevices::default();
        if cuda::driver_present() {
            assert_ne!(devices.discover().err(), Some(GpuAbsent::NoDriver));
        } else {
            assert_eq!(devices.discover().unwrap_err(), GpuAbsent::NoDriver);
            assert!(devices.pinned(0, 1024).is_none());
            assert!(nvml::NvmlTelemetry::open().is_err());
        }
    }
}
