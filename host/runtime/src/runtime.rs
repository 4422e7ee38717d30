//! The wasmtime engine, plugin loading (with a compile cache and role detection) and plugin
//! calls under per-call limits.
//!
//! A call runs in a Store instantiated from the plugin's cached `InstancePre` in the pooling
//! allocator. A trap, a deadline, an out-of-memory or an oversized output ends only that call:
//! its Store is dropped and the next call starts clean. With `reuse_instances` (the default) an
//! instance whose call ended cleanly is kept warm for the next call of the same plugin, which
//! skips instantiation and the page faults of a fresh memory; it is replaced after
//! `MAX_CALLS_PER_INSTANCE` calls. Warm instances belong to one plugin, and plugins to one
//! tenant, so nothing crosses tenants; a plugin's own memory may persist between its calls, but
//! no resource handle does (see `state.rs`).
//!
//! Tenants share the machine fairly ([`crate::fair`]): a call first takes a slot of the instance
//! pool within its tenant's share (`tenant_instances`), waiting within its deadline when the
//! pool is busy instead of failing; the pool's per-component limits guarantee an admitted call
//! always finds its memories, tables and core instances. Plugin code then runs in CPU turns
//! (one per core), given up at each epoch tick when another call waits, fewest-held tenant
//! first. Warm instances are capped per tenant and in all, and dropped after `warm_idle`.
//! Components are compiled one core each on a bounded pool, within a size and a time limit.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, Weak};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};
use wasmtime::component::{Component, HasSelf, Linker, Resource, types::ComponentItem};
use wasmtime::{
    Config, Engine, InstanceAllocationStrategy, PoolingAllocationConfig, Store, StoreContextMut,
    Trap, UpdateDeadline,
};
use weft_core::{Error, ErrorKind, Model, NamedTensor, RequestContext};

use crate::bindings::Imports;
use crate::bindings::combiner::{Combiner, CombinerPre};
use crate::bindings::router::{Router, RouterPre};
use crate::bindings::transformer::{Transformer, TransformerPre};
use crate::bindings::weft::plugin::types::{
    Branch, Error as GuestError, NamedTensor as WitNamedTensor,
};

/// Node parameters as the plugin receives them: key/value strings.
pub type Params = Vec<(String, String)>;
use crate::state::{CallLog, CpuTurn, LogRate, Owned, PluginState};
use crate::tensors::HostTensor;
use weft_core::fair::{FairGate, ShareKey};

/// Limits of one plugin call. Graph nodes and tenants may lower them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CallLimits {
    /// Wall-clock time for the whole call, instantiation included.
    pub deadline: Duration,
    /// Largest linear memory the plugin may grow to.
    pub memory_bytes: usize,
    /// Largest total byte size of the tensors a call returns.
    pub max_output_bytes: usize,
    /// Fuel (roughly, wasm instructions) per call, when the runtime meters fuel.
    pub fuel: Option<u64>,
    /// Bytes of stdout and of stderr kept for the host log.
    pub log_bytes: usize,
}

impl Default for CallLimits {
    fn default() -> Self {
        CallLimits {
            deadline: Duration::from_secs(2),
            memory_bytes: 64 << 20,
            max_output_bytes: 64 << 20,
            fuel: None,
            log_bytes: 64 << 10,
        }
    }
}

/// Process-wide settings of the plugin runtime.
#[derive(Clone, Debug)]
pub struct RuntimeConfig {
    /// Default limits of each call.
    pub limits: CallLimits,
    /// Instances alive at once across all plugins (pooling allocator slots).
    pub max_instances: u32,
    /// Upper bound of any call's `memory_bytes` (the pooling allocator's memory slot size).
    pub max_memory_bytes: usize,
    /// Meter fuel in every call (costs some speed; enables `CallLimits::fuel`).
    pub meter_fuel: bool,
    /// Where compiled plugins are kept across restarts; `None` compiles every time.
    pub cache_dir: Option<PathBuf>,
    /// How often running plugins yield so deadlines can be enforced.
    pub epoch_tick: Duration,
    /// Keep instances whose call ended cleanly for the plugin's next call (see the module doc).
    pub reuse_instances: bool,
    /// Instances one tenant may have in flight at once; its further calls wait for one of its
    /// own to end (within their deadline).
    pub tenant_instances: u32,
    /// Warm instances one tenant may keep, over all its plugins.
    pub tenant_warm_instances: u32,
    /// How long a warm instance may sit unused before it is dropped.
    pub warm_idle: Duration,
    /// Plugin code running at once (CPU turns, one per core by default), shared fairly.
    pub cpu_turns: usize,
    /// Largest component accepted, in bytes.
    pub max_component_bytes: usize,
    /// Longest a component may take to compile; a slower one is refused.
    pub compile_timeout: Duration,
    /// Components compiled at once, each on one core.
    pub compile_slots: usize,
}

impl Default for RuntimeConfig {
    fn default() -> Self {
        RuntimeConfig {
            limits: CallLimits::default(),
            max_instances: 256,
            max_memory_bytes: 256 << 20,
            meter_fuel: false,
            cache_dir: None,
            epoch_tick: Duration::from_millis(5),
            reuse_instances: true,
            tenant_instances: 96,
            tenant_warm_instances: 32,
            warm_idle: Duration::from_secs(30),
            cpu_turns: cores(),
            max_component_bytes: 64 << 20,
            compile_timeout: Duration::from_secs(60),
            compile_slots: cores().div_ceil(2),
        }
    }
}

/// The cores this process may use.
fn cores() -> usize {
    std::thread::available_parallelism().map_or(1, usize::from)
}

/// Which role a plugin's component exports.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Role {
    Transformer,
    Combiner,
    Router,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Transformer => "transformer",
            Role::Combiner => "combiner",
            Role::Router => "router",
        }
    }

    fn export(self) -> &'static str {
        match self {
            Role::Transformer => "transform",
            Role::Combiner => "combine",
            Role::Router => "route",
        }
    }
}

/// Why a plugin call failed; the cause names the limit that was hit.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FailureCause {
    Deadline,
    Memory,
    Fuel,
    OutputTooLarge,
    /// The plugin trapped (panic, unreachable, bad memory access...).
    Trap,
    /// The plugin returned its own error.
    Guest,
    /// The call held more host-side bytes (tensors, wasi-nn tensors, outputs, logs) than its
    /// budget.
    HostMemory,
}

impl FailureCause {
    pub const ALL: [FailureCause; 7] = [
        FailureCause::Deadline,
        FailureCause::Memory,
        FailureCause::Fuel,
        FailureCause::OutputTooLarge,
        FailureCause::Trap,
        FailureCause::Guest,
        FailureCause::HostMemory,
    ];

    pub fn as_str(&self) -> &'static str {
        match self {
            FailureCause::Deadline => "deadline",
            FailureCause::Memory => "memory",
            FailureCause::Fuel => "fuel",
            FailureCause::OutputTooLarge => "output",
            FailureCause::Trap => "trap",
            FailureCause::Guest => "guest",
            FailureCause::HostMemory => "host_memory",
        }
    }
}

/// A failed plugin call: the cause and a core error (with its HTTP-mappable kind).
#[derive(Clone, Debug)]
pub struct PluginFailure {
    pub cause: FailureCause,
    pub error: Error,
}

impl std::fmt::Display for PluginFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.error.fmt(f)
    }
}

/// Counters of one plugin's calls, for metrics.
#[derive(Debug, Default)]
pub struct PluginStats {
    /// Calls made.
    pub calls: AtomicU64,
    /// Failed calls by cause, indexed like [`FailureCause::ALL`].
    pub failures: [AtomicU64; 7],
    /// Fuel consumed, when fuel metering is on.
    pub fuel_consumed: AtomicU64,
    /// The largest linear memory any call grew to, in bytes.
    pub peak_memory_bytes: AtomicU64,
    /// The most host-side bytes any call held, in bytes.
    pub peak_host_bytes: AtomicU64,
}

impl PluginStats {
    pub fn failures_by(&self, cause: &FailureCause) -> u64 {
        let index = FailureCause::ALL
            .iter()
            .position(|c| c == cause)
            .unwrap_or(0);
        self.failures[index].load(Ordering::Relaxed)
    }
}

/// Counters a metrics layer reads.
#[derive(Debug, Default)]
pub struct RuntimeStats {
    pub cache_hits: AtomicU64,
    pub cache_misses: AtomicU64,
    pub instantiations: AtomicU64,
}

struct EpochTicker {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Drop for EpochTicker {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

struct RuntimeInner {
    engine: Engine,
    linker: Linker<PluginState>,
    config: RuntimeConfig,
    stats: RuntimeStats,
    /// Slots of the instance pool for calls in flight (the pool less the warm cap).
    instances: FairGate,
    /// CPU turns of plugin code.
    cpu: FairGate,
    /// Warm instances held across all plugins, in all and per tenant.
    warm: Arc<Mutex<WarmLedger>>,
    /// Every plugin's warm pool, swept for idle instances by the epoch thread.
    warm_pools: Arc<Mutex<Vec<Weak<WarmPool>>>>,
    /// Warm instances kept at most, in all and per tenant.
    warm_cap: usize,
    tenant_warm: usize,
    compiles: Arc<CompileSlots>,
    _ticker: EpochTicker,
}

/// How many warm instances are held, in all and by tenant.
#[derive(Debug, Default)]
struct WarmLedger {
    total: usize,
    per_key: HashMap<ShareKey, usize>,
}

impl WarmLedger {
    fn add(&mut self, key: &ShareKey) {
        self.total += 1;
        *self.per_key.entry(key.clone()).or_insert(0) += 1;
    }

    fn remove(&mut self, key: &ShareKey) {
        self.total = self.total.saturating_sub(1);
        if let Some(held) = self.per_key.get_mut(key) {
            *held = held.saturating_sub(1);
            if *held == 0 {
                self.per_key.remove(key);
            }
        }
    }

    fn held_by(&self, key: &ShareKey) -> usize {
        self.per_key.get(key).copied().unwrap_or(0)
    }
}

fn lock_ledger(ledger: &Mutex<WarmLedger>) -> std::sync::MutexGuard<'_, WarmLedger> {
    ledger
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// A bounded number of compile slots; a blocking wait (compiles run on blocking threads).
#[derive(Debug)]
struct CompileSlots {
    free: Mutex<usize>,
    freed: Condvar,
}

/// One compile slot, given back when the compile (even one the caller gave up on) ends.
struct CompileSlot(Arc<CompileSlots>);

impl CompileSlots {
    fn acquire(self: &Arc<Self>, wait: Duration) -> Option<CompileSlot> {
        let free = self.free.lock().unwrap_or_else(|p| p.into_inner());
        let (mut free, _) = self
            .freed
            .wait_timeout_while(free, wait, |free| *free == 0)
            .unwrap_or_else(|p| p.into_inner());
        if *free == 0 {
            return None;
        }
        *free -= 1;
        Some(CompileSlot(Arc::clone(self)))
    }
}

impl Drop for CompileSlot {
    fn drop(&mut self) {
        let mut free = self.0.free.lock().unwrap_or_else(|p| p.into_inner());
        *free += 1;
        self.0.freed.notify_one();
    }
}

/// Core instances, memories and tables one component may have: more than a component built
/// with wit-bindgen and the WASI adapter (about 4, 2 and 3) or with componentize-py (14 core
/// instances: libc, libpython, the adapter and shims, sharing one memory and one large table)
/// uses, small enough that the pool, sized at these times its component slots, always has room
/// for an admitted call.
const MAX_CORE_INSTANCES_PER_COMPONENT: u32 = 20;
const MAX_MEMORIES_PER_COMPONENT: u32 = 2;
const MAX_TABLES_PER_COMPONENT: u32 = 8;
/// Elements of one table.
const MAX_TABLE_ELEMENTS: usize = 20_000;

/// Epoch ticks between sweeps of idle warm instances.
const SWEEP_EVERY_TICKS: u32 = 200;

/// The plugin sandbox: one wasmtime engine shared by every plugin.
#[derive(Clone)]
pub struct PluginRuntime {
    inner: Arc<RuntimeInner>,
}

impl PluginRuntime {
    pub fn new(config: RuntimeConfig) -> Result<Self, Error> {
        let mut pooling = PoolingAllocationConfig::default();
        let slots = config.max_instances.max(1);
        pooling
            .total_component_instances(slots)
            .total_core_instances(slots * MAX_CORE_INSTANCES_PER_COMPONENT)
            .total_memories(slots * MAX_MEMORIES_PER_COMPONENT)
            .total_tables(slots * MAX_TABLES_PER_COMPONENT)
            .max_core_instances_per_component(MAX_CORE_INSTANCES_PER_COMPONENT)
            .max_memories_per_component(MAX_MEMORIES_PER_COMPONENT)
            .max_tables_per_component(MAX_TABLES_PER_COMPONENT)
            .table_elements(MAX_TABLE_ELEMENTS)
            .max_memory_size(config.max_memory_bytes);
        // Returning a slot to the pool decommits its memory (madvise), and each madvise costs a
        // TLB shootdown across cores; batching them was worth ~10% of classify-graph throughput
        // at concurrency 64 (BENCHMARKS.md). Keeping memory resident instead (memset on reuse)
        // measured slower for Rust guests, whose 1 MiB stack spans the first pages.
        pooling.decommit_batch_size(DECOMMIT_BATCH);
        let mut wasm = Config::new();
        wasm.wasm_component_model(true)
            .epoch_interruption(true)
            .consume_fuel(config.meter_fuel)
            // One core per compile: the compile pool, not the compiler, decides how many cores
            // compiling takes.
            .parallel_compilation(false)
            .allocation_strategy(InstanceAllocationStrategy::Pooling(pooling));
        let engine = Engine::new(&wasm)
            .map_err(|e| Error::internal(format!("cannot create the wasm engine: {e:#}")))?;
        let mut linker = Linker::new(&engine);
        wasmtime_wasi::p2::add_to_linker_async(&mut linker)
            .and_then(|()| {
                Imports::add_to_linker::<PluginState, HasSelf<PluginState>>(&mut linker, |state| {
                    state
                })
            })
            .map_err(|e| Error::internal(format!("cannot link plugin imports: {e:#}")))?;
        let stop = Arc::new(AtomicBool::new(false));
        let ticker_engine = engine.clone();
        let ticker_stop = Arc::clone(&stop);
        let tick = config.epoch_tick;
        let warm_pools: Arc<Mutex<Vec<Weak<WarmPool>>>> = Arc::default();
        let swept_pools = Arc::clone(&warm_pools);
        let warm_idle = config.warm_idle;
        let thread = std::thread::Builder::new()
            .name("weft-epoch".into())
            .spawn(move || {
                let mut ticks = 0u32;
                while !ticker_stop.load(Ordering::Relaxed) {
                    std::thread::sleep(tick);
                    ticker_engine.increment_epoch();
                    ticks = ticks.wrapping_add(1);
                    if ticks.is_multiple_of(SWEEP_EVERY_TICKS) {
                        sweep_warm(&swept_pools, warm_idle);
                    }
                }
            })
            .map_err(|e| Error::internal(format!("cannot start the epoch thread: {e}")))?;
        let warm_cap = (slots / 4) as usize;
        let in_flight = (slots as usize).saturating_sub(warm_cap).max(1);
        let tenant_warm = (config.tenant_warm_instances as usize).min(warm_cap);
        let instances = FairGate::new(in_flight, config.tenant_instances as usize);
        let cpu = FairGate::new(config.cpu_turns.max(1), config.cpu_turns.max(1));
        let compiles = Arc::new(CompileSlots {
            free: Mutex::new(config.compile_slots.max(1)),
            freed: Condvar::new(),
        });
        Ok(PluginRuntime {
            inner: Arc::new(RuntimeInner {
                engine,
                linker,
                config,
                stats: RuntimeStats::default(),
                instances,
                cpu,
                warm: Arc::default(),
                warm_pools,
                warm_cap,
                tenant_warm,
                compiles,
                _ticker: EpochTicker {
                    stop,
                    thread: Some(thread),
                },
            }),
        })
    }

    pub fn stats(&self) -> &RuntimeStats {
        &self.inner.stats
    }

    pub fn config(&self) -> &RuntimeConfig {
        &self.inner.config
    }

    /// Instance slots in flight: (in use, the most one tenant holds).
    pub fn instances_in_use(&self) -> (usize, usize) {
        self.inner.instances.usage()
    }

    /// Warm instances held: (in all, by the tenant holding most).
    pub fn warm_instances(&self) -> (usize, usize) {
        let ledger = lock_ledger(&self.inner.warm);
        (
            ledger.total,
            ledger.per_key.values().copied().max().unwrap_or(0),
        )
    }

    /// Compiles (or fetches from the compile cache) a component, detects its role and prepares
    /// its instantiation. Blocking: call from a blocking thread or at start-up.
    pub fn load(&self, name: &str, bytes: &[u8]) -> Result<Plugin, Error> {
        let limit = self.inner.config.max_component_bytes;
        if bytes.len() > limit {
            return Err(Error::invalid(format!(
                "plugin '{name}' is {} bytes; the largest component accepted is {limit} bytes",
                bytes.len()
            )));
        }
        let digest = hex(&Sha256::digest(bytes));
        let component = self
            .compile(&digest, bytes)
            .map_err(|e| e.context(format!("plugin '{name}'")))?;
        let role = detect_role(&self.inner.engine, &component)
            .map_err(|e| e.context(format!("plugin '{name}'")))?;
        let image = component.image_range();
        let compiled_bytes = (image.end as usize).saturating_sub(image.start as usize) as u64;
        let link_error = |e: wasmtime::Error| {
            Error::invalid(format!(
                "plugin '{name}' imports something Weft does not provide: {e:#}"
            ))
        };
        let instance_pre = self
            .inner
            .linker
            .instantiate_pre(&component)
            .map_err(link_error)?;
        let export_error = |e: wasmtime::Error| {
            Error::invalid(format!(
                "plugin '{name}' exports a malformed {}: {e:#}",
                role.export()
            ))
        };
        let pre = match role {
            Role::Transformer => {
                RolePre::Transformer(TransformerPre::new(instance_pre).map_err(export_error)?)
            }
            Role::Combiner => {
                RolePre::Combiner(CombinerPre::new(instance_pre).map_err(export_error)?)
            }
            Role::Router => RolePre::Router(RouterPre::new(instance_pre).map_err(export_error)?),
        };
        let warm = Arc::new(WarmPool {
            instances: Mutex::default(),
            ledger: Arc::clone(&self.inner.warm),
        });
        if let Ok(mut pools) = self.inner.warm_pools.lock() {
            pools.retain(|pool| pool.strong_count() > 0);
            pools.push(Arc::downgrade(&warm));
        }
        Ok(Plugin {
            name: Arc::from(name),
            digest,
            role,
            compiled_bytes,
            pre: Arc::new(pre),
            runtime: self.clone(),
            stats: Arc::default(),
            warm,
            log_rate: Arc::default(),
        })
    }

    fn compile(&self, digest: &str, bytes: &[u8]) -> Result<Component, Error> {
        let engine = &self.inner.engine;
        let cached = self.inner.config.cache_dir.as_ref().map(|dir| {
            let mut hasher = std::collections::hash_map::DefaultHasher::new();
            std::hash::Hash::hash(&engine.precompile_compatibility_hash(), &mut hasher);
            let engine_key = std::hash::Hasher::finish(&hasher);
            dir.join(format!("{digest}-{engine_key:016x}.cwasm"))
        });
        if let Some(path) = cached.as_deref().filter(|p| p.is_file()) {
            match deserialize_cached(engine, path) {
                Ok(component) => {
                    self.inner.stats.cache_hits.fetch_add(1, Ordering::Relaxed);
                    return Ok(component);
                }
                Err(error) => {
                    tracing::warn!(path = %path.display(), %error, "ignoring unreadable compile cache entry")
                }
            }
        }
        self.inner
            .stats
            .cache_misses
            .fetch_add(1, Ordering::Relaxed);
        let component = self.compile_bounded(bytes)?;
        if let Some(Err((path, error))) =
            cached.map(|path| write_cache(&component, &path).map_err(|e| (path, e)))
        {
            tracing::warn!(path = %path.display(), %error, "cannot write compile cache entry");
        }
        Ok(component)
    }
}

impl PluginRuntime {
    /// Compiles on a slot of the compile pool, on its own thread, within the compile-time
    /// limit. A compile that runs over is refused; its thread keeps the slot until it ends, so
    /// abandoned compiles still count against the pool.
    fn compile_bounded(&self, bytes: &[u8]) -> Result<Component, Error> {
        let config = &self.inner.config;
        let Some(slot) = self.inner.compiles.acquire(config.compile_timeout) else {
            return Err(Error::unavailable(format!(
                "every compile slot ({}) stayed busy for {:?}; try again later",
                config.compile_slots, config.compile_timeout
            )));
        };
        let engine = self.inner.engine.clone();
        let bytes = bytes.to_vec();
        let (done, result) = std::sync::mpsc::sync_channel(1);
        std::thread::Builder::new()
            .name("weft-compile".into())
            .spawn(move || {
                let compiled = Component::new(&engine, &bytes);
                let _ = done.send(compiled);
                drop(bytes);
                release_freed_heap();
                drop(slot);
            })
            .map_err(|e| Error::internal(format!("cannot start a compile thread: {e}")))?;
        match result.recv_timeout(config.compile_timeout) {
            Ok(compiled) => compiled
                .map_err(|e| Error::invalid(format!("not a valid WebAssembly component: {e:#}"))),
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => Err(Error::invalid(format!(
                "the component did not compile within the compile-time limit of {:?}",
                config.compile_timeout
            ))),
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                Err(Error::internal("the compile thread ended without a result"))
            }
        }
    }
}

/// Gives the heap the compile freed back to the operating system. Cranelift's working memory
/// for a large component (a componentize-py one: ~400 MB for 19 MB of wasm) is freed when the
/// compile ends, but glibc keeps freed heap pages mapped, so without this each large push left
/// the process that much bigger.
#[allow(unsafe_code)]
fn release_freed_heap() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only returns free heap memory to the kernel; it touches no live
    // allocation and is thread-safe.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Drops warm instances idle for longer than `idle`, in every plugin's pool.
fn sweep_warm(pools: &Mutex<Vec<Weak<WarmPool>>>, idle: Duration) {
    let live: Vec<Arc<WarmPool>> = match pools.lock() {
        Ok(mut pools) => {
            pools.retain(|pool| pool.strong_count() > 0);
            pools.iter().filter_map(Weak::upgrade).collect()
        }
        Err(_) => return,
    };
    let now = Instant::now();
    for pool in live {
        pool.expire(now, idle);
    }
}

/// Loads a component this process compiled and wrote into its own cache directory.
#[allow(unsafe_code)]
fn deserialize_cached(engine: &Engine, path: &Path) -> Result<Component, Error> {
    // SAFETY: the file was produced by `Component::serialize` of an engine with the same
    // compatibility hash (it is in the file name) and written by this process into a directory
    // only Weft writes, via a temporary file and an atomic rename, so it is never partial.
    unsafe { Component::deserialize_file(engine, path) }
        .map_err(|e| Error::internal(format!("{e:#}")))
}

fn write_cache(component: &Component, path: &Path) -> Result<(), Error> {
    let bytes = component
        .serialize()
        .map_err(|e| Error::internal(format!("{e:#}")))?;
    let io = |e: std::io::Error| Error::internal(e.to_string());
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(io)?;
    }
    // A name no other writer (thread or process) uses, written in full and synced before the
    // rename, so a reader sees either no entry or a whole one.
    static WRITES: AtomicU64 = AtomicU64::new(0);
    let unique = format!(
        "tmp-{}-{}",
        std::process::id(),
        WRITES.fetch_add(1, Ordering::Relaxed)
    );
    let temporary = path.with_extension(unique);
    let written = (|| {
        use std::io::Write;
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&temporary)?;
        file.write_all(&bytes)?;
        file.sync_all()?;
        std::fs::rename(&temporary, path)?;
        if let Some(dir) = path.parent() {
            std::fs::File::open(dir)?.sync_all()?;
        }
        Ok(())
    })();
    if written.is_err() {
        let _ = std::fs::remove_file(&temporary);
    }
    written.map_err(io)
}

fn detect_role(engine: &Engine, component: &Component) -> Result<Role, Error> {
    let exports: Vec<String> = component
        .component_type()
        .exports(engine)
        .filter(|(_, item)| matches!(item.ty, ComponentItem::ComponentFunc(_)))
        .map(|(name, _)| name.to_string())
        .collect();
    let roles: Vec<Role> = [Role::Transformer, Role::Combiner, Role::Router]
        .into_iter()
        .filter(|role| exports.iter().any(|e| e == role.export()))
        .collect();
    match roles.as_slice() {
        [role] => Ok(*role),
        [] => Err(Error::invalid(format!(
            "exports none of transform, combine, route (it exports {exports:?}); build it against \
             a weft:plugin world"
        ))),
        _ => Err(Error::invalid(
            "exports more than one of transform, combine, route",
        )),
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

enum RolePre {
    Transformer(TransformerPre<PluginState>),
    Combiner(CombinerPre<PluginState>),
    Router(RouterPre<PluginState>),
}

/// At each epoch tick: yield to the executor, and give the CPU turn up when another call waits
/// for one (see [`CpuTurn`]).
///
/// A call gives its turn up only once it has held it across a whole tick: the tick it first
/// sees may fall just after it started. Without that grace a short call (a Python plugin's
/// fraction of a millisecond) was often cut off, waited in the queue holding its instance, and
/// the calls behind it instantiated afresh instead of reusing warm instances. A call still
/// holds a turn for at most two ticks while others wait.
fn yield_cpu_turn(
    mut context: StoreContextMut<'_, PluginState>,
) -> wasmtime::Result<UpdateDeadline> {
    let state = context.data_mut();
    let Some(turn) = state.cpu.clone() else {
        return Ok(UpdateDeadline::Yield(1));
    };
    if state.ticks_on_turn >= 1 && turn.contended() {
        state.ticks_on_turn = 0;
        return Ok(UpdateDeadline::YieldCustom(1, Box::pin(turn.requeue())));
    }
    state.ticks_on_turn = state.ticks_on_turn.saturating_add(1);
    Ok(UpdateDeadline::Yield(1))
}

/// Pool slots whose memory is decommitted together (see `PluginRuntime::new`).
const DECOMMIT_BATCH: usize = 16;

/// What a call may use besides its inputs.
#[derive(Clone, Default)]
pub struct CallContext {
    /// Models the plugin may `load-by-name`, by the name it uses (resolved by the caller in the
    /// tenant's namespace).
    pub grants: Arc<HashMap<String, Arc<dyn Model>>>,
    /// Node parameters from the graph.
    pub params: Params,
    /// Limits for this call; `None` uses the runtime's defaults.
    pub limits: Option<CallLimits>,
    /// A host directory the plugin may read (never write) as `/assets`, when the graph grants
    /// one. Without it the plugin sees no filesystem at all.
    pub assets: Option<PathBuf>,
    /// The request the call runs for. Its tenant keys the instance pool's fair share and the
    /// warm instances (one reused only for a call of the same tenant, so one plugin shared by
    /// several tenants never carries one tenant's memory into another's call); its deadline
    /// shortens the call's; the fuel the call consumes (when the runtime meters fuel) and the
    /// models it calls through `wasi:nn` are charged to it.
    pub request: RequestContext,
}

/// A loaded plugin, ready to be called concurrently.
#[derive(Clone)]
pub struct Plugin {
    name: Arc<str>,
    digest: String,
    role: Role,
    /// Bytes of its compiled image (machine code and metadata), what keeping it loaded costs
    /// besides its warm instances.
    compiled_bytes: u64,
    pre: Arc<RolePre>,
    runtime: PluginRuntime,
    stats: Arc<PluginStats>,
    warm: Arc<WarmPool>,
    /// The log-line rate limit shared by this plugin's calls.
    log_rate: Arc<LogRate>,
}

/// A plugin's warm instances; gives their count back to the runtime's ledger when they go.
struct WarmPool {
    instances: Mutex<Vec<Warm>>,
    ledger: Arc<Mutex<WarmLedger>>,
}

impl WarmPool {
    /// Drops the instances unused since before `now - idle`.
    fn expire(&self, now: Instant, idle: Duration) {
        let expired: Vec<Warm> = {
            let Ok(mut warm) = self.instances.lock() else {
                return;
            };
            let (keep, expired) = std::mem::take(&mut *warm)
                .into_iter()
                .partition(|w| now.saturating_duration_since(w.idle_since) < idle);
            *warm = keep;
            expired
        };
        let mut ledger = lock_ledger(&self.ledger);
        for instance in &expired {
            ledger.remove(&instance.isolation);
        }
    }
}

impl Drop for WarmPool {
    fn drop(&mut self) {
        let Ok(warm) = self.instances.get_mut() else {
            return;
        };
        let mut ledger = lock_ledger(&self.ledger);
        for instance in warm.iter() {
            ledger.remove(&instance.isolation);
        }
    }
}

/// A live instance kept for the plugin's next call.
struct Warm {
    store: Store<PluginState>,
    instance: RoleInstance,
    calls: u32,
    /// The isolation key of the calls this instance served (the tenant of [`CallContext::request`]).
    isolation: Option<Arc<str>>,
    /// When its last call ended.
    idle_since: Instant,
}

enum RoleInstance {
    Transformer(Transformer),
    Combiner(Combiner),
    Router(Router),
}

/// Calls one warm instance serves before it is replaced.
const MAX_CALLS_PER_INSTANCE: u32 = 1000;

/// Warm instances kept per plugin (about the calls that run at once).
const MAX_WARM_PER_PLUGIN: usize = 8;

impl std::fmt::Debug for Plugin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Plugin({}, {}, {})",
            self.name,
            self.role.as_str(),
            self.digest
        )
    }
}

/// What a successful call returned.
enum Returned {
    Tensors(Vec<NamedTensor>),
    Route(String),
}

/// The input a role's export takes.
enum Arguments {
    Tensors(Vec<NamedTensor>),
    Branches(Vec<(String, Vec<NamedTensor>)>),
}

impl Plugin {
    pub fn name(&self) -> &str {
        &self.name
    }

    /// sha256 of the component bytes, hex.
    pub fn digest(&self) -> &str {
        &self.digest
    }

    pub fn role(&self) -> Role {
        self.role
    }

    /// Bytes of its compiled image, what keeping it loaded costs besides warm instances.
    pub fn compiled_bytes(&self) -> u64 {
        self.compiled_bytes
    }

    /// The runtime it was compiled by (its default limits apply to its calls).
    pub fn runtime(&self) -> &PluginRuntime {
        &self.runtime
    }

    /// This plugin's call counters (shared by its clones).
    pub fn stats(&self) -> &Arc<PluginStats> {
        &self.stats
    }

    /// Creates a Store and instantiates the plugin from its pool slot, then drops it: the fixed
    /// cost every call pays before the export runs. For benchmarks.
    pub async fn instantiate_only(&self) -> Result<(), Error> {
        let inner = &self.runtime.inner;
        let limits = &inner.config.limits;
        let state = PluginState::new(
            Arc::clone(&self.name),
            Arc::default(),
            RequestContext::background(),
            limits.memory_bytes,
            limits.log_bytes,
        );
        let mut store = Store::new(&inner.engine, state);
        store.limiter(|state| &mut state.limiter);
        store.epoch_deadline_async_yield_and_update(1);
        if inner.config.meter_fuel {
            store
                .set_fuel(u64::MAX)
                .map_err(|e| Error::internal(e.to_string()))?;
        }
        let result = match &*self.pre {
            RolePre::Transformer(pre) => pre.instantiate_async(&mut store).await.map(drop),
            RolePre::Combiner(pre) => pre.instantiate_async(&mut store).await.map(drop),
            RolePre::Router(pre) => pre.instantiate_async(&mut store).await.map(drop),
        };
        result.map_err(|e| Error::internal(format!("{e:#}")))
    }

    pub async fn transform(
        &self,
        context: &CallContext,
        inputs: Vec<NamedTensor>,
    ) -> Result<Vec<NamedTensor>, PluginFailure> {
        self.expect_role(Role::Transformer)?;
        match self.call(context, Arguments::Tensors(inputs)).await? {
            Returned::Tensors(outputs) => Ok(outputs),
            Returned::Route(_) => Err(self.internal("returned a route from transform")),
        }
    }

    pub async fn combine(
        &self,
        context: &CallContext,
        branches: Vec<(String, Vec<NamedTensor>)>,
    ) -> Result<Vec<NamedTensor>, PluginFailure> {
        self.expect_role(Role::Combiner)?;
        match self.call(context, Arguments::Branches(branches)).await? {
            Returned::Tensors(outputs) => Ok(outputs),
            Returned::Route(_) => Err(self.internal("returned a route from combine")),
        }
    }

    pub async fn route(
        &self,
        context: &CallContext,
        inputs: Vec<NamedTensor>,
    ) -> Result<String, PluginFailure> {
        self.expect_role(Role::Router)?;
        match self.call(context, Arguments::Tensors(inputs)).await? {
            Returned::Route(branch) => Ok(branch),
            Returned::Tensors(_) => Err(self.internal("returned tensors from route")),
        }
    }

    fn internal(&self, message: &str) -> PluginFailure {
        PluginFailure {
            cause: FailureCause::Trap,
            error: Error::internal(format!("plugin '{}' {message}", self.name)),
        }
    }

    fn expect_role(&self, role: Role) -> Result<(), PluginFailure> {
        if self.role == role {
            return Ok(());
        }
        Err(PluginFailure {
            cause: FailureCause::Guest,
            error: Error::invalid(format!(
                "plugin '{}' is a {}, not a {}",
                self.name,
                self.role.as_str(),
                role.as_str()
            )),
        })
    }

    async fn call(
        &self,
        context: &CallContext,
        arguments: Arguments,
    ) -> Result<Returned, PluginFailure> {
        self.stats.calls.fetch_add(1, Ordering::Relaxed);
        let result = self.call_instance(context, arguments).await;
        if let Err(failure) = &result {
            let index = FailureCause::ALL
                .iter()
                .position(|c| *c == failure.cause)
                .unwrap_or(0);
            self.stats.failures[index].fetch_add(1, Ordering::Relaxed);
        }
        result
    }

    async fn call_instance(
        &self,
        context: &CallContext,
        arguments: Arguments,
    ) -> Result<Returned, PluginFailure> {
        let inner = &self.runtime.inner;
        let mut limits = context
            .limits
            .clone()
            .unwrap_or_else(|| inner.config.limits.clone());
        limits.memory_bytes = limits.memory_bytes.min(inner.config.max_memory_bytes);
        // The call's deadline, or what is left of the request's when that comes first.
        if let Some(left) = context.request.remaining() {
            limits.deadline = limits.deadline.min(left);
        }
        let deadline = tokio::time::Instant::now() + limits.deadline;
        let key = context.request.share_key();
        let failure = |cause: FailureCause, kind: ErrorKind, message: String| PluginFailure {
            cause,
            error: Error::new(kind, format!("plugin '{}': {message}", self.name)),
        };
        // A slot of the instance pool within the tenant's share, held until the instance is
        // dropped or kept warm (declared first, so it is released after the Store).
        let Ok(_slot) =
            tokio::time::timeout_at(deadline, inner.instances.acquire(key.clone())).await
        else {
            return Err(failure(
                FailureCause::Deadline,
                ErrorKind::DeadlineExceeded,
                format!(
                    "deadline of {:?} exceeded waiting for a plugin instance (this tenant has \
                     {} in flight, its share is {})",
                    limits.deadline,
                    inner.instances.held_by(&key),
                    inner.config.tenant_instances
                ),
            ));
        };
        let reusable = inner.config.reuse_instances && context.assets.is_none();
        let log = CallLog::new(limits.log_bytes, Arc::clone(&self.log_rate));
        // The CPU turn first, then a warm instance: a call that took an instance and then
        // queued for a turn would hold it idle while the calls behind it, finding none free,
        // instantiate afresh. For a componentize-py plugin (milliseconds and megabytes of page
        // faults per instance) that cut classify-graph throughput at c=64 about fourfold.
        let turn = CpuTurn::new(inner.cpu.clone(), key.clone());
        if tokio::time::timeout_at(deadline, turn.take())
            .await
            .is_err()
        {
            return Err(failure(
                FailureCause::Deadline,
                ErrorKind::DeadlineExceeded,
                format!(
                    "deadline of {:?} exceeded waiting for a CPU turn",
                    limits.deadline
                ),
            ));
        }
        let warm = reusable
            .then(|| self.take_warm(limits.memory_bytes, &key))
            .flatten();
        let (mut store, instance, calls) = match warm {
            Some(mut warm) => {
                warm.store.data_mut().begin_call(
                    Arc::clone(&context.grants),
                    context.request.clone(),
                    limits.memory_bytes,
                    log,
                );
                (warm.store, Some(warm.instance), warm.calls)
            }
            None => {
                let mut state = PluginState::new(
                    Arc::clone(&self.name),
                    Arc::clone(&context.grants),
                    context.request.clone(),
                    limits.memory_bytes,
                    limits.log_bytes,
                );
                state.log = log;
                if let Some(assets) = &context.assets {
                    state.grant_assets(assets).map_err(|error| PluginFailure {
                        cause: FailureCause::Guest,
                        error: error.context(format!("plugin '{}'", self.name)),
                    })?;
                }
                let mut store = Store::new(&inner.engine, state);
                store.limiter(|state| &mut state.limiter);
                store.epoch_deadline_callback(yield_cpu_turn);
                (store, None, 0)
            }
        };
        store.set_epoch_deadline(1);
        store.data_mut().cpu = Some(turn.clone());
        store.data_mut().ticks_on_turn = 0;
        if inner.config.meter_fuel {
            let fuel = limits.fuel.unwrap_or(u64::MAX);
            store
                .set_fuel(fuel)
                .map_err(|e| self.internal(&format!("cannot set fuel: {e}")))?;
        }
        let outcome = tokio::time::timeout_at(deadline, async {
            turn.take().await;
            self.invoke(&mut store, instance, arguments, &context.params)
                .await
        })
        .await;
        turn.release();
        store.data_mut().end_call();
        store.data_mut().flush_output();
        self.stats
            .peak_memory_bytes
            .fetch_max(store.data().limiter.peak as u64, Ordering::Relaxed);
        self.stats
            .peak_host_bytes
            .fetch_max(store.data().host.peak as u64, Ordering::Relaxed);
        if inner.config.meter_fuel
            && let Ok(left) = store.get_fuel()
        {
            let consumed = limits.fuel.unwrap_or(u64::MAX).saturating_sub(left);
            self.stats
                .fuel_consumed
                .fetch_add(consumed, Ordering::Relaxed);
            context.request.add_fuel(consumed);
        }
        match outcome {
            Err(_) => Err(failure(
                FailureCause::Deadline,
                ErrorKind::DeadlineExceeded,
                format!("deadline of {:?} exceeded", limits.deadline),
            )),
            Ok(Err(trap)) => Err(self.classify(&store, &limits, trap)),
            Ok(Ok((instance, Err(guest)))) => {
                if reusable {
                    self.keep_warm(store, instance, calls, key);
                }
                let (kind, message) = match guest {
                    GuestError::InvalidInput(m) => {
                        (ErrorKind::InvalidArgument, format!("invalid input: {m}"))
                    }
                    GuestError::Model(m) => {
                        (ErrorKind::Internal, format!("model call failed: {m}"))
                    }
                    GuestError::Other(m) => (ErrorKind::Internal, m),
                };
                Err(failure(FailureCause::Guest, kind, message))
            }
            Ok(Ok((instance, Ok(returned)))) => {
                if let Returned::Tensors(outputs) = &returned {
                    let bytes: usize = outputs.iter().map(|o| o.tensor.data().len()).sum();
                    if bytes > limits.max_output_bytes {
                        return Err(failure(
                            FailureCause::OutputTooLarge,
                            ErrorKind::Internal,
                            format!(
                                "output limit of {} bytes exceeded ({bytes} bytes returned)",
                                limits.max_output_bytes
                            ),
                        ));
                    }
                }
                if reusable {
                    self.keep_warm(store, instance, calls, key);
                }
                Ok(returned)
            }
        }
    }

    /// A warm instance that served the same isolation key and whose memory fits
    /// `memory_bytes`, if one is kept.
    fn take_warm(&self, memory_bytes: usize, isolation: &ShareKey) -> Option<Warm> {
        let mut warm = self.warm.instances.lock().ok()?;
        while let Some(index) = warm
            .iter()
            .rposition(|candidate| &candidate.isolation == isolation)
        {
            let candidate = warm.swap_remove(index);
            lock_ledger(&self.warm.ledger).remove(isolation);
            let fresh = candidate.idle_since.elapsed() < self.runtime.inner.config.warm_idle;
            if fresh && candidate.store.data().limiter.peak <= memory_bytes {
                return Some(candidate);
            }
            // Idle too long, or grown past this call's limit: let it go.
        }
        None
    }

    /// Keeps an instance whose call ended cleanly, unless it has served its share, wrote
    /// output (its capture buffers are per instance), or the warm caps (in all, for its tenant)
    /// are reached.
    fn keep_warm(
        &self,
        store: Store<PluginState>,
        instance: RoleInstance,
        calls: u32,
        isolation: ShareKey,
    ) {
        let inner = &self.runtime.inner;
        let calls = calls + 1;
        if calls >= MAX_CALLS_PER_INSTANCE || store.data().wrote_output() {
            return;
        }
        let Ok(mut warm) = self.warm.instances.lock() else {
            return;
        };
        let mut ledger = lock_ledger(&self.warm.ledger);
        if warm.len() >= MAX_WARM_PER_PLUGIN {
            // Full (perhaps of other tenants' instances): the oldest makes room.
            let oldest = warm.remove(0);
            ledger.remove(&oldest.isolation);
        }
        if ledger.total >= inner.warm_cap || ledger.held_by(&isolation) >= inner.tenant_warm {
            return;
        }
        ledger.add(&isolation);
        warm.push(Warm {
            store,
            instance,
            calls,
            isolation,
            idle_since: Instant::now(),
        });
    }

    fn classify(
        &self,
        store: &Store<PluginState>,
        limits: &CallLimits,
        trap: wasmtime::Error,
    ) -> PluginFailure {
        let state = store.data();
        let (cause, message) = if let Some(message) = &state.host.exceeded {
            (FailureCause::HostMemory, message.clone())
        } else if let Some(asked) = state.limiter.refused {
            (
                FailureCause::Memory,
                format!(
                    "memory limit of {} bytes exceeded (asked for {asked})",
                    limits.memory_bytes
                ),
            )
        } else if matches!(trap.downcast_ref::<Trap>(), Some(Trap::OutOfFuel)) {
            (
                FailureCause::Fuel,
                format!("fuel limit of {} exhausted", limits.fuel.unwrap_or(0)),
            )
        } else {
            let stderr = state.stderr_tail();
            let detail = if stderr.is_empty() {
                String::new()
            } else {
                format!("; stderr: {stderr}")
            };
            let reason = trap.root_cause().to_string();
            (FailureCause::Trap, format!("trapped: {reason}{detail}"))
        };
        PluginFailure {
            cause,
            error: Error::new(
                ErrorKind::Internal,
                format!("plugin '{}': {message}", self.name),
            )
            .trapped(),
        }
    }

    /// Instantiates (unless a warm instance is given), moves the arguments into the Store's
    /// table, calls the export, and takes the returned tensors back out of the table.
    async fn invoke(
        &self,
        store: &mut Store<PluginState>,
        instance: Option<RoleInstance>,
        arguments: Arguments,
        params: &Params,
    ) -> wasmtime::Result<(RoleInstance, Result<Returned, GuestError>)> {
        let instance = match instance {
            Some(instance) => instance,
            None => {
                self.runtime
                    .inner
                    .stats
                    .instantiations
                    .fetch_add(1, Ordering::Relaxed);
                match &*self.pre {
                    RolePre::Transformer(pre) => {
                        RoleInstance::Transformer(pre.instantiate_async(&mut *store).await?)
                    }
                    RolePre::Combiner(pre) => {
                        RoleInstance::Combiner(pre.instantiate_async(&mut *store).await?)
                    }
                    RolePre::Router(pre) => {
                        RoleInstance::Router(pre.instantiate_async(&mut *store).await?)
                    }
                }
            }
        };
        let result = match (&instance, arguments) {
            (RoleInstance::Transformer(transformer), Arguments::Tensors(inputs)) => {
                let inputs = push_tensors(store, inputs)?;
                match transformer
                    .call_transform(&mut *store, &inputs, params)
                    .await?
                {
                    Ok(outputs) => Ok(Returned::Tensors(take_tensors(store, outputs)?)),
                    Err(error) => Err(error),
                }
            }
            (RoleInstance::Combiner(combiner), Arguments::Branches(branches)) => {
                let mut wit_branches = Vec::with_capacity(branches.len());
                for (name, outputs) in branches {
                    wit_branches.push(Branch {
                        name,
                        outputs: push_tensors(store, outputs)?,
                    });
                }
                match combiner
                    .call_combine(&mut *store, &wit_branches, params)
                    .await?
                {
                    Ok(outputs) => Ok(Returned::Tensors(take_tensors(store, outputs)?)),
                    Err(error) => Err(error),
                }
            }
            (RoleInstance::Router(router), Arguments::Tensors(inputs)) => {
                let inputs = push_tensors(store, inputs)?;
                router
                    .call_route(&mut *store, &inputs, params)
                    .await?
                    .map(Returned::Route)
            }
            _ => {
                return Err(wasmtime::Error::msg(
                    "arguments do not match the plugin's role",
                ));
            }
        };
        Ok((instance, result))
    }
}

fn push_tensors(
    store: &mut Store<PluginState>,
    tensors: Vec<NamedTensor>,
) -> wasmtime::Result<Vec<WitNamedTensor>> {
    tensors
        .into_iter()
        .map(|named| {
            // Inputs are charged nothing (the request that brought them was admitted), but are
            // owned by the call: deleted at its end if the plugin keeps them.
            let handle: Resource<HostTensor> = store.data_mut().push_owned(
                HostTensor(named.tensor),
                Owned::Tensor,
                0,
                "an input tensor",
            )?;
            Ok(WitNamedTensor {
                name: named.name,
                tensor: handle,
            })
        })
        .collect()
}

fn take_tensors(
    store: &mut Store<PluginState>,
    tensors: Vec<WitNamedTensor>,
) -> wasmtime::Result<Vec<NamedTensor>> {
    tensors
        .into_iter()
        .map(|named| {
            let tensor = store.data_mut().delete_owned(named.tensor)?;
            Ok(NamedTensor::new(named.name, tensor.0))
        })
        .collect()
}
