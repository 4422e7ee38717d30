//! Process lifecycle: SIGTERM lets a request that is already in flight complete, then the
//! process exits 0.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::type_complexity)]

mod support;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use serde_json::json;
use support::tenants::send;
use support::*;

#[test]
fn request_in_flight_at_sigterm_completes_and_the_process_exits_zero() {
    let server = Server::start(Repo::standard().path());
    let body = serde_json::to_vec(&json!({"id": "in-flight", "inputs": [
        {"name": "x", "shape": [1, 64], "datatype": "FP32", "data": vec![0.25f32; 64]}]}))
    .unwrap();
    let mut stream = TcpStream::connect(&server.address).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let head = format!(
        "POST /v2/models/mlp/infer HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\n\
         Authorization: Bearer {TEST_KEY}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        server.address,
        body.len()
    );
    // Send the headers and half the body: the request is now in flight.
    stream.write_all(head.as_bytes()).unwrap();
    stream.write_all(&body[..body.len() / 2]).unwrap();
    stream.flush().unwrap();
    std::thread::sleep(Duration::from_millis(300));

    let pid = server.child.id().to_string();
    assert!(
        std::process::Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success()
    );
    std::thread::sleep(Duration::from_millis(300));

    // New connections are refused once shutdown has begun...
    let late = TcpStream::connect_timeout(&server.address.parse().unwrap(), Duration::from_secs(2))
        .and_then(|mut s| {
            s.set_read_timeout(Some(Duration::from_secs(2)))?;
            s.write_all(b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n\r\n")?;
            let mut buffer = [0u8; 16];
            let n = s.read(&mut buffer)?;
            Ok(n)
        });
    assert!(
        !matches!(late, Ok(n) if n > 0),
        "a new request was served after SIGTERM"
    );

    // ...but the one in flight finishes.
    stream.write_all(&body[body.len() / 2..]).unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    assert!(response.contains("\"id\":\"in-flight\""), "{response}");

    let status = server.terminate_wait();
    assert_eq!(
        status.code(),
        Some(0),
        "weft must exit 0 after a graceful shutdown"
    );
}

/// A replica at its capacity (`--max-inflight-requests`) sheds load: new inference requests
/// get 503 with `Retry-After` (gRPC: not ready), readiness turns 503, and
/// `weft_replica_load_ratio` on the separate metrics listener reads 1; when the request in
/// flight ends, all three recover. `/metrics` is then not on the main listener.
#[tokio::test(flavor = "multi_thread")]
async fn a_replica_at_capacity_sheds_and_readiness_and_the_load_gauge_say_so() {
    let server = Server::start_with(
        Repo::standard().path(),
        &[
            "--max-inflight-requests",
            "1",
            "--metrics-listen",
            "127.0.0.1:0",
        ],
    );
    let metrics_url = format!(
        "http://{}/metrics",
        server
            .metrics_address
            .clone()
            .expect("the metrics listener is on")
    );
    let gauge = || async {
        let text = reqwest::get(&metrics_url)
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        text.lines()
            .find_map(|line| line.strip_prefix("weft_replica_load_ratio "))
            .map(|value| value.parse::<f64>().unwrap())
            .expect("weft_replica_load_ratio is exported")
    };
    let ready = || async {
        reqwest::get(server.url("/v2/health/ready"))
            .await
            .unwrap()
            .status()
            .as_u16()
    };
    assert_eq!(ready().await, 200);
    assert_eq!(gauge().await, 0.0);
    let on_main = reqwest::get(server.url("/metrics")).await.unwrap().status();
    assert_eq!(on_main, 404, "/metrics moved to --metrics-listen");

    // A request whose body is still arriving holds the replica's one slot.
    let mut stalled = TcpStream::connect(&server.address).unwrap();
    let head = format!(
        "POST /v2/models/mlp/infer HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\n\
         Authorization: Bearer {TEST_KEY}\r\nContent-Length: 1000\r\n\r\n{{\"inputs\": [",
        server.address
    );
    stalled.write_all(head.as_bytes()).unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while gauge().await < 1.0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the stalled request never counted"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(ready().await, 503);
    // The probes' port says the same.
    let probe = metrics_url.replace("/metrics", "/v2/health/ready");
    assert_eq!(reqwest::get(&probe).await.unwrap().status(), 503);
    let response = client()
        .post(server.url("/v2/models/mlp/infer"))
        .json(
            &json!({"inputs": [{"name": "x", "shape": [1, 64], "datatype": "FP32",
                                   "data": vec![0.0f32; 64]}]}),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 503);
    assert_eq!(
        response
            .headers()
            .get("retry-after")
            .unwrap()
            .to_str()
            .unwrap(),
        "1"
    );
    let body: serde_json::Value = response.json().await.unwrap();
    assert!(
        body["error"]
            .as_str()
            .unwrap()
            .contains("--max-inflight-requests"),
        "{body}"
    );

    drop(stalled);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while ready().await != 200 {
        assert!(
            std::time::Instant::now() < deadline,
            "readiness did not recover"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(gauge().await, 0.0);
    let (status, _) = send(client().post(server.url("/v2/models/mlp/infer")).json(
        &json!({"inputs": [{"name": "x", "shape": [1, 64], "datatype": "FP32",
                             "data": vec![0.0f32; 64]}]}),
    ))
    .await;
    assert_eq!(status, 200);
}
