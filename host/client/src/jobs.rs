//! `weft job submit|status|wait|cancel|results|delete`: a tenant's batch inference jobs.
//!
//! The server runs the job; these commands upload the input file (JSON Lines of V2 inference
//! requests), show the job, follow it with a progress bar until it ends, and download its
//! output or error file (JSON Lines keyed by input line, in input order).

use std::io::IsTerminal as _;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use reqwest::Method;
use serde_json::Value;

use crate::cli::{
    JobCommand, JobIdArgs, JobResultsArgs, JobStatusArgs, JobSubmitArgs, JobWaitArgs,
};
use crate::http::{Payload, Server, print_json};

pub async fn run(command: JobCommand) -> Result<()> {
    match command {
        JobCommand::Submit(args) => submit(args).await,
        JobCommand::Status(args) => status(args).await,
        JobCommand::Wait(args) => {
            let server = Server::new(&args.connection.server, &args.connection.api_key)?;
            let job = wait(&server, &args.id, &args).await?;
            print_json(&job)?;
            ended_well(&job)
        }
        JobCommand::Cancel(args) => {
            Server::new(&args.connection.server, &args.connection.api_key)?
                .call_and_print(Method::POST, &["api", "v1", "jobs", &args.id, "cancel"])
                .await
        }
        JobCommand::Results(args) => results(args).await,
        JobCommand::Delete(args) => delete(args).await,
    }
}

async fn submit(args: JobSubmitArgs) -> Result<()> {
    let server = Server::new(&args.connection.server, &args.connection.api_key)?;
    let mut query = vec![("target", args.target.clone())];
    if let Some(version) = args.version {
        query.push(("version", version.to_string()));
    }
    if let Some(rows) = args.chunk_rows {
        query.push(("chunk_rows", rows.to_string()));
    }
    if let Some(seconds) = args.deadline_seconds {
        query.push(("deadline_seconds", seconds.to_string()));
    }
    let payload = match (&args.file, &args.input) {
        (Some(file), None) => {
            let bytes =
                std::fs::read(file).with_context(|| format!("cannot read {}", file.display()))?;
            Payload::Bytes {
                body: bytes.into(),
                content_type: "application/jsonl",
                headers: Vec::new(),
                progress: args.progress,
            }
        }
        (None, Some(digest)) => {
            query.push(("input", digest.clone()));
            Payload::Empty
        }
        _ => bail!("give the input as a FILE or as --input DIGEST (one of them)"),
    };
    let (_, body) = server
        .call_raw_query(Method::POST, &["api", "v1", "jobs"], &query, payload)
        .await?;
    let job = crate::http::parse_json(&body)?;
    if !args.wait {
        return print_json(&job);
    }
    let id = job["id"]
        .as_str()
        .context("the server's answer has no job id")?
        .to_string();
    let wait_args = JobWaitArgs {
        connection: args.connection.clone(),
        id: id.clone(),
        interval_ms: 500,
        progress: args.progress,
    };
    let job = wait(&server, &id, &wait_args).await?;
    print_json(&job)?;
    ended_well(&job)
}

async fn status(args: JobStatusArgs) -> Result<()> {
    let server = Server::new(&args.connection.server, &args.connection.api_key)?;
    match &args.id {
        Some(id) => {
            server
                .call_and_print(Method::GET, &["api", "v1", "jobs", id])
                .await
        }
        None => {
            server
                .call_and_print(Method::GET, &["api", "v1", "jobs"])
                .await
        }
    }
}

/// A job that did not succeed makes the command fail (after printing it).
fn ended_well(job: &Value) -> Result<()> {
    match job["state"].as_str() {
        Some("succeeded") => Ok(()),
        state => bail!(
            "job {} ended {}{}",
            job["id"].as_str().unwrap_or("?"),
            state.unwrap_or("in an unknown state"),
            job["error"]
                .as_str()
                .map(|e| format!(": {e}"))
                .unwrap_or_default()
        ),
    }
}

/// One progress line: `[#####-----]  50.0%  50000/100000 rows, 3 failed, 12000 rows/s, ETA 4s`.
pub fn progress_line(job: &Value) -> String {
    let rows = &job["rows"];
    let (total, done, failed) = (
        rows["total"].as_u64().unwrap_or(0),
        rows["done"].as_u64().unwrap_or(0),
        rows["failed"].as_u64().unwrap_or(0),
    );
    let fraction = if total == 0 {
        1.0
    } else {
        (done as f64 / total as f64).min(1.0)
    };
    let filled = (fraction * 30.0).round() as usize;
    let eta = job["eta_seconds"]
        .as_f64()
        .map(|s| format!(", ETA {}s", s.ceil()))
        .unwrap_or_default();
    format!(
        "[{}{}] {:5.1}%  {done}/{total} rows, {failed} failed, {:.0} rows/s{eta}  {}",
        "#".repeat(filled),
        "-".repeat(30 - filled),
        fraction * 100.0,
        job["rows_per_second"].as_f64().unwrap_or(0.0),
        job["state"].as_str().unwrap_or("?"),
    )
}

/// Polls the job until it ends, drawing a progress bar on stderr (redrawn in place on a
/// terminal, one line per change of state or tenth otherwise). Returns the final view.
async fn wait(server: &Server, id: &str, args: &JobWaitArgs) -> Result<Value> {
    let terminal = std::io::stderr().is_terminal();
    let mut last_tenth = None;
    loop {
        let job = server
            .call(Method::GET, &["api", "v1", "jobs", id], Payload::Empty)
            .await?;
        let state = job["state"].as_str().unwrap_or("?").to_string();
        let active = matches!(state.as_str(), "queued" | "running");
        let line = progress_line(&job);
        if terminal || args.progress {
            if terminal {
                eprint!("\r{line}");
                if !active {
                    eprintln!();
                }
            } else {
                let done = job["rows"]["done"].as_u64().unwrap_or(0);
                let total = job["rows"]["total"].as_u64().unwrap_or(0).max(1);
                let tenth = (state.clone(), done * 10 / total);
                if last_tenth.as_ref() != Some(&tenth) {
                    eprintln!("{line}");
                    last_tenth = Some(tenth);
                }
            }
        }
        if !active {
            return Ok(job);
        }
        tokio::time::sleep(Duration::from_millis(args.interval_ms.max(50))).await;
    }
}

async fn results(args: JobResultsArgs) -> Result<()> {
    let server = Server::new(&args.connection.server, &args.connection.api_key)?;
    let file = if args.errors { "errors" } else { "output" };
    let segments = ["api", "v1", "jobs", args.id.as_str(), file];
    match &args.output {
        Some(path) => {
            let mut out = std::io::BufWriter::new(
                std::fs::File::create(path)
                    .with_context(|| format!("cannot create {}", path.display()))?,
            );
            let bytes = server.download(&segments, &mut out).await?;
            eprintln!("wrote {bytes} bytes to {}", path.display());
            Ok(())
        }
        None => {
            let mut out = std::io::stdout().lock();
            server.download(&segments, &mut out).await.map(|_| ())
        }
    }
}

async fn delete(args: JobIdArgs) -> Result<()> {
    Server::new(&args.connection.server, &args.connection.api_key)?
        .call_and_print(Method::DELETE, &["api", "v1", "jobs", &args.id])
        .await
}
