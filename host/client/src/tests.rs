//! Tests across modules: parsing through a parser shaped like the `weft` binary's (so the
//! flattening the binary does is checked here), and requests against a one-shot local HTTP
//! server (headers, Content-Length framing of streamed uploads, error text).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::path::PathBuf;

use bytes::Bytes;
use clap::{CommandFactory, Parser, Subcommand};
use reqwest::Method;

use crate::http::{Payload, Server};
use crate::*;

/// Shaped like host/server's `Cli`: a versioned top level, the client commands flattened in,
/// and a `graph` group with an offline `check` plus the client graph commands.
#[derive(Debug, Parser)]
#[command(name = "weft", version)]
struct TestCli {
    #[command(subcommand)]
    command: TestCommand,
}

#[derive(Debug, Subcommand)]
enum TestCommand {
    Serve,
    #[command(flatten)]
    Client(ClientCommand),
    #[command(subcommand)]
    Graph(TestGraphCommand),
}

#[derive(Debug, Subcommand)]
enum TestGraphCommand {
    Check {
        files: Vec<PathBuf>,
    },
    #[command(flatten)]
    Client(GraphClientCommand),
}

fn parse(args: &[&str]) -> Result<TestCommand, clap::Error> {
    TestCli::try_parse_from(std::iter::once("weft").chain(args.iter().copied())).map(|c| c.command)
}

#[test]
fn the_merged_command_line_is_consistent() {
    TestCli::command().debug_assert();
}

#[test]
fn parses_key_and_plugin_commands() {
    let TestCommand::Client(ClientCommand::Key(KeyCommand::Gen(args))) =
        parse(&["key", "gen", "--out", "keys/ci"]).unwrap()
    else {
        panic!("not key gen");
    };
    assert_eq!(args.out, PathBuf::from("keys/ci"));

    let command = parse(&[
        "plugin",
        "push",
        "--server",
        "http://h:1",
        "--api-key",
        "weft_x",
        "--name",
        "resize",
        "--version",
        "1.0.0",
        "--progress",
        "p.wasm",
    ])
    .unwrap();
    let TestCommand::Client(ClientCommand::Plugin(PluginCommand::Push(args))) = command else {
        panic!("not plugin push");
    };
    assert_eq!(args.connection.server, "http://h:1");
    assert_eq!(args.connection.api_key, "weft_x");
    assert_eq!(
        (args.name.as_str(), args.version.as_str()),
        ("resize", "1.0.0")
    );
    assert!(args.progress);
    assert_eq!(args.signature, None);
    assert_eq!(args.file, PathBuf::from("p.wasm"));
    assert!(
        !format!("{args:?}").contains("weft_x"),
        "Debug must not print keys"
    );

    let command = parse(&[
        "plugin",
        "sign",
        "--key",
        "k.key",
        "--tenant",
        "acme",
        "--name",
        "n",
        "--version",
        "v",
        "f.wasm",
    ])
    .unwrap();
    let TestCommand::Client(ClientCommand::Plugin(PluginCommand::Sign(args))) = command else {
        panic!("not plugin sign");
    };
    assert_eq!(args.tenant, "acme");
    // The tenant is part of what is signed: there is no default (WEFT_TENANT aside).
    if std::env::var_os("WEFT_TENANT").is_none() {
        let error = parse(&[
            "plugin",
            "sign",
            "--key",
            "k",
            "--name",
            "n",
            "--version",
            "v",
            "f",
        ])
        .unwrap_err()
        .to_string();
        assert!(error.contains("--tenant"), "{error}");
    }
    let command = parse(&["key", "register", "--api-key", "weft_x", "ci.key"]).unwrap();
    let TestCommand::Client(ClientCommand::Key(KeyCommand::Register(args))) = command else {
        panic!("not key register");
    };
    assert_eq!(args.secret_file, PathBuf::from("ci.key"));
    let command = parse(&["plugin", "delete", "--api-key", "k", "n", "--version", "2"]).unwrap();
    let TestCommand::Client(ClientCommand::Plugin(PluginCommand::Delete(args))) = command else {
        panic!("not plugin delete");
    };
    assert_eq!(args.version.as_deref(), Some("2"));
}

#[test]
fn parses_model_tenant_and_infer_commands() {
    let command = parse(&[
        "model",
        "push",
        "--api-key",
        "k",
        "--name",
        "mlp",
        "--version",
        "2",
        "--config",
        "model.toml",
        "model.onnx",
    ])
    .unwrap();
    let TestCommand::Client(ClientCommand::Model(ModelCommand::Push(args))) = command else {
        panic!("not model push");
    };
    assert_eq!(args.version, 2);
    assert_eq!(args.config, PathBuf::from("model.toml"));
    // Model versions are u64 >= 1.
    assert!(
        parse(&[
            "model",
            "push",
            "--api-key",
            "k",
            "--name",
            "m",
            "--version",
            "0",
            "--config",
            "c",
            "f"
        ])
        .is_err()
    );

    let command = parse(&[
        "tenant",
        "create",
        "acme",
        "--admin-key",
        "adm",
        "--quotas",
        "{\"burst\": 5}",
        "--share",
        "mlp",
        "--share",
        "resnet",
    ])
    .unwrap();
    let TestCommand::Client(ClientCommand::Tenant(TenantCommand::Create(args))) = command else {
        panic!("not tenant create");
    };
    assert_eq!(args.name, "acme");
    assert_eq!(args.shared_models, ["mlp", "resnet"]);
    assert_eq!(args.quotas.as_deref(), Some("{\"burst\": 5}"));

    let command = parse(&[
        "tenant",
        "key",
        "revoke",
        "acme",
        "0123",
        "--admin-key",
        "a",
    ])
    .unwrap();
    let TestCommand::Client(ClientCommand::Tenant(TenantCommand::Key(TenantKeyCommand::Revoke(
        args,
    )))) = command
    else {
        panic!("not tenant key revoke");
    };
    assert_eq!((args.name.as_str(), args.id.as_str()), ("acme", "0123"));

    let command = parse(&["infer", "mlp", "--api-key", "k", "--version", "1"]).unwrap();
    let TestCommand::Client(ClientCommand::Infer(args)) = command else {
        panic!("not infer");
    };
    assert_eq!(args.input, PathBuf::from("-"));
    assert_eq!(args.version.as_deref(), Some("1"));
}

#[test]
fn graph_commands_sit_next_to_check() {
    assert!(matches!(
        parse(&["graph", "check", "g.toml"]).unwrap(),
        TestCommand::Graph(TestGraphCommand::Check { .. })
    ));
    let command = parse(&["graph", "apply", "--api-key", "k", "a.toml", "b.toml"]).unwrap();
    let TestCommand::Graph(TestGraphCommand::Client(GraphClientCommand::Apply(args))) = command
    else {
        panic!("not graph apply");
    };
    assert_eq!(args.files.len(), 2);
    assert!(parse(&["graph", "apply", "--api-key", "k"]).is_err());
    assert!(matches!(
        parse(&["graph", "delete", "--api-key", "k", "g", "--version", "3"]).unwrap(),
        TestCommand::Graph(TestGraphCommand::Client(GraphClientCommand::Delete(
            GraphDeleteArgs {
                version: Some(3),
                ..
            }
        )))
    ));
}

/// A request as the one-shot server saw it.
struct Seen {
    head: String,
    body: Vec<u8>,
}

impl Seen {
    fn header(&self, name: &str) -> Option<String> {
        self.head.lines().find_map(|line| {
            let (key, value) = line.split_once(':')?;
            key.eq_ignore_ascii_case(name)
                .then(|| value.trim().to_string())
        })
    }
}

/// Serves one request with `status` and `body`; returns the base URL and what it received.
fn serve_once(status: &'static str, body: &'static str) -> (String, std::thread::JoinHandle<Seen>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let base = format!("http://{}/", listener.local_addr().unwrap());
    let handle = std::thread::spawn(move || answer_one(&listener, status, body));
    (base, handle)
}

/// Serves one request per `(status, body)`, in order, each on its own connection.
fn serve_each(
    answers: Vec<(&'static str, &'static str)>,
) -> (String, std::thread::JoinHandle<Vec<Seen>>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let base = format!("http://{}/", listener.local_addr().unwrap());
    let handle = std::thread::spawn(move || {
        answers
            .into_iter()
            .map(|(status, body)| answer_one(&listener, status, body))
            .collect()
    });
    (base, handle)
}

fn answer_one(listener: &TcpListener, status: &str, body: &str) -> Seen {
    {
        let (stream, _) = listener.accept().unwrap();
        let mut reader = BufReader::new(stream.try_clone().unwrap());
        let mut head = String::new();
        loop {
            let mut line = String::new();
            reader.read_line(&mut line).unwrap();
            if line == "\r\n" || line.is_empty() {
                break;
            }
            head.push_str(&line);
        }
        let mut seen = Seen {
            head,
            body: Vec::new(),
        };
        let length: usize = seen
            .header("content-length")
            .map(|l| l.parse().unwrap())
            .unwrap_or(0);
        seen.body.resize(length, 0);
        reader.read_exact(&mut seen.body).unwrap();
        let mut stream = stream;
        write!(
            stream,
            "HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\
             connection: close\r\n\r\n{body}",
            body.len()
        )
        .unwrap();
        seen
    }
}

#[tokio::test]
async fn streamed_uploads_keep_content_length_and_headers() {
    let (base, server) = serve_once("201 Created", r#"{"name": "m", "version": "1"}"#);
    let client = Server::new(&base, "weft_secret").unwrap();
    let config = b"name = \"m\"\n";
    let onnx: Vec<u8> = (0..3 * 1024 * 1024 + 5).map(|i| (i % 251) as u8).collect();
    let (body, config_length) = crate::models::model_body(config, &onnx);
    let answer = client
        .call(
            Method::PUT,
            &["api", "v1", "models", "m", "versions", "1"],
            Payload::Bytes {
                body: body.clone(),
                content_type: "application/octet-stream",
                headers: vec![("Weft-Config-Length", config_length.clone())],
                progress: true,
            },
        )
        .await
        .unwrap();
    assert_eq!(answer["version"], "1");
    let seen = server.join().unwrap();
    assert!(
        seen.head
            .starts_with("PUT /api/v1/models/m/versions/1 HTTP/1.1\r\n"),
        "{}",
        seen.head
    );
    assert_eq!(
        seen.header("authorization").as_deref(),
        Some("Bearer weft_secret")
    );
    assert_eq!(seen.header("weft-config-length"), Some(config_length));
    assert_eq!(seen.header("content-length"), Some(body.len().to_string()));
    assert_eq!(seen.header("transfer-encoding"), None);
    assert_eq!(Bytes::from(seen.body), body);
}

#[tokio::test]
async fn server_errors_show_the_servers_text() {
    let (base, server) = serve_once(
        "409 Conflict",
        r#"{"error": "plugin resize version 1.0.0 already exists"}"#,
    );
    let client = Server::new(&base, "k").unwrap();
    let error = client
        .call(Method::GET, &["api", "v1", "plugins"], Payload::Empty)
        .await
        .unwrap_err();
    assert_eq!(
        error.to_string(),
        "server said 409 Conflict: plugin resize version 1.0.0 already exists"
    );
    server.join().unwrap();
}

#[tokio::test]
async fn network_errors_name_the_url() {
    // Bind then drop: nothing listens on this port now.
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let client = Server::new(&format!("http://127.0.0.1:{port}"), "k").unwrap();
    let error = client
        .call(Method::GET, &["api", "v1", "models"], Payload::Empty)
        .await
        .unwrap_err();
    assert!(
        error
            .to_string()
            .contains(&format!("GET http://127.0.0.1:{port}/api/v1/models failed")),
        "{error:#}"
    );
}

#[tokio::test]
async fn plugin_push_sends_the_signature_headers() {
    let dir = tempfile::tempdir().unwrap();
    let (key_id, key_path, _) = crate::keys::generate_files(&dir.path().join("k")).unwrap();
    let wasm = dir.path().join("p.wasm");
    std::fs::write(&wasm, b"\0asm\x0d\0\x01\0component").unwrap();
    let sign = parse(&[
        "plugin",
        "sign",
        "--key",
        key_path.to_str().unwrap(),
        "--tenant",
        "acme",
        "--name",
        "p",
        "--version",
        "1",
        wasm.to_str().unwrap(),
    ])
    .unwrap();
    let TestCommand::Client(sign) = sign else {
        panic!("not a client command");
    };
    run(sign).await.unwrap();
    let signature: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("p.wasm.sig")).unwrap())
            .unwrap();

    let (base, server) = serve_once("201 Created", r#"{"name": "p", "version": "1"}"#);
    let push = parse(&[
        "plugin",
        "push",
        "--server",
        &base,
        "--api-key",
        "weft_k",
        "--name",
        "p",
        "--version",
        "1",
        wasm.to_str().unwrap(),
    ])
    .unwrap();
    let TestCommand::Client(push) = push else {
        panic!("not a client command");
    };
    run(push).await.unwrap();
    let seen = server.join().unwrap();
    assert!(
        seen.head.starts_with("PUT /api/v1/plugins/p/versions/1 "),
        "{}",
        seen.head
    );
    assert_eq!(seen.header("weft-signing-key"), Some(key_id));
    assert_eq!(
        seen.header("weft-signature").as_deref(),
        signature["signature"].as_str()
    );
    assert_eq!(
        seen.header("content-type").as_deref(),
        Some("application/wasm")
    );
    assert_eq!(seen.body, std::fs::read(&wasm).unwrap());

    // A mismatched version is refused locally: nothing is sent (no server is listening).
    let push = parse(&[
        "plugin",
        "push",
        "--server",
        &base,
        "--api-key",
        "k",
        "--name",
        "p",
        "--version",
        "2",
        wasm.to_str().unwrap(),
    ])
    .unwrap();
    let TestCommand::Client(push) = push else {
        panic!("not a client command");
    };
    let error = run(push).await.unwrap_err().to_string();
    assert!(error.contains("signs version '1', not '2'"), "{error}");
}

#[tokio::test]
async fn key_register_answers_the_servers_challenge_with_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let (key_id, key_path, public_path) =
        crate::keys::generate_files(&dir.path().join("k")).unwrap();
    let (base, server) = serve_each(vec![
        (
            "201 Created",
            r#"{"challenge": "c0ffee", "tenant": "acme", "expires_in_s": 300}"#,
        ),
        ("201 Created", r#"{"id": "x"}"#),
    ]);
    let register = parse(&[
        "key",
        "register",
        "--server",
        &base,
        "--api-key",
        "weft_k",
        key_path.to_str().unwrap(),
    ])
    .unwrap();
    let TestCommand::Client(register) = register else {
        panic!("not a client command");
    };
    run(register).await.unwrap();
    let seen = server.join().unwrap();
    assert!(
        seen[0]
            .head
            .starts_with("POST /api/v1/signing-keys/challenge "),
        "{}",
        seen[0].head
    );
    assert!(
        seen[1].head.starts_with("POST /api/v1/signing-keys "),
        "{}",
        seen[1].head
    );
    let body: serde_json::Value = serde_json::from_slice(&seen[1].body).unwrap();
    assert_eq!(body["challenge"], "c0ffee");
    let public =
        weft_store::signing::PublicKey::from_base64(body["public_key"].as_str().unwrap()).unwrap();
    assert_eq!(public.key_id(), key_id);
    public
        .verify_key_registration("acme", "c0ffee", body["signature"].as_str().unwrap())
        .unwrap();
    // The secret key is never sent.
    let secret_text = std::fs::read_to_string(&key_path).unwrap();
    let secret_json: serde_json::Value = serde_json::from_str(&secret_text).unwrap();
    let seed = secret_json["secret_key"].as_str().unwrap();
    for request in &seen {
        assert!(!String::from_utf8_lossy(&request.body).contains(seed));
    }

    // The public file is not enough: registering proves possession of the secret half.
    let register = parse(&[
        "key",
        "register",
        "--server",
        &base,
        "--api-key",
        "weft_k",
        public_path.to_str().unwrap(),
    ])
    .unwrap();
    let TestCommand::Client(register) = register else {
        panic!("not a client command");
    };
    let error = run(register).await.unwrap_err().to_string();
    assert!(error.contains("is a public key"), "{error}");
    assert!(error.contains("PREFIX.key"), "{error}");
}
