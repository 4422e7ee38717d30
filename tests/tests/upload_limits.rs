//! What a hostile tenant's bodies cost the server, end to end: an upload past its limit is
//! refused while it streams (413, the limit named, nothing left on disk); parallel uploads that
//! each fit but together pass the storage quota are refused before their bodies are read (403,
//! the quota named), and the stored usage never passes it; one tenant's parallel inference
//! bodies are held to its in-flight byte budget (429, the budget named) while another tenant is
//! served as usual; a body that stops arriving is answered 408 and frees what it held.
//!
//! These speak raw HTTP/1.1 where a stock client would hide what is being proven: a chunked
//! body that never ends (the refusal must come without the rest), `Expect: 100-continue` (a
//! refusal before `100 Continue` was never read), a body held half-sent (it holds its bytes).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::time::Duration;

use serde_json::{Value, json};
use support::tenants::*;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A raw HTTP/1.1 exchange on one connection.
struct Raw {
    stream: TcpStream,
    buffer: Vec<u8>,
}

/// A response read off a [`Raw`] connection.
#[derive(Debug)]
struct Answer {
    status: u16,
    headers: Vec<(String, String)>,
    body: Value,
}

impl Answer {
    fn error(&self) -> &str {
        self.body["error"].as_str().unwrap_or_default()
    }

    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(key, _)| key.eq_ignore_ascii_case(name))
            .map(|(_, value)| value.as_str())
    }
}

impl Raw {
    /// Connects and sends the request line and headers (nothing of the body).
    async fn open(server: &Server, method: &str, path: &str, headers: &[(&str, String)]) -> Raw {
        let mut stream = TcpStream::connect(&server.address).await.unwrap();
        let mut head = format!("{method} {path} HTTP/1.1\r\nHost: {}\r\n", server.address);
        for (name, value) in headers {
            head.push_str(&format!("{name}: {value}\r\n"));
        }
        head.push_str("\r\n");
        stream.write_all(head.as_bytes()).await.unwrap();
        Raw {
            stream,
            buffer: Vec::new(),
        }
    }

    async fn send(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.stream.write_all(bytes).await
    }

    /// Sends one chunk of a chunked body.
    async fn chunk(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.send(format!("{:x}\r\n", bytes.len()).as_bytes())
            .await?;
        self.send(bytes).await?;
        self.send(b"\r\n").await
    }

    /// The next response (an interim `100 Continue` included), or `None` if none comes within
    /// `wait` or the connection ends first.
    async fn answer(&mut self, wait: Duration) -> Option<Answer> {
        tokio::time::timeout(wait, self.read_answer())
            .await
            .ok()
            .flatten()
    }

    async fn read_answer(&mut self) -> Option<Answer> {
        let end = loop {
            if let Some(end) = self.buffer.windows(4).position(|w| w == b"\r\n\r\n") {
                break end;
            }
            self.fill().await?;
        };
        let head = String::from_utf8_lossy(&self.buffer[..end]).to_string();
        self.buffer.drain(..end + 4);
        let mut lines = head.split("\r\n");
        let status: u16 = lines.next()?.split(' ').nth(1)?.parse().ok()?;
        let headers: Vec<(String, String)> = lines
            .filter_map(|line| line.split_once(':'))
            .map(|(name, value)| (name.trim().to_string(), value.trim().to_string()))
            .collect();
        let length: usize = headers
            .iter()
            .find(|(name, _)| name.eq_ignore_ascii_case("content-length"))
            .map_or(0, |(_, value)| value.parse().unwrap());
        while self.buffer.len() < length {
            self.fill().await?;
        }
        let body: Vec<u8> = self.buffer.drain(..length).collect();
        Some(Answer {
            status,
            headers,
            body: serde_json::from_slice(&body).unwrap_or(Value::Null),
        })
    }

    async fn fill(&mut self) -> Option<()> {
        let mut chunk = [0u8; 8192];
        match self.stream.read(&mut chunk).await {
            Ok(0) | Err(_) => None,
            Ok(n) => {
                self.buffer.extend_from_slice(&chunk[..n]);
                Some(())
            }
        }
    }
}

fn bearer(key: &str) -> (&'static str, String) {
    ("Authorization", format!("Bearer {key}"))
}

/// The files under `<data-dir>/store/tmp`, where uploads are received.
fn upload_files(server: &Server) -> Vec<String> {
    std::fs::read_dir(server.data_dir().join("store/tmp"))
        .map(|entries| {
            entries
                .flatten()
                .map(|entry| entry.file_name().to_string_lossy().to_string())
                .collect()
        })
        .unwrap_or_default()
}

/// Waits (briefly) for the upload directory to be empty, and says what is left if it is not.
async fn assert_no_upload_files(server: &Server) {
    for _ in 0..50 {
        if upload_files(server).is_empty() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!(
        "temporary upload files left behind: {:?}",
        upload_files(server)
    );
}

/// A graph `g` of one node calling the shared `mlp`; every version (1 to 899) has the same
/// length.
fn mlp_graph(version: u64) -> String {
    mlp_model_graph("g", 100 + version)
}

#[tokio::test]
async fn oversize_uploads_are_refused_while_streaming_and_leave_no_temporary_file() {
    let repo = Repo::new().with_model(&quickstart(), "mlp");
    let server = Server::start_with(repo.path(), &["--max-upload-bytes", "131072"]);
    let key = create_tenant(&server, "acme", json!({ "shared_models": ["mlp"] })).await;

    // A chunked plugin upload that never ends: 160 KiB sent, then the client waits. The answer
    // must come without the rest of the body.
    let mut upload = Raw::open(
        &server,
        "PUT",
        "/api/v1/plugins/p/versions/1",
        &[
            bearer(&key),
            ("Weft-Signature", "c2lnbmF0dXJl".into()),
            ("Weft-Signing-Key", "some-key".into()),
            ("Transfer-Encoding", "chunked".into()),
        ],
    )
    .await;
    for _ in 0..5 {
        // Writes may fail once the server has refused and closed: that is the point.
        let _ = upload.chunk(&[0u8; 32 * 1024]).await;
    }
    let answer = upload
        .answer(Duration::from_secs(10))
        .await
        .expect("no answer while the body was still open: the server waited for all of it");
    assert_eq!(answer.status, 413, "{answer:?}");
    assert!(answer.error().contains("131072"), "{answer:?}");
    assert!(answer.error().contains("--max-upload-bytes"), "{answer:?}");
    assert_no_upload_files(&server).await;

    // A declared length over the limit is refused before a byte of the body is sent.
    let mut upload = Raw::open(
        &server,
        "PUT",
        "/api/v1/models/m/versions/1",
        &[
            bearer(&key),
            ("Weft-Config-Length", "10".into()),
            ("Content-Length", (10u64 << 20).to_string()),
        ],
    )
    .await;
    let answer = upload.answer(Duration::from_secs(10)).await.unwrap();
    assert_eq!(answer.status, 413, "{answer:?}");
    assert!(answer.error().contains("131072"), "{answer:?}");

    // A model.toml header longer than any model.toml is refused before the body is read.
    let mut upload = Raw::open(
        &server,
        "PUT",
        "/api/v1/models/m/versions/1",
        &[
            bearer(&key),
            ("Weft-Config-Length", (64u64 << 20).to_string()),
            ("Transfer-Encoding", "chunked".into()),
        ],
    )
    .await;
    let answer = upload.answer(Duration::from_secs(10)).await.unwrap();
    assert_eq!(answer.status, 413, "{answer:?}");
    assert!(answer.error().contains("model.toml"), "{answer:?}");

    // A graph past the limit (here the upload limit, below the graph limit of 1 MiB).
    let mut upload = Raw::open(
        &server,
        "PUT",
        "/api/v1/graphs/g",
        &[bearer(&key), ("Transfer-Encoding", "chunked".into())],
    )
    .await;
    for _ in 0..5 {
        let _ = upload.chunk(&[b'#'; 32 * 1024]).await;
    }
    let answer = upload.answer(Duration::from_secs(10)).await.unwrap();
    assert_eq!(answer.status, 413, "{answer:?}");
    assert_no_upload_files(&server).await;

    // An upload that fits is stored as before, and its temporary file goes with it.
    let (status, body) = apply_graph(&server, &key, "g", &mlp_graph(1)).await;
    assert_eq!(status, 201, "{body}");
    assert_no_upload_files(&server).await;
    let (status, body) = push_model(&server, &key, "m", 1, MLP_CONFIG, &mlp_onnx()).await;
    assert_eq!(status, 201, "{body}");
    assert_eq!(infer(&server, &key, "m").await.0, 200);
    assert_eq!(infer(&server, &key, "g").await.0, 200);
    assert_no_upload_files(&server).await;

    // A client that goes away mid-upload leaves nothing either.
    let mut upload = Raw::open(
        &server,
        "PUT",
        "/api/v1/graphs/h",
        &[bearer(&key), ("Content-Length", "50000".into())],
    )
    .await;
    upload.send(&[b'#'; 20000]).await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    drop(upload);
    assert_no_upload_files(&server).await;

    // What a crash leaves in the upload directory is gone after the restart.
    let data = server.crash();
    std::fs::write(
        data.path()
            .join("data/store/tmp/.tmp-upload-1-0-left-by-a-crash"),
        b"half an upload",
    )
    .unwrap();
    let server =
        Server::try_start_in(repo.path(), &["--max-upload-bytes", "131072"], data).unwrap();
    assert_no_upload_files(&server).await;
    assert_eq!(infer(&server, &key, "m").await.0, 200);
}

#[tokio::test]
async fn parallel_uploads_cannot_overshoot_the_storage_quota() {
    let repo = Repo::new().with_model(&quickstart(), "mlp");
    let server = Server::start(repo.path());
    let size = mlp_graph(1).len() as u64;
    // Room for two versions and a half.
    let quota = size * 5 / 2;
    let key = create_tenant(
        &server,
        "acme",
        json!({ "shared_models": ["mlp"], "quotas": { "max_stored_bytes": quota } }),
    )
    .await;

    // Six applies at once, each asking before it sends its body (Expect: 100-continue).
    let mut uploads = Vec::new();
    for version in 1..=6u64 {
        let text = mlp_graph(version);
        let mut raw = Raw::open(
            &server,
            "PUT",
            "/api/v1/graphs/g",
            &[
                bearer(&key),
                ("Content-Length", text.len().to_string()),
                ("Expect", "100-continue".into()),
            ],
        )
        .await;
        uploads.push(tokio::spawn(async move {
            let first = raw.answer(Duration::from_secs(30)).await.unwrap();
            if first.status != 100 {
                // Refused before the server asked for the body.
                return (first, false);
            }
            raw.send(text.as_bytes()).await.unwrap();
            (raw.answer(Duration::from_secs(30)).await.unwrap(), true)
        }));
    }
    let mut stored = 0;
    for upload in uploads {
        let (answer, sent) = upload.await.unwrap();
        match answer.status {
            201 => {
                assert!(sent);
                stored += 1;
            }
            403 => {
                assert!(
                    !sent,
                    "refused only after its body was read: the quota was not reserved up front"
                );
                assert!(
                    answer
                        .error()
                        .contains(&format!("quota of {quota} stored bytes")),
                    "{answer:?}"
                );
            }
            other => panic!("unexpected {other}: {answer:?}"),
        }
    }
    assert_eq!(stored, 2, "exactly as many as fit are stored");
    let (_, tenant) = send(client_with_key(&key).get(server.url("/api/v1/tenant"))).await;
    let used = tenant["usage"]["stored_bytes"].as_u64().unwrap();
    assert_eq!(used, 2 * size, "{tenant}");
    assert!(used <= quota);

    // While one upload holds the rest of the quota, the next is refused at once, naming it;
    // once that upload is gone, the room is back.
    let (status, body) = send(client_with_key(&key).delete(server.url("/api/v1/graphs/g"))).await;
    assert_eq!(status, 200, "{body}");
    let text = mlp_graph(7);
    let mut holder = Raw::open(
        &server,
        "PUT",
        "/api/v1/graphs/g",
        &[bearer(&key), ("Content-Length", (2 * size).to_string())],
    )
    .await;
    holder.send(&text.as_bytes()[..10]).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (status, body) = apply_graph(&server, &key, "g", &mlp_graph(8)).await;
    assert_eq!(status, 403, "{body}");
    assert!(
        body["error"]
            .as_str()
            .unwrap()
            .contains("held by the tenant's uploads in progress"),
        "{body}"
    );
    drop(holder);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (status, body) = apply_graph(&server, &key, "g", &mlp_graph(8)).await;
    assert_eq!(status, 201, "{body}");
    assert_no_upload_files(&server).await;
}

#[tokio::test]
async fn one_tenants_parallel_bodies_are_held_to_its_inflight_budget() {
    let repo = Repo::new().with_model(&quickstart(), "mlp");
    let server = Server::start_with(
        repo.path(),
        &["--max-tenant-inflight-bytes", &(1u64 << 20).to_string()],
    );
    let greedy = create_tenant(&server, "greedy", json!({ "shared_models": ["mlp"] })).await;
    let calm = create_tenant(&server, "calm", json!({ "shared_models": ["mlp"] })).await;

    // Four bodies of 400 KB, each half-sent and held: two fit the 1 MiB budget, two do not.
    let mut held = Vec::new();
    for _ in 0..4 {
        let mut raw = Raw::open(
            &server,
            "POST",
            "/v2/models/mlp/infer",
            &[
                bearer(&greedy),
                ("Content-Type", "application/json".into()),
                ("Content-Length", "400000".into()),
            ],
        )
        .await;
        raw.send(&[b' '; 1000]).await.unwrap();
        held.push(raw);
    }
    let mut refused = 0;
    let mut waiting = Vec::new();
    for mut raw in held {
        match raw.answer(Duration::from_secs(2)).await {
            Some(answer) => {
                assert_eq!(answer.status, 429, "{answer:?}");
                assert!(
                    answer.error().contains("--max-tenant-inflight-bytes"),
                    "{answer:?}"
                );
                assert!(answer.error().contains("1048576"), "{answer:?}");
                assert_eq!(answer.header("retry-after"), Some("1"), "{answer:?}");
                refused += 1;
            }
            None => waiting.push(raw),
        }
    }
    assert_eq!(refused, 2, "two of four 400 KB bodies fit a 1 MiB budget");

    // Meanwhile another tenant is served as usual, and so is a small request of the same
    // tenant (the budget is bytes, not requests).
    assert_eq!(infer(&server, &calm, "mlp").await.0, 200);
    assert_eq!(infer(&server, &greedy, "mlp").await.0, 200);
    // A body larger than the whole budget could never fit: 413 at once.
    let mut huge = Raw::open(
        &server,
        "POST",
        "/v2/models/mlp/infer",
        &[
            bearer(&greedy),
            ("Content-Type", "application/json".into()),
            ("Content-Length", (2u64 << 20).to_string()),
        ],
    )
    .await;
    let answer = huge.answer(Duration::from_secs(10)).await.unwrap();
    assert_eq!(answer.status, 413, "{answer:?}");
    assert!(
        answer.error().contains("--max-tenant-inflight-bytes"),
        "{answer:?}"
    );

    // The held bodies going away gives their bytes back.
    drop(waiting);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut calls = Vec::new();
    for _ in 0..8 {
        let request = client_with_key(&greedy)
            .post(server.url("/v2/models/mlp/infer"))
            .json(&row());
        calls.push(tokio::spawn(async move {
            request.send().await.unwrap().status().as_u16()
        }));
    }
    for call in calls {
        assert_eq!(call.await.unwrap(), 200);
    }
    let live = reqwest::get(server.url("/v2/health/live")).await.unwrap();
    assert_eq!(live.status(), 200);
}

#[tokio::test]
async fn a_body_that_stops_arriving_is_answered_408_and_frees_what_it_held() {
    let repo = Repo::new().with_model(&quickstart(), "mlp");
    let server = Server::start_with(repo.path(), &["--body-idle-timeout-seconds", "1"]);
    let size = mlp_graph(1).len() as u64;
    let key = create_tenant(
        &server,
        "acme",
        json!({ "shared_models": ["mlp"], "quotas": { "max_stored_bytes": size * 3 / 2 } }),
    )
    .await;

    // An upload that sends ten bytes of its declared length and then nothing: it holds the
    // quota (another apply is refused) until the idle timeout answers it 408.
    let text = mlp_graph(1);
    let mut stalled = Raw::open(
        &server,
        "PUT",
        "/api/v1/graphs/g",
        &[bearer(&key), ("Content-Length", text.len().to_string())],
    )
    .await;
    stalled.send(&text.as_bytes()[..10]).await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let (status, body) = apply_graph(&server, &key, "g", &mlp_graph(2)).await;
    assert_eq!(status, 403, "the stalled upload holds the quota: {body}");
    let answer = stalled
        .answer(Duration::from_secs(10))
        .await
        .expect("a stalled upload is answered, not held open");
    assert_eq!(answer.status, 408, "{answer:?}");
    assert!(
        answer.error().contains("--body-idle-timeout-seconds"),
        "{answer:?}"
    );
    assert_no_upload_files(&server).await;
    let (status, body) = apply_graph(&server, &key, "g", &mlp_graph(2)).await;
    assert_eq!(status, 201, "the quota is free again: {body}");

    // An inference body that stops half-way gets 408 too, and the tenant is served after it.
    let mut stalled = Raw::open(
        &server,
        "POST",
        "/v2/models/mlp/infer",
        &[bearer(&key), ("Content-Length", "5000".into())],
    )
    .await;
    stalled.send(b"{\"inputs\": [").await.unwrap();
    let answer = stalled
        .answer(Duration::from_secs(10))
        .await
        .expect("a stalled inference body is answered");
    assert_eq!(answer.status, 408, "{answer:?}");
    assert_eq!(infer(&server, &key, "mlp").await.0, 200);

    // A slow but steady body (a chunk every half second, past the timeout in all) is not cut.
    let (status, body) = send(client_with_key(&key).delete(server.url("/api/v1/graphs/g"))).await;
    assert_eq!(status, 200, "{body}");
    let text = mlp_graph(3);
    let mut steady = Raw::open(
        &server,
        "PUT",
        "/api/v1/graphs/g",
        &[bearer(&key), ("Transfer-Encoding", "chunked".into())],
    )
    .await;
    for part in text.as_bytes().chunks(text.len() / 4 + 1) {
        steady.chunk(part).await.unwrap();
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    steady.send(b"0\r\n\r\n").await.unwrap();
    let answer = steady.answer(Duration::from_secs(10)).await.unwrap();
    assert_eq!(answer.status, 201, "{answer:?}");
}
