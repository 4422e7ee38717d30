//! Process lifecycle: SIGTERM lets a request that is already in flight complete, then the
//! process exits 0.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::type_complexity)]

mod support;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use serde_json::json;
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
