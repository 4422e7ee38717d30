//! Python plugins (componentize-py components using sdk-python's `weft_plugin`) served by a
//! real `weft` process: the Python normalize answers as the Rust one does inside a graph over
//! HTTP, the Python router picks branches, a Python exception becomes the call's error with its
//! message, a Python plugin that loops or allocates without end meets the same limits as a Rust
//! one, and a tenant builds, signs and pushes a Python plugin with the CLI and serves it, also
//! after a restart (from the compile cache).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::path::Path;
use std::process::{Command, Output};

use serde_json::{Value, json};
use support::*;

/// Deterministic features for `rows` rows of 64, not already normalized.
fn features(rows: usize) -> Vec<f32> {
    (0..rows * 64)
        .map(|i| ((i * 37 % 101) as f32) / 7.0 - 2.0)
        .collect()
}

fn floats(output: &Value) -> Vec<f32> {
    output["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap() as f32)
        .collect()
}

fn output<'a>(response: &'a Value, name: &str) -> &'a Value {
    response["outputs"]
        .as_array()
        .unwrap()
        .iter()
        .find(|o| o["name"] == name)
        .unwrap_or_else(|| panic!("no output {name} in {response}"))
}

/// Elementwise within `tolerance` (Python computes in double precision, Rust in single).
fn assert_close(actual: &[f32], expected: &[f32], tolerance: f32) {
    assert_eq!(actual.len(), expected.len());
    for (i, (a, e)) in actual.iter().zip(expected).enumerate() {
        assert!((a - e).abs() <= tolerance, "element {i}: {a} vs {e}");
    }
}

async fn call(server: &Server, model: &str, values: &[f32], parameters: Value) -> (u16, Value) {
    let body = json!({
        "inputs": [{"name": "x", "datatype": "FP32", "shape": [values.len() / 64, 64], "data": values}],
        "parameters": parameters,
    });
    post_json(&server.url(&format!("/v2/models/{model}/infer")), &body).await
}

async fn infer_ok(server: &Server, model: &str, values: &[f32], parameters: Value) -> Value {
    let (status, body) = call(server, model, values, parameters).await;
    assert_eq!(status, 200, "{model}: {body}\n{}", server.log());
    body
}

/// A one-node graph `name` running `plugin` on the request's `x`, answering the node's `x`.
fn one_node(name: &str, plugin: &str, node_extra: &str) -> String {
    transformer_graph(name, 1, "node", plugin, 64, "node.x", node_extra)
}

/// The value of one Prometheus series (0 when absent).
fn metric(metrics: &str, series: &str) -> f64 {
    metrics
        .lines()
        .find_map(|line| line.strip_prefix(series)?.trim().parse().ok())
        .unwrap_or(0.0)
}

const ZSCORE: &str = r#"params = { mode = "zscore" }"#;
const SCALE: &str = r#"params = { mode = "scale", scale = "0.5", shift = "1.5" }"#;

#[tokio::test]
async fn python_plugins_serve_like_rust_ones_and_fail_only_their_own_calls() {
    let repo = Repo::new()
        .with_model(&example("classify"), "mlp")
        .with_plugin("normalize", "normalize")
        .with_python_plugin("normalize-py")
        .with_python_plugin("param-router-py")
        .with_python_plugin("misbehave-py")
        .with_plugin("softmax", "softmax")
        .with_python_plugin("softmax-py")
        .with_graph("python", "route.toml")
        .with_graph("python", "classify.toml")
        .with_file(
            "graphs/classify-rust.toml",
            std::fs::read_to_string(example("classify").join("graphs/classify.toml"))
                .unwrap()
                .replace("name = \"classify\"", "name = \"classify-rust\"")
                .as_bytes(),
        )
        .with_file(
            "graphs/rust-z.toml",
            one_node("rust-z", "normalize", ZSCORE).as_bytes(),
        )
        .with_file(
            "graphs/py-z.toml",
            one_node("py-z", "normalize-py", ZSCORE).as_bytes(),
        )
        .with_file(
            "graphs/rust-s.toml",
            one_node("rust-s", "normalize", SCALE).as_bytes(),
        )
        .with_file(
            "graphs/py-s.toml",
            one_node("py-s", "normalize-py", SCALE).as_bytes(),
        )
        .with_file(
            "graphs/py-raise.toml",
            one_node("py-raise", "misbehave-py", r#"params = { mode = "raise" }"#).as_bytes(),
        )
        .with_file(
            "graphs/py-invalid.toml",
            one_node(
                "py-invalid",
                "misbehave-py",
                r#"params = { mode = "invalid" }"#,
            )
            .as_bytes(),
        )
        .with_file(
            "graphs/py-loop.toml",
            one_node(
                "py-loop",
                "misbehave-py",
                "deadline_ms = 300\nparams = { mode = \"loop\" }",
            )
            .as_bytes(),
        )
        .with_file(
            "graphs/py-allocate.toml",
            one_node(
                "py-allocate",
                "misbehave-py",
                "memory_mb = 48\nparams = { mode = \"allocate\" }",
            )
            .as_bytes(),
        )
        .with_file(
            "graphs/py-model.toml",
            transformer_graph(
                "py-model",
                1,
                "node",
                "misbehave-py",
                10,
                "node.y",
                "models = [\"mlp\"]\nparams = { mode = \"model\", model = \"mlp\" }",
            )
            .as_bytes(),
        );
    let server = Server::start(repo.path());
    let values = features(3);

    // The Python normalize gives the Rust normalize's outputs, in both modes.
    for (rust, python) in [("rust-z", "py-z"), ("rust-s", "py-s")] {
        let expected = floats(output(
            &infer_ok(&server, rust, &values, json!({})).await,
            "y",
        ));
        let actual = floats(output(
            &infer_ok(&server, python, &values, json!({})).await,
            "y",
        ));
        assert_close(&actual, &expected, 1e-4);
        assert_ne!(actual, values, "{python} changed nothing");
    }

    // The example classify graph with Python plugins answers as the Rust one: the same
    // probabilities and labels.
    let rust = infer_ok(&server, "classify-rust", &values, json!({})).await;
    let python = infer_ok(&server, "classify", &values, json!({})).await;
    assert_close(
        &floats(output(&python, "probabilities")),
        &floats(output(&rust, "probabilities")),
        1e-5,
    );
    assert_eq!(
        output(&python, "label")["data"],
        output(&rust, "label")["data"]
    );

    // A Python plugin calls a granted model through wasi:nn and gets what a direct call gets.
    let direct = floats(output(
        &infer_ok(&server, "mlp", &values, json!({})).await,
        "y",
    ));
    let through = floats(output(
        &infer_ok(&server, "py-model", &values, json!({})).await,
        "y",
    ));
    assert_close(&through, &direct, 1e-6);

    // The Python router picks the branch the request names, and only that branch runs; with no
    // name it takes its default.
    let zscored = floats(output(
        &infer_ok(&server, "py-z", &values, json!({})).await,
        "y",
    ));
    let scaled: Vec<f32> = values.iter().map(|v| v * 0.01).collect();
    let after_zscore = floats(output(
        &infer_ok(&server, "mlp", &zscored, json!({})).await,
        "y",
    ));
    let after_scale = floats(output(
        &infer_ok(&server, "mlp", &scaled, json!({})).await,
        "y",
    ));
    for (parameters, route, expected) in [
        (
            json!({"route": "scale", "trace": true}),
            "scale",
            &after_scale,
        ),
        (
            json!({"route": "zscore", "trace": true}),
            "zscore",
            &after_zscore,
        ),
        (json!({"trace": true}), "zscore", &after_zscore),
    ] {
        let answer = infer_ok(&server, "route", &values, parameters).await;
        let trace = answer["parameters"]["trace"].as_array().unwrap();
        let nodes: Vec<&str> = trace.iter().map(|n| n["node"].as_str().unwrap()).collect();
        assert_eq!(nodes, ["pick", route, &format!("{route}_mlp")], "{answer}");
        assert_eq!(trace[0]["route"], route);
        assert_close(&floats(output(&answer, "y")), expected, 1e-4);
    }
    let (status, body) = call(&server, "route", &values, json!({"route": "nowhere"})).await;
    assert!(status >= 400, "{body}");
    assert!(
        body["error"].as_str().unwrap().contains("nowhere"),
        "{body}"
    );

    // A Python exception is the call's error, with its type, message and line.
    let (status, body) = call(&server, "py-raise", &values, json!({})).await;
    let error = body["error"].as_str().unwrap();
    assert_eq!(status, 500, "{body}");
    assert!(
        error.contains("node 'node'")
            && error.contains("ValueError: the misbehave plugin was told to fail")
            && error.contains("app.py line"),
        "{error}"
    );
    // InvalidInput is the caller's fault: 400, with the plugin's message.
    let (status, body) = call(&server, "py-invalid", &values, json!({})).await;
    assert_eq!(status, 400, "{body}");
    assert!(
        body["error"]
            .as_str()
            .unwrap()
            .contains("misbehave: this input is not acceptable"),
        "{body}"
    );

    // A loop meets the node's deadline and a hoard its memory limit, as a Rust plugin's would:
    // each is counted under its cause, and only that call fails.
    for (graph, cause, status_wanted, words) in [
        ("py-loop", "deadline", 504, "deadline"),
        (
            "py-allocate",
            "memory",
            500,
            "memory limit of 50331648 bytes",
        ),
    ] {
        let series =
            format!("weft_plugin_traps_total{{cause=\"{cause}\",plugin=\"misbehave-py\"}}");
        let before = metric(&scrape(&server).await, &series);
        let (status, body) = call(&server, graph, &values, json!({})).await;
        assert_eq!(status, status_wanted, "{graph}: {body}");
        assert!(
            body["error"].as_str().unwrap().contains(words),
            "{graph}: {body}"
        );
        let after = metric(&scrape(&server).await, &series);
        assert_eq!(after - before, 1.0, "{graph}: {series}");
        let again = infer_ok(&server, "py-z", &values, json!({})).await;
        assert_close(&floats(output(&again, "y")), &zscored, 0.0);
    }
}

/// Runs `weft <args>` against `server` with `env`.
fn weft(server: &Server, env: &[(&str, &str)], args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_weft-under-test"))
        .args(args)
        .env("WEFT_SERVER", format!("http://{}", server.address))
        .env_remove("WEFT_API_KEY")
        .env_remove("WEFT_ADMIN_KEY")
        .envs(env.iter().copied())
        .output()
        .unwrap()
}

/// Runs and asserts success; returns (stdout, stderr).
fn ok(server: &Server, env: &[(&str, &str)], args: &[&str]) -> (String, String) {
    let output = weft(server, env, args);
    let stdout = String::from_utf8_lossy(&output.stdout).to_string();
    let stderr = String::from_utf8_lossy(&output.stderr).to_string();
    assert!(
        output.status.success(),
        "weft {args:?} failed:\n{stdout}\n{stderr}\nserver log:\n{}",
        server.log()
    );
    (stdout, stderr)
}

fn path(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[tokio::test]
async fn a_tenant_builds_signs_and_pushes_a_python_plugin_with_the_cli() {
    let repo = Repo::new().with_model(&quickstart(), "mlp");
    let data = tempfile::tempdir().unwrap();
    let server = Server::try_start_in(repo.path(), &[], data).unwrap();
    let work = tempfile::tempdir().unwrap();
    let (created, _) = ok(
        &server,
        &[("WEFT_ADMIN_KEY", ADMIN_KEY)],
        &["tenant", "create", "acme", "--share", "mlp"],
    );
    let created: Value = serde_json::from_str(&created).unwrap();
    let key = created["api_key"]["key"].as_str().unwrap().to_string();
    let tenant = [("WEFT_API_KEY", key.as_str())];

    // Build: the tenant's own copy of the example normalize, with a helper module beside it.
    let source = work.path().join("src");
    std::fs::create_dir_all(&source).unwrap();
    let app = std::fs::read_to_string(workspace_root().join("plugins/python/normalize/app.py"))
        .unwrap()
        .replace("import math\n", "import math\n\nimport helper\n")
        .replace(
            "    mode = params.get(\"mode\", \"zscore\")",
            "    mode = helper.mode(params)",
        );
    std::fs::write(source.join("app.py"), app).unwrap();
    std::fs::write(
        source.join("helper.py"),
        "def mode(params):\n    return params.get(\"mode\", \"zscore\")\n",
    )
    .unwrap();
    let wasm = work.path().join("normalize.wasm");
    let componentize = componentize_py();
    let builder = [("WEFT_COMPONENTIZE_PY", path(&componentize))];
    let (_, built) = ok(
        &server,
        &builder,
        &[
            "plugin",
            "build",
            "--out",
            path(&wasm),
            path(&source.join("app.py")),
        ],
    );
    let size = std::fs::metadata(&wasm).unwrap().len();
    assert!(
        built.contains("a transformer plugin") && built.contains(&format!("{size} bytes")),
        "{built}"
    );
    // A module without a role decorator is refused before componentize-py runs.
    std::fs::write(
        source.join("plain.py"),
        "def f(inputs, params):\n    return inputs\n",
    )
    .unwrap();
    let refused = weft(
        &server,
        &builder,
        &["plugin", "build", path(&source.join("plain.py"))],
    );
    assert!(!refused.status.success());
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("@transformer, @combiner or @router"),
        "{refused:?}"
    );

    // Sign with a registered key, push with progress: upload lines, then notes while the server
    // compiles the 19 MB component.
    let prefix = work.path().join("acme");
    ok(&server, &[], &["key", "gen", "--out", path(&prefix)]);
    let secret = work.path().join("acme.key");
    ok(&server, &tenant, &["key", "register", path(&secret)]);
    ok(
        &server,
        &[],
        &[
            "plugin",
            "sign",
            "--key",
            path(&secret),
            "--tenant",
            "acme",
            "--name",
            "normalize-py",
            "--version",
            "1.0.0",
            path(&wasm),
        ],
    );
    let (pushed, progress) = ok(
        &server,
        &tenant,
        &[
            "plugin",
            "push",
            "--progress",
            "--name",
            "normalize-py",
            "--version",
            "1.0.0",
            path(&wasm),
        ],
    );
    let pushed: Value = serde_json::from_str(&pushed).unwrap();
    assert_eq!(pushed["role"], "transformer", "{pushed}");
    assert!(
        progress.contains("(100%)")
            && progress.contains("waiting while the server uploads, compiles and checks"),
        "{progress}"
    );

    // Serve it in a graph and compare with the Rust SDK's arithmetic (z-score per row).
    let graph = work.path().join("norm.toml");
    std::fs::write(&graph, one_node("norm", "normalize-py", ZSCORE)).unwrap();
    ok(&server, &tenant, &["graph", "apply", path(&graph)]);
    let values = features(2);
    let expected: Vec<f32> = values
        .chunks(64)
        .flat_map(|row| {
            let mean = row.iter().sum::<f32>() / 64.0;
            let std = (row.iter().map(|v| (v - mean).powi(2)).sum::<f32>() / 64.0).sqrt();
            row.iter().map(move |v| (v - mean) / std)
        })
        .collect();
    let answer = |server: &Server| {
        let body = json!({
            "inputs": [{"name": "x", "datatype": "FP32", "shape": [2, 64], "data": values}],
        });
        client_with_key(&key)
            .post(server.url("/v2/models/norm/infer"))
            .json(&body)
            .send()
    };
    let response = answer(&server).await.unwrap();
    assert_eq!(response.status(), 200);
    let body: Value = response.json().await.unwrap();
    assert_close(&floats(output(&body, "y")), &expected, 1e-4);

    // A restart serves it again without compiling: the first call loads the compile cache.
    let data = server.crash();
    let server = Server::try_start_in(repo.path(), &[], data).unwrap();
    let response = answer(&server).await.unwrap();
    assert_eq!(response.status(), 200, "{}", server.log());
    let body: Value = response.json().await.unwrap();
    assert_close(&floats(output(&body, "y")), &expected, 1e-4);
    let metrics = scrape(&server).await;
    assert_eq!(
        metric(
            &metrics,
            "weft_compile_cache_lookups_total{result=\"miss\"}"
        ),
        0.0,
        "{metrics}"
    );
    assert!(metric(&metrics, "weft_compile_cache_lookups_total{result=\"hit\"}") >= 1.0);
}

/// sdk-python's own unit tests (tensor conversions for every datatype, params, what the role
/// decorators hand the host), run with the test environment's pytest against bindings
/// componentize-py generates.
#[test]
fn the_python_sdk_unit_tests_pass() {
    let output = Command::new(test_python())
        .args(["-m", "pytest", "-q", "-p", "no:cacheprovider"])
        .arg(workspace_root().join("sdk-python/tests"))
        .env("WEFT_COMPONENTIZE_PY", componentize_py())
        .output()
        .expect("cannot run pytest from the test environment (run `cargo xtask setup`)");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(stdout.contains("21 passed"), "{stdout}");
}
