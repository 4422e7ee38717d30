//! `weft plugin build app.py`: Python plugins compiled into components with componentize-py.
//!
//! The Weft WIT package and the `weft_plugin` helper package (`sdk-python/`) are embedded in the
//! binary and written to a temporary directory for each build, so the command works from any
//! directory and offline: componentize-py bundles CPython and downloads nothing. The role (and
//! so the `weft:plugin` world) is read from the module's decorator unless `--role` says it.
//!
//! componentize-py's `--stub-wasi` is not used: it stubs `wasi:nn` too, and the plugin would
//! trap on its first model call. The component imports WASI interfaces it never uses; the host
//! links them with a context that grants nothing.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{Context, Result, bail};

use crate::cli::{PluginBuildArgs, PluginRole};

/// The files a build needs besides the app: (path under the build directory, contents).
const EMBEDDED: &[(&str, &str)] = &[
    (
        "wit/weft-plugin.wit",
        include_str!("../../../wit/weft-plugin.wit"),
    ),
    (
        "wit/deps/wasi-nn/wasi-nn.wit",
        include_str!("../../../wit/deps/wasi-nn/wasi-nn.wit"),
    ),
    (
        "sdk/weft_plugin/__init__.py",
        include_str!("../../../sdk-python/weft_plugin/__init__.py"),
    ),
];

impl PluginRole {
    fn world(self) -> &'static str {
        match self {
            PluginRole::Transformer => "transformer",
            PluginRole::Combiner => "combiner",
            PluginRole::Router => "router",
        }
    }
}

/// The role a module declares with its decorator (`@transformer`, `@weft_plugin.router`, ...).
pub fn detect_role(source: &str) -> Result<PluginRole> {
    let mut found = Vec::new();
    for line in source.lines().map(str::trim) {
        let Some(decorator) = line.strip_prefix('@') else {
            continue;
        };
        let name = decorator.rsplit('.').next().unwrap_or(decorator).trim();
        let role = match name {
            "transformer" => PluginRole::Transformer,
            "combiner" => PluginRole::Combiner,
            "router" => PluginRole::Router,
            _ => continue,
        };
        if !found.contains(&role) {
            found.push(role);
        }
    }
    match found.as_slice() {
        [role] => Ok(*role),
        [] => bail!(
            "no @transformer, @combiner or @router decorator found; mark the plugin's function \
             with one (from weft_plugin) or pass --role"
        ),
        _ => bail!("more than one role decorator found; a plugin has one role (or pass --role)"),
    }
}

/// The Python module name of `file` (`app.py` -> `app`).
fn module_name(file: &Path) -> Result<String> {
    if file.extension().and_then(|e| e.to_str()) != Some("py") {
        bail!("{} is not a Python module (.py)", file.display());
    }
    let stem = file
        .file_stem()
        .and_then(|s| s.to_str())
        .unwrap_or_default();
    let identifier = stem
        .chars()
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && stem.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
    if !identifier {
        bail!(
            "{} cannot be imported as a Python module: name it like app.py (letters, digits, _)",
            file.display()
        );
    }
    Ok(stem.to_string())
}

/// The componentize-py command line for one build.
pub fn componentize_command(
    program: &Path,
    build_dir: &Path,
    role: PluginRole,
    app_dir: &Path,
    module: &str,
    out: &Path,
) -> Command {
    let mut command = Command::new(program);
    command
        .arg("-d")
        .arg(build_dir.join("wit"))
        .arg("-w")
        .arg(format!("weft:plugin/{}", role.world()))
        .arg("componentize")
        .arg("-p")
        .arg(app_dir)
        .arg("-p")
        .arg(build_dir.join("sdk"))
        .arg(module)
        .arg("-o")
        .arg(out);
    command
}

pub fn build(args: &PluginBuildArgs) -> Result<()> {
    let source = std::fs::read_to_string(&args.file)
        .with_context(|| format!("cannot read {}", args.file.display()))?;
    let module = module_name(&args.file)?;
    let role = match args.role {
        Some(role) => role,
        None => detect_role(&source).with_context(|| format!("{}", args.file.display()))?,
    };
    let app_dir = match args.file.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let out = args
        .out
        .clone()
        .unwrap_or_else(|| args.file.with_extension("wasm"));
    let build_dir = tempfile::tempdir().context("cannot make a temporary build directory")?;
    for (path, text) in EMBEDDED {
        let path = build_dir.path().join(path);
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)
                .with_context(|| format!("cannot create {}", dir.display()))?;
        }
        std::fs::write(&path, text).with_context(|| format!("cannot write {}", path.display()))?;
    }
    let started = Instant::now();
    let output = componentize_command(
        &args.componentize_py,
        build_dir.path(),
        role,
        &app_dir,
        &module,
        &out,
    )
    .output()
    .map_err(|error| {
        anyhow::anyhow!(
            "cannot run {}: {error}; install it with `pip install componentize-py==0.25.1` or name \
             it with --componentize-py / WEFT_COMPONENTIZE_PY",
            args.componentize_py.display()
        )
    })?;
    if !output.status.success() {
        bail!(
            "componentize-py could not build {} ({}):\n{}{}",
            args.file.display(),
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }
    let size = std::fs::metadata(&out)
        .with_context(|| format!("componentize-py wrote no {}", out.display()))?
        .len();
    eprintln!(
        "built {}: a {} plugin, {size} bytes ({:.1} MB), in {:.1} s",
        out.display(),
        role.world(),
        size as f64 / 1e6,
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    #[test]
    fn role_comes_from_the_decorator() {
        let source = "from weft_plugin import router\n\n@router\ndef pick(inputs, params):\n";
        assert_eq!(detect_role(source).unwrap(), PluginRole::Router);
        let source = "import weft_plugin\n@weft_plugin.transformer\ndef f(i, p):\n";
        assert_eq!(detect_role(source).unwrap(), PluginRole::Transformer);
        let source = "    @combiner\n";
        assert_eq!(detect_role(source).unwrap(), PluginRole::Combiner);
    }

    #[test]
    fn no_role_or_two_roles_is_an_error_that_says_what_to_do() {
        let error = detect_role("@staticmethod\ndef f(): pass\n")
            .unwrap_err()
            .to_string();
        assert!(error.contains("--role"), "{error}");
        let error = detect_role("@router\n@transformer\n")
            .unwrap_err()
            .to_string();
        assert!(error.contains("more than one role"), "{error}");
    }

    #[test]
    fn module_names_must_import() {
        assert_eq!(module_name(Path::new("dir/app.py")).unwrap(), "app");
        assert_eq!(
            module_name(Path::new("my_plugin2.py")).unwrap(),
            "my_plugin2"
        );
        assert!(module_name(Path::new("my-plugin.py")).is_err());
        assert!(module_name(Path::new("2app.py")).is_err());
        assert!(module_name(Path::new("app.txt")).is_err());
    }

    #[test]
    fn the_command_names_the_world_of_the_role_and_both_paths() {
        let command = componentize_command(
            Path::new("componentize-py"),
            Path::new("/b"),
            PluginRole::Router,
            Path::new("/src"),
            "app",
            Path::new("/out/app.wasm"),
        );
        let args: Vec<String> = command
            .get_args()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        assert_eq!(
            args,
            [
                "-d",
                "/b/wit",
                "-w",
                "weft:plugin/router",
                "componentize",
                "-p",
                "/src",
                "-p",
                "/b/sdk",
                "app",
                "-o",
                "/out/app.wasm"
            ]
        );
    }

    #[test]
    fn a_missing_componentize_py_says_how_to_install_it() {
        let dir = tempfile::tempdir().unwrap();
        let app = dir.path().join("app.py");
        std::fs::write(&app, "@transformer\ndef f(i, p): return i\n").unwrap();
        let error = build(&PluginBuildArgs {
            role: None,
            out: None,
            componentize_py: dir.path().join("no-such-program"),
            file: app,
        })
        .unwrap_err()
        .to_string();
        assert!(error.contains("pip install componentize-py"), "{error}");
    }
}
