//! What one plugin call's Store holds: its resource table, a locked-down WASI context, the
//! memory limiter that remembers whether it refused a grow, and the models granted to the call.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use wasmtime::ResourceLimiter;
use wasmtime::component::ResourceTable;
use wasmtime_wasi::p2::pipe::MemoryOutputPipe;
use wasmtime_wasi::{
    HostMonotonicClock, HostWallClock, WasiCtx, WasiCtxBuilder, WasiCtxView, WasiView,
};
use weft_core::Model;

/// Store data of one call.
pub struct PluginState {
    pub(crate) table: ResourceTable,
    pub(crate) wasi: WasiCtx,
    pub(crate) limiter: MemoryLimiter,
    /// Models this call may `load-by-name`, keyed by the name the plugin uses.
    pub(crate) grants: Arc<HashMap<String, Arc<dyn Model>>>,
    pub(crate) plugin: Arc<str>,
    pub(crate) stdout: MemoryOutputPipe,
    pub(crate) stderr: MemoryOutputPipe,
}

impl WasiView for PluginState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

impl PluginState {
    /// A state with no filesystem, no network, no environment, no arguments, and clocks frozen
    /// at zero: the closed default. Output goes to capped in-memory pipes.
    pub(crate) fn new(
        plugin: Arc<str>,
        grants: Arc<HashMap<String, Arc<dyn Model>>>,
        memory_bytes: usize,
        log_bytes: usize,
    ) -> Self {
        let stdout = MemoryOutputPipe::new(log_bytes);
        let stderr = MemoryOutputPipe::new(log_bytes);
        let wasi = closed_wasi(&stdout, &stderr).build();
        PluginState {
            table: ResourceTable::new(),
            wasi,
            limiter: MemoryLimiter::new(memory_bytes),
            grants,
            plugin,
            stdout,
            stderr,
        }
    }

    /// Lets the plugin read `dir` as `/assets` (read-only, through cap-std: no path can escape it).
    pub(crate) fn grant_assets(&mut self, dir: &std::path::Path) -> Result<(), weft_core::Error> {
        let mut builder = closed_wasi(&self.stdout, &self.stderr);
        builder
            .preopened_dir(dir, "/assets", wasmtime_wasi::FsPerms::ReadOnly)
            .map_err(|error| {
                weft_core::Error::unavailable(format!(
                    "cannot open asset directory {}: {error}",
                    dir.display()
                ))
            })?;
        self.wasi = builder.build();
        Ok(())
    }

    /// Writes whatever the plugin printed to the host log, once the call is over.
    pub(crate) fn flush_output(&self) {
        for (stream, pipe) in [("stdout", &self.stdout), ("stderr", &self.stderr)] {
            let bytes = pipe.contents();
            if !bytes.is_empty() {
                let text = String::from_utf8_lossy(&bytes);
                tracing::info!(plugin = &*self.plugin, stream, "{}", text.trim_end());
            }
        }
    }

    /// Whether the plugin wrote anything to stdout or stderr (its capture buffers are bounded
    /// and per instance, so an instance that wrote is not reused).
    pub(crate) fn wrote_output(&self) -> bool {
        !self.stdout.contents().is_empty() || !self.stderr.contents().is_empty()
    }

    /// The end of stderr, for error messages (a Rust guest's panic message lands there).
    pub(crate) fn stderr_tail(&self) -> String {
        let bytes = self.stderr.contents();
        let text = String::from_utf8_lossy(&bytes);
        let text = text.trim();
        let start = text.len().saturating_sub(500);
        let start = (start..text.len())
            .find(|&i| text.is_char_boundary(i))
            .unwrap_or(0);
        text[start..].to_string()
    }
}

/// WASI with nothing granted: no preopens, env, args or sockets, frozen clocks, captured output.
fn closed_wasi(stdout: &MemoryOutputPipe, stderr: &MemoryOutputPipe) -> WasiCtxBuilder {
    let mut builder = WasiCtx::builder();
    builder
        .stdout(stdout.clone())
        .stderr(stderr.clone())
        .wall_clock(FrozenClock)
        .monotonic_clock(FrozenClock)
        .allow_tcp(false)
        .allow_udp(false)
        .allow_ip_name_lookup(false);
    builder
}

/// A clock that always says zero: plugins get no host time unless a graph grants it.
struct FrozenClock;

impl HostWallClock for FrozenClock {
    fn resolution(&self) -> Duration {
        Duration::from_secs(1)
    }
    fn now(&self) -> Duration {
        Duration::ZERO
    }
}

impl HostMonotonicClock for FrozenClock {
    fn resolution(&self) -> u64 {
        1_000_000_000
    }
    fn now(&self) -> u64 {
        0
    }
}

/// Caps linear memory and table growth, and remembers a refused grow so the call's error can
/// say the memory limit was hit (a plain trap would look like `unreachable`).
#[derive(Debug)]
pub(crate) struct MemoryLimiter {
    pub(crate) memory_bytes: usize,
    pub(crate) refused: Option<usize>,
    pub(crate) peak: usize,
}

impl MemoryLimiter {
    fn new(memory_bytes: usize) -> Self {
        MemoryLimiter {
            memory_bytes,
            refused: None,
            peak: 0,
        }
    }
}

impl ResourceLimiter for MemoryLimiter {
    fn memory_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        if desired > self.memory_bytes {
            self.refused = Some(desired);
            return Err(wasmtime::Error::msg(format!(
                "memory limit of {} bytes reached (the plugin asked for {desired})",
                self.memory_bytes
            )));
        }
        self.peak = self.peak.max(desired);
        Ok(true)
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        Ok(desired <= 100_000)
    }
}

/// Cuts `text` to at most `limit` bytes on a character boundary.
pub(crate) fn truncate(text: &str, limit: usize) -> &str {
    if text.len() <= limit {
        return text;
    }
    let end = (0..=limit)
        .rev()
        .find(|&i| text.is_char_boundary(i))
        .unwrap_or(0);
    &text[..end]
}
