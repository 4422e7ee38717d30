//! `cargo xtask bench`: the benchmark matrix of BENCHMARKS.md in one command.
//!
//! Generates the `wide` model (bench/make_bench_models.py) if missing, builds the release
//! binary, serves bench/repository on a free port, and runs `weft bench` over HTTP for the bare
//! models and the "graph3" graphs (normalize -> model -> softmax: `classify` on `mlp`, `wide3`
//! on `wide`), at concurrency 1 and 64, with batching off and on, then the in-process limits
//! (one row, and batches of 64 from one and from two callers: the model has one session per
//! core), then the plugin `wasi:nn` overhead. With `--peers` it also installs MLServer 1.7.1
//! and KServe 0.21 into virtual environments under target/peers/, serves the same graph3 work
//! with each (bench/peers/graph3.py), and drives them and Weft with the same JSON requests.
//! Prints each `weft bench` line, a table, and the issue-20 targets as ratios of this run.
//! Weft runs in the configuration BENCHMARKS.md recommends for speed: `--ort-threads <cores>`
//! and `--busy-poll-us 2000` (`--ort-threads 0 --busy-poll-us 0` measures the defaults).
//! The load generator shares the machine with the server; compare rows of one run.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};

use anyhow::{Context, Result, bail};

struct Options {
    duration: String,
    warmup: String,
    only: Option<String>,
    /// `weft serve --ort-threads`: one shared ONNX Runtime pool of this many threads.
    ort_threads: String,
    /// `weft serve --busy-poll-us`.
    busy_poll_us: String,
    peers: bool,
    /// Rows of the `bench-job` input file.
    rows: String,
}

fn options(args: &[String]) -> Result<Options> {
    let mut options = Options {
        duration: "8".into(),
        warmup: "2".into(),
        only: None,
        // One shared ONNX Runtime pool over every core: the configuration BENCHMARKS.md
        // recommends (`--ort-threads 0` measures one pool per session instead).
        ort_threads: std::thread::available_parallelism()
            .map_or(1, usize::from)
            .to_string(),
        busy_poll_us: "2000".into(),
        peers: false,
        rows: "1000000".into(),
    };
    let mut args = args.iter();
    while let Some(arg) = args.next() {
        if arg == "--peers" {
            options.peers = true;
            continue;
        }
        let value = args
            .next()
            .with_context(|| format!("{arg} needs a value"))?
            .clone();
        match arg.as_str() {
            "--duration" => options.duration = value,
            "--warmup" => options.warmup = value,
            "--only" => options.only = Some(value),
            "--ort-threads" => options.ort_threads = value,
            "--busy-poll-us" => options.busy_poll_us = value,
            "--rows" => options.rows = value,
            other => bail!(
                "unknown bench option {other} (--duration, --warmup, --only, --ort-threads, \
                 --busy-poll-us, --peers, and --rows for bench-job)"
            ),
        }
    }
    Ok(options)
}

impl Options {
    fn skips(&self, model: &str) -> bool {
        self.only
            .as_deref()
            .is_some_and(|only| !model.contains(only))
    }
}

/// Kills a server when the matrix ends, however it ends.
struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// What one `weft bench` line measured.
#[derive(Clone, Copy, Debug)]
struct Figure {
    requests_per_second: f64,
    rows_per_second: f64,
    p50_us: f64,
}

/// Reads "... : N req/s, N rows/s, p50 N us, ..." from a `weft bench` line.
fn figure(line: &str) -> Option<Figure> {
    let number_before = |unit: &str| -> Option<f64> {
        let at = line.find(unit)?;
        line[..at].split_whitespace().last()?.parse().ok()
    };
    let p50 = line.split("p50 ").nth(1)?.split_whitespace().next()?;
    Some(Figure {
        requests_per_second: number_before(" req/s")?,
        rows_per_second: number_before(" rows/s")?,
        p50_us: p50.parse().ok()?,
    })
}

/// Every row of the run, by name, in order.
#[derive(Default)]
struct Rows(Vec<(String, String)>);

impl Rows {
    fn push(&mut self, name: String, line: String) {
        self.0.push((name, line));
    }

    fn get(&self, name: &str) -> Option<Figure> {
        self.0
            .iter()
            .find(|(n, _)| n == name)
            .and_then(|(_, line)| figure(line))
    }
}

pub fn run_matrix(root: &Path, args: &[String]) -> Result<()> {
    let options = options(args)?;
    bench_models(root)?;
    let weft = build_release(root)?;
    let library = crate::ort_library(root);
    let mut rows = Rows::default();

    let (server, url, _) = serve_weft(root, &weft, &library, &options)?;
    let http = [
        ("mlp", "mlp", "off"),
        ("mlp", "mlp-batched", "on"),
        ("wide", "wide", "off"),
        ("wide", "wide-batched", "on"),
        ("mlp in a model worker", "mlp-worker", "off"),
        ("mlp in a model worker", "mlp-worker-batched", "on"),
        ("wide in a model worker", "wide-worker", "off"),
        ("wide in a model worker", "wide-worker-batched", "on"),
        ("mlp graph3 (classify)", "classify", "off"),
        ("mlp graph3 (classify)", "classify-batched", "on"),
        ("wide graph3 (wide3)", "wide3", "off"),
        ("wide graph3 (wide3)", "wide3-batched", "on"),
    ];
    for concurrency in ["1", "64"] {
        for (label, model, batching) in http {
            if options.skips(model) {
                continue;
            }
            let line = weft_bench(&weft, root, &http_args(model, &url, concurrency, &options))?;
            rows.push(
                format!("{label}, HTTP binary, batching {batching}, c={concurrency}"),
                line,
            );
        }
    }
    if options.peers {
        // The same JSON requests for Weft as for the peers below.
        for concurrency in ["1", "64"] {
            for graph in ["classify-batched", "wide3-batched"] {
                let mut args = http_args(graph, &url, concurrency, &options);
                args.extend(["--encoding".to_string(), "json".to_string()]);
                let line = weft_bench(&weft, root, &args)?;
                rows.push(format!("Weft {graph}, JSON, c={concurrency}"), line);
            }
        }
    }
    drop(server);
    for model in ["mlp", "mlp-worker", "wide", "wide-worker"] {
        if options.skips(model) {
            continue;
        }
        for (batch, concurrency) in [("1", "1"), ("1", "64"), ("64", "1"), ("64", "2")] {
            let args = in_process_args(model, batch, concurrency, &library, &options);
            let line = weft_bench(&weft, root, &args)?;
            rows.push(
                format!("{model}, in-process, batch of {batch}, c={concurrency}"),
                line,
            );
        }
    }
    // A model call from a plugin through wasi:nn, the model in process and in a worker.
    let mut sandbox_overhead = None;
    for model in ["mlp", "mlp-worker"] {
        if options.skips(model) {
            continue;
        }
        let output = Command::new(&weft)
            .current_dir(root)
            .args([
                "bench-plugins",
                "--repository",
                "bench/repository",
                "--model",
                model,
            ])
            .args(["--iterations", "20000", "--ort-library"])
            .arg(&library)
            .env("WEFT_LOG", "warn")
            .output()
            .context("cannot run weft bench-plugins")?;
        let stdout = String::from_utf8_lossy(&output.stdout);
        if !output.status.success() {
            bail!(
                "weft bench-plugins failed: {stdout}{}",
                String::from_utf8_lossy(&output.stderr)
            );
        }
        for line in stdout.lines() {
            println!("{line}");
            if let Some(rest) = line.strip_prefix("sandbox overhead per model call") {
                rows.push(
                    format!("wasi:nn overhead, {model}"),
                    rest.trim().to_string(),
                );
                if model == "mlp" {
                    sandbox_overhead = rest
                        .split_whitespace()
                        .find_map(|word| word.parse::<f64>().ok());
                }
            }
        }
    }
    if options.peers {
        for peer in ["mlserver", "kserve"] {
            let server = serve_peer(root, peer)?;
            let url = format!("http://127.0.0.1:{}", server.1);
            for concurrency in ["1", "64"] {
                for (graph, width) in [("classify", 64), ("wide3", 512)] {
                    let mut args = http_args(graph, &url, concurrency, &options);
                    args.extend([
                        "--encoding".to_string(),
                        "json".to_string(),
                        "--input".to_string(),
                        format!("x:FP32:-1,{width}"),
                    ]);
                    let line = weft_bench(&weft, root, &args)?;
                    rows.push(format!("{peer} {graph}, JSON, c={concurrency}"), line);
                }
            }
            drop(server);
        }
    }

    println!("\n| run | result |\n|---|---|");
    for (name, line) in &rows.0 {
        let result = line.split_once(": ").map_or(line.as_str(), |(_, r)| r);
        println!("| {name} | {result} |");
    }
    print_targets(&rows, sandbox_overhead);
    Ok(())
}

/// `weft bench` arguments for `model` in process from bench/repository: `rows` a call from
/// `concurrency` callers.
fn in_process_args(
    model: &str,
    rows: &str,
    concurrency: &str,
    library: &Path,
    options: &Options,
) -> Vec<String> {
    let mut args: Vec<String> = [
        "--model",
        model,
        "--in-process",
        "--repository",
        "bench/repository",
        "--rows",
        rows,
        "--ort-threads",
        &options.ort_threads,
        "--ort-library",
    ]
    .map(String::from)
    .to_vec();
    args.push(library.to_string_lossy().into_owned());
    args.extend(timing_args(concurrency, options));
    args
}

/// Builds the release `weft` binary; returns its path.
pub fn build_release(root: &Path) -> Result<std::path::PathBuf> {
    crate::run(Command::new(env!("CARGO")).current_dir(root).args([
        "build",
        "--release",
        "--quiet",
        "-p",
        "weft-cli",
        "--bin",
        "weft",
    ]))?;
    Ok(root.join("target/release/weft"))
}

/// The model the batch-job benchmark runs: the reference `mlp` behind a dynamic batcher, so
/// the job's rows and the real-time load share one batcher as the issue asks.
const JOB_MODEL: &str = "mlp-batched";

/// `cargo xtask bench-job`: the batch-job figures of BENCHMARKS.md (issue 18). The in-process
/// limit of `mlp` in batches of 64 (one and two callers), then `weft bench-job` against a
/// server of bench/repository: a `--rows` (1,000,000) job alone, a real-time c=8 load alone
/// and beside a second run of the job. Prints the job's rows/s against the limit and the p99
/// ratio, the two targets (>= 0.5x and <= 1.5x). Weft runs with its defaults
/// (`--ort-threads 0 --busy-poll-us 0`) unless those flags are given.
pub fn run_job_bench(root: &Path, args: &[String]) -> Result<()> {
    let mut options = options(args)?;
    // Weft's defaults unless asked otherwise: the matrix's spinning configuration (a shared
    // ONNX Runtime pool, busy polling) keeps every core busy, which leaves a job, at the idle
    // priority, little to run on (BENCHMARKS.md has both).
    if !args.iter().any(|arg| arg == "--ort-threads") {
        options.ort_threads = "0".into();
    }
    if !args.iter().any(|arg| arg == "--busy-poll-us") {
        options.busy_poll_us = "0".into();
    }
    let weft = build_release(root)?;
    let library = crate::ort_library(root);
    let mut limits = Vec::new();
    for callers in ["1", "2"] {
        let args = in_process_args(JOB_MODEL, "64", callers, &library, &options);
        let line = weft_bench(&weft, root, &args)?;
        let figure = figure(&line).context("no figure in the in-process line")?;
        limits.push((callers, figure.rows_per_second));
    }
    let (server, url, _) = serve_weft(root, &weft, &library, &options)?;
    let output = Command::new(&weft)
        .current_dir(root)
        .args(["bench-job", "--model", JOB_MODEL, "--url", &url])
        .args(["--rows", &options.rows, "--concurrency", "8"])
        .args(["--duration", &options.duration, "--warmup", &options.warmup])
        .env("WEFT_LOG", "warn")
        .env("WEFT_API_KEY", BENCH_KEY)
        .stderr(Stdio::inherit())
        .output()
        .context("cannot run weft bench-job")?;
    drop(server);
    let stdout = String::from_utf8_lossy(&output.stdout);
    print!("{stdout}");
    if !output.status.success() {
        bail!("weft bench-job failed");
    }
    let job_rate = stdout
        .lines()
        .find_map(|line| line.strip_prefix("job rows/s "))
        .and_then(|rest| rest.split(';').next())
        .and_then(|rate| rate.trim().parse::<f64>().ok())
        .context("no job rows/s in weft bench-job's output")?;
    println!("\n| target | this run |\n|---|---|");
    for (callers, limit) in limits {
        println!(
            "| job rows/s >= 0.5x in-process batch-64 ({callers} caller(s), {limit:.0} rows/s) | {job_rate:.0} = {:.2}x |",
            job_rate / limit
        );
    }
    if let Some(ratio) = stdout.lines().find_map(|line| {
        line.rsplit_once(": ")
            .filter(|_| line.starts_with("job rows/s "))
    }) {
        println!(
            "| real-time c=8 p99 beside the job <= 1.5x alone | {} |",
            ratio.1
        );
    }
    Ok(())
}

fn http_args(model: &str, url: &str, concurrency: &str, options: &Options) -> Vec<String> {
    let mut args: Vec<String> = ["--model", model, "--url", url].map(String::from).to_vec();
    args.extend(timing_args(concurrency, options));
    args
}

/// Concurrency, duration and warm-up, the same for every `weft bench` row.
fn timing_args(concurrency: &str, options: &Options) -> Vec<String> {
    [
        "--concurrency",
        concurrency,
        "--duration",
        &options.duration,
        "--warmup",
        &options.warmup,
    ]
    .map(String::from)
    .to_vec()
}

/// Generates the models of bench/repository that git does not hold, if missing.
pub fn bench_models(root: &Path) -> Result<()> {
    let missing = ["wide", "identity"].iter().any(|model| {
        !root
            .join(format!("bench/repository/models/{model}/1/model.onnx"))
            .is_file()
    });
    if missing {
        crate::run(
            Command::new(crate::venv_python(root)).arg(root.join("bench/make_bench_models.py")),
        )?;
    }
    Ok(())
}

/// Starts `weft serve` on bench/repository with a fresh store, gRPC on, and shared memory for
/// the benchmark's tenant; returns it, its HTTP URL and its gRPC URL.
fn serve_weft(
    root: &Path,
    weft: &Path,
    library: &Path,
    options: &Options,
) -> Result<(Server, String, String)> {
    let data_dir = root.join("target/bench-data");
    // A fresh store each run: the benchmark's tenant starts with the bootstrap quotas.
    let _ = std::fs::remove_dir_all(data_dir.join("store"));
    let mut child = Command::new(weft)
        .current_dir(root)
        .args([
            "serve",
            "--repository",
            "bench/repository",
            "--listen",
            "127.0.0.1:0",
            "--grpc-listen",
            "127.0.0.1:0",
            "--system-shared-memory",
            "default",
        ])
        .arg("--data-dir")
        .arg(&data_dir)
        .arg("--ort-library")
        .arg(library)
        .args(["--ort-threads", &options.ort_threads])
        .args(["--busy-poll-us", &options.busy_poll_us])
        .args(["--bootstrap-key", BENCH_KEY])
        .env("WEFT_LOG", "warn")
        .stdout(Stdio::piped())
        .spawn()
        .context("cannot start weft serve")?;
    let stdout = child.stdout.take().context("no stdout")?;
    let server = Server(child);
    let mut address = None;
    let mut grpc = None;
    for line in BufReader::new(stdout).lines() {
        let line = line?;
        if let Some(found) = line.strip_prefix("weft gRPC listening on ") {
            grpc = Some(format!("http://{found}"));
        }
        if let Some(found) = line.strip_prefix("weft listening on ") {
            address = Some(found.to_string());
            break;
        }
    }
    let url = address.context("weft serve exited before listening")?;
    let grpc = grpc.context("weft serve did not open its gRPC listener")?;
    Ok((server, url, grpc))
}

/// `cargo xtask bench-transports`: the same requests over HTTP (binary extension) and gRPC,
/// per request at concurrency 1 and 64 for `mlp`, `mlp-batched` and the `classify-batched`
/// graph; then a large tensor (4 MiB through `identity`) over HTTP binary, gRPC, and shared
/// memory with either. Prints each line, a table, and gRPC / HTTP ratios of this run.
pub fn run_transport_bench(root: &Path, args: &[String]) -> Result<()> {
    let options = options(args)?;
    bench_models(root)?;
    let weft = build_release(root)?;
    let library = crate::ort_library(root);
    let (server, url, grpc) = serve_weft(root, &weft, &library, &options)?;
    let mut rows = Rows::default();
    let pairs = [
        ("mlp", "mlp"),
        ("mlp batched", "mlp-batched"),
        ("mlp graph3 (classify)", "classify-batched"),
    ];
    for concurrency in ["1", "64"] {
        for (label, model) in pairs {
            if options.skips(model) {
                continue;
            }
            let args = http_args(model, &url, concurrency, &options);
            let line = weft_bench(&weft, root, &args)?;
            rows.push(format!("{label}, HTTP binary, c={concurrency}"), line);
            let mut args = args;
            args.extend(["--grpc".to_string(), "--grpc-url".to_string(), grpc.clone()]);
            let line = weft_bench(&weft, root, &args)?;
            rows.push(format!("{label}, gRPC, c={concurrency}"), line);
        }
    }
    if !options.skips("identity") {
        for concurrency in ["1", "8"] {
            for (transport, extra) in [
                ("HTTP binary", vec![]),
                ("gRPC", vec!["--grpc", "--grpc-url", &grpc]),
                ("HTTP shared memory", vec!["--shared-memory"]),
                (
                    "gRPC shared memory",
                    vec!["--grpc", "--grpc-url", &grpc, "--shared-memory"],
                ),
            ] {
                let mut args = http_args("identity", &url, concurrency, &options);
                args.extend(["--rows", "4"].map(String::from));
                args.extend(extra.into_iter().map(String::from));
                let line = weft_bench(&weft, root, &args)?;
                rows.push(
                    format!("identity 4 MiB, {transport}, c={concurrency}"),
                    line,
                );
            }
        }
    }
    drop(server);
    println!("\n| run | result |\n|---|---|");
    for (name, line) in &rows.0 {
        let result = line.split_once(": ").map_or(line.as_str(), |(_, r)| r);
        println!("| {name} | {result} |");
    }
    println!("\n| comparison | req/s ratio | p50 ratio |\n|---|---|---|");
    let compare = |a: &str, b: &str| {
        if let (Some(a_figure), Some(b_figure)) = (rows.get(a), rows.get(b)) {
            println!(
                "| {a} / {b} | {:.2}x | {:.2}x |",
                a_figure.requests_per_second / b_figure.requests_per_second.max(f64::EPSILON),
                a_figure.p50_us / b_figure.p50_us.max(f64::EPSILON)
            );
        }
    };
    for concurrency in ["1", "64"] {
        for (label, _) in pairs {
            compare(
                &format!("{label}, gRPC, c={concurrency}"),
                &format!("{label}, HTTP binary, c={concurrency}"),
            );
        }
    }
    for concurrency in ["1", "8"] {
        for transport in ["gRPC", "HTTP shared memory", "gRPC shared memory"] {
            compare(
                &format!("identity 4 MiB, {transport}, c={concurrency}"),
                &format!("identity 4 MiB, HTTP binary, c={concurrency}"),
            );
        }
    }
    Ok(())
}

/// The pinned packages of each peer's virtual environment (target/peers/<peer>).
const PEER_PACKAGES: [(&str, &[&str]); 2] = [
    (
        "mlserver",
        &["mlserver==1.7.1", "onnxruntime==1.22.1", "numpy<2.3"],
    ),
    (
        "kserve",
        &["kserve==0.21.0", "onnxruntime==1.22.1", "numpy<2.3"],
    ),
];

/// Creates (once per set of pins) the peer's virtual environment; returns its Python.
fn peer_env(root: &Path, peer: &str) -> Result<std::path::PathBuf> {
    let packages = PEER_PACKAGES
        .iter()
        .find(|(name, _)| *name == peer)
        .map(|(_, packages)| *packages)
        .with_context(|| format!("unknown peer {peer}"))?;
    crate::pinned_venv(&root.join("target/peers").join(peer), packages)
}

/// Starts a peer server (bench/peers/graph3.py) on a free port and waits until both graph3
/// models answer ready; returns it and its port.
fn serve_peer(root: &Path, peer: &str) -> Result<(Server, u16)> {
    let python = peer_env(root, peer)?;
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let child = Command::new(python)
        .current_dir(root.join("bench/peers"))
        .arg("graph3.py")
        .arg(peer)
        .arg(root.join("bench/repository"))
        .arg(port.to_string())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        // One process, as the peers run by default; no thread oversubscription from NumPy.
        .env("OMP_NUM_THREADS", "1")
        .spawn()
        .with_context(|| format!("cannot start {peer}"))?;
    let mut server = Server(child);
    let started = std::time::Instant::now();
    loop {
        if ready(port, "classify") && ready(port, "wide3") {
            return Ok((server, port));
        }
        if let Ok(Some(status)) = server.0.try_wait() {
            bail!("{peer} exited with {status} before it was ready");
        }
        if started.elapsed() > std::time::Duration::from_secs(120) {
            bail!("{peer} was not ready after 120 s");
        }
        std::thread::sleep(std::time::Duration::from_millis(250));
    }
}

/// Whether `GET /v2/models/<model>/ready` answers 200.
fn ready(port: u16, model: &str) -> bool {
    use std::io::{Read, Write};
    let Ok(mut stream) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let request = format!(
        "GET /v2/models/{model}/ready HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    );
    let mut answer = String::new();
    stream.write_all(request.as_bytes()).is_ok()
        && stream.read_to_string(&mut answer).is_ok()
        && answer.starts_with("HTTP/1.1 200")
}

/// The issue-20 targets, as ratios of figures of this run (missing rows print as n/a).
fn print_targets(rows: &Rows, sandbox_overhead: Option<f64>) {
    let ratio = |a: Option<f64>, b: Option<f64>| match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => format!("{:.2}x", a / b),
        _ => "n/a".to_string(),
    };
    let rows_s = |name: &str| rows.get(name).map(|f| f.rows_per_second);
    let req_s = |name: &str| rows.get(name).map(|f| f.requests_per_second);
    let p50 = |name: &str| rows.get(name).map(|f| f.p50_us);
    let limit = rows_s("wide, in-process, batch of 64, c=2");
    println!("\n| target | this run |\n|---|---|");
    println!(
        "| wide graph3 c=64 >= 0.6x limit | {} |",
        ratio(
            rows_s("wide graph3 (wide3), HTTP binary, batching on, c=64"),
            limit
        )
    );
    println!(
        "| bare wide batched c=64 >= 0.75x limit | {} |",
        ratio(rows_s("wide, HTTP binary, batching on, c=64"), limit)
    );
    println!(
        "| wide graph3 c=1 >= 1.2x MLServer | {} (JSON both) |",
        ratio(
            req_s("Weft wide3-batched, JSON, c=1"),
            req_s("mlserver wide3, JSON, c=1")
        )
    );
    println!(
        "| mlp graph3 c=64 >= 10x MLServer | {} (JSON both) |",
        ratio(
            req_s("Weft classify-batched, JSON, c=64"),
            req_s("mlserver classify, JSON, c=64")
        )
    );
    println!(
        "| mlp graph3 c=1 p50 <= 0.25x KServe's | {} (JSON both) |",
        ratio(
            p50("Weft classify-batched, JSON, c=1"),
            p50("kserve classify, JSON, c=1")
        )
    );
    println!(
        "| bare mlp-batched c=64 >= 50,000 req/s | {} |",
        req_s("mlp, HTTP binary, batching on, c=64").map_or("n/a".into(), |r| format!("{r:.0}"))
    );
    println!(
        "| wasi:nn call <= 10 us over direct (p50) | {} |",
        sandbox_overhead.map_or("n/a".into(), |us| format!("{us:.1} us"))
    );
}

/// Runs `weft bench` and returns its result line (also printed).
/// The API key of tenant `default` in the benchmark server (every request is authenticated,
/// as in production).
const BENCH_KEY: &str = "weft-bench-bootstrap-key";

fn weft_bench(weft: &Path, root: &Path, args: &[String]) -> Result<String> {
    let output = Command::new(weft)
        .current_dir(root)
        .arg("bench")
        .args(args)
        .env("WEFT_LOG", "warn")
        .env("WEFT_API_KEY", BENCH_KEY)
        .output()
        .context("cannot run weft bench")?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    if !output.status.success() {
        bail!(
            "weft bench {args:?} failed: {stdout}{}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    let line = stdout.lines().last().unwrap_or_default().to_string();
    println!("{line}");
    // A run with failed requests measured something else (refusals): no figure from it.
    if !line.contains(" 0 errors") {
        bail!("weft bench {args:?} had failed requests: {line}");
    }
    Ok(line)
}
