//! The `weft` command line end to end against a real server: an operator creates a tenant, the
//! tenant generates a signing key, registers it, signs and pushes plugins, pushes a model,
//! applies a graph and calls it with `weft infer` — the README's walkthrough — and errors come
//! out exactly as the server said them.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::path::Path;
use std::process::{Command, Output};

use serde_json::Value;
use support::*;

/// Runs `weft <args>` with the server's address and the given key in the environment.
fn weft(server: &Server, env: &[(&str, &str)], args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_weft-under-test"))
        .args(args)
        .env("WEFT_SERVER", format!("http://{}", server.address))
        .envs(env.iter().copied())
        .env_remove("WEFT_API_KEY")
        .env_remove("WEFT_ADMIN_KEY")
        .envs(env.iter().copied())
        .output()
        .unwrap()
}

/// Runs and asserts success; returns stdout.
fn ok(server: &Server, env: &[(&str, &str)], args: &[&str]) -> String {
    let output = weft(server, env, args);
    let stdout = String::from_utf8_lossy(&output.stdout).to_string();
    let stderr = String::from_utf8_lossy(&output.stderr).to_string();
    assert!(
        output.status.success(),
        "weft {args:?} failed:\n{stdout}\n{stderr}\nserver log:\n{}",
        server.log()
    );
    stdout
}

fn path(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn a_new_tenant_goes_from_key_gen_to_a_signed_plugin_in_a_graph() {
    let repo = Repo::new().with_model(&quickstart(), "mlp");
    let server = Server::start(repo.path());
    let work = tempfile::tempdir().unwrap();
    let admin = [("WEFT_ADMIN_KEY", ADMIN_KEY)];

    // Operator: a tenant sharing the platform's mlp; its API key is printed once.
    let created: Value = serde_json::from_str(&ok(
        &server,
        &admin,
        &["tenant", "create", "acme", "--share", "mlp"],
    ))
    .unwrap();
    let key = created["api_key"]["key"].as_str().unwrap().to_string();
    let tenant = [("WEFT_API_KEY", key.as_str())];

    // Tenant: a signing key pair, registered.
    let prefix = work.path().join("acme");
    let key_id = ok(&server, &[], &["key", "gen", "--out", path(&prefix)]);
    let key_id = key_id.trim();
    assert_eq!(key_id.len(), 16, "{key_id}");
    let secret = work.path().join("acme.key");
    let public = work.path().join("acme.pub");
    // Registering proves possession: the public file alone is refused locally, the secret key
    // answers the server's challenge (and is never sent).
    let refused = weft(&server, &tenant, &["key", "register", path(&public)]);
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("is a public key"));
    let registered = weft(&server, &tenant, &["key", "register", path(&secret)]);
    assert!(registered.status.success(), "{registered:?}");
    assert!(
        String::from_utf8_lossy(&registered.stderr).contains("--tenant acme"),
        "{registered:?}"
    );
    // A second `key gen` to the same prefix never overwrites a secret key.
    assert!(
        !weft(&server, &[], &["key", "gen", "--out", path(&prefix)])
            .status
            .success()
    );

    // Sign and push both plugins of the classify graph.
    for plugin in ["normalize", "softmax"] {
        let wasm = work.path().join(format!("{plugin}.wasm"));
        std::fs::copy(guests().join(format!("{plugin}.wasm")), &wasm).unwrap();
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
                plugin,
                "--version",
                "1.0.0",
                path(&wasm),
            ],
        );
        assert!(work.path().join(format!("{plugin}.wasm.sig")).is_file());
        let pushed: Value = serde_json::from_str(&ok(
            &server,
            &tenant,
            &[
                "plugin",
                "push",
                "--name",
                plugin,
                "--version",
                "1.0.0",
                path(&wasm),
            ],
        ))
        .unwrap();
        assert_eq!(pushed["key_id"], key_id);
    }
    // A plugin whose bytes changed after signing is refused locally, before any upload.
    let tampered = work.path().join("normalize.wasm");
    let mut bytes = std::fs::read(&tampered).unwrap();
    bytes.push(0);
    std::fs::write(&tampered, bytes).unwrap();
    let refused = weft(
        &server,
        &tenant,
        &[
            "plugin",
            "push",
            "--name",
            "normalize",
            "--version",
            "1.0.0",
            path(&tampered),
        ],
    );
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("does not match"));

    // A signature names its tenant: one made for another tenant is refused by the server, which
    // says how to sign for this one.
    let wasm = work.path().join("softmax.wasm");
    let elsewhere = work.path().join("softmax.elsewhere.sig");
    ok(
        &server,
        &[("WEFT_TENANT", "bolt")],
        &[
            "plugin",
            "sign",
            "--key",
            path(&secret),
            "--name",
            "softmax",
            "--version",
            "2.0.0",
            "--out",
            path(&elsewhere),
            path(&wasm),
        ],
    );
    let refused = weft(
        &server,
        &tenant,
        &[
            "plugin",
            "push",
            "--name",
            "softmax",
            "--version",
            "2.0.0",
            "--signature",
            path(&elsewhere),
            path(&wasm),
        ],
    );
    assert!(!refused.status.success());
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(
        stderr.contains("400") && stderr.contains("--tenant acme") && !stderr.contains("bolt"),
        "{stderr}"
    );

    // A model of its own, with its model.toml.
    let config = work.path().join("model.toml");
    std::fs::write(&config, "platform = \"onnx\"\nmax_batch_size = 64\n").unwrap();
    let onnx = quickstart().join("models/mlp/1/model.onnx");
    ok(
        &server,
        &tenant,
        &[
            "model",
            "push",
            "--name",
            "scorer",
            "--version",
            "1",
            "--config",
            path(&config),
            path(&onnx),
        ],
    );
    let models: Value = serde_json::from_str(&ok(&server, &tenant, &["model", "list"])).unwrap();
    assert_eq!(models["models"][0]["name"], "scorer");

    // The graph: checked locally against nothing but itself is `weft graph check`'s job; the
    // server validates it the same way on apply, and its errors name the local file.
    let graph = std::fs::read_to_string(example("classify").join("graphs/classify.toml")).unwrap();
    let broken = work.path().join("broken.toml");
    std::fs::write(
        &broken,
        graph.replace("model = \"mlp\"", "model = \"nope\""),
    )
    .unwrap();
    let failed = weft(&server, &tenant, &["graph", "apply", path(&broken)]);
    assert!(!failed.status.success());
    let stderr = String::from_utf8_lossy(&failed.stderr);
    assert!(
        stderr.contains("400")
            && stderr.contains(&format!("{}:", broken.display()))
            && stderr.contains("unknown model 'nope'"),
        "{stderr}"
    );
    let file = work.path().join("classify.toml");
    std::fs::write(
        &file,
        graph.replace("model = \"mlp\"", "model = \"scorer\""),
    )
    .unwrap();
    // --dry-run: the server's check against the tenant's own models and plugins, nothing stored.
    let checked = ok(
        &server,
        &tenant,
        &["graph", "apply", "--dry-run", path(&file)],
    );
    assert!(
        checked.contains("\"checked\"") && checked.contains("\"dry_run\": true"),
        "{checked}"
    );
    let listed = ok(&server, &tenant, &["graph", "list"]);
    assert!(
        !listed.contains("classify"),
        "a dry run stored the graph: {listed}"
    );
    ok(&server, &tenant, &["graph", "apply", path(&file)]);

    // Call it: JSON in, JSON out.
    let request = work.path().join("request.json");
    let x: Vec<f32> = (0..64).map(|i| i as f32 / 8.0).collect();
    std::fs::write(
        &request,
        serde_json::json!({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 64], "data": x}]}).to_string(),
    )
    .unwrap();
    let answer: Value = serde_json::from_str(&ok(
        &server,
        &tenant,
        &["infer", "classify", "--input", path(&request)],
    ))
    .unwrap();
    assert_eq!(answer["model_name"], "classify");
    let probabilities: Vec<f64> = answer["outputs"]
        .as_array()
        .unwrap()
        .iter()
        .find(|o| o["name"] == "probabilities")
        .unwrap()["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap())
        .collect();
    assert!((probabilities.iter().sum::<f64>() - 1.0).abs() < 1e-4);
    assert_eq!(answer["parameters"]["provenance"][0]["key_id"], key_id);

    // Errors print what the server said: another tenant's graph is just unknown.
    let other: Value =
        serde_json::from_str(&ok(&server, &admin, &["tenant", "create", "bolt"])).unwrap();
    let other_key = other["api_key"]["key"].as_str().unwrap();
    let denied = weft(
        &server,
        &[("WEFT_API_KEY", other_key)],
        &["infer", "classify", "--input", path(&request)],
    );
    assert!(!denied.status.success());
    let stderr = String::from_utf8_lossy(&denied.stderr);
    assert!(
        stderr.contains("404")
            && stderr.contains("Request for unknown model: 'classify' is not found"),
        "{stderr}"
    );
    let listed: Value = serde_json::from_str(&ok(&server, &admin, &["tenant", "list"])).unwrap();
    assert_eq!(
        listed["tenants"].as_array().unwrap().len(),
        3,
        "default, acme and bolt"
    );
}
