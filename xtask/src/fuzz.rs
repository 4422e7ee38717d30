//! `cargo xtask fuzz`: the time-boxed run of the cargo-fuzz targets in fuzz/ that CI does at the
//! end of `cargo xtask test`, and that anyone can run for longer.
//!
//! cargo-fuzz needs nightly `-Z` flags; the pinned stable toolchain accepts them with
//! `RUSTC_BOOTSTRAP=1`. Each target reads the committed seeds in `fuzz/corpus/<target>/` and
//! writes what it discovers to `target/fuzz-corpus/<target>/`, so a run never dirties the
//! checkout; a crashing input is saved under `fuzz/artifacts/<target>/` (git ignores it).

use std::path::Path;
use std::process::Command;

use anyhow::{Context, Result, bail};

/// Every target in fuzz/Cargo.toml.
pub const TARGETS: &[&str] = &[
    "v2_json_decode",
    "v2_binary_extension",
    "grpc_infer_request",
    "graph_toml",
];

/// Seconds per target when `cargo xtask test` runs them.
pub const TEST_SECONDS: u64 = 20;

const DEFAULT_SECONDS: u64 = 30;

/// `cargo xtask fuzz [--seconds N] [target...]`.
pub fn run(root: &Path, args: &[String]) -> Result<()> {
    let mut seconds = DEFAULT_SECONDS;
    let mut targets = Vec::new();
    let mut args = args.iter();
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--seconds" => {
                let value = args.next().context("--seconds needs a number")?;
                seconds = value
                    .parse()
                    .with_context(|| format!("--seconds {value}: not a whole number"))?;
            }
            name if TARGETS.contains(&name) => targets.push(name),
            other => bail!(
                "cargo xtask fuzz: unknown argument '{other}' (targets: {})",
                TARGETS.join(", ")
            ),
        }
    }
    run_all(root, seconds, &targets)
}

/// Builds the targets once, then runs each (all when `only` is empty) for `seconds`.
pub fn run_all(root: &Path, seconds: u64, only: &[&str]) -> Result<()> {
    install_cargo_fuzz()?;
    let targets = if only.is_empty() { TARGETS } else { only };
    eprintln!("xtask: building the fuzz targets");
    super::run(cargo_fuzz(root).arg("build"))
        .context("building the fuzz targets (fuzz/) failed")?;
    for target in targets {
        let discovered = root.join("target/fuzz-corpus").join(target);
        std::fs::create_dir_all(&discovered)
            .with_context(|| format!("cannot create {}", discovered.display()))?;
        eprintln!("xtask: fuzzing {target} for {seconds} s");
        let outcome = super::run(
            cargo_fuzz(root)
                .args(["run", target])
                .arg(&discovered)
                .arg(root.join("fuzz/corpus").join(target))
                .arg("--")
                .arg(format!("-max_total_time={seconds}"))
                // One input that takes this long is a finding (a hang), not a slow machine.
                .arg("-timeout=30")
                .arg("-print_final_stats=1"),
        );
        if let Err(error) = outcome {
            bail!(
                "FUZZ TARGET {target} FAILED: {error:#}\n\
                 The input that crashed it is under fuzz/artifacts/{target}/; reproduce with\n\
                 `RUSTC_BOOTSTRAP=1 cargo fuzz run {target} fuzz/artifacts/{target}/<file>`"
            );
        }
    }
    Ok(())
}

/// `cargo fuzz` in the repository root, with the stable compiler allowed nightly flags.
fn cargo_fuzz(root: &Path) -> Command {
    let mut command = Command::new(env!("CARGO"));
    command
        .current_dir(root)
        .arg("fuzz")
        .env("RUSTC_BOOTSTRAP", "1");
    command
}

fn install_cargo_fuzz() -> Result<()> {
    let installed = Command::new(env!("CARGO"))
        .args(["fuzz", "--version"])
        .output()
        .is_ok_and(|output| output.status.success());
    if installed {
        return Ok(());
    }
    eprintln!("xtask: installing cargo-fuzz");
    super::run(Command::new(env!("CARGO")).args(["install", "cargo-fuzz", "--locked"]))
}
