//! `weft graph check`: validates graph files against a repository's real models and plugins,
//! with the same error text loading would give.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::process::Command;

use support::*;

const CLASSIFY: &str = r#"name = "classify"

[[input]]
name = "x"
datatype = "FP32"
shape = [-1, 64]

[[output]]
name = "probabilities"
datatype = "FP32"
shape = [-1, 10]
from = "softmax.y"

[[node]]
name = "normalize"
kind = "transformer"
plugin = "normalize"
inputs = ["request"]

[[node]]
name = "mlp"
kind = "model"
model = "mlp"
inputs = ["normalize"]

[[node]]
name = "softmax"
kind = "output_transformer"
plugin = "softmax"
inputs = ["mlp"]
"#;

#[test]
fn graph_check_accepts_a_valid_graph_and_names_the_problem_in_an_invalid_one() {
    let guests = std::env::var_os("WEFT_GUESTS")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target/guests/wasm32-wasip2/release"));
    let plugin = |name: &str| {
        std::fs::read(guests.join(format!("{name}.wasm"))).expect("run `cargo xtask setup`")
    };
    let repo = Repo::new()
        .with_model(&quickstart(), "mlp")
        .with_file("plugins/normalize.wasm", &plugin("normalize"))
        .with_file("plugins/softmax.wasm", &plugin("softmax"))
        .with_file("plugins/param_router.wasm", &plugin("param_router"))
        .with_file("graphs/classify.toml", CLASSIFY.as_bytes())
        .with_file(
            "graphs/wrong.toml",
            CLASSIFY
                .replace("plugin = \"softmax\"", "plugin = \"param_router\"")
                .as_bytes(),
        )
        .with_file(
            "graphs/typo.toml",
            CLASSIFY
                .replace("model = \"mlp\"", "model = \"mpl\"")
                .as_bytes(),
        );
    let check = |file: &str| {
        Command::new(env!("CARGO_BIN_EXE_weft-under-test"))
            .args(["graph", "check", "--repository"])
            .arg(repo.path())
            .arg("--ort-library")
            .arg(ort_library())
            .arg(repo.path().join("graphs").join(file))
            .env("WEFT_LOG", "warn")
            .output()
            .unwrap()
    };
    let valid = check("classify.toml");
    let stdout = String::from_utf8_lossy(&valid.stdout);
    assert!(
        valid.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&valid.stderr)
    );
    assert!(
        stdout.contains("ok: ") && stdout.contains("graph 'classify' version 1, 3 nodes"),
        "{stdout}"
    );

    let wrong = check("wrong.toml");
    assert_eq!(wrong.status.code(), Some(1));
    let stdout = String::from_utf8_lossy(&wrong.stdout);
    assert!(
        stdout.contains("wrong.toml:27: node 'softmax': plugin 'param_router' is a router but an output_transformer node needs a transformer"),
        "{stdout}"
    );
    let typo = check("typo.toml");
    assert_eq!(typo.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&typo.stdout)
            .contains("typo.toml:21: node 'mlp': unknown model 'mpl'")
    );
}
