//! A machine's GPUs, made up: for the tests of everything that uses [`GpuDevices`] and
//! [`GpuTelemetry`] on machines without one.

use std::sync::Mutex;

use crate::{GpuAbsent, GpuDevices, GpuInfo, GpuSample, GpuTelemetry, PinnedBuffer};

/// Devices and readings set by the test.
#[derive(Debug)]
pub struct FakeGpus {
    devices: Result<Vec<GpuInfo>, GpuAbsent>,
    /// What the next samples read.
    pub samples: Mutex<Vec<GpuSample>>,
    /// Pinned buffers handed out.
    pub pinned_handed: std::sync::atomic::AtomicUsize,
}

impl FakeGpus {
    /// `count` devices of 80 GiB, `GPU-0000...0<index>`, each sampled at 50 % utilization.
    pub fn with_devices(count: u32) -> Self {
        let devices: Vec<GpuInfo> = (0..count)
            .map(|index| GpuInfo {
                index,
                name: "Fake H100".into(),
                uuid: format!("GPU-00000000-0000-0000-0000-{index:012}"),
                compute_capability: (9, 0),
                memory_total_bytes: 80 << 30,
                memory_free_bytes: 79 << 30,
            })
            .collect();
        let samples = devices
            .iter()
            .map(|device| GpuSample {
                uuid: device.uuid.clone(),
                utilization: 0.5,
                memory_total_bytes: device.memory_total_bytes,
                memory_used_bytes: device.memory_total_bytes - device.memory_free_bytes,
                power_usage: 250.0,
                power_limit: 700.0,
                energy_consumption: Some(1000.0),
            })
            .collect();
        FakeGpus {
            devices: Ok(devices),
            samples: Mutex::new(samples),
            pinned_handed: Default::default(),
        }
    }

    /// No device, for `reason`.
    pub fn absent(reason: GpuAbsent) -> Self {
        FakeGpus {
            devices: Err(reason),
            samples: Mutex::default(),
            pinned_handed: Default::default(),
        }
    }
}

/// Ordinary memory standing in for a page-locked buffer.
struct FakePinned(Vec<u8>);

impl AsRef<[u8]> for FakePinned {
    fn as_ref(&self) -> &[u8] {
        &self.0
    }
}

impl AsMut<[u8]> for FakePinned {
    fn as_mut(&mut self) -> &mut [u8] {
        &mut self.0
    }
}

impl PinnedBuffer for FakePinned {}

impl GpuDevices for FakeGpus {
    fn discover(&self) -> Result<Vec<GpuInfo>, GpuAbsent> {
        self.devices.clone()
    }

    fn pinned(&self, device: u32, len: usize) -> Option<Box<dyn PinnedBuffer>> {
        self.device(device).ok()?;
        self.pinned_handed
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        Some(Box::new(FakePinned(vec![0; len])))
    }
}

impl GpuTelemetry for FakeGpus {
    fn sample(&self) -> Vec<GpuSample> {
        self.samples
            .lock()
            .map(|samples| samples.clone())
            .unwrap_or_default()
    }
}
