//! `weft bench-job`: how fast a batch job runs, and what it costs real-time traffic on the same
//! model.
//!
//! Against a running server: generates (once, cached under `--dir`) a JSON Lines file of
//! `--rows` V2 requests for the model's inputs, then
//! 1. runs it as a job alone and reports its rows/s (server-side start to end);
//! 2. runs a real-time load (`--concurrency` callers, binary bodies) alone: its p50/p99;
//! 3. runs the same file again (by digest) and, while that job runs, the same real-time load:
//!    its p50/p99 with the job, and the job's rows/s with the load beside it.
//!
//! The load runs only while the second job does (the command fails if the job ends first, as
//! that would measure the load alone): give it enough rows to outlast `--warmup + --duration`.
//! The in-process limit the job is compared with is `weft bench --in-process --rows 64`;
//! `cargo xtask bench-job` runs both and prints the ratios.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde_json::Value;
use weft_core::{DataType, TensorSpec};

use crate::bench::{Encoding, HttpCaller, HttpTarget, Report, Timing, api_client, drive};

#[derive(Debug, clap::Args)]
pub struct BenchJobArgs {
    /// Model (or graph) the job and the real-time load call.
    #[arg(long)]
    pub model: String,
    /// Server to measure.
    #[arg(long, default_value = "http://127.0.0.1:8000")]
    pub url: String,
    /// Rows of the job's input file.
    #[arg(long, default_value_t = 1_000_000)]
    pub rows: usize,
    /// Concurrent real-time requests in flight.
    #[arg(long, default_value_t = 8)]
    pub concurrency: usize,
    /// Seconds the real-time load is measured (alone, then beside the job).
    #[arg(long, default_value_t = 8.0)]
    pub duration: f64,
    /// Seconds the real-time load runs before it is measured.
    #[arg(long, default_value_t = 2.0)]
    pub warmup: f64,
    /// Folder for the generated input file (kept for the next run).
    #[arg(long, default_value = "target/bench-job")]
    pub dir: PathBuf,
    /// API key sent as `Authorization: Bearer <key>`.
    #[arg(long, env = "WEFT_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
}

pub async fn bench_job(args: BenchJobArgs) -> anyhow::Result<()> {
    if args.rows == 0 || args.concurrency == 0 {
        bail!("--rows and --concurrency must be at least 1");
    }
    let client = api_client(args.api_key.as_deref(), args.concurrency + 2)?;
    let specs = crate::bench::model_inputs(&client, &args.url, &args.model).await?;
    let input = input_file(&args, &specs)?;
    let body = tokio::fs::read(&input)
        .await
        .with_context(|| format!("cannot read {}", input.display()))?;
    println!(
        "input: {} rows, {:.0} MiB ({})",
        args.rows,
        body.len() as f64 / (1 << 20) as f64,
        input.display()
    );
    let jobs = Jobs {
        client: &client,
        url: &args.url,
        model: &args.model,
    };

    // 1. The job alone.
    let uploaded = Instant::now();
    let job = jobs.submit(&format!("target={}", args.model), body).await?;
    println!(
        "upload and submit: {:.1} s",
        uploaded.elapsed().as_secs_f64()
    );
    let digest = job["input"]["digest"]
        .as_str()
        .context("the job has no input digest")?
        .to_string();
    let alone = jobs.wait_end(&job_id(&job)?).await?;
    let alone_rate = finished_rate(&alone)?;
    println!(
        "job alone: {} rows in {:.2} s: {alone_rate:.0} rows/s",
        alone["rows"]["done"],
        seconds_run(&alone)?
    );

    // 2. The real-time load alone.
    let caller = HttpCaller::new(&HttpTarget {
        url: &args.url,
        model: &args.model,
        api_key: args.api_key.as_deref(),
        connections: args.concurrency,
        rows: 1,
        encoding: Encoding::Binary,
        inputs: Some(specs.clone()),
        shared_memory: false,
    })
    .await?;
    let timing = Timing {
        concurrency: args.concurrency,
        warmup: args.warmup,
        duration: args.duration,
    };
    let load = |caller: HttpCaller| async move { drive(&timing, move || caller.call()).await };
    let realtime_alone = load(caller.clone()).await;
    realtime_alone.print(&format!("real-time c={} alone", args.concurrency), 1);

    // 3. The same load while the same file runs again as a job.
    let job = jobs
        .submit(&format!("target={}&input={digest}", args.model), Vec::new())
        .await?;
    let id = job_id(&job)?;
    jobs.wait_running(&id).await?;
    let realtime_shared = load(caller).await;
    let during = jobs.get(&id).await?;
    if !matches!(during["state"].as_str(), Some("running")) {
        bail!(
            "the job ended before the real-time load did, so the load was not measured beside \
             it: use more --rows or a shorter --duration ({during})"
        );
    }
    realtime_shared.print(
        &format!("real-time c={} beside the job", args.concurrency),
        1,
    );
    let shared = jobs.wait_end(&id).await?;
    let shared_rate = finished_rate(&shared)?;
    println!(
        "job beside the load: {} rows in {:.2} s: {shared_rate:.0} rows/s",
        shared["rows"]["done"],
        seconds_run(&shared)?
    );
    if alone["output"]["digest"] != shared["output"]["digest"] {
        bail!("the two runs of the same input wrote different output files");
    }
    summary(
        args.concurrency,
        alone_rate,
        &realtime_alone,
        &realtime_shared,
    );
    Ok(())
}

fn summary(concurrency: usize, job_rate: f64, alone: &Report, shared: &Report) {
    let p99 = |report: &Report| report.percentile(0.99).as_secs_f64() * 1e6;
    println!(
        "job rows/s {job_rate:.0}; real-time c={concurrency} p99 {:.1} us alone, {:.1} us beside \
         the job: {:.2}x",
        p99(alone),
        p99(shared),
        p99(shared) / p99(alone).max(f64::EPSILON)
    );
}

/// The job API of one server for one model.
struct Jobs<'a> {
    client: &'a reqwest::Client,
    url: &'a str,
    model: &'a str,
}

impl Jobs<'_> {
    async fn submit(&self, query: &str, body: Vec<u8>) -> anyhow::Result<Value> {
        let response = self
            .client
            .post(format!("{}/api/v1/jobs?{query}", self.url))
            .header(reqwest::header::CONTENT_TYPE, "application/jsonl")
            .body(body)
            .send()
            .await;
        job_answer(response, &format!("submitting a job on '{}'", self.model)).await
    }

    async fn get(&self, id: &str) -> anyhow::Result<Value> {
        let response = self
            .client
            .get(format!("{}/api/v1/jobs/{id}", self.url))
            .send()
            .await;
        job_answer(response, &format!("reading job {id}")).await
    }

    /// Polls until the job has started and done some rows.
    async fn wait_running(&self, id: &str) -> anyhow::Result<()> {
        loop {
            let job = self.get(id).await?;
            match job["state"].as_str() {
                Some("queued") => {}
                Some("running") if job["rows"]["done"].as_u64().unwrap_or(0) > 0 => {
                    return Ok(());
                }
                Some("running") => {}
                _ => bail!("the job ended before the load could start: {job}"),
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Polls until the job ends; fails unless it succeeded with no failed row.
    async fn wait_end(&self, id: &str) -> anyhow::Result<Value> {
        loop {
            let job = self.get(id).await?;
            match job["state"].as_str() {
                Some("queued" | "running") => {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Some("succeeded") if job["rows"]["failed"] == 0 => return Ok(job),
                _ => bail!("the job did not succeed with every row: {job}"),
            }
        }
    }
}

/// The job a jobs API call answered with, or what went wrong `doing` it.
async fn job_answer(
    response: reqwest::Result<reqwest::Response>,
    doing: &str,
) -> anyhow::Result<Value> {
    let response = response.with_context(|| format!("{doing} failed"))?;
    let status = response.status();
    let job: Value = response
        .json()
        .await
        .with_context(|| format!("{doing}: the answer is not JSON"))?;
    if !status.is_success() {
        bail!("{doing} failed ({status}): {job}");
    }
    Ok(job)
}

fn job_id(job: &Value) -> anyhow::Result<String> {
    job["id"]
        .as_str()
        .map(str::to_string)
        .context("the job answer has no id")
}

/// Seconds from the job's start to its end, as the server recorded them.
fn seconds_run(job: &Value) -> anyhow::Result<f64> {
    let (Some(start), Some(end)) = (
        job["started_unix_ms"].as_u64(),
        job["finished_unix_ms"].as_u64(),
    ) else {
        bail!("the job has no start or end time: {job}");
    };
    Ok((end.saturating_sub(start) as f64 / 1000.0).max(0.001))
}

fn finished_rate(job: &Value) -> anyhow::Result<f64> {
    let rows = job["rows"]["done"].as_u64().context("no rows done")?;
    Ok(rows as f64 / seconds_run(job)?)
}

/// The input file for this model and row count, generated if it is not there yet.
fn input_file(args: &BenchJobArgs, specs: &[TensorSpec]) -> anyhow::Result<PathBuf> {
    std::fs::create_dir_all(&args.dir)
        .with_context(|| format!("cannot create {}", args.dir.display()))?;
    let safe: String = args
        .model
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect();
    let path = args.dir.join(format!("{safe}-{}.jsonl", args.rows));
    if !path.is_file() {
        write_input(&path, specs, args.rows)?;
    }
    Ok(path)
}

/// Writes `rows` V2 requests, one per line, each with one row of every input and values that
/// differ from row to row (written to a temporary name first, so a cut-off run leaves none).
fn write_input(path: &Path, specs: &[TensorSpec], rows: usize) -> anyhow::Result<()> {
    let partial = path.with_extension("partial");
    let file = std::fs::File::create(&partial)
        .with_context(|| format!("cannot create {}", partial.display()))?;
    let mut out = std::io::BufWriter::with_capacity(1 << 20, file);
    for row in 0..rows {
        write!(out, r#"{{"id":"r{row}","inputs":["#)?;
        for (n, spec) in specs.iter().enumerate() {
            let shape: Vec<usize> = spec
                .shape
                .iter()
                .map(|&d| if d < 0 { 1 } else { d as usize })
                .collect();
            let count: usize = shape.iter().product();
            let shape: Vec<String> = shape.iter().map(usize::to_string).collect();
            if n > 0 {
                out.write_all(b",")?;
            }
            write!(
                out,
                r#"{{"name":{},"datatype":"{}","shape":[{}],"data":["#,
                Value::from(spec.name.as_str()),
                spec.datatype,
                shape.join(",")
            )?;
            for i in 0..count {
                if i > 0 {
                    out.write_all(b",")?;
                }
                let step = ((row * 131 + i * 17) % 401) as i64 - 200;
                match spec.datatype {
                    DataType::Fp32 | DataType::Fp64 => write!(out, "{}", step as f64 / 100.0)?,
                    DataType::Int32 | DataType::Int64 => write!(out, "{step}")?,
                    other => bail!("bench-job cannot generate {other} input '{}'", spec.name),
                }
            }
            out.write_all(b"]}")?;
        }
        out.write_all(b"]}\n")?;
    }
    out.flush()?;
    drop(out);
    std::fs::rename(&partial, path)
        .with_context(|| format!("cannot move the input to {}", path.display()))?;
    Ok(())
}
