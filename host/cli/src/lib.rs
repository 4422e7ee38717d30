//! The `weft` command line: one binary for the server (`serve`, `graph check`, `migrate`, the
//! hidden model `worker`), the client commands that talk to a running server (`weft-client`),
//! and the benchmarks (`bench`, `bench-plugins`, `bench-job`).
//!
//! Each command's work lives in the crate that owns it; this crate only parses, sets up logging
//! and dispatches, so the server library carries no HTTP client and no load generator. It is a
//! library (with a two-line `main.rs`) so the end-to-end tests run the exact same entry point as
//! a binary of their own.

pub mod bench;
pub mod bench_grpc;
pub mod bench_job;

use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};
use weft_server::commands::{
    GraphCheckArgs, MigrateArgs, ServeArgs, WorkerCliArgs, graph_check, migrate, serve, worker,
};

#[derive(Debug, Parser)]
#[command(
    name = "weft",
    version,
    about = "Weft: WebAssembly-plugin inference serving (KServe V2 HTTP API)"
)]
pub struct Cli {
    /// Log line format.
    #[arg(long, env = "WEFT_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text, global = true)]
    pub log_format: LogFormat,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve a model repository over the Open Inference Protocol (KServe V2): HTTP and gRPC.
    Serve(Box<ServeArgs>),
    /// Measure a model over HTTP (V2, JSON or binary) or in-process with the same input.
    Bench(crate::bench::BenchArgs),
    /// Work with inference graphs.
    #[command(subcommand)]
    Graph(GraphCommand),
    /// Measure the plugin sandbox: instantiation, an empty call, and a model call through
    /// wasi:nn against the same model called directly.
    BenchPlugins(crate::bench::BenchPluginsArgs),
    /// Measure a batch job against a running server: its rows/s, and the p99 of a real-time
    /// load on the same model with and without the job running.
    BenchJob(crate::bench_job::BenchJobArgs),
    /// Copy every tenant and the blobs they use from one store into an empty other one
    /// (embedded data directory to PostgreSQL + S3, or back), verified by digests.
    Migrate(MigrateArgs),
    #[command(flatten)]
    Client(weft_client::ClientCommand),
    /// Internal: a sandboxed model worker, started and supervised by `weft serve`.
    #[command(hide = true)]
    Worker(WorkerCliArgs),
}

#[derive(Debug, Subcommand)]
pub enum GraphCommand {
    /// Validate graph files against a repository's models and plugins, as loading would
    /// (dry run: no server). Exits 1 if any file is invalid.
    Check(GraphCheckArgs),
    #[command(flatten)]
    Client(weft_client::GraphClientCommand),
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line, for log collectors.
    Json,
}

/// Parses the command line, runs it, and turns any error into a message and exit code 1.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.log_format);
    // A model worker must still have a single thread when it closes its sandbox: it runs
    // before any async runtime exists.
    if let Command::Worker(args) = &cli.command {
        return match worker(args) {
            Ok(()) => ExitCode::SUCCESS,
            Err(error) => {
                eprintln!("weft worker: {error}");
                ExitCode::FAILURE
            }
        };
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime");
    let result = runtime.and_then(|runtime| match cli.command {
        Command::Serve(args) => runtime.block_on(serve(*args)),
        Command::Bench(args) => runtime.block_on(crate::bench::bench(args)),
        Command::BenchPlugins(args) => runtime.block_on(crate::bench::bench_plugins(args)),
        Command::BenchJob(args) => runtime.block_on(crate::bench_job::bench_job(args)),
        Command::Graph(GraphCommand::Check(args)) => graph_check(args),
        Command::Graph(GraphCommand::Client(command)) => {
            runtime.block_on(weft_client::run_graph(command))
        }
        Command::Client(command) => runtime.block_on(weft_client::run(command)),
        Command::Migrate(args) => migrate(args),
        Command::Worker(_) => Ok(()),
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            tracing::error!("{error:#}");
            eprintln!("weft: {error:#}");
            ExitCode::FAILURE
        }
    }
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("WEFT_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().flatten_event(true).init(),
    }
}
