//! What one plugin call's Store holds: its resource table, a locked-down WASI context, the
//! memory limiter that remembers whether it refused a grow, the models granted to the call,
//! the call's host-side byte budget, its log budget, and its CPU turn.
//!
//! Host-side bytes (tensors a plugin creates through `weft:plugin/types` or `wasi:nn`, model
//! outputs it holds, error messages, log lines) are charged to [`HostBudget`], whose limit is
//! the call's `memory_bytes`: a call can hold at most its linear memory again in the host. Every
//! resource the host creates for the call is remembered and deleted when the call ends, so a
//! warm instance never keeps a tensor, a `wasi:nn` graph or context (and the model grant behind
//! it) from one call to the next.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use wasmtime::ResourceLimiter;
use wasmtime::component::ResourceTable;
use wasmtime_wasi::p2::pipe::MemoryOutputPipe;
use wasmtime_wasi::{
    HostMonotonicClock, HostWallClock, WasiCtx, WasiCtxBuilder, WasiCtxView, WasiView,
};
use weft_core::{Model, RequestContext};

use crate::nn::{NnContext, NnError, NnGraph, NnTensor};
use crate::tensors::HostTensor;
use weft_core::fair::{FairGate, FairPermit, ShareKey};

/// Bytes charged for each resource besides its payload (table slot, headers, shape).
pub(crate) const RESOURCE_OVERHEAD: usize = 64;

/// Log lines a plugin call may write (host log calls and stdout/stderr lines together).
pub const MAX_LOG_LINES_PER_CALL: u32 = 100;
/// Bytes kept of one log line.
pub const MAX_LOG_LINE_BYTES: usize = 4096;
/// Log lines per second one plugin may write across all its calls (burst: twice as many).
pub const LOG_LINES_PER_SECOND: f64 = 100.0;

/// Store data of one call.
pub struct PluginState {
    pub(crate) table: ResourceTable,
    pub(crate) wasi: WasiCtx,
    pub(crate) limiter: MemoryLimiter,
    /// Models this call may `load-by-name`, keyed by the name the plugin uses.
    pub(crate) grants: Arc<HashMap<String, Arc<dyn Model>>>,
    /// The request the current call runs for: granted models are called under it.
    pub(crate) request: RequestContext,
    pub(crate) plugin: Arc<str>,
    pub(crate) stdout: MemoryOutputPipe,
    pub(crate) stderr: MemoryOutputPipe,
    pub(crate) host: HostBudget,
    /// Resources the host created for this call, by handle, deleted when the call ends.
    pub(crate) owned: HashMap<u32, (Owned, usize)>,
    pub(crate) log: CallLog,
    /// The CPU turn this call runs in, given up at epoch ticks when others wait.
    pub(crate) cpu: Option<CpuTurn>,
    /// Epoch ticks this call has seen since it last took its CPU turn: a call gives the
    /// turn up to a waiting one only from its second tick, so a short call is not cut at a
    /// tick that happened to fall just after it started.
    pub(crate) ticks_on_turn: u32,
}

/// The kind of a resource the host created for a call.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Owned {
    Tensor,
    NnTensor,
    NnGraph,
    NnContext,
    NnError,
}

/// Host-side bytes one call holds, against its limit.
#[derive(Debug)]
pub(crate) struct HostBudget {
    pub(crate) limit: usize,
    pub(crate) used: usize,
    pub(crate) peak: usize,
    /// What the call was doing when it went over, for its error.
    pub(crate) exceeded: Option<String>,
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
        request: RequestContext,
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
            request,
            plugin,
            stdout,
            stderr,
            host: HostBudget {
                limit: memory_bytes,
                used: 0,
                peak: 0,
                exceeded: None,
            },
            owned: HashMap::new(),
            log: CallLog::new(log_bytes, Arc::default()),
            cpu: None,
            ticks_on_turn: 0,
        }
    }

    /// Charges `bytes` of host memory to the call; over the limit the call traps (and the
    /// failure names the host memory limit).
    pub(crate) fn charge(&mut self, bytes: usize, what: &str) -> wasmtime::Result<()> {
        let used = self.host.used.saturating_add(bytes);
        if used > self.host.limit {
            let message = format!(
                "host memory limit of {} bytes for this call exceeded: {what} needed {bytes} \
                 bytes with {} already held (tensors, wasi-nn tensors, outputs and logs count)",
                self.host.limit, self.host.used
            );
            self.host.exceeded = Some(message.clone());
            return Err(wasmtime::Error::msg(message));
        }
        self.host.used = used;
        self.host.peak = self.host.peak.max(used);
        Ok(())
    }

    /// Charges and pushes a resource the host creates for the guest; it is deleted when the
    /// call ends unless the guest drops it first.
    pub(crate) fn push_owned<T: Send + 'static>(
        &mut self,
        value: T,
        kind: Owned,
        bytes: usize,
        what: &str,
    ) -> wasmtime::Result<wasmtime::component::Resource<T>> {
        let bytes = bytes.saturating_add(RESOURCE_OVERHEAD);
        self.charge(bytes, what)?;
        let handle = self.table.push(value)?;
        self.owned.insert(handle.rep(), (kind, bytes));
        Ok(handle)
    }

    /// Deletes a resource the guest dropped (or the host consumed) and gives its bytes back.
    pub(crate) fn delete_owned<T: 'static>(
        &mut self,
        handle: wasmtime::component::Resource<T>,
    ) -> wasmtime::Result<T> {
        let rep = handle.rep();
        let value = self.table.delete(handle)?;
        if let Some((_, bytes)) = self.owned.remove(&rep) {
            self.host.used = self.host.used.saturating_sub(bytes);
        }
        Ok(value)
    }

    /// Prepares a (possibly warm) state for a new call: its grants, limits and log budget.
    pub(crate) fn begin_call(
        &mut self,
        grants: Arc<HashMap<String, Arc<dyn Model>>>,
        request: RequestContext,
        memory_bytes: usize,
        log: CallLog,
    ) {
        self.grants = grants;
        self.request = request;
        self.limiter.memory_bytes = memory_bytes;
        self.limiter.refused = None;
        self.host.limit = memory_bytes;
        self.host.used = 0;
        self.host.exceeded = None;
        self.log = log;
    }

    /// Deletes every resource the host made for the call that the guest still holds, so
    /// nothing (a tensor, a `wasi:nn` graph and its model grant) outlives the call.
    pub(crate) fn end_call(&mut self) {
        // A warm instance keeps nothing of the request it served.
        self.request = RequestContext::background();
        for (rep, (kind, _)) in std::mem::take(&mut self.owned) {
            use wasmtime::component::Resource;
            let _ = match kind {
                Owned::Tensor => self
                    .table
                    .delete(Resource::<HostTensor>::new_own(rep))
                    .map(drop),
                Owned::NnTensor => self
                    .table
                    .delete(Resource::<NnTensor>::new_own(rep))
                    .map(drop),
                Owned::NnGraph => self
                    .table
                    .delete(Resource::<NnGraph>::new_own(rep))
                    .map(drop),
                Owned::NnContext => self
                    .table
                    .delete(Resource::<NnContext>::new_own(rep))
                    .map(drop),
                Owned::NnError => self
                    .table
                    .delete(Resource::<NnError>::new_own(rep))
                    .map(drop),
            };
        }
        self.host.used = 0;
        self.cpu = None;
    }

    /// Writes one line the plugin logged, within the call's and the plugin's log budget,
    /// escaped so it cannot forge other log lines.
    pub(crate) fn log_line(&mut self, level: tracing::Level, line: &str) -> wasmtime::Result<()> {
        let line = truncate(line, MAX_LOG_LINE_BYTES);
        if !self.log.admit(line.len()) {
            return Ok(());
        }
        self.charge(line.len(), "a log line")?;
        let plugin = &*self.plugin;
        let text = escape_log(line);
        match level {
            tracing::Level::TRACE => tracing::trace!(plugin, "{text}"),
            tracing::Level::DEBUG => tracing::debug!(plugin, "{text}"),
            tracing::Level::INFO => tracing::info!(plugin, "{text}"),
            tracing::Level::WARN => tracing::warn!(plugin, "{text}"),
            tracing::Level::ERROR => tracing::error!(plugin, "{text}"),
        }
        Ok(())
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

    /// Writes whatever the plugin printed to the host log, once the call is over, line by
    /// line within the call's log budget, then one line saying what was cut.
    pub(crate) fn flush_output(&mut self) {
        for (stream, pipe) in [
            ("stdout", self.stdout.clone()),
            ("stderr", self.stderr.clone()),
        ] {
            let bytes = pipe.contents();
            let text = String::from_utf8_lossy(&bytes);
            for line in text.trim_end().lines() {
                let line = truncate(line, MAX_LOG_LINE_BYTES);
                if self.log.admit(line.len()) {
                    let text = escape_log(line);
                    tracing::info!(plugin = &*self.plugin, stream, "{text}");
                }
            }
        }
        if self.log.dropped > 0 {
            tracing::warn!(
                plugin = &*self.plugin,
                "plugin log truncated: {} more lines were dropped (limits: {} lines and {} bytes \
                 per call, {} lines per second per plugin)",
                self.log.dropped,
                MAX_LOG_LINES_PER_CALL,
                self.log.max_bytes,
                LOG_LINES_PER_SECOND
            );
            self.log.dropped = 0;
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

/// The log budget of one call, and the rate limit of its plugin.
#[derive(Debug)]
pub(crate) struct CallLog {
    lines: u32,
    bytes: usize,
    max_bytes: usize,
    /// Lines refused since the last "truncated" line.
    dropped: u64,
    rate: Arc<LogRate>,
}

impl CallLog {
    pub(crate) fn new(max_bytes: usize, rate: Arc<LogRate>) -> Self {
        CallLog {
            lines: 0,
            bytes: 0,
            max_bytes,
            dropped: 0,
            rate,
        }
    }

    /// Whether a line of `len` bytes may be written; counts it either way.
    fn admit(&mut self, len: usize) -> bool {
        let fits = self.lines < MAX_LOG_LINES_PER_CALL
            && self.bytes.saturating_add(len) <= self.max_bytes
            && self.rate.take();
        if fits {
            self.lines += 1;
            self.bytes += len;
        } else {
            self.dropped += 1;
        }
        fits
    }
}

/// A token bucket of log lines shared by every call of one plugin.
#[derive(Debug)]
pub struct LogRate {
    bucket: Mutex<(f64, Instant)>,
}

impl Default for LogRate {
    fn default() -> Self {
        LogRate {
            bucket: Mutex::new((2.0 * LOG_LINES_PER_SECOND, Instant::now())),
        }
    }
}

impl LogRate {
    fn take(&self) -> bool {
        let Ok(mut bucket) = self.bucket.lock() else {
            return false;
        };
        let (tokens, last) = &mut *bucket;
        let now = Instant::now();
        let refill = now.duration_since(*last).as_secs_f64() * LOG_LINES_PER_SECOND;
        *tokens = (*tokens + refill).min(2.0 * LOG_LINES_PER_SECOND);
        *last = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// Escapes control characters (newlines, carriage returns, ANSI escapes, NEL) and the Unicode
/// line separators, so one plugin log call is exactly one host log line.
pub(crate) fn escape_log(text: &str) -> std::borrow::Cow<'_, str> {
    let needs = |c: char| c.is_control() || c == '\u{2028}' || c == '\u{2029}';
    if !text.chars().any(needs) {
        return std::borrow::Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 16);
    for c in text.chars() {
        match c {
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if needs(c) => out.push_str(&format!("\\u{{{:x}}}", c as u32)),
            c => out.push(c),
        }
    }
    std::borrow::Cow::Owned(out)
}

/// The CPU turn a call runs plugin code in: a permit of the runtime's CPU gate (one per core,
/// shared fairly between tenants). At each epoch tick a call whose gate has waiters gives its
/// turn up and queues again, so a tenant's spinning plugins cannot keep the cores from the
/// others; a call waiting on a model gives it up for the wait.
#[derive(Clone)]
pub(crate) struct CpuTurn {
    gate: FairGate,
    key: ShareKey,
    held: Arc<Mutex<Option<FairPermit>>>,
}

impl CpuTurn {
    pub(crate) fn new(gate: FairGate, key: ShareKey) -> Self {
        CpuTurn {
            gate,
            key,
            held: Arc::default(),
        }
    }

    /// Waits for a turn (if not holding one).
    pub(crate) async fn take(&self) {
        if self.held.lock().map(|held| held.is_some()).unwrap_or(true) {
            return;
        }
        let permit = self.gate.acquire(self.key.clone()).await;
        if let Ok(mut held) = self.held.lock() {
            *held = Some(permit);
        }
    }

    /// Gives the turn up.
    pub(crate) fn release(&self) {
        let permit = self.held.lock().ok().and_then(|mut held| held.take());
        drop(permit);
    }

    /// Whether another call waits for a turn.
    pub(crate) fn contended(&self) -> bool {
        self.gate.contended()
    }

    /// Gives the turn up and queues for the next one. It always yields to the executor once,
    /// even when the turn comes straight back, so the call's deadline (a timeout around the
    /// call) is checked at every tick.
    pub(crate) async fn requeue(self) {
        self.release();
        tokio::task::yield_now().await;
        self.take().await;
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
