//! TLS on both listeners with a test CA: tritonclient over HTTPS and gRPC with TLS, mutual TLS
//! refusing a client without a certificate, and a certificate rotated under a running server
//! served to new connections while an open one goes on (tests/python/test_tls.py).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::path::Path;
use std::process::Command;

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair, KeyUsagePurpose,
};
use support::*;

/// A CA that issues server and client certificates into a folder.
struct TestCa {
    issuer: CertifiedIssuer<'static, KeyPair>,
}

impl TestCa {
    fn new(name: &str) -> TestCa {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        TestCa {
            issuer: CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap(),
        }
    }

    /// Writes `<stem>.pem` and `<stem>.key` for a certificate named `common_name`, valid for
    /// localhost and 127.0.0.1.
    fn issue(&self, folder: &Path, stem: &str, common_name: &str) {
        let mut params =
            CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()]).unwrap();
        params
            .distinguished_name
            .push(DnType::CommonName, common_name);
        let key = KeyPair::generate().unwrap();
        let certificate = params.signed_by(&key, &self.issuer).unwrap();
        std::fs::write(folder.join(format!("{stem}.pem")), certificate.pem()).unwrap();
        std::fs::write(folder.join(format!("{stem}.key")), key.serialize_pem()).unwrap();
    }

    fn write(&self, path: &Path) {
        std::fs::write(path, self.issuer.pem()).unwrap();
    }
}

#[test]
fn tls_on_both_listeners_mutual_tls_and_reload() {
    let certs = tempfile::tempdir().unwrap();
    let dir = certs.path();
    let ca = TestCa::new("weft test CA");
    ca.write(&dir.join("ca.pem"));
    ca.issue(dir, "server", "weft-one");
    ca.issue(dir, "rotated", "weft-two");
    ca.issue(dir, "client", "acme-client");
    // A client certificate from a CA the server does not trust.
    let stranger = TestCa::new("stranger CA");
    stranger.issue(dir, "stranger", "stranger-client");

    let path = |name: &str| dir.join(name).to_str().unwrap().to_string();
    let repo = Repo::standard();
    let server = Server::start_with(
        repo.path(),
        &[
            "--tls-cert",
            &path("server.pem"),
            "--tls-key",
            &path("server.key"),
            "--tls-reload-seconds",
            "1",
        ],
    );
    let mutual = Server::start_with(
        repo.path(),
        &[
            "--tls-cert",
            &path("server.pem"),
            "--tls-key",
            &path("server.key"),
            "--tls-client-ca",
            &path("ca.pem"),
        ],
    );
    let output = Command::new(test_python())
        .args(["-m", "pytest", "-q", "-p", "no:cacheprovider"])
        .arg(workspace_root().join("tests/python/test_tls.py"))
        .env("WEFT_API_KEY", TEST_KEY)
        .env("WEFT_URL", &server.address)
        .env("WEFT_GRPC_URL", server.grpc_address.as_ref().unwrap())
        .env("WEFT_MTLS_URL", &mutual.address)
        .env("WEFT_MTLS_GRPC_URL", mutual.grpc_address.as_ref().unwrap())
        .env("WEFT_CERTS", dir)
        .output()
        .expect("cannot run pytest from the test environment (run `cargo xtask setup`)");
    let stdout = String::from_utf8_lossy(&output.stdout);
    println!("test_tls.py: {}", stdout.lines().last().unwrap_or_default());
    assert!(
        output.status.success() && stdout.contains("passed") && !stdout.contains("skipped"),
        "TLS tests failed:\n{stdout}\n{}\nserver log:\n{}\nmutual TLS server log:\n{}",
        String::from_utf8_lossy(&output.stderr),
        server.log(),
        mutual.log()
    );
    assert!(
        server.log().contains("TLS certificate reloaded"),
        "{}",
        server.log()
    );
}

#[test]
fn bad_tls_files_stop_the_server_with_the_file_named() {
    let certs = tempfile::tempdir().unwrap();
    let dir = certs.path();
    let ca = TestCa::new("weft test CA");
    ca.issue(dir, "server", "weft-one");
    ca.issue(dir, "other", "weft-other");
    std::fs::write(dir.join("garbage.pem"), "not a certificate").unwrap();
    let path = |name: &str| dir.join(name).to_str().unwrap().to_string();
    let cases = [
        (
            vec!["--tls-cert", "garbage.pem", "--tls-key", "server.key"],
            "--tls-cert",
        ),
        (
            vec!["--tls-cert", "server.pem", "--tls-key", "garbage.pem"],
            "--tls-key",
        ),
        (
            vec!["--tls-cert", "server.pem", "--tls-key", "other.key"],
            "does the key match",
        ),
        (
            vec!["--tls-cert", "server.pem", "--tls-key", "missing.key"],
            "cannot read --tls-key",
        ),
    ];
    let repo = Repo::standard();
    for (args, expected) in cases {
        let args: Vec<String> = args
            .iter()
            .map(|arg| {
                if arg.starts_with("--") {
                    arg.to_string()
                } else {
                    path(arg)
                }
            })
            .collect();
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let log = match Server::try_start(repo.path(), &args) {
            Ok(server) => panic!("started with {args:?}:\n{}", server.log()),
            Err(log) => log,
        };
        assert!(log.contains(expected), "{args:?}: {log}");
        assert!(!log.contains("panicked"), "{log}");
    }
}
