//! `cargo xtask bench`: the benchmark matrix of BENCHMARKS.md in one command.
//!
//! Generates the `wide` model (bench/make_bench_models.py) if missing, builds the release
//! binary, serves bench/repository on a free port, and runs `weft bench` over HTTP for the bare
//! models and the classify-style graph, at concurrency 1 and 64, with batching off and on, then
//! the in-process limits (one row, and batches of 64 from one and from two callers: the model
//! has one session per core). Prints each `weft bench` line and a table.
//! The load generator shares the machine with the server; compare rows of one run.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};

use anyhow::{Context, Result, bail};

struct Options {
    duration: String,
    warmup: String,
    only: Option<String>,
}

fn options(args: &[String]) -> Result<Options> {
    let mut options = Options {
        duration: "8".into(),
        warmup: "2".into(),
        only: None,
    };
    let mut args = args.iter();
    while let Some(arg) = args.next() {
        let value = args
            .next()
            .with_context(|| format!("{arg} needs a value"))?
            .clone();
        match arg.as_str() {
            "--duration" => options.duration = value,
            "--warmup" => options.warmup = value,
            "--only" => options.only = Some(value),
            other => bail!("unknown bench option {other} (--duration, --warmup, --only)"),
        }
    }
    Ok(options)
}

/// Kills the server when the matrix ends, however it ends.
struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub fn run_matrix(root: &Path, args: &[String]) -> Result<()> {
    let options = options(args)?;
    let wide = root.join("bench/repository/models/wide/1/model.onnx");
    if !wide.is_file() {
        crate::run(
            Command::new(crate::venv_python(root)).arg(root.join("bench/make_bench_models.py")),
        )?;
    }
    crate::run(Command::new(env!("CARGO")).current_dir(root).args([
        "build",
        "--release",
        "--quiet",
        "-p",
        "weft-cli",
        "--bin",
        "weft",
    ]))?;
    let weft = root.join("target/release/weft");
    let library = crate::ort_library(root);
    let data_dir = root.join("target/bench-data");
    // A fresh store each run: the benchmark's tenant starts with the bootstrap quotas.
    let _ = std::fs::remove_dir_all(data_dir.join("store"));
    let mut child = Command::new(&weft)
        .current_dir(root)
        .args([
            "serve",
            "--repository",
            "bench/repository",
            "--listen",
            "127.0.0.1:0",
        ])
        .arg("--data-dir")
        .arg(&data_dir)
        .arg("--ort-library")
        .arg(&library)
        .args(["--bootstrap-key", BENCH_KEY])
        .env("WEFT_LOG", "warn")
        .stdout(Stdio::piped())
        .spawn()
        .context("cannot start weft serve")?;
    let stdout = child.stdout.take().context("no stdout")?;
    let server = Server(child);
    let mut address = None;
    for line in BufReader::new(stdout).lines() {
        if let Some(found) = line?.strip_prefix("weft listening on ") {
            address = Some(found.to_string());
            break;
        }
    }
    let url = address.context("weft serve exited before listening")?;

    let mut rows = Vec::new();
    let http = [
        ("mlp", "mlp", "off"),
        ("mlp", "mlp-batched", "on"),
        ("wide", "wide", "off"),
        ("wide", "wide-batched", "on"),
        ("mlp in a model worker", "mlp-worker", "off"),
        ("mlp in a model worker", "mlp-worker-batched", "on"),
        ("wide in a model worker", "wide-worker", "off"),
        ("wide in a model worker", "wide-worker-batched", "on"),
        ("classify graph", "classify", "off"),
        ("classify graph", "classify-batched", "on"),
    ];
    for concurrency in ["1", "64"] {
        for (label, model, batching) in http {
            if options
                .only
                .as_deref()
                .is_some_and(|only| !model.contains(only))
            {
                continue;
            }
            let line = weft_bench(
                &weft,
                root,
                &[
                    "--model",
                    model,
                    "--url",
                    &url,
                    "--concurrency",
                    concurrency,
                    "--duration",
                    &options.duration,
                    "--warmup",
                    &options.warmup,
                ],
            )?;
            rows.push((
                format!("{label}, HTTP binary, batching {batching}, c={concurrency}"),
                line,
            ));
        }
    }
    drop(server);
    for model in ["mlp", "mlp-worker", "wide", "wide-worker"] {
        if options
            .only
            .as_deref()
            .is_some_and(|only| !model.contains(only))
        {
            continue;
        }
        for (batch, concurrency) in [("1", "1"), ("1", "64"), ("64", "1"), ("64", "2")] {
            let line = weft_bench(
                &weft,
                root,
                &[
                    "--model",
                    model,
                    "--in-process",
                    "--repository",
                    "bench/repository",
                    "--ort-library",
                    &library.to_string_lossy(),
                    "--rows",
                    batch,
                    "--concurrency",
                    concurrency,
                    "--duration",
                    &options.duration,
                    "--warmup",
                    &options.warmup,
                ],
            )?;
            rows.push((
                format!("{model}, in-process, batch of {batch}, c={concurrency}"),
                line,
            ));
        }
    }
    // A model call from a plugin through wasi:nn, the model in process and in a worker.
    for model in ["mlp", "mlp-worker"] {
        if options
            .only
            .as_deref()
            .is_some_and(|only| !model.contains(only))
        {
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
            .args(["--iterations", "5000", "--ort-library"])
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
        for line in stdout.lines().filter(|line| line.contains(model)) {
            println!("{line}");
            rows.push((format!("bench-plugins {model}"), line.trim().to_string()));
        }
    }
    println!("\n| run | result |\n|---|---|");
    for (name, line) in rows {
        let result = line.split_once(": ").map_or(line.as_str(), |(_, r)| r);
        println!("| {name} | {result} |");
    }
    Ok(())
}

/// Runs `weft bench` and returns its result line (also printed).
/// The API key of tenant `default` in the benchmark server (every request is authenticated,
/// as in production).
const BENCH_KEY: &str = "weft-bench-bootstrap-key";

fn weft_bench(weft: &Path, root: &Path, args: &[&str]) -> Result<String> {
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
