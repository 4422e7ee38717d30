//! Client compatibility: the stock `tritonclient[http]` Python package, in its default binary
//! mode and in JSON mode, against a real `weft serve`: models (tests/python/test_tritonclient.py)
//! and graphs (tests/python/test_tritonclient_graphs.py).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::type_complexity)]

mod support;

use std::process::Command;

use support::*;

/// Runs one pytest module with `env`; fails with its output and the servers' logs.
fn pytest(module: &str, env: &[(&str, &std::ffi::OsStr)], servers: &[&Server]) {
    let script = workspace_root().join("tests/python").join(module);
    let output = Command::new(test_python())
        .args(["-m", "pytest", "-q", "-p", "no:cacheprovider"])
        .arg(&script)
        .envs(env.iter().copied())
        .env("WEFT_API_KEY", TEST_KEY)
        .output()
        .expect("cannot run pytest from the test environment (run `cargo xtask setup`)");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    let logs: Vec<String> = servers.iter().map(|s| s.log()).collect();
    assert!(
        output.status.success(),
        "tritonclient tests failed:\n{stdout}\n{stderr}\nserver logs:\n{}",
        logs.join("\n---\n")
    );
    assert!(
        stdout.contains("passed") && !stdout.contains("skipped"),
        "{stdout}"
    );
}

#[test]
fn tritonclient_compatibility() {
    let server = Server::start(Repo::standard().path());
    let models = quickstart().join("models");
    pytest(
        "test_tritonclient.py",
        &[
            ("WEFT_URL", server.address.as_ref()),
            ("WEFT_QUICKSTART_MODELS", models.as_os_str()),
        ],
        &[&server],
    );
}

#[test]
fn tritonclient_calls_graphs() {
    // classify, ensemble and text in one repository; ab-route has its own (its `mlp` has two
    // versions, and classify's `mlp` node takes the latest).
    let repo = Repo::new()
        .with_model(&example("classify"), "mlp")
        .with_model(&example("ensemble"), "mlp-alt")
        .with_model(&example("text"), "sentiment")
        .with_graph("classify", "classify.toml")
        .with_graph("ensemble", "ensemble.toml")
        .with_graph("text", "text.toml")
        .with_plugin("normalize", "normalize")
        .with_plugin("softmax", "softmax")
        .with_plugin("mean_combine", "mean-combine")
        .with_plugin("tokenize", "tokenize");
    let server = Server::start(repo.path());
    let ab_route = Server::start(&example_repository("ab-route"));
    let examples = workspace_root().join("examples");
    pytest(
        "test_tritonclient_graphs.py",
        &[
            ("WEFT_URL", server.address.as_ref()),
            ("WEFT_AB_URL", ab_route.address.as_ref()),
            ("WEFT_EXAMPLES", examples.as_os_str()),
        ],
        &[&server, &ab_route],
    );
}
