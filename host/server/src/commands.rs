//! The server's own subcommands, with their flags and `WEFT_*` environment fallbacks: `serve`
//! (start-up, the store, the repository, graceful shutdown), the sandboxed model `worker`,
//! `graph check` and `migrate`. The `weft` binary (`host/cli`) puts them on one command line
//! next to the client and the benchmarks, which do not belong in the server.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use anyhow::{Context, bail};
use tokio::net::TcpListener;

use crate::app::{AppState, app};
use crate::loader::{RepositoryLoader, WorkerPool, WorkerSettings};
use crate::metrics::{Metrics, ScrapeSources};

/// `weft migrate`: a source and a destination, each an embedded data directory or a shared
/// store (PostgreSQL + S3; endpoint and keys from the AWS_* variables).
#[derive(Debug, clap::Args)]
pub struct MigrateArgs {
    /// Source: an embedded store's data directory (the server using it must be stopped).
    #[arg(long, conflicts_with_all = ["from_database_url", "from_blob_url"])]
    pub from_data_dir: Option<PathBuf>,
    /// Source: a shared store's database.
    #[arg(long, requires = "from_blob_url")]
    pub from_database_url: Option<String>,
    /// Source: a shared store's bucket (`s3://bucket[/prefix]`).
    #[arg(long, requires = "from_database_url")]
    pub from_blob_url: Option<String>,
    /// Destination: an embedded store's data directory (created if missing; must be empty).
    #[arg(long, conflicts_with_all = ["to_database_url", "to_blob_url"])]
    pub to_data_dir: Option<PathBuf>,
    /// Destination: a shared store's database (must hold no tenants).
    #[arg(long, requires = "to_blob_url")]
    pub to_database_url: Option<String>,
    /// Destination: a shared store's bucket.
    #[arg(long, requires = "to_database_url")]
    pub to_blob_url: Option<String>,
}

/// Opens one side of a migration; a shared store gets a temporary local cache directory.
fn open_side(
    side: &str,
    data_dir: Option<&std::path::Path>,
    database_url: Option<&str>,
    blob_url: Option<&str>,
    cache: &std::path::Path,
) -> anyhow::Result<weft_store::Store> {
    match (data_dir, database_url, blob_url) {
        (Some(dir), None, None) => {
            std::fs::create_dir_all(dir)
                .with_context(|| format!("cannot create {}", dir.display()))?;
            weft_store::Store::open(dir)
                .with_context(|| format!("cannot open the {side} store under {}", dir.display()))
        }
        (None, Some(database_url), Some(blob_url)) => {
            let blobs =
                weft_store::s3::S3Blobs::connect(blob_url, &weft_store::s3::S3Settings::from_env())
                    .with_context(|| format!("cannot open the {side} bucket"))?;
            weft_store::Store::open_shared(cache, database_url, blobs)
                .with_context(|| format!("cannot open the {side} shared store"))
        }
        _ => bail!(
            "name the {side} store: --{side}-data-dir, or --{side}-database-url with \
             --{side}-blob-url"
        ),
    }
}

pub fn migrate(args: MigrateArgs) -> anyhow::Result<()> {
    let caches = tempfile::tempdir().context("cannot create a temporary cache directory")?;
    let from = open_side(
        "from",
        args.from_data_dir.as_deref(),
        args.from_database_url.as_deref(),
        args.from_blob_url.as_deref(),
        &caches.path().join("from"),
    )?;
    let to = open_side(
        "to",
        args.to_data_dir.as_deref(),
        args.to_database_url.as_deref(),
        args.to_blob_url.as_deref(),
        &caches.path().join("to"),
    )?;
    let migrated = weft_store::migrate::migrate(&from, &to).context("migration failed")?;
    println!(
        "migrated {} tenant(s) and {} blob(s) ({} bytes); every blob verified by its digest",
        migrated.tenants, migrated.blobs, migrated.bytes
    );
    Ok(())
}

/// The model worker's command line (set by the server; `--probe-*` only for tests).
#[derive(Debug, clap::Args)]
pub struct WorkerCliArgs {
    #[arg(long)]
    pub ort_library: PathBuf,
    #[arg(long, default_value_t = 1)]
    pub slots: usize,
    #[arg(long, default_value_t = 4096)]
    pub slot_bytes: usize,
    /// Address space the worker may add beyond its baseline.
    #[arg(long)]
    pub memory_limit_bytes: Option<u64>,
    #[arg(long)]
    pub allow_weak_model_sandbox: bool,
    #[arg(long, default_value_t = 0)]
    pub nice: i32,
    /// Probe mode: close the sandbox, then try to open this path (repeatable), report, exit.
    #[arg(long)]
    pub probe_open: Vec<PathBuf>,
    /// Probe mode: try to connect to this TCP address (repeatable).
    #[arg(long)]
    pub probe_connect: Vec<SocketAddr>,
}

#[derive(Debug, clap::Args)]
pub struct GraphCheckArgs {
    /// Repository whose models/ and plugins/ the graphs refer to.
    #[arg(long, env = "WEFT_REPOSITORY")]
    pub repository: PathBuf,
    #[command(flatten)]
    pub ort: OrtArgs,
    /// Graph TOML files.
    #[arg(required = true)]
    pub files: Vec<PathBuf>,
}

/// Where the ONNX Runtime library is; shared by every subcommand that runs models.
#[derive(Debug, Clone, clap::Args)]
pub struct OrtArgs {
    /// Path of libonnxruntime.so (1.22 or newer); `cargo xtask setup` puts one under target/onnxruntime/.
    #[arg(
        id = "ort_library",
        long = "ort-library",
        value_name = "PATH",
        env = "ORT_DYLIB_PATH",
        default_value = "target/onnxruntime/libonnxruntime.so.1.22.1"
    )]
    pub library: PathBuf,
    /// Threads of one ONNX Runtime intra-op pool shared by every model session that does not
    /// set `intra_op_threads` in its model.toml (0 = no shared pool: each session gets
    /// `intra_op_threads` = cores / instance_count of its own). A shared pool lets one request
    /// use every core and concurrent ones share them; its threads spin briefly between calls.
    #[arg(long = "ort-threads", env = "WEFT_ORT_THREADS", default_value_t = 0)]
    pub shared_threads: usize,
}

impl OrtArgs {
    /// Loads the library with these settings (see [`weft_backends::init_onnxruntime`]).
    pub fn init(&self) -> weft_core::Result<String> {
        weft_backends::init_onnxruntime(&self.library, self.shared_threads)
    }
}

/// A listener's address, or `off` for none.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ListenAddress(pub Option<SocketAddr>);

impl std::str::FromStr for ListenAddress {
    type Err = String;

    fn from_str(value: &str) -> Result<Self, Self::Err> {
        if value.trim().eq_ignore_ascii_case("off") {
            return Ok(ListenAddress(None));
        }
        value
            .trim()
            .parse()
            .map(|address| ListenAddress(Some(address)))
            .map_err(|_| format!("'{value}' is neither an address (host:port) nor 'off'"))
    }
}

#[derive(Debug, clap::Args)]
pub struct ServeArgs {
    /// Address to listen on; port 0 picks a free port (the chosen address is logged).
    #[arg(long, env = "WEFT_LISTEN", default_value = "127.0.0.1:8000")]
    pub listen: SocketAddr,
    /// PEM certificate chain for TLS on both listeners (HTTP and gRPC); with --tls-key.
    /// Reloaded when the file changes (see --tls-reload-seconds).
    #[arg(long, env = "WEFT_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert.
    #[arg(long, env = "WEFT_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// PEM CA certificate(s) for mutual TLS: clients must present a certificate issued by
    /// one of them, or the handshake fails.
    #[arg(long, env = "WEFT_TLS_CLIENT_CA", requires = "tls_cert")]
    pub tls_client_ca: Option<PathBuf>,
    /// Seconds between checks of the TLS files for a new certificate; new connections get
    /// it, open ones keep theirs.
    #[arg(long, env = "WEFT_TLS_RELOAD_SECONDS", default_value_t = 10,
          value_parser = clap::value_parser!(u64).range(1..=86400))]
    pub tls_reload_seconds: u64,
    /// Tenants whose clients may use Triton's system shared memory extension (comma
    /// separated; `default` is the bootstrap key's tenant). Off for every other tenant: a
    /// shared memory key is global to the host, so only enable tenants whose clients run on
    /// the server's host and may see each other's shared memory objects.
    #[arg(long, env = "WEFT_SYSTEM_SHARED_MEMORY", value_delimiter = ',')]
    pub system_shared_memory: Vec<String>,
    /// Serve `/metrics` on this address instead of on --listen (`off`: on --listen), with the
    /// health routes, so a network policy can open it to monitoring alone and probes reach
    /// health even with mutual TLS on the other listeners. Plaintext, even with TLS.
    #[arg(long, env = "WEFT_METRICS_LISTEN", default_value = "off")]
    pub metrics_listen: ListenAddress,
    /// Inference requests this replica takes at once (HTTP and gRPC, all tenants); at the
    /// limit new ones get 503 and readiness turns 503, and `weft_replica_load_ratio` (in
    /// flight over this) reaches 1.
    #[arg(long, env = "WEFT_MAX_INFLIGHT_REQUESTS", default_value_t = crate::load::DEFAULT_MAX_INFLIGHT_REQUESTS,
          value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=1_000_000))]
    pub max_inflight_requests: usize,
    /// Bytes of tenant models loaded at once (each counts its file size times its
    /// instances; 0: no limit). Tenant models load on their first request; to load another
    /// over the budget, the least recently used ones no request is using (and not `pin = true`)
    /// are unloaded first, and a load that still does not fit answers 503.
    #[arg(long, env = "WEFT_MODEL_MEMORY_BUDGET", default_value_t = 0)]
    pub model_memory_budget: u64,
    /// Bytes a tenant's model worker process takes besides its models (ONNX Runtime, the
    /// sandbox; 30 to 45 MiB measured), charged to --model-memory-budget while any of the
    /// tenant's models is loaded, so the budget bounds memory and not only model files.
    #[arg(long, env = "WEFT_MODEL_WORKER_BASELINE_BYTES", default_value_t = 48 << 20)]
    pub model_worker_baseline_bytes: u64,
    /// Bytes of compiled tenant plugins kept loaded at once (each counts its compiled image;
    /// 0: no limit). Tenant plugins compile, or load from the compile cache, on their first
    /// call; to load another over the budget, the least recently used ones no call is running
    /// are dropped first, and a load that still does not fit answers 503.
    #[arg(long, env = "WEFT_PLUGIN_CACHE_BUDGET", default_value_t = 0)]
    pub plugin_cache_budget: u64,
    /// Address of the gRPC endpoint (Triton's GRPCInferenceService, which OIP gRPC clients
    /// also speak), or `off`; port 0 picks a free port.
    #[arg(long, env = "WEFT_GRPC_LISTEN", default_value = "127.0.0.1:8001")]
    pub grpc_listen: ListenAddress,
    /// Model repository directory: models/<name>/model.toml and models/<name>/<version>/model.onnx.
    #[arg(long, env = "WEFT_REPOSITORY")]
    pub repository: PathBuf,
    /// Directory for Weft's own durable state (created if missing).
    #[arg(long, env = "WEFT_DATA_DIR", default_value = "weft-data")]
    pub data_dir: PathBuf,
    /// PostgreSQL holding the tenants' metadata, shared by every replica
    /// (`postgres://user:password@host:port/database`); with --blob-url. Without both, the
    /// embedded store under --data-dir is used.
    #[arg(
        long,
        env = "WEFT_DATABASE_URL",
        hide_env_values = true,
        requires = "blob_url"
    )]
    pub database_url: Option<String>,
    /// S3-compatible bucket holding the blobs (plugins, models, graphs) shared by every replica
    /// (`s3://bucket[/prefix]`; endpoint and credentials from the standard AWS_* variables);
    /// with --database-url.
    #[arg(long, env = "WEFT_BLOB_URL", requires = "database_url")]
    pub blob_url: Option<String>,
    /// Seconds a blob in the shared object store that no stored version references any more
    /// (a deleted version) is kept before it is deleted. Longer than any upload takes from its
    /// first byte to its commit; shared store only.
    #[arg(long, env = "WEFT_BLOB_GC_GRACE_SECONDS",
          default_value_t = weft_tenancy::tenancy::DEFAULT_BLOB_GRACE.as_secs(),
          value_parser = clap::value_parser!(u64).range(1..))]
    pub blob_gc_grace_seconds: u64,
    /// Largest request body in bytes; larger requests get 413.
    #[arg(long, env = "WEFT_MAX_REQUEST_BYTES", default_value_t = 64 * 1024 * 1024)]
    pub max_request_bytes: usize,
    #[command(flatten)]
    pub ort: OrtArgs,
    /// Exit at start-up if any model fails to load, instead of serving it as UNAVAILABLE.
    #[arg(long, env = "WEFT_STRICT")]
    pub strict: bool,
    /// Requests slower than this many milliseconds are logged at warn level ("slow request").
    #[arg(long, env = "WEFT_SLOW_REQUEST_MS", default_value_t = 1000)]
    pub slow_request_ms: u64,
    /// The operator's key for the admin API (`/api/v1/tenants`: tenants, quotas, API keys);
    /// without it the admin API answers 401. At least 16 characters.
    #[arg(long, env = "WEFT_ADMIN_KEY", hide_env_values = true)]
    pub admin_key: Option<String>,
    /// An API key for the tenant `default`, which shares every repository model and graph. Kept
    /// in memory only (hashed); for the quickstart and tests. At least 16 characters.
    #[arg(long, env = "WEFT_BOOTSTRAP_KEY", hide_env_values = true)]
    pub bootstrap_key: Option<String>,
    /// Batch jobs this replica runs at once (all tenants together; a tenant's jobs beyond
    /// them wait, queued, and tenants take turns).
    #[arg(long, env = "WEFT_JOB_SLOTS", default_value_t = weft_tenancy::jobs::DEFAULT_JOB_SLOTS,
          value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=64))]
    pub job_slots: usize,
    /// Rows of one batch job in flight at once: the most of a model's batch slots one job
    /// holds (real-time requests always go before its rows).
    #[arg(long, env = "WEFT_JOB_ROWS_IN_FLIGHT",
          default_value_t = weft_tenancy::jobs::DEFAULT_ROWS_IN_FLIGHT,
          value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=1024))]
    pub job_rows_in_flight: usize,
    /// Batch jobs yield to real-time inference: while any request is in flight on this
    /// replica, each group of a job's rows waits up to this many milliseconds for them to
    /// finish before it runs anyway. Higher protects real-time latency more and slows jobs
    /// under steady real-time load (0: jobs do not yield).
    #[arg(long, env = "WEFT_JOB_REALTIME_PAUSE_MS", default_value_t = 20,
          value_parser = clap::value_parser!(u64).range(0..=1000))]
    pub job_realtime_pause_ms: u64,
    /// Largest control-plane upload (plugin, model, graph, job input) in bytes; larger uploads get 413.
    #[arg(long, env = "WEFT_MAX_UPLOAD_BYTES", default_value_t = crate::app::DEFAULT_MAX_UPLOAD_BYTES)]
    pub max_upload_bytes: usize,
    /// Bytes of inference request bodies one tenant may have in memory at once (read, decoded,
    /// until the response is built); a request that does not fit within a second gets 429, and
    /// a body without Content-Length is limited to it. Other tenants have their own.
    #[arg(long, env = "WEFT_MAX_TENANT_INFLIGHT_BYTES",
          default_value_t = weft_tenancy::inflight::DEFAULT_TENANT_INFLIGHT_BYTES)]
    pub max_tenant_inflight_bytes: usize,
    /// Seconds a request body may send nothing before the request fails with 408, freeing what
    /// it held (storage reserved by an upload, in-flight budget, a concurrency slot).
    #[arg(long, env = "WEFT_BODY_IDLE_TIMEOUT_SECONDS", default_value_t = 30,
          value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub body_idle_timeout_seconds: u64,
    /// Meter WebAssembly fuel (about one unit per instruction) in every plugin call: responses
    /// then carry `parameters.fuel` and `weft_plugin_fuel_consumed_total` counts it. Costs
    /// some plugin speed (the compiled code counts as it runs), so it is off by default.
    #[arg(long, env = "WEFT_METER_FUEL")]
    pub meter_fuel: bool,
    /// Calls in flight at once per model worker (each holds one slot of its shared arena).
    #[arg(long, env = "WEFT_MODEL_WORKER_SLOTS", default_value_t = 64)]
    pub model_worker_slots: usize,
    /// KiB of one slot of a model worker's shared arena; tensors larger than what is left of
    /// their call's slot cross inline through the socket instead (slower, still correct).
    #[arg(long, env = "WEFT_MODEL_WORKER_SLOT_KIB", default_value_t = 1024)]
    pub model_worker_slot_kib: usize,
    /// A model call in a worker unanswered after this many seconds counts as a hang: the
    /// worker is killed and restarted.
    #[arg(long, env = "WEFT_MODEL_CALL_TIMEOUT_SECONDS", default_value_t = 60)]
    pub model_call_timeout_seconds: u64,
    /// Longest a model worker start or one model load may take; a push over it is refused.
    #[arg(long, env = "WEFT_MODEL_LOAD_TIMEOUT_SECONDS", default_value_t = 60)]
    pub model_load_timeout_seconds: u64,
    /// Nice value of model workers (0-19): above 0, tenants' models yield the CPU to the
    /// server's own request handling when the machine is saturated.
    #[arg(long, env = "WEFT_MODEL_WORKER_NICE", default_value_t = 0,
          value_parser = clap::value_parser!(i32).range(0..=19))]
    pub model_worker_nice: i32,
    /// Run model workers even on a kernel without Landlock (seccomp and rlimits only): a
    /// tenant model could then read the files the server's user can read. Off by default.
    #[arg(long, env = "WEFT_ALLOW_WEAK_MODEL_SANDBOX")]
    pub allow_weak_model_sandbox: bool,
    /// Seconds in-flight requests get to finish after SIGINT/SIGTERM.
    #[arg(long, env = "WEFT_SHUTDOWN_GRACE_SECONDS", default_value_t = 30)]
    pub shutdown_grace_seconds: u64,
    /// Microseconds after each request during which one lowest-priority thread per core
    /// spins instead of letting the core halt, so the hand-offs between threads of a request
    /// do not each pay a core's wake-up (0 = off). Costs CPU time while busy; see
    /// BENCHMARKS.md.
    #[arg(long = "busy-poll-us", env = "WEFT_BUSY_POLL_US", default_value_t = 0)]
    pub busy_poll_us: u64,
}

/// `weft graph check`: validates graph files against a repository, as loading would.
pub fn graph_check(args: GraphCheckArgs) -> anyhow::Result<()> {
    args.ort.init()?;
    let models = weft_engine::ModelRegistry::load(&args.repository, &RepositoryLoader::default())?;
    let runtime = weft_runtime::PluginRuntime::new(weft_runtime::RuntimeConfig::default())?;
    let plugins = crate::graphs::load_plugins(&args.repository, &runtime)?;
    let catalog = weft_tenancy::graphs::ScopeCatalog {
        models: &models,
        plugins: &plugins,
        limits: Some(crate::graphs::runtime_node_limits(&runtime)),
    };
    let (lines, all_valid) = crate::graphs::check_files(&args.files, &catalog);
    for line in &lines {
        println!("{line}");
    }
    if !all_valid {
        bail!(
            "{} of {} graph files are invalid",
            lines.iter().filter(|l| l.starts_with("error")).count(),
            lines.len()
        );
    }
    Ok(())
}

/// What serving needs from the repository: every model and graph in one registry, the reasons
/// of anything that could not be served at all, and what `/metrics` reads at scrape time.
struct Loaded {
    registry: weft_engine::ModelRegistry,
    unserved: Vec<String>,
    scrape: ScrapeSources,
    runtime: weft_runtime::PluginRuntime,
    loader: RepositoryLoader,
}

/// Loads the repository's models, plugins (compiled once into `<data-dir>/compile-cache`) and
/// graphs into one registry: graphs are served next to models, under their own names.
fn load_repository(
    repository: &std::path::Path,
    data_dir: &std::path::Path,
    metrics: &Arc<Metrics>,
    meter_fuel: bool,
    workers: Arc<WorkerPool>,
) -> anyhow::Result<Loaded> {
    let loader = RepositoryLoader {
        metrics: Some(Arc::clone(metrics)),
        workers: Some(workers),
        ..RepositoryLoader::default()
    };
    let models = Arc::new(weft_engine::ModelRegistry::load(repository, &loader)?);
    let runtime = weft_runtime::PluginRuntime::new(weft_runtime::RuntimeConfig {
        cache_dir: Some(data_dir.join("compile-cache")),
        meter_fuel,
        ..weft_runtime::RuntimeConfig::default()
    })?;
    let plugins = crate::graphs::load_plugins(repository, &runtime)?;
    let catalog = weft_tenancy::graphs::ScopeCatalog {
        models: &models,
        plugins: &plugins,
        limits: Some(crate::graphs::runtime_node_limits(&runtime)),
    };
    let compiler = crate::graphs::WasmCompiler(runtime.clone());
    let runner = Arc::new(weft_tenancy::graphs::ScopeRunner::new(
        Arc::clone(&models),
        &plugins,
        weft_tenancy::backends::PluginCompiler::defaults(&compiler),
        Arc::new(crate::metrics::TenancyMetrics(Arc::clone(metrics))),
    ));
    let scrape = ScrapeSources {
        runtime: Some(runtime.clone()),
        gpus: gpu_telemetry(),
        plugins: Arc::new(
            runner
                .plugins()
                .iter()
                .filter_map(|(name, plugin)| {
                    let wasm = crate::graphs::WasmPlugin::of(plugin.as_ref())?;
                    Some((name.clone(), wasm))
                })
                .collect(),
        ),
    };
    let mut registry = (*models).clone();
    let unserved = weft_tenancy::graphs::load_repository_graphs(
        repository,
        &catalog,
        &runner,
        Some(metrics.graph_observer()),
        &mut registry,
    )?;
    Ok(Loaded {
        registry,
        unserved,
        scrape,
        runtime,
        loader,
    })
}

/// `weft worker`: serve the server's model calls, or probe the sandbox. It must run before
/// any async runtime exists: the worker closes its sandbox while it has a single thread.
pub fn worker(args: &WorkerCliArgs) -> weft_core::Result<()> {
    let policy = weft_backends::worker::SandboxPolicy {
        memory_limit: args.memory_limit_bytes,
        allow_weak: args.allow_weak_model_sandbox,
        nice: args.nice,
    };
    if !args.probe_open.is_empty() || !args.probe_connect.is_empty() {
        let report = weft_backends::worker::process::probe(
            &args.ort_library,
            &policy,
            &args.probe_open,
            &args.probe_connect,
        )?;
        println!(
            "{}",
            serde_json::to_string(&report)
                .map_err(|e| weft_core::Error::internal(e.to_string()))?
        );
        return Ok(());
    }
    weft_backends::worker::process::run(weft_backends::worker::WorkerArgs {
        ort_library: args.ort_library.clone(),
        slots: args.slots,
        slot_bytes: args.slot_bytes,
        policy,
    })
}

/// Worker settings: this binary in worker mode, the library by absolute path (workers run in
/// `/`), and the serve defaults for the rest.
fn worker_settings(ort_library: &std::path::Path) -> anyhow::Result<WorkerSettings> {
    Ok(WorkerSettings {
        program: std::env::current_exe().context("cannot find the server's own executable")?,
        program_args: vec!["worker".into()],
        ort_library: std::fs::canonicalize(ort_library)
            .with_context(|| format!("cannot resolve {}", ort_library.display()))?,
        slots: 64,
        slot_bytes: 1 << 20,
        call_timeout: Duration::from_secs(60),
        load_timeout: Duration::from_secs(60),
        allow_weak_sandbox: false,
        nice: 0,
    })
}

/// The model workers of `weft bench --in-process` (serve's defaults, no metrics).
pub fn bench_worker_pool(ort_library: &std::path::Path) -> anyhow::Result<Arc<WorkerPool>> {
    Ok(Arc::new(WorkerPool::new(
        worker_settings(ort_library)?,
        None,
    )))
}

/// The model workers `weft serve` starts: the server's own binary in worker mode.
fn worker_pool(args: &ServeArgs, metrics: &Arc<Metrics>) -> anyhow::Result<Arc<WorkerPool>> {
    if args.model_worker_slots == 0 || args.model_worker_slot_kib == 0 {
        bail!("--model-worker-slots and --model-worker-slot-kib must be at least 1");
    }
    Ok(Arc::new(WorkerPool::new(
        WorkerSettings {
            slots: args.model_worker_slots,
            slot_bytes: args.model_worker_slot_kib.saturating_mul(1024),
            call_timeout: Duration::from_secs(args.model_call_timeout_seconds.max(1)),
            load_timeout: Duration::from_secs(args.model_load_timeout_seconds.max(1)),
            allow_weak_sandbox: args.allow_weak_model_sandbox,
            nice: args.model_worker_nice,
            ..worker_settings(&args.ort.library)?
        },
        Some(Arc::clone(metrics) as Arc<dyn weft_backends::worker::WorkerObserver>),
    )))
}

/// Loads the repository, binds, serves until SIGINT/SIGTERM, then drains in-flight requests.
pub async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    std::fs::create_dir_all(&args.data_dir)
        .with_context(|| format!("cannot create --data-dir {}", args.data_dir.display()))?;
    let ort_info = args.ort.init()?;
    tracing::info!(
        library = %args.ort.library.display(),
        build = %ort_info,
        shared_threads = args.ort.shared_threads,
        "ONNX Runtime loaded"
    );

    for (flag, key) in [
        ("--admin-key", &args.admin_key),
        ("--bootstrap-key", &args.bootstrap_key),
    ] {
        if key.as_ref().is_some_and(|key| key.trim().len() < 16) {
            bail!("{flag} must be at least 16 characters");
        }
    }
    if args.max_tenant_inflight_bytes == 0 {
        bail!("--max-tenant-inflight-bytes must be at least 1");
    }
    let repository = args.repository.clone();
    let data_dir = args.data_dir.clone();
    let metrics = Arc::new(Metrics::new());
    let loading_metrics = Arc::clone(&metrics);
    let admin_key = args.admin_key.clone();
    let bootstrap_key = args.bootstrap_key.clone();
    let meter_fuel = args.meter_fuel;
    let workers = worker_pool(&args, &metrics)?;
    let model_budget = match args.model_memory_budget {
        0 => u64::MAX,
        budget => budget,
    };
    metrics.models_on_demand.declare_budget(model_budget);
    let residency = weft_engine::lazy::Residency::with_group_cost(
        model_budget,
        args.model_worker_baseline_bytes,
        Some(Arc::clone(&metrics.models_on_demand) as Arc<dyn weft_engine::lazy::ResidencyObserver>),
    );
    let plugin_budget = match args.plugin_cache_budget {
        0 => u64::MAX,
        budget => budget,
    };
    metrics.plugins_on_demand.declare_budget(plugin_budget);
    let plugin_residency = weft_engine::lazy::Residency::for_plugins(
        plugin_budget,
        Some(
            Arc::clone(&metrics.plugins_on_demand) as Arc<dyn weft_engine::lazy::ResidencyObserver>
        ),
    );
    let shared_store = (args.database_url.clone(), args.blob_url.clone());
    let (loaded, tenancy) = tokio::task::spawn_blocking(move || {
        // The store first: it locks the data directory, so a second server on the same
        // directory stops here, before it touches the compile cache.
        let store = match (&shared_store.0, &shared_store.1) {
            (Some(database_url), Some(blob_url)) => {
                let blobs = weft_store::s3::S3Blobs::connect(
                    blob_url,
                    &weft_store::s3::S3Settings::from_env(),
                )
                .context("cannot open --blob-url")?;
                weft_store::Store::open_shared(&data_dir, database_url, blobs)
                    .context("cannot open the shared store (--database-url)")?
            }
            _ => weft_store::Store::open(&data_dir)
                .with_context(|| format!("cannot open the store under {}", data_dir.display()))?,
        };
        let loaded = load_repository(
            &repository,
            &data_dir,
            &loading_metrics,
            meter_fuel,
            workers,
        )?;
        let tenancy = crate::tenants::Tenancy::new(crate::tenants::TenancyConfig {
            store: Arc::new(store),
            platform: loaded.registry.clone(),
            plugins: Arc::new(crate::graphs::WasmCompiler(loaded.runtime.clone())),
            models: Arc::new(loaded.loader.clone()),
            observer: Arc::new(crate::metrics::TenancyMetrics(Arc::clone(&loading_metrics))),
            admin_key,
            bootstrap_key,
            residency: Some(residency),
            plugin_residency: Some(plugin_residency),
        })
        .context("cannot restore the tenants from the store")?;
        anyhow::Ok((loaded, tenancy))
    })
    .await
    .context("repository loading stopped unexpectedly")??;
    tracing::info!(
        tenants = tenancy.scopes().len(),
        admin_api = args.admin_key.is_some(),
        "tenants restored"
    );
    let mut failures = loaded.unserved;
    failures.extend(loaded.registry.failures());
    if args.strict && !failures.is_empty() {
        bail!(
            "--strict: {} model(s) or graph(s) failed to load: {}",
            failures.len(),
            failures.join("; ")
        );
    }

    let state = AppState {
        metrics,
        scrape: loaded.scrape,
        slow_request: Duration::from_millis(args.slow_request_ms),
        max_upload_bytes: args.max_upload_bytes,
        body_idle_timeout: Duration::from_secs(args.body_idle_timeout_seconds),
        body_budget: Arc::new(weft_tenancy::inflight::BodyBudget::new(
            args.max_tenant_inflight_bytes,
        )),
        busy_poll: match args.busy_poll_us {
            0 => None,
            window => Some(
                crate::busy_poll::BusyPoll::start(
                    std::thread::available_parallelism().map_or(1, usize::from),
                    Duration::from_micros(window),
                )
                .context("cannot start the --busy-poll-us spinners")?,
            ),
        },
        shared_memory: Arc::new(crate::shared_memory::SystemSharedMemory::for_tenants(
            args.system_shared_memory
                .iter()
                .map(|tenant| tenant.trim().to_string())
                .filter(|tenant| !tenant.is_empty()),
        )),
        load: Arc::new(crate::load::ReplicaLoad::new(args.max_inflight_requests)),
        metrics_on_main: args.metrics_listen.0.is_none(),
        ..AppState::new(Arc::new(tenancy), args.max_request_bytes)
    };
    let tenancy = Arc::clone(&state.tenancy);
    if tenancy.store().shared().is_some() {
        crate::tenants::follow_shared_store(
            Arc::clone(&tenancy),
            Duration::from_secs(args.blob_gc_grace_seconds),
        )?;
    }
    weft_tenancy::rollouts::run_rollout_controller(Arc::clone(&tenancy));
    // Batch jobs run on a runtime of their own at low priority; the models' batch schedulers
    // stay on this one whoever calls a model first.
    weft_engine::batcher::run_schedulers_on(tokio::runtime::Handle::current());
    weft_tenancy::jobs::run_job_runner(
        Arc::clone(&tenancy),
        weft_tenancy::jobs::JobRunnerConfig {
            slots: args.job_slots,
            rows_in_flight: args.job_rows_in_flight,
            runtime: Some(crate::thread_priority::background_runtime()?),
            background: weft_engine::jobs::Background {
                on_thread_start: Some(crate::thread_priority::become_background),
                yield_to: Some(Arc::clone(&state.realtime)),
                realtime_pause: Duration::from_millis(args.job_realtime_pause_ms),
            },
        },
    );
    let accepting = state.accepting.clone();
    let tls = match (&args.tls_cert, &args.tls_key) {
        (Some(cert), Some(key)) => {
            let reloader = crate::tls::TlsReloader::load(crate::tls::TlsFiles {
                cert: cert.clone(),
                key: key.clone(),
                client_ca: args.tls_client_ca.clone(),
            })?;
            reloader.watch(Duration::from_secs(args.tls_reload_seconds))?;
            Some(reloader)
        }
        _ => None,
    };
    let scheme = if tls.is_some() { "https" } else { "http" };
    let listener = bind(args.listen).await?;
    let grpc_listener = match args.grpc_listen.0 {
        Some(address) => Some(bind(address).await?),
        None => None,
    };
    let metrics_listener = match args.metrics_listen.0 {
        Some(address) => Some(bind(address).await?),
        None => None,
    };
    // Machine-readable lines on stdout, for scripts and tests that listen on port 0; the
    // HTTP line comes last, so whoever waits for it has seen the gRPC one.
    if let Some(grpc) = &grpc_listener {
        let address = grpc.local_addr().context("cannot read the bound address")?;
        tracing::info!(%address, tls = tls.is_some(), "gRPC listening");
        println!("weft gRPC listening on {address}");
    }
    if let Some(metrics) = &metrics_listener {
        let address = metrics
            .local_addr()
            .context("cannot read the bound address")?;
        tracing::info!(%address, "metrics listening");
        println!("weft metrics listening on http://{address}");
    }
    let address = listener
        .local_addr()
        .context("cannot read the bound address")?;
    tracing::info!(%address, tls = tls.is_some(), "listening");
    println!("weft listening on {scheme}://{address}");

    // Both listeners stop accepting on the signal and finish their connections' requests.
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let stopped = move || {
        let mut stop = stop_rx.clone();
        async move {
            let _ = stop.wait_for(|stopped| *stopped).await;
        }
    };
    let mut servers = tokio::task::JoinSet::new();
    servers.spawn(crate::listen::serve(
        listener,
        app(state.clone()).into_service::<hyper::body::Incoming>(),
        crate::listen::Protocols::Http,
        tls.clone(),
        stopped(),
    ));
    if let Some(metrics) = metrics_listener {
        servers.spawn(crate::listen::serve(
            metrics,
            crate::app::metrics_app(state.clone()).into_service::<hyper::body::Incoming>(),
            crate::listen::Protocols::Http,
            None,
            stopped(),
        ));
    }
    if let Some(grpc) = grpc_listener {
        servers.spawn(crate::listen::serve(
            grpc,
            crate::grpc::service(state),
            crate::listen::Protocols::Http2Only,
            tls,
            stopped(),
        ));
    }
    shutdown_signal().await;
    accepting.store(false, Ordering::Relaxed);
    tracing::info!("shutdown signal received; finishing in-flight requests");
    let _ = stop_tx.send(true);
    let grace = Duration::from_secs(args.shutdown_grace_seconds);
    let drained = async {
        while let Some(finished) = servers.join_next().await {
            finished.context("server task failed")?;
        }
        anyhow::Ok(())
    };
    match tokio::time::timeout(grace, drained).await {
        Ok(drained) => drained?,
        Err(_) => {
            bail!("in-flight requests did not finish within {grace:?} of the shutdown signal")
        }
    }
    let _ = tokio::task::spawn_blocking(move || tenancy.leave()).await;
    tracing::info!("shut down cleanly");
    Ok(())
}

async fn bind(address: SocketAddr) -> anyhow::Result<TcpListener> {
    TcpListener::bind(address)
        .await
        .with_context(|| format!("cannot listen on {address}"))
}

async fn shutdown_signal() {
    let interrupt = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut terminate) => {
                tokio::select! {
                    _ = interrupt => {},
                    _ = terminate.recv() => {},
                }
            }
            Err(error) => {
                tracing::warn!(%error, "cannot listen for SIGTERM; only SIGINT stops the server");
                let _ = interrupt.await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = interrupt.await;
    }
}

/// NVML, when the machine has the NVIDIA driver, with what start-up found said in the log:
/// the devices (from the CUDA driver) or why there are none.
fn gpu_telemetry() -> Option<Arc<dyn weft_gpu::GpuTelemetry>> {
    match weft_gpu::GpuDevices::discover(weft_backends::onnx::process_gpus()) {
        Ok(devices) => {
            for device in &devices {
                tracing::info!(
                    index = device.index,
                    name = %device.name,
                    uuid = %device.uuid,
                    compute_capability = ?device.compute_capability,
                    memory_bytes = device.memory_total_bytes,
                    "GPU found"
                );
            }
        }
        Err(reason) => {
            tracing::info!(%reason, "no GPU: models with execution = \"cuda\" stay unavailable")
        }
    }
    match weft_gpu::nvml::NvmlTelemetry::open() {
        Ok(telemetry) => Some(Arc::new(telemetry)),
        Err(reason) => {
            tracing::debug!(%reason, "no GPU telemetry; nv_gpu_* metrics are not exported");
            None
        }
    }
}
