//! Client compatibility: the stock `tritonclient[http]` Python package, in its default binary
//! mode and in JSON mode, against a real `weft serve` (tests/python/test_tritonclient.py).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::type_complexity)]

mod support;

use std::process::Command;

use support::*;

#[test]
fn tritonclient_compatibility() {
    let server = Server::start(Repo::standard().path());
    let script = workspace_root().join("tests/python/test_tritonclient.py");
    let output = Command::new(test_python())
        .args(["-m", "pytest", "-q", "-p", "no:cacheprovider"])
        .arg(&script)
        .env("WEFT_URL", &server.address)
        .env("WEFT_QUICKSTART_MODELS", quickstart().join("models"))
        .output()
        .expect("cannot run pytest from the test environment (run `cargo xtask setup`)");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "tritonclient tests failed:\n{stdout}\n{stderr}\nserver log:\n{}",
        server.log()
    );
    assert!(
        stdout.contains("passed") && !stdout.contains("skipped"),
        "{stdout}"
    );
}
