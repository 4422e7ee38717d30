//! Client compatibility: the stock `tritonclient[http]` Python package, in its default binary
//! mode and in JSON mode, against a real `weft serve`: models (tests/python/test_tritonclient.py)
//! and graphs (tests/python/test_tritonclient_graphs.py).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::type_complexity)]

mod support;

use std::process::Command;

use serde_json::json;
use support::tenants::*;
use support::*;

/// Runs one pytest module with `env`; fails with its output and the servers' logs.
fn pytest(module: &str, env: &[(&str, &std::ffi::OsStr)], servers: &[&Server]) {
    let script = workspace_root().join("tests/python").join(module);
    let output = Command::new(test_python())
        .args(["-m", "pytest", "-q", "-p", "no:cacheprovider"])
        .arg(&script)
        .env("WEFT_API_KEY", TEST_KEY)
        .envs(env.iter().copied())
        .output()
        .expect("cannot run pytest from the test environment (run `cargo xtask setup`)");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    // What ran, for `--nocapture`.
    println!("{module}: {}", stdout.lines().last().unwrap_or_default());
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

/// The README's tenant walkthrough ends here: plugins the tenant signed and pushed and a graph it
/// applied answer stock tritonclient, with provenance, and only for that tenant.
#[tokio::test(flavor = "multi_thread")]
async fn tritonclient_calls_a_tenants_signed_graph() {
    let repo = Repo::new().with_model(&quickstart(), "mlp");
    let server = Server::start(repo.path());
    let key = create_tenant(&server, "acme", json!({ "shared_models": ["mlp"] })).await;
    let other = create_tenant(&server, "bolt", json!({ "shared_models": ["mlp"] })).await;
    let secret = signing_key(&server, &key).await;
    push_classify_plugins(&server, &key, &secret, "1.0.0").await;
    let (status, body) = apply_graph(
        &server,
        &key,
        "classify",
        &classify_graph("classify", 1, "mlp"),
    )
    .await;
    assert_eq!(status, 201, "{body}");
    let signer = secret.public().key_id();
    pytest(
        "test_tritonclient_tenant.py",
        &[
            ("WEFT_URL", server.address.as_ref()),
            ("WEFT_API_KEY", key.as_ref()),
            ("WEFT_OTHER_KEY", other.as_ref()),
            ("WEFT_SIGNER", signer.as_ref()),
        ],
        &[&server],
    );
}

/// Stock `tritonclient[grpc]` on the gRPC endpoint: the default tenant calls the standard models
/// and the classify graph; a second tenant owns a model `secret` the first must not see.
#[tokio::test(flavor = "multi_thread")]
async fn tritonclient_grpc_compatibility() {
    let repo = Repo::standard()
        .with_graph("classify", "classify.toml")
        .with_plugin("normalize", "normalize")
        .with_plugin("softmax", "softmax");
    let max_request_bytes = "1048576";
    let server = Server::start_with(repo.path(), &["--max-request-bytes", max_request_bytes]);
    let grpc = server
        .grpc_address
        .clone()
        .expect("the gRPC listener is on");
    let other = create_tenant(&server, "bolt", json!({})).await;
    let (status, body) = push_model(&server, &other, "secret", 1, MLP_CONFIG, &mlp_onnx()).await;
    assert_eq!(status, 201, "{body}");
    let models = quickstart().join("models");
    let examples = workspace_root().join("examples");
    pytest(
        "test_tritonclient_grpc.py",
        &[
            ("WEFT_GRPC_URL", grpc.as_ref()),
            ("WEFT_OTHER_KEY", other.as_ref()),
            ("WEFT_MAX_REQUEST_BYTES", max_request_bytes.as_ref()),
            ("WEFT_QUICKSTART_MODELS", models.as_os_str()),
            ("WEFT_EXAMPLES", examples.as_os_str()),
        ],
        &[&server],
    );
}

/// Triton's system shared memory extension with stock tritonclient over HTTP and gRPC, for the
/// tenant the operator enabled, and refused for one it did not.
#[tokio::test(flavor = "multi_thread")]
async fn tritonclient_system_shared_memory() {
    let repo = Repo::standard();
    let server = Server::start_with(repo.path(), &["--system-shared-memory", "default"]);
    let other = create_tenant(&server, "bolt", json!({})).await;
    let (status, body) = push_model(&server, &other, "secret", 1, MLP_CONFIG, &mlp_onnx()).await;
    assert_eq!(status, 201, "{body}");
    let grpc = server
        .grpc_address
        .clone()
        .expect("the gRPC listener is on");
    let models = quickstart().join("models");
    pytest(
        "test_shared_memory.py",
        &[
            ("WEFT_URL", server.address.as_ref()),
            ("WEFT_GRPC_URL", grpc.as_ref()),
            ("WEFT_OTHER_KEY", other.as_ref()),
            ("WEFT_QUICKSTART_MODELS", models.as_os_str()),
        ],
        &[&server],
    );
}
