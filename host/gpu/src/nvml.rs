//! GPU telemetry through NVML (`libnvidia-ml.so.1`, loaded at run time): what Triton exports
//! as `nv_gpu_utilization`, `nv_gpu_memory_*`, `nv_gpu_power_*` and `nv_energy_consumption`.

use std::collections::HashSet;
use std::sync::Mutex;

use nvml_wrapper::Nvml;

use crate::{GpuSample, GpuTelemetry};

/// NVML, initialised once.
pub struct NvmlTelemetry {
    nvml: Nvml,
    /// Devices whose failure was already logged (a scrape every few seconds must not flood).
    logged: Mutex<HashSet<u32>>,
}

impl NvmlTelemetry {
    /// Loads and initialises NVML; `Err` says why not (no driver, no permission).
    pub fn open() -> Result<Self, String> {
        // NVML's loader returns errors rather than panicking; guard anyway, since a panic
        // here would take down start-up for a metric.
        let nvml = std::panic::catch_unwind(Nvml::init)
            .map_err(|_| "NVML panicked while loading".to_string())?
            .map_err(|error| format!("NVML is not available: {error}"))?;
        Ok(NvmlTelemetry {
            nvml,
            logged: Mutex::default(),
        })
    }

    fn read(&self, index: u32) -> Result<GpuSample, nvml_wrapper::error::NvmlError> {
        let device = self.nvml.device_by_index(index)?;
        let memory = device.memory_info()?;
        Ok(GpuSample {
            uuid: device.uuid()?,
            utilization: f64::from(device.utilization_rates()?.gpu) / 100.0,
            memory_total_bytes: memory.total,
            memory_used_bytes: memory.used,
            power_usage: f64::from(device.power_usage()?) / 1000.0,
            power_limit: f64::from(device.enforced_power_limit()?) / 1000.0,
            energy_consumption: device
                .total_energy_consumption()
                .ok()
                .map(|millijoules| millijoules as f64 / 1000.0),
        })
    }
}

impl GpuTelemetry for NvmlTelemetry {
    fn sample(&self) -> Vec<GpuSample> {
        let count = self.nvml.device_count().unwrap_or(0);
        let mut samples = Vec::with_capacity(count as usize);
        for index in 0..count {
            match self.read(index) {
                Ok(sample) => samples.push(sample),
                Err(error) => {
                    let first = self
                        .logged
                        .lock()
                        .map(|mut logged| logged.insert(index))
                        .unwrap_or(false);
                    if first {
                        tracing::warn!(device = index, %error, "cannot read GPU telemetry");
                    }
                }
            }
        }
        samples
    }
}
