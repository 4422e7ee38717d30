//! Tenant models cannot reach the host: hostile ONNX models (external data anywhere in the
//! model, custom-op domains, oversized initializers, load-time memory bombs) are refused at
//! push; tenant models run in sandboxed model workers that cannot open the server's files or
//! connect anywhere; a worker killed mid-request fails only that tenant's call with a 503, is
//! restarted, and serves the next request, while another tenant sees nothing of it.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use serde_json::{Value, json};
use support::tenants::{MLP_CONFIG, create_tenant, infer, mlp_onnx, push_model, send};
use support::*;

/// Writes the hostile models of tests/models/make_hostile_models.py into `dir`, with the
/// absolute external-data path pointing at `secret`.
fn hostile_models(dir: &Path, secret: &Path) -> PathBuf {
    let status = Command::new(test_python())
        .arg(workspace_root().join("tests/models/make_hostile_models.py"))
        .arg(dir)
        .arg(secret)
        .status()
        .unwrap();
    assert!(status.success(), "make_hostile_models.py failed");
    dir.to_path_buf()
}

fn read(dir: &Path, file: &str) -> Vec<u8> {
    std::fs::read(dir.join(file)).unwrap_or_else(|e| panic!("{file}: {e}"))
}

const TINY_CONFIG: &str = "platform = \"onnx\"\nmax_batch_size = 8\n";

async fn models_of(server: &Server, key: &str) -> Value {
    let (status, body) = send(client_with_key(key).get(server.url("/api/v1/models"))).await;
    assert_eq!(status, 200, "{body}");
    body
}

#[tokio::test]
async fn hostile_models_are_refused_at_push_and_never_loaded() {
    let repo = Repo::new();
    let server = Server::start(repo.path());
    let key = create_tenant(&server, "mallory", json!({})).await;
    let secret = server.data_dir().join("state.json");
    let scratch = tempfile::tempdir().unwrap();
    let dir = hostile_models(scratch.path(), &secret);

    let cases = [
        ("external_absolute.onnx", "external data"),
        ("external_relative.onnx", "external data"),
        ("external_climb.onnx", "external data"),
        ("external_in_if.onnx", "external data"),
        ("external_sparse.onnx", "external data"),
        ("external_constant.onnx", "external data"),
        ("custom_domain.onnx", "com.evil.customops"),
    ];
    for (version, (file, reason)) in cases.iter().enumerate() {
        let (status, body) = push_model(
            &server,
            &key,
            "evil",
            version as u64 + 1,
            TINY_CONFIG,
            &read(&dir, file),
        )
        .await;
        let message = body["error"].as_str().unwrap_or_default().to_string();
        assert_eq!(status, 400, "{file}: {body}");
        assert!(message.contains(reason), "{file}: {message}");
        assert!(
            !message.contains(&server.data_dir().display().to_string()),
            "{file}: the error must not carry the server's paths: {message}"
        );
    }
    // Nothing was stored, and the control model still loads and serves.
    assert_eq!(models_of(&server, &key).await["models"], json!([]));
    let (status, body) = push_model(
        &server,
        &key,
        "clean",
        1,
        TINY_CONFIG,
        &read(&dir, "clean.onnx"),
    )
    .await;
    assert_eq!(status, 201, "{body}");
    let (status, body) = send(
        client_with_key(&key)
            .post(server.url("/v2/models/clean/infer"))
            .json(
                &json!({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 4],
                                       "data": [1.0, 2.0, 3.0, 4.0]}]}),
            ),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    // A tenant may not ask to run in process or to read external data.
    for config in [
        "platform = \"onnx\"\nisolation = \"in_process\"\n",
        "platform = \"onnx\"\nallow_external_data = true\n",
    ] {
        let (status, body) = push_model(&server, &key, "sneaky", 1, config, &mlp_onnx()).await;
        assert_eq!(status, 400, "{config}: {body}");
    }
}

#[tokio::test]
async fn models_over_the_tenant_model_memory_are_refused_and_cost_others_nothing() {
    let repo = Repo::new();
    let server = Server::start(repo.path());
    let small = create_tenant(
        &server,
        "small",
        json!({ "quotas": { "model_memory_mb": 64 } }),
    )
    .await;
    let other = create_tenant(&server, "other", json!({})).await;
    let (status, body) = push_model(&server, &other, "mlp", 1, MLP_CONFIG, &mlp_onnx()).await;
    assert_eq!(status, 201, "{body}");
    let scratch = tempfile::tempdir().unwrap();
    let dir = hostile_models(scratch.path(), Path::new("/etc/hostname"));

    // 96 MiB of weights do not fit 64 MiB.
    let (status, body) = push_model(
        &server,
        &small,
        "big",
        1,
        TINY_CONFIG,
        &read(&dir, "big_initializer.onnx"),
    )
    .await;
    assert_eq!(status, 400, "{body}");
    assert!(
        body["error"]
            .as_str()
            .unwrap()
            .contains(&format!("max_initializer_bytes = {}", 64u64 << 20)),
        "{body}"
    );

    // A tiny file whose load folds into GiBs: refused at push by the trial load, which runs in
    // a worker of its own.
    let (status, body) = push_model(
        &server,
        &small,
        "bomb",
        1,
        TINY_CONFIG,
        &read(&dir, "load_bomb.onnx"),
    )
    .await;
    assert_eq!(status, 400, "{body}");
    let message = body["error"].as_str().unwrap();
    assert!(
        message.contains("cannot be loaded within the tenant's limits (model memory 64 MiB"),
        "{message}"
    );
    assert_eq!(models_of(&server, &small).await["models"], json!([]));

    // instance_count × size counts: 4 sessions of a 20 MiB model do not fit 64 MiB either.
    let (status, body) = push_model(
        &server,
        &small,
        "many",
        1,
        "platform = \"onnx\"\n[ort]\ninstance_count = 4\n",
        &read(&dir, "medium_initializer.onnx"),
    )
    .await;
    assert_eq!(status, 403, "{body}");
    assert!(
        body["error"].as_str().unwrap().contains("model_memory_mb"),
        "{body}"
    );

    // The other tenant never noticed.
    let (status, body) = infer(&server, &other, "mlp").await;
    assert_eq!(status, 200, "{body}");
}

/// The model worker processes of the server whose command line carries `marker`.
fn workers_with(server: &Server, marker: &str) -> Vec<i32> {
    let mut pids = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        let parent = stat
            .rsplit_once(") ")
            .and_then(|(_, rest)| rest.split_whitespace().nth(1))
            .and_then(|ppid| ppid.parse::<u32>().ok());
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        if parent == Some(server.pid()) && cmdline.contains(" worker ") && cmdline.contains(marker)
        {
            pids.push(pid);
        }
    }
    pids
}

/// Pushes `slow_matmul` (seconds of compute per call, one session, one thread) as `slow`.
async fn push_slow_model(server: &Server, key: &str) {
    let scratch = tempfile::tempdir().unwrap();
    let dir = hostile_models(scratch.path(), Path::new("/etc/hostname"));
    let config = "platform = \"onnx\"\n[ort]\ninstance_count = 1\nintra_op_threads = 1\n";
    let (status, body) = push_model(
        server,
        key,
        "slow",
        1,
        config,
        &read(&dir, "slow_matmul.onnx"),
    )
    .await;
    assert_eq!(status, 201, "{body}");
}

/// User plus system CPU time of a process, in clock ticks (fields 14 and 15 of its stat).
fn cpu_ticks(pid: i32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let fields: Vec<&str> = stat
        .rsplit_once(") ")
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default();
    fields.get(11..13).map_or(0, |times| {
        times.iter().filter_map(|t| t.parse::<u64>().ok()).sum()
    })
}

async fn infer_slow(server: &Server, key: &str) -> (u16, Value) {
    // 1024×1024 FP32 through eight chained MatMuls: seconds of compute, sent binary.
    let n = 1024usize;
    let header = json!({"inputs": [{"name": "x", "datatype": "FP32", "shape": [n, n],
                                    "parameters": {"binary_data_size": n * n * 4}}]});
    let json = serde_json::to_vec(&header).unwrap();
    let mut body = json.clone();
    body.extend(f32_bytes(&vec![0.001; n * n]));
    send(
        client_with_key(key)
            .post(server.url("/v2/models/slow/infer"))
            .header("Inference-Header-Content-Length", json.len().to_string())
            .header("Content-Type", "application/octet-stream")
            .body(body),
    )
    .await
}

#[tokio::test]
async fn a_killed_worker_fails_only_its_own_calls_and_is_restarted() {
    let repo = Repo::new();
    let server = Server::start(repo.path());
    // Distinct memory quotas tell the two tenants' workers apart on their command lines.
    let victim = create_tenant(
        &server,
        "victim",
        json!({ "quotas": { "model_memory_mb": 1501 } }),
    )
    .await;
    let bystander = create_tenant(
        &server,
        "bystander",
        json!({ "quotas": { "model_memory_mb": 1502 } }),
    )
    .await;
    push_slow_model(&server, &victim).await;
    for key in [&victim, &bystander] {
        let (status, body) = push_model(&server, key, "mlp", 1, MLP_CONFIG, &mlp_onnx()).await;
        assert_eq!(status, 201, "{body}");
    }
    let marker = (1501u64 << 20).to_string();
    let victims = workers_with(&server, &marker);
    assert_eq!(
        victims.len(),
        1,
        "one worker for the victim tenant: {victims:?}"
    );
    assert_eq!(workers_with(&server, &(1502u64 << 20).to_string()).len(), 1);

    // The bystander keeps calling its own model the whole time.
    let bystander_loop = {
        let url = server.url("/v2/models/mlp/infer");
        let client = client_with_key(&bystander);
        tokio::spawn(async move {
            let mut statuses = Vec::new();
            for _ in 0..60 {
                let response = client
                    .post(&url)
                    .json(&support::tenants::row())
                    .send()
                    .await
                    .unwrap();
                statuses.push(response.status().as_u16());
                tokio::time::sleep(Duration::from_millis(25)).await;
            }
            statuses
        })
    };
    let (slow_result, _) = tokio::join!(infer_slow(&server, &victim), async {
        // Kill it once it has been computing for a while: the call is in the worker by then.
        let start = cpu_ticks(victims[0]);
        for _ in 0..400 {
            if cpu_ticks(victims[0]) >= start + 30 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let status = Command::new("kill")
            .args(["-KILL", &victims[0].to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    });
    let (status, body) = slow_result;
    assert_eq!(status, 503, "{body}");
    let message = body["error"].as_str().unwrap();
    assert!(
        message.contains("SIGKILL") && message.contains("restarted"),
        "{message}"
    );

    // The next request waits for the new worker and succeeds.
    let (status, body) = infer(&server, &victim, "mlp").await;
    assert_eq!(status, 200, "{body}");
    let (status, body) =
        send(client_with_key(&victim).get(server.url("/v2/models/mlp/ready"))).await;
    assert_eq!(status, 200, "{body}");
    let restarted = workers_with(&server, &marker);
    assert_eq!(restarted.len(), 1);
    assert_ne!(restarted, victims, "a new worker process serves the tenant");

    let statuses = bystander_loop.await.unwrap();
    assert!(
        statuses.iter().all(|&s| s == 200),
        "bystander saw {statuses:?}"
    );
    let metrics = scrape(&server).await;
    assert!(
        metrics.contains("weft_model_worker_restarts_total{cause=\"killed\",tenant=\"victim\"} 1"),
        "{}",
        metrics
            .lines()
            .filter(|l| l.contains("worker"))
            .collect::<Vec<_>>()
            .join("\n")
    );
}

#[test]
fn the_worker_sandbox_denies_the_data_directory_the_network_and_exec() {
    let data = tempfile::tempdir().unwrap();
    let secret = data.path().join("state.json");
    std::fs::write(&secret, b"{\"secret\": true}").unwrap();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let address = listener.local_addr().unwrap();
    let output = Command::new(env!("CARGO_BIN_EXE_weft-under-test"))
        .arg("worker")
        .arg("--ort-library")
        .arg(ort_library())
        .arg("--memory-limit-bytes")
        .arg((512u64 << 20).to_string())
        .arg("--probe-open")
        .arg(&secret)
        .arg("--probe-open")
        .arg("/etc/hostname")
        .arg("--probe-connect")
        .arg(address.to_string())
        .env_clear()
        .current_dir("/")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "probe failed: {stdout} {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let report: Value = serde_json::from_str(stdout.trim()).unwrap();
    let sandbox = report["sandbox"].as_str().unwrap();
    assert!(
        sandbox.contains("landlock") && sandbox.contains("seccomp"),
        "{sandbox}"
    );
    let attempts = report["attempts"].as_array().unwrap();
    assert_eq!(attempts.len(), 7, "{report}");
    for attempt in attempts {
        assert_eq!(
            attempt["allowed"],
            json!(false),
            "the sandbox let through: {attempt}"
        );
    }
    // The same open works outside the sandbox: the probe measured the sandbox, not the file.
    assert!(std::fs::File::open(&secret).is_ok());
}

#[tokio::test]
async fn repository_models_get_the_external_data_check_unless_they_opt_out() {
    let scratch = tempfile::tempdir().unwrap();
    let dir = hostile_models(scratch.path(), Path::new("/etc/hostname"));
    // The model's weight tensor lives in `state.json` next to it: 16 bytes, four FP32.
    let weights = f32_bytes(&[1.0, 2.0, 3.0, 4.0]);
    let onnx = read(&dir, "external_relative.onnx");
    let repo = Repo::new()
        .with_file("models/untrusted/model.toml", b"platform = \"onnx\"\n")
        .with_file("models/untrusted/1/model.onnx", &onnx)
        .with_file("models/untrusted/1/state.json", &weights)
        .with_file(
            "models/trusted/model.toml",
            b"platform = \"onnx\"\nallow_external_data = true\n",
        )
        .with_file("models/trusted/1/model.onnx", &onnx)
        .with_file("models/trusted/1/state.json", &weights);
    let server = Server::start(repo.path());

    let (status, body) = get_json(&server.url("/v2/models/untrusted/ready")).await;
    assert_eq!(status, 503, "{body}");
    assert!(
        body["error"].as_str().unwrap().contains("external data"),
        "{body}"
    );

    let (status, body) = post_json(
        &server.url("/v2/models/trusted/infer"),
        &json!({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 4],
                             "data": [0.5, 0.5, 0.5, 0.5]}]}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["outputs"][0]["data"], json!([1.5, 2.5, 3.5, 4.5]));
}

#[tokio::test]
async fn a_worker_model_batches_and_answers_exactly_like_the_in_process_one() {
    let repo = Repo::standard();
    let server = Server::start(repo.path());
    let key = create_tenant(&server, "batcher", json!({})).await;
    let config = "platform = \"onnx\"\nmax_batch_size = 64\n[dynamic_batching]\n\
                  max_queue_delay_microseconds = 2000\n";
    let (status, body) = push_model(&server, &key, "mine", 1, config, &mlp_onnx()).await;
    assert_eq!(status, 201, "{body}");
    let request = |i: usize| {
        let x: Vec<f32> = (0..64).map(|j| ((i * 64 + j) % 17) as f32 / 7.0).collect();
        json!({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 64], "data": x}]})
    };
    let calls = (0..32).map(|i| {
        let (worker, local) = (
            client_with_key(&key)
                .post(server.url("/v2/models/mine/infer"))
                .json(&request(i)),
            client()
                .post(server.url("/v2/models/mlp/infer"))
                .json(&request(i)),
        );
        async move { (send(worker).await, send(local).await) }
    });
    for ((status, worker), (local_status, local)) in futures_util::future::join_all(calls).await {
        assert_eq!((status, local_status), (200, 200), "{worker} {local}");
        assert_eq!(worker["outputs"][0]["data"], local["outputs"][0]["data"]);
    }
    let metrics = scrape(&server).await;
    let batches = metrics
        .lines()
        .find(|line| line.starts_with("weft_batch_size_rows_count{model=\"batcher/mine\"}"))
        .and_then(|line| line.rsplit(' ').next())
        .and_then(|count| count.parse::<f64>().ok())
        .unwrap_or_default();
    assert!(
        batches > 0.0 && batches < 32.0,
        "32 concurrent calls should merge into fewer batches: {batches}"
    );
}

#[tokio::test]
async fn a_call_past_the_call_timeout_restarts_the_worker_as_a_hang() {
    let repo = Repo::new();
    let server = Server::start_with(repo.path(), &["--model-call-timeout-seconds", "1"]);
    let key = create_tenant(&server, "sloth", json!({})).await;
    push_slow_model(&server, &key).await;
    let (status, body) = push_model(&server, &key, "mlp", 1, MLP_CONFIG, &mlp_onnx()).await;
    assert_eq!(status, 201, "{body}");
    let (status, body) = infer_slow(&server, &key).await;
    assert_eq!(status, 503, "{body}");
    assert!(
        body["error"]
            .as_str()
            .unwrap()
            .contains("call timeout of 1 s"),
        "{body}"
    );
    let (status, body) = infer(&server, &key, "mlp").await;
    assert_eq!(status, 200, "{body}");
    let metrics = scrape(&server).await;
    assert!(
        metrics.contains("weft_model_worker_restarts_total{cause=\"hang\",tenant=\"sloth\"} 1"),
        "{}",
        metrics
            .lines()
            .filter(|l| l.contains("worker"))
            .collect::<Vec<_>>()
            .join("\n")
    );
}
