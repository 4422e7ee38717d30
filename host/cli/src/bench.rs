//! `weft bench`: a V2 load generator, and the same workload run in-process as the baseline.
//!
//! HTTP mode sends the same request over keep-alive connections from `--concurrency` tasks for
//! `--duration` seconds after a warm-up, JSON or binary-extension bodies. In-process mode loads
//! the model from the repository the way `weft serve` does and calls it directly with the same
//! input, so the difference between the two is the cost of HTTP and the protocol codecs.
//! `--grpc` sends the same load as gRPC calls and `--shared-memory` moves the tensors through
//! shared memory regions (`bench_grpc.rs`).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use bytes::Bytes;
use clap::ValueEnum;
use weft_core::{DataType, Model, NamedTensor, Tensor, TensorSpec};
use weft_engine::ModelRegistry;

use weft_server::commands::{OrtArgs, bench_worker_pool};

use crate::bench_grpc::{GrpcCaller, GrpcTarget, SharedMemoryPlan};
use weft_server::loader::RepositoryLoader;

#[derive(Debug, clap::Args)]
pub struct BenchArgs {
    /// Model (or graph) to call.
    #[arg(long)]
    pub model: String,
    /// Server to load, e.g. http://127.0.0.1:8000. Omit with --in-process.
    #[arg(long, default_value = "http://127.0.0.1:8000")]
    pub url: String,
    /// Run the model in this process instead of over HTTP (the baseline).
    #[arg(long)]
    pub in_process: bool,
    /// Repository to load the model from with --in-process.
    #[arg(long, default_value = "examples/quickstart")]
    pub repository: PathBuf,
    #[command(flatten)]
    pub ort: OrtArgs,
    /// Concurrent requests in flight.
    #[arg(long, default_value_t = 1)]
    pub concurrency: usize,
    /// Seconds to measure.
    #[arg(long, default_value_t = 10.0)]
    pub duration: f64,
    /// Seconds to run before measuring.
    #[arg(long, default_value_t = 2.0)]
    pub warmup: f64,
    /// Rows in dimension 0 of each input (replaces every variable dimension).
    #[arg(long, default_value_t = 1)]
    pub rows: usize,
    /// Request body encoding over HTTP.
    #[arg(long, value_enum, default_value_t = Encoding::Binary)]
    pub encoding: Encoding,
    /// Call over gRPC (`ModelInfer` with raw tensor contents) at --grpc-url instead of HTTP.
    #[arg(long)]
    pub grpc: bool,
    /// The gRPC endpoint, with --grpc.
    #[arg(long, default_value = "http://127.0.0.1:8001")]
    pub grpc_url: String,
    /// Send inputs and receive outputs through Triton's system shared memory (a region per
    /// tensor in one object under /dev/shm) instead of in the requests; the server must
    /// allow the key's tenant (`--system-shared-memory`) and share this host.
    #[arg(long)]
    pub shared_memory: bool,
    /// API key sent as `Authorization: Bearer <key>` over HTTP.
    #[arg(long, env = "WEFT_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// An input as `NAME:DATATYPE:DIMS` (e.g. `x:FP32:-1,64`), repeatable: used instead of the
    /// server's model metadata, for servers whose metadata does not list inputs.
    #[arg(long = "input", value_name = "NAME:DATATYPE:DIMS", value_parser = parse_input_spec)]
    pub inputs: Vec<TensorSpec>,
}

/// Parses `--input NAME:DATATYPE:DIMS`.
fn parse_input_spec(text: &str) -> Result<TensorSpec, String> {
    let mut parts = text.splitn(3, ':');
    let (Some(name), Some(datatype), Some(dims)) = (parts.next(), parts.next(), parts.next())
    else {
        return Err(format!(
            "'{text}' is not NAME:DATATYPE:DIMS (e.g. x:FP32:-1,64)"
        ));
    };
    let datatype = datatype
        .parse::<DataType>()
        .map_err(|error| format!("'{text}': {error}"))?;
    let shape = dims
        .split(',')
        .map(|dim| dim.trim().parse::<i64>())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|_| format!("'{text}': dimensions are integers separated by commas"))?;
    Ok(TensorSpec {
        name: name.to_string(),
        datatype,
        shape,
    })
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum Encoding {
    Json,
    Binary,
}

/// What a run measured.
#[derive(Debug)]
pub struct Report {
    pub requests: usize,
    pub errors: usize,
    pub elapsed: Duration,
    pub latencies: Vec<Duration>,
}

impl Report {
    pub fn percentile(&self, p: f64) -> Duration {
        if self.latencies.is_empty() {
            return Duration::ZERO;
        }
        let index = ((self.latencies.len() - 1) as f64 * p).round() as usize;
        self.latencies[index.min(self.latencies.len() - 1)]
    }

    pub fn print(&self, label: &str, rows: usize) {
        let seconds = self.elapsed.as_secs_f64().max(f64::EPSILON);
        println!(
            "{label}: {} requests, {} errors in {:.1}s: {:.0} req/s, {:.0} rows/s, p50 {:.1} us, p90 {:.1} us, p99 {:.1} us",
            self.requests,
            self.errors,
            seconds,
            self.requests as f64 / seconds,
            (self.requests * rows) as f64 / seconds,
            self.percentile(0.50).as_secs_f64() * 1e6,
            self.percentile(0.90).as_secs_f64() * 1e6,
            self.percentile(0.99).as_secs_f64() * 1e6,
        );
    }
}

pub async fn bench(args: BenchArgs) -> anyhow::Result<()> {
    if args.concurrency == 0 {
        bail!("--concurrency must be at least 1");
    }
    let report = if args.in_process {
        let model = load_in_process(&args).await?;
        let inputs = sample_inputs(&model.metadata().inputs, args.rows)?;
        let call = move || {
            let model = Arc::clone(&model);
            let inputs = inputs.clone();
            async move {
                let request = weft_core::RequestContext::background();
                model.infer(&request, inputs).await.is_ok()
            }
        };
        drive(&Timing::of(&args), call).await
    } else if args.grpc {
        let caller = GrpcCaller::new(&GrpcTarget {
            url: &args.grpc_url,
            model: &args.model,
            api_key: args.api_key.as_deref(),
            // One HTTP/2 connection per concurrent caller, as the HTTP load keeps one
            // keep-alive connection each.
            connections: args.concurrency,
            rows: args.rows,
            inputs: (!args.inputs.is_empty()).then(|| args.inputs.clone()),
            shared_memory: args.shared_memory,
        })
        .await?;
        let call = move || caller.call();
        drive(&Timing::of(&args), call).await
    } else {
        let caller = HttpCaller::new(&HttpTarget {
            url: &args.url,
            model: &args.model,
            api_key: args.api_key.as_deref(),
            connections: args.concurrency,
            rows: args.rows,
            encoding: args.encoding,
            inputs: (!args.inputs.is_empty()).then(|| args.inputs.clone()),
            shared_memory: args.shared_memory,
        })
        .await?;
        let call = move || caller.call();
        drive(&Timing::of(&args), call).await
    };
    let label = if args.in_process {
        format!(
            "in-process {} rows={} concurrency={}",
            args.model, args.rows, args.concurrency
        )
    } else {
        let transport = match (args.grpc, args.shared_memory) {
            (true, true) => "grpc shared-memory".to_string(),
            (true, false) => "grpc".to_string(),
            (false, true) => "http shared-memory".to_string(),
            (false, false) => format!("http {:?}", args.encoding),
        };
        format!(
            "{transport} {} rows={} concurrency={}",
            args.model, args.rows, args.concurrency
        )
    };
    report.print(&label, args.rows);
    Ok(())
}

async fn load_in_process(args: &BenchArgs) -> anyhow::Result<Arc<dyn Model>> {
    args.ort.init()?;
    let repository = args.repository.clone();
    // Models with `isolation = "process"` run in a model worker of this process, as in
    // `weft serve`, so the same call measures the process boundary.
    let loader = RepositoryLoader {
        workers: Some(bench_worker_pool(&args.ort.library)?),
        ..RepositoryLoader::default()
    };
    let registry =
        tokio::task::spawn_blocking(move || ModelRegistry::load(&repository, &loader)).await??;
    let (_, model) = registry.resolve(&args.model, None)?;
    Ok(model)
}

/// How long and how wide a load runs.
#[derive(Clone, Copy, Debug)]
pub struct Timing {
    /// Concurrent requests in flight.
    pub concurrency: usize,
    /// Seconds run before measuring.
    pub warmup: f64,
    /// Seconds measured.
    pub duration: f64,
}

impl Timing {
    fn of(args: &BenchArgs) -> Self {
        Timing {
            concurrency: args.concurrency,
            warmup: args.warmup,
            duration: args.duration,
        }
    }
}

/// What one HTTP load sends: `rows` rows of `model`'s inputs (from its metadata unless
/// `inputs` names them) to the server at `url`.
pub struct HttpTarget<'a> {
    pub url: &'a str,
    pub model: &'a str,
    pub api_key: Option<&'a str>,
    /// Keep-alive connections to hold open (one per concurrent caller).
    pub connections: usize,
    pub rows: usize,
    pub encoding: Encoding,
    pub inputs: Option<Vec<TensorSpec>>,
    /// Tensors through shared memory regions instead of the body (`encoding` unused).
    pub shared_memory: bool,
}

/// Sends the same V2 inference request again and again over keep-alive connections.
#[derive(Clone)]
pub struct HttpCaller {
    client: reqwest::Client,
    url: String,
    body: Bytes,
    header_length: Option<String>,
    /// The regions a shared-memory load names, kept while the caller lives.
    _plan: Option<Arc<SharedMemoryPlan>>,
}

impl HttpCaller {
    /// Builds the request once (reading the model's metadata for its inputs if needed).
    pub async fn new(target: &HttpTarget<'_>) -> anyhow::Result<Self> {
        let client = api_client(target.api_key, target.connections)?;
        let specs: Vec<TensorSpec> = match &target.inputs {
            Some(inputs) => inputs.clone(),
            None => model_inputs(&client, target.url, target.model).await?,
        };
        let inputs = sample_inputs(&specs, target.rows)?;
        let (body, header_length, plan) = if target.shared_memory {
            let outputs = model_tensors(&client, target.url, target.model, "outputs").await?;
            let plan = SharedMemoryPlan::create(&inputs, &outputs, target.rows)?;
            plan.register_http(&client, target.url).await?;
            (plan.http_body(), None, Some(Arc::new(plan)))
        } else {
            let (body, header_length) = request_body(&inputs, target.encoding)?;
            (body, header_length, None)
        };
        Ok(HttpCaller {
            client,
            url: format!("{}/v2/models/{}/infer", target.url, target.model),
            body,
            header_length,
            _plan: plan,
        })
    }

    /// One request; whether it succeeded.
    pub fn call(&self) -> impl std::future::Future<Output = bool> + Send + use<> {
        let mut request = self.client.post(&self.url).body(self.body.clone());
        match &self.header_length {
            Some(length) => {
                request = request.header("Inference-Header-Content-Length", length.as_str());
            }
            // Some servers (KServe) refuse a JSON body without its content type.
            None => request = request.header(reqwest::header::CONTENT_TYPE, "application/json"),
        }
        async move {
            match request.send().await {
                Ok(response) if response.status().is_success() => response.bytes().await.is_ok(),
                _ => false,
            }
        }
    }
}

/// An HTTP client that sends `Authorization: Bearer <key>` when given a key.
pub fn api_client(api_key: Option<&str>, connections: usize) -> anyhow::Result<reqwest::Client> {
    let mut headers = reqwest::header::HeaderMap::new();
    if let Some(key) = api_key {
        let value = reqwest::header::HeaderValue::from_str(&format!("Bearer {key}"))
            .context("--api-key is not a valid header value")?;
        headers.insert(reqwest::header::AUTHORIZATION, value);
    }
    reqwest::Client::builder()
        .pool_max_idle_per_host(connections)
        .default_headers(headers)
        .build()
        .context("cannot build the HTTP client")
}

/// The inputs a server's model metadata lists.
pub async fn model_inputs(
    client: &reqwest::Client,
    url: &str,
    model: &str,
) -> anyhow::Result<Vec<TensorSpec>> {
    model_tensors(client, url, model, "inputs").await
}

/// The `inputs` or `outputs` a server's model metadata lists.
async fn model_tensors(
    client: &reqwest::Client,
    url: &str,
    model: &str,
    which: &str,
) -> anyhow::Result<Vec<TensorSpec>> {
    let metadata: serde_json::Value = client
        .get(format!("{url}/v2/models/{model}"))
        .send()
        .await
        .and_then(reqwest::Response::error_for_status)
        .with_context(|| format!("cannot read metadata of '{model}' from {url}"))?
        .json()
        .await?;
    serde_json::from_value(metadata[which].clone())
        .with_context(|| format!("model metadata has no usable {which}"))
}

/// Runs `call` from `timing.concurrency` tasks: warm-up, then measurement.
pub async fn drive<F, Fut>(timing: &Timing, call: F) -> Report
where
    F: Fn() -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = bool> + Send,
{
    let warmup = Duration::from_secs_f64(timing.warmup.max(0.0));
    let duration = Duration::from_secs_f64(timing.duration.max(0.1));
    let start = Instant::now();
    let measure_from = start + warmup;
    let stop_at = measure_from + duration;
    let mut tasks = Vec::new();
    for _ in 0..timing.concurrency {
        let call = call.clone();
        tasks.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            let mut errors = 0usize;
            loop {
                let began = Instant::now();
                if began >= stop_at {
                    break;
                }
                let ok = call().await;
                if began >= measure_from {
                    if ok {
                        latencies.push(began.elapsed());
                    } else {
                        errors += 1;
                    }
                }
            }
            (latencies, errors)
        }));
    }
    let mut latencies = Vec::new();
    let mut errors = 0;
    for task in tasks {
        if let Ok((task_latencies, task_errors)) = task.await {
            latencies.extend(task_latencies);
            errors += task_errors;
        }
    }
    latencies.sort_unstable();
    Report {
        requests: latencies.len(),
        errors,
        elapsed: duration,
        latencies,
    }
}

/// Deterministic inputs: every variable dimension becomes `rows`, values cycle small numbers.
pub fn sample_inputs(specs: &[TensorSpec], rows: usize) -> anyhow::Result<Vec<NamedTensor>> {
    specs
        .iter()
        .map(|spec| {
            let shape: Vec<usize> = spec
                .shape
                .iter()
                .map(|&d| if d < 0 { rows } else { d as usize })
                .collect();
            let count: usize = shape.iter().product();
            let data: Vec<u8> = match spec.datatype {
                DataType::Fp32 => (0..count)
                    .flat_map(|i| ((i % 17) as f32 / 17.0).to_le_bytes())
                    .collect(),
                DataType::Fp64 => (0..count)
                    .flat_map(|i| ((i % 17) as f64 / 17.0).to_le_bytes())
                    .collect(),
                DataType::Int64 => (0..count)
                    .flat_map(|i| ((i % 17) as i64).to_le_bytes())
                    .collect(),
                DataType::Int32 => (0..count)
                    .flat_map(|i| ((i % 17) as i32).to_le_bytes())
                    .collect(),
                DataType::Bool | DataType::Uint8 => (0..count).map(|i| (i % 2) as u8).collect(),
                other => bail!("bench cannot generate {other} input '{}'", spec.name),
            };
            Ok(NamedTensor::new(
                spec.name.clone(),
                Tensor::new(spec.datatype, shape, Bytes::from(data))?,
            ))
        })
        .collect()
}

/// A V2 request body for these inputs, and the binary header length if binary.
fn request_body(
    inputs: &[NamedTensor],
    encoding: Encoding,
) -> anyhow::Result<(Bytes, Option<String>)> {
    let binary = matches!(encoding, Encoding::Binary);
    let request_inputs = inputs
        .iter()
        .map(|input| weft_protocol::RequestInput {
            tensor: input.clone(),
            parameters: serde_json::Map::new(),
        })
        .collect::<Vec<_>>();
    let (body, header_length) = weft_protocol::encode_infer_request(&request_inputs, binary)?;
    Ok((Bytes::from(body), header_length.map(|l| l.to_string())))
}

#[derive(Debug, clap::Args)]
pub struct BenchPluginsArgs {
    /// Folder with the built guest components (`cargo xtask setup` builds them).
    #[arg(long, default_value = "target/guests/wasm32-wasip2/release")]
    pub guests: PathBuf,
    /// Repository holding the model the plugin calls.
    #[arg(long, default_value = "examples/quickstart")]
    pub repository: PathBuf,
    /// Model the plugin calls through wasi:nn, and that is called directly for comparison.
    #[arg(long, default_value = "mlp")]
    pub model: String,
    #[command(flatten)]
    pub ort: OrtArgs,
    /// Calls per measurement (after as many warm-up calls).
    #[arg(long, default_value_t = 20_000, value_parser = clap::value_parser!(u64).range(1..))]
    pub iterations: u64,
}

/// Rounds of the interleaved direct / through-a-plugin measurement in `bench-plugins`.
const ROUNDS: usize = 40;

/// Times `call` `iterations` times after as many warm-up calls; returns sorted latencies.
async fn time_calls<F, Fut>(iterations: usize, mut call: F) -> anyhow::Result<Vec<Duration>>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<()>>,
{
    for _ in 0..iterations {
        call().await?;
    }
    let mut latencies = Vec::with_capacity(iterations);
    for _ in 0..iterations {
        let began = Instant::now();
        call().await?;
        latencies.push(began.elapsed());
    }
    latencies.sort_unstable();
    Ok(latencies)
}

fn summary(label: &str, latencies: &[Duration]) -> f64 {
    let at = |p: f64| latencies[((latencies.len() - 1) as f64 * p) as usize].as_secs_f64() * 1e6;
    let mean =
        latencies.iter().map(Duration::as_secs_f64).sum::<f64>() / latencies.len() as f64 * 1e6;
    println!(
        "{label:<48} mean {mean:8.1} us   p50 {:8.1} us   p99 {:8.1} us",
        at(0.5),
        at(0.99)
    );
    at(0.5)
}

pub async fn bench_plugins(args: BenchPluginsArgs) -> anyhow::Result<()> {
    use std::collections::HashMap;
    use weft_runtime::{CallContext, PluginRuntime, RuntimeConfig};

    let runtime = PluginRuntime::new(RuntimeConfig::default())?;
    let read = |name: &str| {
        let path = args.guests.join(format!("{name}.wasm"));
        std::fs::read(&path)
            .with_context(|| format!("cannot read {} (run `cargo xtask setup`)", path.display()))
    };
    let echo = runtime.load("runtime_echo", &read("runtime_echo")?)?;
    let caller = runtime.load("runtime_call_model", &read("runtime_call_model")?)?;
    let model = load_in_process(&BenchArgs {
        model: args.model.clone(),
        url: String::new(),
        in_process: true,
        repository: args.repository.clone(),
        ort: args.ort.clone(),
        concurrency: 1,
        duration: 0.0,
        warmup: 0.0,
        rows: 1,
        encoding: Encoding::Binary,
        grpc: false,
        grpc_url: String::new(),
        shared_memory: false,
        api_key: None,
        inputs: Vec::new(),
    })
    .await?;
    let inputs = sample_inputs(&model.metadata().inputs, 1)?;
    let mut grants: HashMap<String, Arc<dyn Model>> = HashMap::new();
    grants.insert(args.model.clone(), Arc::clone(&model));
    let with_grant = CallContext {
        grants: Arc::new(grants),
        params: vec![("model".to_string(), args.model.clone())],
        ..CallContext::default()
    };
    let empty = CallContext::default();
    // At least 1 (clap refuses 0): the summary indexes the sorted latencies.
    let n = usize::try_from(args.iterations).unwrap_or(usize::MAX);
    println!("plugin sandbox, {n} calls each, one at a time:");
    summary(
        "instantiate from pool (fresh Store)",
        &time_calls(n, || async { Ok(echo.instantiate_only().await?) }).await?,
    );
    summary(
        "empty transform call (instantiate + call)",
        &time_calls(n, || async {
            echo.transform(&empty, Vec::new())
                .await
                .map(drop)
                .map_err(|f| anyhow::anyhow!("{f}"))
        })
        .await?,
    );
    // The overhead is the difference of two ~20-60 µs figures on a noisy machine: measure
    // the two calls in interleaved rounds (each round a block of direct calls, then a block
    // through the plugin), so drift hits both alike, and report the median round's difference
    // with the spread across rounds.
    let rounds = ROUNDS.min(n);
    let per_round = (n / rounds).max(1);
    let direct_call = || async {
        model
            .infer(&weft_core::RequestContext::background(), inputs.clone())
            .await
            .map(drop)
            .map_err(anyhow::Error::from)
    };
    let plugin_call = || async {
        caller
            .transform(&with_grant, inputs.clone())
            .await
            .map(drop)
            .map_err(|f| anyhow::anyhow!("{f}"))
    };
    let (mut all_direct, mut all_through, mut differences) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..rounds {
        let direct = time_calls(per_round, direct_call).await?;
        let through = time_calls(per_round, plugin_call).await?;
        differences.push(
            through[through.len() / 2].as_secs_f64() * 1e6
                - direct[direct.len() / 2].as_secs_f64() * 1e6,
        );
        all_direct.extend(direct);
        all_through.extend(through);
    }
    all_direct.sort_unstable();
    all_through.sort_unstable();
    summary(
        &format!("{} called directly (Model::infer)", args.model),
        &all_direct,
    );
    summary(
        &format!("{} through a plugin via wasi:nn", args.model),
        &all_through,
    );
    differences.sort_by(f64::total_cmp);
    let quartile = |q: usize| differences[(differences.len() - 1) * q / 4];
    println!(
        "sandbox overhead per model call (p50 difference): {:.1} us (median of {rounds} \
         interleaved rounds of {per_round} calls each; quartiles {:.1} to {:.1} us)",
        quartile(2),
        quartile(1),
        quartile(3),
    );
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn an_input_spec_names_the_tensor_its_datatype_and_dims() {
        let spec = parse_input_spec("x:FP32:-1, 64").unwrap();
        assert_eq!(spec.name, "x");
        assert_eq!(spec.datatype, DataType::Fp32);
        assert_eq!(spec.shape, vec![-1, 64]);
        for bad in ["x:FP32", "x:FLOAT9:1", "x:FP32:1,a", "x:FP32:"] {
            let error = parse_input_spec(bad).unwrap_err();
            assert!(
                error.contains(bad) || error.contains("NAME:DATATYPE:DIMS"),
                "{bad}: {error}"
            );
        }
    }
}
