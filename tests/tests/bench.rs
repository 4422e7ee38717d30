//! `weft bench` end to end: the load generator measures a real server over both encodings and
//! in-process, prints one summary line with requests, errors and percentiles, and counts
//! refused requests as errors rather than as throughput.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::process::Command;

use serde_json::json;
use support::tenants::create_tenant;
use support::*;

/// Runs `weft bench` with `args`; returns (success, last stdout line, stderr).
fn bench(args: &[&str]) -> (bool, String, String) {
    let output = Command::new(env!("CARGO_BIN_EXE_weft-under-test"))
        .arg("bench")
        .args(args)
        .args(["--duration", "1", "--warmup", "0.2"])
        .arg("--ort-library")
        .arg(ort_library())
        .env_remove("WEFT_API_KEY")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let line = stdout.lines().last().unwrap_or_default().to_string();
    (
        output.status.success(),
        line,
        String::from_utf8_lossy(&output.stderr).to_string(),
    )
}

/// `"<n> requests, <e> errors"` from a summary line.
fn counts(line: &str) -> (u64, u64) {
    let number = |word: &str| -> u64 {
        let before = line.split(&format!(" {word}")).next().unwrap();
        before.rsplit([' ', ':']).next().unwrap().parse().unwrap()
    };
    (number("requests,"), number("errors"))
}

#[tokio::test(flavor = "multi_thread")]
async fn bench_measures_a_server_in_both_encodings_and_in_process() {
    let repo = Repo::new().with_model(&quickstart(), "mlp");
    let server = Server::start(repo.path());
    let url = format!("http://{}", server.address);
    for encoding in ["binary", "json"] {
        let (ok, line, stderr) = bench(&[
            "--model",
            "mlp",
            "--url",
            &url,
            "--api-key",
            TEST_KEY,
            "--concurrency",
            "2",
            "--encoding",
            encoding,
        ]);
        assert!(ok, "{line}\n{stderr}");
        let (requests, errors) = counts(&line);
        assert!(requests > 10, "{encoding}: {line}");
        assert_eq!(errors, 0, "{encoding}: {line}");
        for figure in ["req/s", "p50", "p90", "p99"] {
            assert!(line.contains(figure), "{line}");
        }
    }
    let (ok, line, stderr) = bench(&[
        "--model",
        "mlp",
        "--in-process",
        "--repository",
        repo.path().to_str().unwrap(),
        "--rows",
        "4",
    ]);
    assert!(ok, "{line}\n{stderr}");
    let (requests, errors) = counts(&line);
    assert!(requests > 10 && errors == 0, "{line}");

    // Without a key: a clear failure before any load.
    let (ok, _, stderr) = bench(&["--model", "mlp", "--url", &url]);
    assert!(!ok && stderr.contains("401"), "{stderr}");
    // A tenant over its rate quota: refusals are counted as errors, not as throughput.
    let key = create_tenant(
        &server,
        "slow",
        json!({ "shared_models": ["mlp"], "quotas": { "requests_per_second": 5.0, "burst": 5 } }),
    )
    .await;
    let (_, line, stderr) = bench(&["--model", "mlp", "--url", &url, "--api-key", &key]);
    let (requests, errors) = counts(&line);
    // The burst of 5 plus ~5/s over the run succeed; the rest are errors.
    assert!(errors > 0 && requests <= 15, "{line}\n{stderr}");
}

/// `weft bench --grpc` and `--shared-memory` measure the same server over gRPC and through
/// shared memory regions (both protocols), with no failed request; without the tenant's
/// shared memory the bench stops with the server's reason.
#[tokio::test(flavor = "multi_thread")]
async fn bench_measures_grpc_and_shared_memory() {
    let repo = Repo::new().with_model(&quickstart(), "mlp");
    let server = Server::start_with(repo.path(), &["--system-shared-memory", "default"]);
    let url = format!("http://{}", server.address);
    let grpc = format!("http://{}", server.grpc_address.as_ref().unwrap());
    let base = [
        "--model",
        "mlp",
        "--url",
        &url,
        "--grpc-url",
        &grpc,
        "--api-key",
        TEST_KEY,
        "--rows",
        "3",
        "--concurrency",
        "2",
    ];
    for (extra, label) in [
        (&["--grpc"][..], "grpc mlp rows=3"),
        (&["--shared-memory"][..], "http shared-memory mlp"),
        (&["--grpc", "--shared-memory"][..], "grpc shared-memory mlp"),
    ] {
        let args: Vec<&str> = base.iter().chain(extra).copied().collect();
        let (ok, line, stderr) = bench(&args);
        assert!(ok, "{extra:?}: {line}\n{stderr}");
        assert!(line.starts_with(label), "{line}");
        let (requests, errors) = counts(&line);
        assert!(requests > 10, "{extra:?}: {line}");
        assert_eq!(errors, 0, "{extra:?}: {line}\n{}", server.log());
    }
    // The bench removed its shared memory object when it ended.
    let leftover = std::fs::read_dir("/dev/shm")
        .unwrap()
        .filter_map(Result::ok)
        .any(|entry| {
            entry
                .file_name()
                .to_string_lossy()
                .starts_with("weft-bench-")
        });
    assert!(!leftover, "a weft-bench object is left in /dev/shm");

    let plain = Server::start(repo.path());
    let url = format!("http://{}", plain.address);
    let (ok, line, stderr) = bench(&[
        "--model",
        "mlp",
        "--url",
        &url,
        "--api-key",
        TEST_KEY,
        "--shared-memory",
    ]);
    assert!(!ok, "{line}");
    assert!(
        stderr.contains("not enabled for tenant 'default'"),
        "{stderr}"
    );
}
