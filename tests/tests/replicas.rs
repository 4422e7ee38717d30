//! Three `weft serve` replicas sharing one PostgreSQL and one S3 API (SeaweedFS), all real and
//! started by the test: a tenant created on one replica, a signed plugin and a graph pushed on a
//! second, are served by the third within a second; a delete on one is 404 on all within a
//! second; a replica SIGKILLed in the middle of an upload leaves nothing half-written anywhere
//! and serves again after a restart; PostgreSQL restarted under load: the replicas keep serving
//! what they have and pick up changes made after it is back; each replica enforces its share of
//! a tenant's quotas, and takes all of it again when the other leaves; `weft migrate` moves an
//! embedded store into the shared one and back, served the same before and after; a
//! key-registration challenge issued by one replica is spent through another, once; a deleted
//! version's blobs leave the bucket after the grace while live ones stay; a batch job whose
//! replica is SIGKILLed is finished by another, every output line exactly once.
//!
//! Convergence times are printed (run with `--nocapture`).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::time::{Duration, Instant};

use serde_json::json;
use support::tenants::*;
use support::*;
use weft_testkit::{Postgres, SeaweedS3};

struct Cluster {
    postgres: Postgres,
    s3: SeaweedS3,
    database_url: String,
    repo: Repo,
}

impl Cluster {
    fn start() -> Cluster {
        let postgres = Postgres::start();
        let database_url = postgres.create_database();
        Cluster {
            postgres,
            s3: SeaweedS3::start(),
            database_url,
            repo: Repo::new().with_model(&quickstart(), "mlp"),
        }
    }

    fn replica_in(&self, data: tempfile::TempDir) -> Server {
        self.replica_with(data, &[])
    }

    fn replica_with(&self, data: tempfile::TempDir, more: &[&str]) -> Server {
        let blob_url = self.s3.blob_url("replicas");
        let mut extra = vec![
            "--database-url",
            self.database_url.as_str(),
            "--blob-url",
            blob_url.as_str(),
        ];
        extra.extend_from_slice(more);
        match Server::try_start_with_env(self.repo.path(), &extra, &self.s3.env(), data) {
            Ok(server) => server,
            Err(log) => panic!("a replica did not start:\n{log}"),
        }
    }

    fn replica(&self) -> Server {
        self.replica_in(tempfile::tempdir().unwrap())
    }
}

/// Polls `check` until it holds; returns how long that took (panics after 10 s).
async fn until<F, Fut>(what: &str, mut check: F) -> Duration
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let started = Instant::now();
    loop {
        if check().await {
            return started.elapsed();
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "{what}: not within 10 s"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

async fn status_of(request: reqwest::RequestBuilder) -> u16 {
    send(request).await.0
}

/// Waits until `server` knows the tenant of `key`; returns how long that took.
async fn tenant_known(server: &Server, key: &str) -> Duration {
    until("the tenant on another replica", || async {
        status_of(client_with_key(key).get(server.url("/api/v1/tenant"))).await == 200
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_replicas_share_tenants_plugins_and_graphs_within_a_second() {
    let cluster = Cluster::start();
    let replicas = [cluster.replica(), cluster.replica(), cluster.replica()];
    let [one, two, three] = &replicas;

    // A tenant created on one is known to the others.
    let key = create_tenant(one, "acme", json!({ "shared_models": ["mlp"] })).await;
    let known = tenant_known(two, &key).await;
    eprintln!("tenant created on one, usable on two after {known:?}");
    assert!(known < Duration::from_secs(1), "{known:?}");

    // A signed plugin set, a model and a graph pushed on two; the graph served on three.
    let signer = signing_key(two, &key).await;
    push_classify_plugins(two, &key, &signer, "1").await;
    let (status, body) = push_model(two, &key, "m", 1, MLP_CONFIG, &mlp_onnx()).await;
    assert_eq!(status, 201, "{body}");
    let (status, body) =
        apply_graph(two, &key, "classify", &classify_graph("classify", 1, "m")).await;
    assert_eq!(status, 201, "{body}");
    let pushed = Instant::now();
    let served = until("the graph on replica three", || async {
        infer(three, &key, "classify").await.0 == 200
    })
    .await;
    eprintln!("graph applied on two, served on three after {served:?}");
    assert!(pushed.elapsed() < Duration::from_secs(1), "{served:?}");
    let (_, answer) = infer(three, &key, "classify").await;
    let (_, reference) = infer(two, &key, "classify").await;
    assert_eq!(answer["outputs"], reference["outputs"]);
    let on_one = until("the model on replica one", || async {
        infer(one, &key, "m").await.0 == 200
    })
    .await;
    eprintln!("model pushed on two, served on one after {on_one:?} more");

    // Deleted on one: 404 everywhere within a second.
    let (status, body) =
        send(client_with_key(&key).delete(one.url("/api/v1/graphs/classify"))).await;
    assert_eq!(status, 200, "{body}");
    let gone = until("the graph gone everywhere", || async {
        let mut all = true;
        for replica in &replicas {
            all &= infer(replica, &key, "classify").await.0 == 404;
        }
        all
    })
    .await;
    eprintln!("graph deleted on one, 404 on all after {gone:?}");
    assert!(gone < Duration::from_secs(1), "{gone:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_replica_killed_mid_upload_leaves_nothing_half_written_and_restarts() {
    let cluster = Cluster::start();
    let one = cluster.replica();
    let two = cluster.replica();
    let key = create_tenant(&one, "acme", json!({ "shared_models": ["mlp"] })).await;
    tenant_known(&two, &key).await;

    // Half a model upload on two, then SIGKILL.
    let onnx = mlp_onnx();
    let mut body = MLP_CONFIG.as_bytes().to_vec();
    body.extend_from_slice(&onnx);
    let half = body[..body.len() / 2].to_vec();
    let address = two.address.clone();
    let length = body.len();
    let upload = tokio::spawn({
        let key = key.clone();
        async move {
            use tokio::io::AsyncWriteExt;
            let mut stream = tokio::net::TcpStream::connect(&address).await.unwrap();
            let head = format!(
                "PUT /api/v1/models/m/versions/1 HTTP/1.1\r\nHost: {address}\r\nAuthorization: \
                 Bearer {key}\r\nWeft-Config-Length: {}\r\nContent-Length: {length}\r\n\r\n",
                MLP_CONFIG.len()
            );
            stream.write_all(head.as_bytes()).await.unwrap();
            stream.write_all(&half).await.unwrap();
            tokio::time::sleep(Duration::from_secs(30)).await;
        }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let data = two.crash();
    upload.abort();

    // Nothing of it anywhere: not on one, not on two after its restart.
    let two = cluster.replica_in(data);
    for replica in [&one, &two] {
        let (status, listing) =
            send(client_with_key(&key).get(replica.url("/api/v1/models"))).await;
        assert_eq!(status, 200, "{listing}");
        assert!(
            !listing.to_string().contains("\"m\""),
            "a half upload is visible: {listing}"
        );
        assert_eq!(infer(replica, &key, "m").await.0, 404);
    }
    // The same upload, whole, through the restarted replica: served by both.
    let (status, body) = push_model(&two, &key, "m", 1, MLP_CONFIG, &onnx).await;
    assert_eq!(status, 201, "{body}");
    until("the model on one", || async {
        infer(&one, &key, "m").await.0 == 200
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_database_restart_under_load_keeps_replicas_serving_and_they_catch_up() {
    let cluster = Cluster::start();
    let one = cluster.replica();
    let two = cluster.replica();
    // A rate quota far above what two loops can send, so the load measures availability only.
    let key = create_tenant(
        &one,
        "acme",
        json!({
            "shared_models": ["mlp"],
            "quotas": { "requests_per_second": 1_000_000.0, "burst": 1_000_000 }
        }),
    )
    .await;
    let (status, body) = apply_graph(&one, &key, "g", &mlp_model_graph("g", 1)).await;
    assert_eq!(status, 201, "{body}");
    until("the graph on two", || async {
        infer(&two, &key, "g").await.0 == 200
    })
    .await;

    // Load on both replicas while PostgreSQL is down for two seconds: every request succeeds.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut load = Vec::new();
    for server in [&one, &two] {
        let url = server.url("/v2/models/g/infer");
        let client = client_with_key(&key);
        let stop = std::sync::Arc::clone(&stop);
        load.push(tokio::spawn(async move {
            let mut served = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let (status, body) = send(client.post(&url).json(&row())).await;
                assert_eq!(
                    status, 200,
                    "a request failed while the database was down: {body}"
                );
                served += 1;
            }
            served
        }));
    }
    cluster.postgres.stop();
    tokio::time::sleep(Duration::from_secs(2)).await;
    // A change while it is down fails clearly (and changes nothing).
    let (status, body) = apply_graph(&one, &key, "h", &mlp_model_graph("h", 1)).await;
    assert_eq!(status, 503, "{body}");
    // What failed, never the database's address (that is in the operator's log).
    let error = body["error"].as_str().unwrap();
    assert!(error.contains("database is unavailable"), "{body}");
    assert!(!error.contains("127.0.0.1"), "{body}");
    cluster.postgres.restart();
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut served = 0;
    for task in load {
        served += task.await.unwrap();
    }
    eprintln!("{served} requests served during the database restart");
    assert!(served > 0);

    // After it is back: a change on one reaches two (the listener reconnected, or the
    // reconcile timer caught it).
    let applied = until("a change after the restart", || async {
        apply_graph(&one, &key, "h", &mlp_model_graph("h", 1))
            .await
            .0
            == 201
    })
    .await;
    let caught_up = until("the new graph on two", || async {
        infer(&two, &key, "h").await.0 == 200
    })
    .await;
    eprintln!(
        "after the database restart: change accepted in {applied:?}, on two {caught_up:?} later"
    );
}

/// Sends `count` authenticated requests at once to `server`; returns the 429 answers' errors.
async fn refusals(server: &Server, key: &str, count: usize) -> Vec<String> {
    let mut refused = Vec::new();
    for _ in 0..count {
        let (status, body) = send(client_with_key(key).get(server.url("/api/v1/tenant"))).await;
        if status == 429 {
            refused.push(body["error"].as_str().unwrap_or_default().to_string());
        } else {
            assert_eq!(status, 200, "{body}");
        }
    }
    refused
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn each_replica_enforces_its_share_of_a_tenants_quotas() {
    let cluster = Cluster::start();
    let one = cluster.replica();
    let two = cluster.replica();
    // A burst of 10 and almost no refill: two replicas get 5 each.
    let key = create_tenant(
        &one,
        "acme",
        json!({ "quotas": { "requests_per_second": 0.01, "burst": 10 } }),
    )
    .await;
    // Both replicas have announced themselves to each other within a reconcile round.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let refused = refusals(&one, &key, 10).await;
    // The tenant was created on one (which charged nothing for the admin call); 5 pass.
    assert_eq!(refused.len(), 5, "{refused:?}");
    assert!(refused[0].contains("2 replicas share it"), "{refused:?}");

    // Two leaves (a clean shutdown signs it off): one takes the whole quota again, which
    // shows as the message no longer naming a share once its bucket refills to the full burst.
    two.terminate();
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let refused = refusals(&one, &key, 3).await;
    assert!(!refused.is_empty(), "the bucket is still spent");
    assert!(
        !refused[0].contains("replicas share it"),
        "one replica left: {refused:?}"
    );
}

/// Runs `weft migrate` with `args` (and the S3 settings), asserting success; returns stdout.
fn weft_migrate(cluster: &Cluster, args: &[&str]) -> String {
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_weft-under-test"))
        .arg("migrate")
        .args(args)
        .envs(cluster.s3.env())
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "weft migrate failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn weft_migrate_moves_an_embedded_store_to_the_shared_one_and_back() {
    let cluster = Cluster::start();
    let embedded = Server::start(cluster.repo.path());
    let key = create_tenant(&embedded, "acme", json!({ "shared_models": ["mlp"] })).await;
    let signer = signing_key(&embedded, &key).await;
    push_classify_plugins(&embedded, &key, &signer, "1").await;
    let (status, body) = push_model(&embedded, &key, "m", 1, MLP_CONFIG, &mlp_onnx()).await;
    assert_eq!(status, 201, "{body}");
    let (status, body) = apply_graph(
        &embedded,
        &key,
        "classify",
        &classify_graph("classify", 1, "m"),
    )
    .await;
    assert_eq!(status, 201, "{body}");
    let (_, before) = infer(&embedded, &key, "classify").await;
    let data = embedded.crash();
    let embedded_dir = data.path().join("data");

    let blob_url = cluster.s3.blob_url("replicas");
    let printed = weft_migrate(
        &cluster,
        &[
            "--from-data-dir",
            embedded_dir.to_str().unwrap(),
            "--to-database-url",
            &cluster.database_url,
            "--to-blob-url",
            &blob_url,
        ],
    );
    // acme and the bootstrap tenant the test servers open.
    assert!(printed.contains("migrated 2 tenant(s)"), "{printed}");
    assert!(printed.contains("verified"), "{printed}");

    // A replica on the shared store serves the same tenant, key, plugins, model and graph.
    let replica = cluster.replica();
    let (status, after) = infer(&replica, &key, "classify").await;
    assert_eq!(status, 200, "{after}");
    assert_eq!(after["outputs"], before["outputs"]);

    // And back into a new embedded data directory, which a plain server then serves.
    let back = tempfile::tempdir().unwrap();
    let back_dir = back.path().join("data");
    weft_migrate(
        &cluster,
        &[
            "--from-database-url",
            &cluster.database_url,
            "--from-blob-url",
            &blob_url,
            "--to-data-dir",
            back_dir.to_str().unwrap(),
        ],
    );
    let restored = Server::try_start_in(cluster.repo.path(), &[], back).unwrap();
    let (status, again) = infer(&restored, &key, "classify").await;
    assert_eq!(status, 200, "{again}");
    assert_eq!(again["outputs"], before["outputs"]);

    // Into a store that already holds tenants: refused.
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_weft-under-test"))
        .arg("migrate")
        .args(["--from-data-dir", embedded_dir.to_str().unwrap()])
        .args([
            "--to-database-url",
            &cluster.database_url,
            "--to-blob-url",
            &blob_url,
        ])
        .envs(cluster.s3.env())
        .output()
        .unwrap();
    assert!(!output.status.success());
    assert!(
        String::from_utf8_lossy(&output.stderr).contains("already holds"),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_challenge_from_one_replica_registers_a_key_through_another_once() {
    let cluster = Cluster::start();
    let one = cluster.replica();
    let two = cluster.replica();
    let key = create_tenant(&one, "acme", json!({})).await;
    tenant_known(&two, &key).await;
    let secret = weft_store::signing::SecretKey::generate().unwrap();
    let issued = challenge(&one, &key).await;
    let nonce = issued["challenge"].as_str().unwrap();
    let tenant = issued["tenant"].as_str().unwrap();
    let registration = json!({
        "public_key": secret.public().to_base64(),
        "challenge": nonce,
        "signature": secret.sign_key_registration(tenant, nonce),
    });
    let (status, body) = send(
        client_with_key(&key)
            .post(two.url("/api/v1/signing-keys"))
            .json(&registration),
    )
    .await;
    assert_eq!(
        status, 201,
        "a challenge issued by one is good on two: {body}"
    );
    // Spent: not again, on either replica.
    for replica in [&one, &two] {
        let (status, body) = send(
            client_with_key(&key)
                .post(replica.url("/api/v1/signing-keys"))
                .json(&registration),
        )
        .await;
        assert_eq!(status, 400, "{body}");
        assert!(
            body["error"].as_str().unwrap().contains("already used"),
            "{body}"
        );
    }
}

/// The replicas' bucket, as the servers see it.
fn bucket(cluster: &Cluster) -> weft_store::s3::S3Blobs {
    let settings = weft_store::s3::S3Settings {
        endpoint: Some(cluster.s3.endpoint()),
        region: Some("us-east-1".to_string()),
        access_key_id: Some(cluster.s3.access_key().to_string()),
        secret_access_key: Some(cluster.s3.secret_key().to_string()),
        session_token: None,
    };
    weft_store::s3::S3Blobs::connect(&cluster.s3.blob_url("replicas"), &settings).unwrap()
}

async fn in_bucket(bucket: &std::sync::Arc<weft_store::s3::S3Blobs>, digest: &str) -> bool {
    let bucket = std::sync::Arc::clone(bucket);
    let digest = digest.to_string();
    tokio::task::spawn_blocking(move || bucket.contains(&digest).unwrap())
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_deleted_versions_blobs_leave_the_bucket_after_the_grace_and_live_ones_stay() {
    let cluster = Cluster::start();
    let one = cluster.replica_with(
        tempfile::tempdir().unwrap(),
        &["--blob-gc-grace-seconds", "1"],
    );
    let bucket = std::sync::Arc::new(bucket(&cluster));
    let key = create_tenant(&one, "acme", json!({})).await;
    let onnx = mlp_onnx();
    let first_config = format!("{MLP_CONFIG}# version 1\n");
    let second_config = format!("{MLP_CONFIG}# version 2\n");
    for (version, config) in [(1, &first_config), (2, &second_config)] {
        let (status, body) = push_model(&one, &key, "m", version, config, &onnx).await;
        assert_eq!(status, 201, "{body}");
    }
    let onnx_digest = weft_store::signing::sha256_hex(&onnx);
    let first_digest = weft_store::signing::sha256_hex(first_config.as_bytes());
    let second_digest = weft_store::signing::sha256_hex(second_config.as_bytes());
    for digest in [&onnx_digest, &first_digest, &second_digest] {
        assert!(
            in_bucket(&bucket, digest).await,
            "{digest} was never uploaded"
        );
    }

    // Version 1 deleted: its model.toml is referenced by nothing; the ONNX bytes still are.
    let (status, body) =
        send(client_with_key(&key).delete(one.url("/api/v1/models/m/versions/1"))).await;
    assert_eq!(status, 200, "{body}");
    let started = Instant::now();
    loop {
        if !in_bucket(&bucket, &first_digest).await {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(15),
            "the deleted version's blob is still in the bucket after 15 s"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    eprintln!(
        "a deleted version's blob left the bucket after {:?}",
        started.elapsed()
    );
    assert!(
        in_bucket(&bucket, &onnx_digest).await,
        "a live version's ONNX blob was deleted"
    );
    assert!(
        in_bucket(&bucket, &second_digest).await,
        "a live version's config was deleted"
    );
    assert_eq!(infer(&one, &key, "m").await.0, 200);

    // The same bytes pushed again are stored again, and served by a replica that never had them.
    let (status, body) = push_model(&one, &key, "m", 3, &first_config, &onnx).await;
    assert_eq!(status, 201, "{body}");
    assert!(in_bucket(&bucket, &first_digest).await);
    let two = cluster.replica();
    let (status, body) = send(
        client_with_key(&key)
            .post(two.url("/v2/models/m/versions/3/infer"))
            .json(&row()),
    )
    .await;
    assert_eq!(status, 200, "{body}");
}

/// A job input of `rows` lines for `mlp`, each 64 values.
fn job_input(rows: usize) -> String {
    (0..rows)
        .map(|i| {
            let x: Vec<f32> = (0..64).map(|j| ((i + j) % 13) as f32 / 13.0).collect();
            let row =
                json!({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 64], "data": x}]});
            format!("{row}\n")
        })
        .collect()
}

/// The job as `server` shows it.
async fn job_on(server: &Server, key: &str, id: &str) -> serde_json::Value {
    let (status, job) =
        send(client_with_key(key).get(server.url(&format!("/api/v1/jobs/{id}")))).await;
    assert_eq!(status, 200, "{job}");
    job
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_job_orphaned_by_a_killed_replica_is_finished_by_another_every_line_once() {
    let cluster = Cluster::start();
    let one = cluster.replica();
    let two = cluster.replica();
    let key = create_tenant(&one, "acme", json!({ "shared_models": ["mlp"] })).await;
    tenant_known(&two, &key).await;
    let rows = 30_000u64;
    let (status, job) = send(
        client_with_key(&key)
            .post(one.url("/api/v1/jobs?target=mlp&chunk_rows=500"))
            .body(job_input(rows as usize)),
    )
    .await;
    assert_eq!(status, 201, "{job}");
    let id = job["id"].as_str().unwrap().to_string();

    until("the job on the other replica", || async {
        status_of(client_with_key(&key).get(two.url(&format!("/api/v1/jobs/{id}")))).await == 200
    })
    .await;
    // The runner is the replica that shows progress (the other reads the record only).
    let started = Instant::now();
    let one_runs = loop {
        let (a, b) = (job_on(&one, &key, &id).await, job_on(&two, &key, &id).await);
        let done = |job: &serde_json::Value| job["rows"]["done"].as_u64().unwrap();
        assert!(
            done(&a) < rows && done(&b) < rows,
            "the job ended before the kill; make it longer"
        );
        if done(&a) >= 1000 {
            break true;
        }
        if done(&b) >= 1000 {
            break false;
        }
        assert!(started.elapsed() < Duration::from_secs(120), "{a}\n{b}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let (runner, survivor) = if one_runs { (one, two) } else { (two, one) };
    let _ = runner.crash();
    let killed = Instant::now();

    // Once the dead replica stops announcing itself, the survivor takes the job over.
    let job = loop {
        let job = job_on(&survivor, &key, &id).await;
        if !matches!(job["state"].as_str(), Some("queued" | "running")) {
            break job;
        }
        assert!(
            killed.elapsed() < Duration::from_secs(180),
            "not finished after the kill: {job}\n{}",
            survivor.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    println!(
        "kill to finished on the other replica: {:?}",
        killed.elapsed()
    );
    assert_eq!(job["state"], "succeeded", "{job}");
    assert_eq!(job["rows"]["done"], rows, "{job}");
    let response = client_with_key(&key)
        .get(survivor.url(&format!("/api/v1/jobs/{id}/output")))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let numbers: Vec<u64> = response
        .text()
        .await
        .unwrap()
        .lines()
        .map(|line| {
            serde_json::from_str::<serde_json::Value>(line).unwrap()["line"]
                .as_u64()
                .unwrap()
        })
        .collect();
    assert_eq!(
        numbers,
        (1..=rows).collect::<Vec<_>>(),
        "every line exactly once, in order"
    );
}
