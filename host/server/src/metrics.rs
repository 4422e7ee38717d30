//! Prometheus metrics: `/metrics` in the text format, named `weft_<noun>_<unit>` with bounded
//! labels (tenant, model or graph, version, status, node, plugin, cause).
//!
//! Request counts and latencies are recorded as requests finish; batch sizes, queue waits and
//! compute times by the batcher's observer and the metered model wrapper; per-node durations by
//! the graph observer. Counters the runtime keeps itself (plugin calls, failures by cause, fuel,
//! peak memory, instantiations, compile-cache lookups) and process RSS are read at scrape time.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use prometheus::core::{
    AtomicU64 as PromAtomicU64, Collector, GenericCounter, MetricVec, MetricVecBuilder,
};
use prometheus::{
    Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};
use weft_core::Spent;
use weft_core::{BoxFuture, Model, ModelMetadata, NamedTensor, Result};
use weft_engine::BatchObserver;
use weft_engine::graph::GraphObserver;
use weft_runtime::{FailureCause, Plugin, PluginRuntime};

/// Latency buckets from 50 µs to 10 s: in-process hops are microseconds, requests milliseconds.
const SECONDS_BUCKETS: &[f64] = &[
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
    2.5, 10.0,
];
const BATCH_BUCKETS: &[f64] = &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0];

/// Every metric the server exports.
pub struct Metrics {
    registry: Registry,
    requests: IntCounterVec,
    request_duration: HistogramVec,
    queue_duration: HistogramVec,
    compute_duration: HistogramVec,
    node_duration: HistogramVec,
    batch_size: HistogramVec,
    queue_depth: IntGaugeVec,
    batch_retries: IntCounterVec,
    queue_rejected: IntCounterVec,
    plugin_duration: HistogramVec,
    plugin_calls: IntCounterVec,
    plugin_traps: IntCounterVec,
    plugin_errors: IntCounterVec,
    plugin_fuel: IntCounterVec,
    plugin_memory_peak: IntGaugeVec,
    plugin_instantiations: IntCounter,
    compile_cache: IntCounterVec,
    uploads: IntCounterVec,
    resident_memory: IntGauge,
    worker_restarts: IntCounterVec,
    /// Batch sizes and compute times per GPU (`gpu_uuid`).
    gpu_batch_size: HistogramVec,
    gpu_compute_duration: HistogramVec,
    /// Device memory each GPU model's sessions took at load.
    model_gpu_memory: IntGaugeVec,
    /// Tenant models loaded on demand (`--model-memory-budget`).
    pub models_on_demand: Arc<OnDemandMetrics>,
    /// Tenant plugins compiled on demand (`--plugin-cache-budget`).
    pub plugins_on_demand: Arc<OnDemandMetrics>,
}

/// The series of one on-demand budget: loads, their duration, evictions, resident bytes.
pub struct OnDemandMetrics {
    loads: IntCounterVec,
    load_duration: HistogramVec,
    evictions: IntCounterVec,
    resident_bytes: IntGaugeVec,
}

impl OnDemandMetrics {
    fn models(r: &Registry) -> Self {
        OnDemandMetrics {
            loads: counter_vec(
                r,
                "weft_model_loads_total",
                "Loads of tenant models on demand (a cold start: the first request after \
                 start-up, a push or an unload), by result (ok, failed).",
                &["result"],
            ),
            load_duration: histogram_vec(
                r,
                "weft_model_load_duration_seconds",
                "Time a model loaded on demand took to load: what its first request waited.",
                &["result"],
                LOAD_BUCKETS,
            ),
            evictions: counter_vec(
                r,
                "weft_model_evictions_total",
                "Tenant models unloaded: least recently used ones to make room under \
                 --model-memory-budget, or by POST /v2/repository/models/{m}/unload.",
                &[],
            ),
            resident_bytes: gauge_vec(
                r,
                "weft_model_resident_bytes",
                "Bytes of tenant models loaded (file size times instances), and the budget \
                 (--model-memory-budget; absent when unbounded).",
                &["kind"],
            ),
        }
    }

    fn plugins(r: &Registry) -> Self {
        OnDemandMetrics {
            loads: counter_vec(
                r,
                "weft_plugin_loads_total",
                "Compiles (or compile-cache reads) of tenant plugins on demand (a cold start: \
                 the first call after start-up or an eviction), by result (ok, failed).",
                &["result"],
            ),
            load_duration: histogram_vec(
                r,
                "weft_plugin_load_duration_seconds",
                "Time a plugin loaded on demand took to compile: what its first call waited.",
                &["result"],
                LOAD_BUCKETS,
            ),
            evictions: counter_vec(
                r,
                "weft_plugin_evictions_total",
                "Compiled tenant plugins dropped, least recently used first, to make room \
                 under --plugin-cache-budget.",
                &[],
            ),
            resident_bytes: gauge_vec(
                r,
                "weft_plugin_cache_bytes",
                "Bytes of compiled tenant plugins loaded (their images), and the budget \
                 (--plugin-cache-budget; absent when unbounded).",
                &["kind"],
            ),
        }
    }

    /// Declares the budget (`u64::MAX`: unbounded, not exported) and the series that exist
    /// before the first load.
    pub fn declare_budget(&self, budget: u64) {
        self.resident_bytes.with_label_values(&["resident"]).set(0);
        if budget != u64::MAX {
            self.resident_bytes
                .with_label_values(&["budget"])
                .set(i64::try_from(budget).unwrap_or(i64::MAX));
        }
        for result in ["ok", "failed"] {
            self.loads.with_label_values(&[result]);
        }
        self.evictions.with_label_values::<&str>(&[]);
    }
}

/// What models and plugins loaded on demand report (see `weft_engine::lazy`).
impl weft_engine::lazy::ResidencyObserver for OnDemandMetrics {
    fn loaded(&self, elapsed: std::time::Duration, ok: bool) {
        let result = if ok { "ok" } else { "failed" };
        self.loads.with_label_values(&[result]).inc();
        self.load_duration
            .with_label_values(&[result])
            .observe(elapsed.as_secs_f64());
    }

    fn evicted(&self) {
        self.evictions.with_label_values::<&str>(&[]).inc();
    }

    fn resident(&self, bytes: u64) {
        self.resident_bytes
            .with_label_values(&["resident"])
            .set(i64::try_from(bytes).unwrap_or(i64::MAX));
    }
}

/// Seconds a model load may take (worker start and sessions, up to the load timeout).
const LOAD_BUCKETS: &[f64] = &[
    0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];

fn counter_vec(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    let metric = IntCounterVec::new(Opts::new(name, help), labels)
        .unwrap_or_else(|error| unreachable!("metric {name} is well-formed: {error}"));
    register(registry, Box::new(metric.clone()));
    metric
}

fn histogram_vec(
    registry: &Registry,
    name: &str,
    help: &str,
    labels: &[&str],
    buckets: &[f64],
) -> HistogramVec {
    let metric = HistogramVec::new(
        HistogramOpts::new(name, help).buckets(buckets.to_vec()),
        labels,
    )
    .unwrap_or_else(|error| unreachable!("metric {name} is well-formed: {error}"));
    register(registry, Box::new(metric.clone()));
    metric
}

fn gauge_vec(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
    let metric = IntGaugeVec::new(Opts::new(name, help), labels)
        .unwrap_or_else(|error| unreachable!("metric {name} is well-formed: {error}"));
    register(registry, Box::new(metric.clone()));
    metric
}

fn register(registry: &Registry, metric: Box<dyn prometheus::core::Collector>) {
    if let Err(error) = registry.register(metric) {
        tracing::error!(%error, "cannot register a metric");
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let r = Registry::new();
        let plugin_instantiations = IntCounter::new(
            "weft_plugin_instantiations_total",
            "Plugin instances created (a warm instance serves many calls).",
        )
        .unwrap_or_else(|error| unreachable!("well-formed: {error}"));
        register(&r, Box::new(plugin_instantiations.clone()));
        let resident_memory = IntGauge::new(
            "weft_process_resident_memory_bytes",
            "Resident memory of the weft process.",
        )
        .unwrap_or_else(|error| unreachable!("well-formed: {error}"));
        register(&r, Box::new(resident_memory.clone()));
        let metrics = Metrics {
            requests: counter_vec(
                &r,
                "weft_requests_total",
                "Inference requests by tenant, model or graph, version and HTTP status.",
                &["tenant", "model", "version", "status"],
            ),
            request_duration: histogram_vec(
                &r,
                "weft_request_duration_seconds",
                "Inference request latency inside the server, decoding to encoding.",
                &["tenant", "model"],
                SECONDS_BUCKETS,
            ),
            queue_duration: histogram_vec(
                &r,
                "weft_queue_duration_seconds",
                "Time a request waited in a model's batch queue.",
                &["model"],
                SECONDS_BUCKETS,
            ),
            compute_duration: histogram_vec(
                &r,
                "weft_compute_duration_seconds",
                "Backend compute time of one model execution (one batch).",
                &["model"],
                SECONDS_BUCKETS,
            ),
            node_duration: histogram_vec(
                &r,
                "weft_graph_node_duration_seconds",
                "Duration of one graph node.",
                &["graph", "node"],
                SECONDS_BUCKETS,
            ),
            batch_size: histogram_vec(
                &r,
                "weft_batch_size_rows",
                "Rows per backend execution of a batching model.",
                &["model"],
                BATCH_BUCKETS,
            ),
            queue_depth: gauge_vec(
                &r,
                "weft_queue_depth_requests",
                "Requests waiting in a model's batch queue.",
                &["model"],
            ),
            batch_retries: counter_vec(
                &r,
                "weft_batch_retries_total",
                "Requests run again alone because the merged batch they were part of failed.",
                &["model"],
            ),
            queue_rejected: counter_vec(
                &r,
                "weft_queue_rejected_total",
                "Requests refused because a model's batch queue (or the tenant's share of it) \
                 was full.",
                &["model"],
            ),
            plugin_duration: histogram_vec(
                &r,
                "weft_plugin_call_duration_seconds",
                "Duration of one plugin call, instantiation included.",
                &["plugin"],
                SECONDS_BUCKETS,
            ),
            plugin_calls: counter_vec(&r, "weft_plugin_calls_total", "Plugin calls.", &["plugin"]),
            plugin_traps: counter_vec(
                &r,
                "weft_plugin_traps_total",
                "Plugin calls stopped by a limit or a trap, by cause (deadline, memory, fuel, \
                 output, trap).",
                &["plugin", "cause"],
            ),
            plugin_errors: counter_vec(
                &r,
                "weft_plugin_errors_total",
                "Plugin calls that returned an error of their own.",
                &["plugin"],
            ),
            plugin_fuel: counter_vec(
                &r,
                "weft_plugin_fuel_consumed_total",
                "Fuel plugins consumed (when fuel metering is on).",
                &["plugin"],
            ),
            plugin_memory_peak: gauge_vec(
                &r,
                "weft_plugin_memory_peak_bytes",
                "Largest linear memory any call of the plugin grew to.",
                &["plugin"],
            ),
            plugin_instantiations,
            worker_restarts: counter_vec(
                &r,
                "weft_model_worker_restarts_total",
                "Model worker processes that ended and were restarted, by tenant and cause \
                 (killed, crashed, exited, hang, load_timeout, protocol).",
                &["tenant", "cause"],
            ),
            compile_cache: counter_vec(
                &r,
                "weft_compile_cache_lookups_total",
                "Plugin compile-cache lookups by result (hit, miss).",
                &["result"],
            ),
            uploads: counter_vec(
                &r,
                "weft_uploads_total",
                "Uploads of plugins, models and graphs by kind and outcome.",
                &["kind", "status"],
            ),
            resident_memory,
            gpu_batch_size: histogram_vec(
                &r,
                "weft_gpu_batch_size",
                "Rows per backend call of the models on each GPU.",
                &["gpu_uuid"],
                BATCH_BUCKETS,
            ),
            gpu_compute_duration: histogram_vec(
                &r,
                "weft_gpu_compute_duration_seconds",
                "Backend call time of the models on each GPU.",
                &["gpu_uuid"],
                SECONDS_BUCKETS,
            ),
            model_gpu_memory: gauge_vec(
                &r,
                "weft_model_gpu_memory_bytes",
                "Device memory a GPU model's sessions took when they loaded.",
                &["model", "gpu_uuid"],
            ),
            models_on_demand: Arc::new(OnDemandMetrics::models(&r)),
            plugins_on_demand: Arc::new(OnDemandMetrics::plugins(&r)),
            registry: r,
        };
        // The repository's worker series exist from the start (at zero), so the family is
        // exported and alerts on it evaluate before any worker has restarted.
        weft_backends::worker::WorkerObserver::started(&metrics, crate::loader::REPOSITORY_WORKER);
        metrics
    }

    /// Records one finished inference request.
    pub fn request(
        &self,
        tenant: &str,
        model: &str,
        version: &str,
        status: u16,
        duration: Duration,
    ) {
        self.requests
            .with_label_values(&[tenant, model, version, &status.to_string()])
            .inc();
        self.request_duration
            .with_label_values(&[tenant, model])
            .observe(duration.as_secs_f64());
    }

    /// Creates the request series of every served model and graph version (at zero), so
    /// dashboards and alerts see them before the first request.
    pub fn declare_models(&self, tenant: &str, registry: &weft_engine::ModelRegistry) {
        for entry in registry.index() {
            let version = entry.version.map(|v| v.to_string()).unwrap_or_default();
            let _ = self
                .requests
                .with_label_values(&[tenant, &entry.name, &version, "200"]);
            let _ = self
                .request_duration
                .with_label_values(&[tenant, &entry.name]);
        }
    }

    /// Records one control-plane upload (plugin, model or graph) and its HTTP status.
    pub fn upload(&self, kind: &str, status: u16) {
        let status = if status < 300 {
            "ok".to_string()
        } else {
            status.to_string()
        };
        self.uploads.with_label_values(&[kind, &status]).inc();
    }

    pub fn plugin_call(&self, plugin: &str, duration: Duration) {
        self.plugin_duration
            .with_label_values(&[plugin])
            .observe(duration.as_secs_f64());
    }

    /// An observer for one batching model's batcher.
    pub fn batch_observer(
        self: &Arc<Self>,
        model: &str,
        gpu_uuid: Option<&str>,
    ) -> Arc<dyn BatchObserver> {
        Arc::new(ModelMetrics {
            batch_size: self.batch_size.with_label_values(&[model]),
            compute: self.compute_duration.with_label_values(&[model]),
            device: gpu_uuid.map(|uuid| self.device_histograms(uuid)),
            queue: self.queue_duration.with_label_values(&[model]),
            depth: self.queue_depth.with_label_values(&[model]),
            retries: self.batch_retries.with_label_values(&[model]),
            rejected: self.queue_rejected.with_label_values(&[model]),
        })
    }

    /// Wraps a model that does not batch so its compute time is measured and accounted.
    pub fn metered(
        &self,
        model: &str,
        inner: Arc<dyn Model>,
        gpu_uuid: Option<&str>,
    ) -> Arc<dyn Model> {
        Arc::new(MeteredModel {
            inner,
            compute: self.compute_duration.with_label_values(&[model]),
            device: gpu_uuid.map(|uuid| self.device_histograms(uuid)),
        })
    }

    /// Records the device memory a GPU model's sessions took at load.
    pub fn model_gpu_memory(&self, model: &str, gpu_uuid: &str, bytes: u64) {
        self.model_gpu_memory
            .with_label_values(&[model, gpu_uuid])
            .set(i64::try_from(bytes).unwrap_or(i64::MAX));
    }

    /// The batch size and compute histograms of one GPU (every model on it together).
    fn device_histograms(&self, gpu_uuid: &str) -> (Histogram, Histogram) {
        (
            self.gpu_batch_size.with_label_values(&[gpu_uuid]),
            self.gpu_compute_duration.with_label_values(&[gpu_uuid]),
        )
    }

    pub fn graph_observer(self: &Arc<Self>) -> Arc<dyn GraphObserver> {
        Arc::clone(self) as Arc<dyn GraphObserver>
    }

    /// Like [`Metrics::graph_observer`] for a tenant's graph: its `graph` label is
    /// `tenant/graph`, so it never shares series with the platform's graph of the same name.
    pub fn tenant_graph_observer(self: &Arc<Self>, tenant: &str) -> Arc<dyn GraphObserver> {
        Arc::new(TenantGraphObserver {
            metrics: Arc::clone(self),
            tenant: tenant.to_string(),
        })
    }

    /// Renders every metric, after refreshing those read from the runtime, the plugins (the
    /// repository's and the tenants' live ones, labelled `tenant/name@version`) and the process,
    /// and dropping the series of what no longer exists (see [`Live`]).
    pub fn render(&self, sources: &ScrapeSources, live: &Live) -> String {
        self.refresh(sources, &live.plugins);
        self.prune(live);
        let mut text = String::new();
        if let Err(error) = TextEncoder::new().encode_utf8(&self.registry.gather(), &mut text) {
            tracing::error!(%error, "cannot encode metrics");
        }
        text
    }

    /// Drops the series of deleted tenants and of their deleted plugin versions, models and
    /// graphs, so labels stay bounded by what exists. Repository (unprefixed) names stay.
    fn prune(&self, live: &Live) {
        let plugin_live = |labels: &HashMap<&str, &str>| {
            let plugin = labels.get("plugin").copied().unwrap_or_default();
            !plugin.contains('/') || live.plugins.iter().any(|(label, _)| label == plugin)
        };
        prune(&self.plugin_duration, plugin_live);
        prune(&self.plugin_calls, plugin_live);
        prune(&self.plugin_errors, plugin_live);
        prune(&self.plugin_traps, plugin_live);
        prune(&self.plugin_fuel, plugin_live);
        prune(&self.plugin_memory_peak, plugin_live);
        let owned_live = |key: &'static str| {
            move |labels: &HashMap<&str, &str>| {
                let value = labels.get(key).copied().unwrap_or_default();
                value
                    .split_once('/')
                    .is_none_or(|(tenant, name)| live.sees(tenant, name))
            }
        };
        prune(&self.batch_size, owned_live("model"));
        prune(&self.compute_duration, owned_live("model"));
        prune(&self.queue_duration, owned_live("model"));
        prune(&self.queue_depth, owned_live("model"));
        prune(&self.batch_retries, owned_live("model"));
        prune(&self.queue_rejected, owned_live("model"));
        prune(&self.node_duration, owned_live("graph"));
        // A deleted tenant's worker restarts go with it (the repository's worker stays).
        prune(&self.worker_restarts, |labels| {
            let tenant = labels.get("tenant").copied().unwrap_or_default();
            tenant == crate::loader::REPOSITORY_WORKER || live.tenants.contains_key(tenant)
        });
        let request_live = |labels: &HashMap<&str, &str>| {
            let tenant = labels.get("tenant").copied().unwrap_or_default();
            let model = labels.get("model").copied().unwrap_or_default();
            tenant.is_empty() || model.is_empty() || live.sees(tenant, model)
        };
        prune(&self.requests, request_live);
        prune(&self.request_duration, request_live);
    }

    fn refresh(&self, sources: &ScrapeSources, tenant_plugins: &[(String, Plugin)]) {
        if let Some(runtime) = &sources.runtime {
            let stats = runtime.stats();
            catch_up(&self.plugin_instantiations, load(&stats.instantiations));
            catch_up(
                &self.compile_cache.with_label_values(&["hit"]),
                load(&stats.cache_hits),
            );
            catch_up(
                &self.compile_cache.with_label_values(&["miss"]),
                load(&stats.cache_misses),
            );
        }
        let plugins = sources
            .plugins
            .iter()
            .chain(tenant_plugins.iter().map(|(label, plugin)| (label, plugin)));
        for (name, plugin) in plugins {
            let stats = plugin.stats();
            let _ = self.plugin_duration.with_label_values(&[name]);
            catch_up(
                &self.plugin_calls.with_label_values(&[name]),
                load(&stats.calls),
            );
            for cause in FailureCause::ALL {
                let count = stats.failures_by(&cause);
                if cause == FailureCause::Guest {
                    catch_up(&self.plugin_errors.with_label_values(&[name]), count);
                } else {
                    catch_up(
                        &self.plugin_traps.with_label_values(&[name, cause.as_str()]),
                        count,
                    );
                }
            }
            catch_up(
                &self.plugin_fuel.with_label_values(&[name]),
                load(&stats.fuel_consumed),
            );
            self.plugin_memory_peak
                .with_label_values(&[name])
                .set(i64::try_from(load(&stats.peak_memory_bytes)).unwrap_or(i64::MAX));
        }
        if let Some(bytes) = resident_memory_bytes() {
            self.resident_memory.set(bytes);
        }
        // Families appear even before their first sample, so dashboards and alerts always
        // find every name.
        let _ = self.uploads.with_label_values(&["plugin", "ok"]);
    }
}

fn load(counter: &std::sync::atomic::AtomicU64) -> u64 {
    counter.load(std::sync::atomic::Ordering::Relaxed)
}

/// Moves a Prometheus counter up to a value kept elsewhere (counters only go up).
fn catch_up(counter: &GenericCounter<PromAtomicU64>, value: u64) {
    let current = counter.get();
    if value > current {
        counter.inc_by(value - current);
    }
}

/// Resident set size from /proc/self/statm (Linux), in bytes.
fn resident_memory_bytes() -> Option<i64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: i64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    Some(pages * 4096)
}

/// What exists at scrape time: series of anything else (a deleted tenant, a replaced plugin
/// version, a deleted model or graph) are dropped.
#[derive(Default)]
pub struct Live {
    /// The tenants' current plugins by metric label (`tenant/name@version`).
    pub plugins: Vec<(String, Plugin)>,
    /// Each tenant and every name it can call (its own models and graphs, shared names).
    pub tenants: HashMap<String, HashSet<String>>,
}

impl Live {
    /// Whether `tenant` exists and can call `name`.
    pub fn sees(&self, tenant: &str, name: &str) -> bool {
        self.tenants
            .get(tenant)
            .is_some_and(|names| names.contains(name))
    }
}

/// Removes the series of `family` whose labels `keep` refuses.
fn prune<B: MetricVecBuilder>(family: &MetricVec<B>, keep: impl Fn(&HashMap<&str, &str>) -> bool) {
    for gathered in family.collect() {
        for metric in gathered.get_metric() {
            let labels: HashMap<&str, &str> = metric
                .get_label()
                .iter()
                .map(|pair| (pair.name(), pair.value()))
                .collect();
            if !keep(&labels) {
                let _ = family.remove(&labels);
            }
        }
    }
}

/// The metrics as the tenancy layer reports to them.
pub struct TenancyMetrics(pub Arc<Metrics>);

impl weft_tenancy::backends::TenancyObserver for TenancyMetrics {
    fn plugin_call(&self, label: &str, elapsed: Duration) {
        self.0.plugin_call(label, elapsed);
    }

    fn declare_models(&self, tenant: &str, registry: &weft_engine::ModelRegistry) {
        self.0.declare_models(tenant, registry);
    }

    fn graph_observer(&self, tenant: Option<&str>) -> Option<Arc<dyn GraphObserver>> {
        Some(match tenant {
            Some(tenant) => self.0.tenant_graph_observer(tenant),
            None => self.0.graph_observer(),
        })
    }
}

/// What `/metrics` reads at scrape time.
#[derive(Clone, Default)]
pub struct ScrapeSources {
    pub runtime: Option<PluginRuntime>,
    pub plugins: Arc<HashMap<String, Plugin>>,
    /// NVML, when this machine has the NVIDIA driver: the `nv_gpu_*` families.
    pub gpus: Option<Arc<dyn weft_gpu::GpuTelemetry>>,
}

impl GraphObserver for Metrics {
    fn node(&self, graph: &str, node: &str, duration: Duration) {
        self.node_duration
            .with_label_values(&[graph, node])
            .observe(duration.as_secs_f64());
    }

    fn declare(&self, graph: &str, node: &str) {
        let _ = self.node_duration.with_label_values(&[graph, node]);
    }
}

/// Reports a tenant's graph nodes under `tenant/graph`.
struct TenantGraphObserver {
    metrics: Arc<Metrics>,
    tenant: String,
}

impl GraphObserver for TenantGraphObserver {
    fn node(&self, graph: &str, node: &str, duration: Duration) {
        self.metrics
            .node(&format!("{}/{graph}", self.tenant), node, duration);
    }

    fn declare(&self, graph: &str, node: &str) {
        self.metrics
            .declare(&format!("{}/{graph}", self.tenant), node);
    }
}

/// One batching model's series, resolved once.
struct ModelMetrics {
    batch_size: Histogram,
    compute: Histogram,
    /// The same two for the GPU the model runs on, labelled by its UUID.
    device: Option<(Histogram, Histogram)>,
    queue: Histogram,
    depth: IntGauge,
    retries: IntCounter,
    rejected: IntCounter,
}

impl BatchObserver for ModelMetrics {
    fn batch(&self, rows: usize, _requests: usize, compute: Duration) {
        self.batch_size.observe(rows as f64);
        self.compute.observe(compute.as_secs_f64());
        if let Some((batch_size, device_compute)) = &self.device {
            batch_size.observe(rows as f64);
            device_compute.observe(compute.as_secs_f64());
        }
    }

    fn waited(&self, queued: Duration) {
        self.queue.observe(queued.as_secs_f64());
    }

    fn depth(&self, depth: usize) {
        self.depth.set(i64::try_from(depth).unwrap_or(i64::MAX));
    }

    fn retried(&self) {
        self.retries.inc();
    }

    fn rejected(&self) {
        self.rejected.inc();
    }
}

impl weft_backends::worker::WorkerObserver for Metrics {
    fn started(&self, label: &str) {
        for cause in weft_backends::worker::client::RESTART_CAUSES {
            self.worker_restarts.with_label_values(&[label, cause]);
        }
    }

    fn restarted(&self, label: &str, cause: &str) {
        self.worker_restarts
            .with_label_values(&[label, cause])
            .inc();
    }
}

/// A model that does not batch, with its compute time measured for metrics and accounting.
struct MeteredModel {
    inner: Arc<dyn Model>,
    compute: Histogram,
    /// The batch size (one call's rows) and compute histograms of its GPU, if on one.
    device: Option<(Histogram, Histogram)>,
}

impl Model for MeteredModel {
    fn metadata(&self) -> &ModelMetadata {
        self.inner.metadata()
    }

    fn health(&self) -> std::result::Result<(), String> {
        self.inner.health()
    }

    fn serving(&self) -> weft_core::ServingConfig {
        self.inner.serving()
    }

    fn infer<'a>(
        &'a self,
        request: &'a weft_core::RequestContext,
        inputs: Vec<NamedTensor>,
    ) -> BoxFuture<'a, Result<Vec<NamedTensor>>> {
        Box::pin(async move {
            let started = Instant::now();
            let result = self.inner.infer(request, inputs).await;
            let elapsed = started.elapsed();
            self.compute.observe(elapsed.as_secs_f64());
            if let Some((batch_size, device_compute)) = &self.device {
                let rows = result
                    .as_ref()
                    .ok()
                    .and_then(|outputs| outputs.first()?.tensor.shape().first().copied())
                    .unwrap_or(1);
                batch_size.observe(rows as f64);
                device_compute.observe(elapsed.as_secs_f64());
            }
            request.add(Spent::Compute, elapsed);
            result
        })
    }
}

/// Triton's GPU families, built at scrape time from one NVML sample per device, labelled
/// `gpu_uuid`: `nv_gpu_utilization` (0.0 to 1.0), `nv_gpu_memory_total_bytes`,
/// `nv_gpu_memory_used_bytes`, `nv_gpu_power_usage` and `nv_gpu_power_limit` (watts), and
/// `nv_energy_consumption` (joules since the driver loaded) where the device reports it.
pub fn render_gpus(samples: &[weft_gpu::GpuSample]) -> String {
    if samples.is_empty() {
        return String::new();
    }
    let registry = prometheus::Registry::new();
    let gauges = [
        ("nv_gpu_utilization", "GPU utilization rate [0.0 - 1.0)"),
        ("nv_gpu_memory_total_bytes", "GPU total memory, in bytes"),
        ("nv_gpu_memory_used_bytes", "GPU used memory, in bytes"),
        ("nv_gpu_power_usage", "GPU power usage in watts"),
        ("nv_gpu_power_limit", "GPU power management limit in watts"),
        (
            "nv_energy_consumption",
            "GPU energy consumption in joules since the driver loaded",
        ),
    ]
    .map(|(name, help)| {
        let gauge = prometheus::GaugeVec::new(Opts::new(name, help), &["gpu_uuid"]);
        if let Ok(gauge) = &gauge {
            register(&registry, Box::new(gauge.clone()));
        }
        gauge
    });
    let [
        Ok(utilization),
        Ok(total),
        Ok(used),
        Ok(power),
        Ok(limit),
        Ok(energy),
    ] = gauges
    else {
        return String::new();
    };
    for sample in samples {
        let uuid = [sample.uuid.as_str()];
        utilization.with_label_values(&uuid).set(sample.utilization);
        total
            .with_label_values(&uuid)
            .set(sample.memory_total_bytes as f64);
        used.with_label_values(&uuid)
            .set(sample.memory_used_bytes as f64);
        power.with_label_values(&uuid).set(sample.power_usage);
        limit.with_label_values(&uuid).set(sample.power_limit);
        if let Some(joules) = sample.energy_consumption {
            energy.with_label_values(&uuid).set(joules);
        }
    }
    let mut text = String::new();
    if let Err(error) = TextEncoder::new().encode_utf8(&registry.gather(), &mut text) {
        tracing::error!(%error, "cannot encode the GPU metrics");
    }
    text
}

/// The `weft_rollout_*` families, built at scrape time from the rollouts this replica serves
/// (rollouts come and go with their records, so nothing of a deleted one lingers): each arm's
/// share of traffic, its requests by outcome since the rollout's generation started here, the
/// mirrored calls, and the decisions this replica committed.
pub fn render_rollouts(rollouts: &[weft_tenancy::rollouts::RolloutMetrics]) -> String {
    let registry = prometheus::Registry::new();
    let families = (|| -> prometheus::Result<_> {
        let weight = prometheus::GaugeVec::new(
            Opts::new(
                "weft_rollout_weight",
                "Share of a rollout's traffic each arm takes now, in percent",
            ),
            &["tenant", "rollout", "arm"],
        )?;
        let requests = prometheus::IntCounterVec::new(
            Opts::new(
                "weft_rollout_requests_total",
                "Calls each rollout arm served on this replica, by outcome (ok, error, trap); \
                 the arm candidate-shadow counts mirrored calls",
            ),
            &["tenant", "rollout", "arm", "outcome"],
        )?;
        let shadow = prometheus::IntCounterVec::new(
            Opts::new(
                "weft_rollout_shadow_total",
                "Mirrored calls of a rollout: sent to the candidate, or dropped because the \
                 shadow pool was full",
            ),
            &["tenant", "rollout", "outcome"],
        )?;
        let decisions = prometheus::IntCounterVec::new(
            Opts::new(
                "weft_rollout_decisions_total",
                "Rollout decisions this replica committed, by action",
            ),
            &["tenant", "rollout", "action"],
        )?;
        let phase = prometheus::IntGaugeVec::new(
            Opts::new(
                "weft_rollout_phase",
                "1 for the phase each rollout is in (progressing, promoted, rolled_back, ...)",
            ),
            &["tenant", "rollout", "phase"],
        )?;
        registry.register(Box::new(weight.clone()))?;
        registry.register(Box::new(requests.clone()))?;
        registry.register(Box::new(shadow.clone()))?;
        registry.register(Box::new(decisions.clone()))?;
        registry.register(Box::new(phase.clone()))?;
        Ok((weight, requests, shadow, decisions, phase))
    })();
    let Ok((weight, requests, shadow, decisions, phase)) = families else {
        return String::new();
    };
    for rollout in rollouts {
        let (tenant, name) = (rollout.tenant.as_str(), rollout.name.as_str());
        for arm in &rollout.arms {
            weight
                .with_label_values(&[tenant, name, &arm.name])
                .set(arm.weight);
            let total = &arm.total;
            let errors = total.failures.saturating_sub(total.traps);
            for (outcome, count) in [
                ("ok", total.requests.saturating_sub(total.failures)),
                ("error", errors),
                ("trap", total.traps),
            ] {
                requests
                    .with_label_values(&[tenant, name, &arm.name, outcome])
                    .inc_by(count);
            }
        }
        let (sent, dropped) = rollout.shadow;
        shadow
            .with_label_values(&[tenant, name, "sent"])
            .inc_by(sent);
        shadow
            .with_label_values(&[tenant, name, "dropped"])
            .inc_by(dropped);
        for (action, count) in &rollout.decisions {
            decisions
                .with_label_values(&[tenant, name, action])
                .inc_by(*count);
        }
        let phase_name = serde_json::to_value(rollout.phase)
            .ok()
            .and_then(|value| value.as_str().map(str::to_owned))
            .unwrap_or_default();
        phase.with_label_values(&[tenant, name, &phase_name]).set(1);
    }
    let mut text = String::new();
    if let Err(error) = TextEncoder::new().encode_utf8(&registry.gather(), &mut text) {
        tracing::error!(%error, "cannot encode the rollout metrics");
    }
    text
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use std::sync::Arc;

    use weft_gpu::GpuTelemetry;
    use weft_gpu::fake::FakeGpus;

    use super::*;

    #[test]
    fn gpu_families_carry_tritons_names_per_device() {
        let gpus = FakeGpus::with_devices(2);
        let text = render_gpus(&gpus.sample());
        for device in [
            "GPU-00000000-0000-0000-0000-000000000000",
            "GPU-00000000-0000-0000-0000-000000000001",
        ] {
            for (family, value) in [
                ("nv_gpu_utilization", "0.5"),
                ("nv_gpu_memory_total_bytes", "85899345920"),
                ("nv_gpu_memory_used_bytes", "1073741824"),
                ("nv_gpu_power_usage", "250"),
                ("nv_gpu_power_limit", "700"),
                ("nv_energy_consumption", "1000"),
            ] {
                let line = format!("{family}{{gpu_uuid=\"{device}\"}} {value}");
                assert!(text.lines().any(|l| l == line), "{line} not in\n{text}");
            }
        }
        assert!(text.contains("# TYPE nv_gpu_utilization gauge"), "{text}");
        // No devices: no families at all (not empty ones).
        assert_eq!(render_gpus(&[]), "");
    }

    #[test]
    fn a_model_on_a_gpu_also_reports_to_its_devices_histograms() {
        let metrics = Arc::new(Metrics::new());
        let uuid = "GPU-00000000-0000-0000-0000-000000000000";
        let on_gpu = metrics.batch_observer("wide", Some(uuid));
        on_gpu.batch(64, 8, Duration::from_millis(2));
        metrics
            .batch_observer("mlp", None)
            .batch(4, 1, Duration::from_millis(1));
        let text = metrics.render(&ScrapeSources::default(), &Live::default());
        let count = format!("weft_gpu_batch_size_count{{gpu_uuid=\"{uuid}\"}} 1");
        let sum = format!("weft_gpu_batch_size_sum{{gpu_uuid=\"{uuid}\"}} 64");
        assert!(text.lines().any(|l| l == count), "{count} not in\n{text}");
        assert!(text.lines().any(|l| l == sum), "{sum} not in\n{text}");
        assert!(
            text.contains("weft_gpu_compute_duration_seconds_count{gpu_uuid"),
            "{text}"
        );
        // No made-up device memory for a model nobody measured.
        assert!(!text.contains("weft_model_gpu_memory_bytes{"), "{text}");
        metrics.model_gpu_memory("wide", uuid, 26 << 20);
        let text = metrics.render(&ScrapeSources::default(), &Live::default());
        let memory = format!(
            "weft_model_gpu_memory_bytes{{gpu_uuid=\"{uuid}\",model=\"wide\"}} {}",
            26 << 20
        );
        assert!(text.lines().any(|l| l == memory), "{memory} not in\n{text}");
    }
}
