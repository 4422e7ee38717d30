//! TLS for both listeners (`--tls-cert`, `--tls-key`, optional `--tls-client-ca` for mutual TLS),
//! with rustls, reloaded when the files change.
//!
//! Why reload by watching: certificates are rotated under a running server (cert-manager
//! rewrites a Kubernetes Secret's files, ACME renewals), and a restart would drop every open
//! connection. Every few seconds the files are read again; when their bytes changed and they
//! form a valid configuration, new connections get it, while open connections keep the one
//! they were made with. An invalid or half-written set is logged and the previous one stays.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use anyhow::{Context, bail};
use rustls::ServerConfig;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::TlsAcceptor;

use crate::listen::Protocols;

/// The files TLS is made of.
#[derive(Clone, Debug)]
pub struct TlsFiles {
    /// PEM certificate chain, the server's certificate first.
    pub cert: PathBuf,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
    /// PEM certificates of the CA(s) client certificates must chain to; none: no client
    /// certificates are asked for.
    pub client_ca: Option<PathBuf>,
}

/// The current TLS configuration, one per protocol set (their ALPN lists differ), and the
/// bytes it was built from.
pub struct TlsReloader {
    files: TlsFiles,
    current: RwLock<Loaded>,
}

struct Loaded {
    source: Vec<Vec<u8>>,
    http: Arc<ServerConfig>,
    grpc: Arc<ServerConfig>,
}

impl TlsReloader {
    /// Loads the files; an error names the file and what is wrong with it.
    pub fn load(files: TlsFiles) -> anyhow::Result<Arc<TlsReloader>> {
        let source = read_all(&files)?;
        let loaded = build(&files, source)?;
        Ok(Arc::new(TlsReloader {
            files,
            current: RwLock::new(loaded),
        }))
    }

    /// An acceptor with the configuration current now, for one new connection.
    pub fn acceptor(&self, protocols: Protocols) -> TlsAcceptor {
        let current = self
            .current
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        TlsAcceptor::from(Arc::clone(match protocols {
            Protocols::Http => &current.http,
            Protocols::Http2Only => &current.grpc,
        }))
    }

    /// Reads the files again and switches to them if they changed and are valid; `Ok(true)`
    /// when it switched.
    pub fn reload(&self) -> anyhow::Result<bool> {
        let source = read_all(&self.files)?;
        let unchanged = {
            let current = self
                .current
                .read()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            current.source == source
        };
        if unchanged {
            return Ok(false);
        }
        let loaded = build(&self.files, source)?;
        *self
            .current
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = loaded;
        Ok(true)
    }

    /// Checks the files every `interval` on a thread of its own (file reads block) for as long
    /// as the process runs.
    pub fn watch(self: &Arc<Self>, interval: Duration) -> anyhow::Result<()> {
        let reloader = Arc::downgrade(self);
        std::thread::Builder::new()
            .name("weft-tls-reload".into())
            .spawn(move || {
                let mut failing = false;
                loop {
                    std::thread::sleep(interval);
                    let Some(reloader) = reloader.upgrade() else {
                        return;
                    };
                    match reloader.reload() {
                        Ok(true) => {
                            failing = false;
                            tracing::info!(
                                cert = %reloader.files.cert.display(),
                                "TLS certificate reloaded; new connections use it"
                            );
                        }
                        Ok(false) => failing = false,
                        // Once per failure, not every interval: a file may be mid-rotation.
                        Err(error) if !failing => {
                            failing = true;
                            tracing::error!(
                                error = format!("{error:#}"),
                                "cannot reload TLS files; serving the previous certificate"
                            );
                        }
                        Err(_) => {}
                    }
                }
            })
            .context("cannot start the TLS reload thread")?;
        Ok(())
    }
}

fn read_all(files: &TlsFiles) -> anyhow::Result<Vec<Vec<u8>>> {
    let read = |path: &Path, flag: &str| {
        std::fs::read(path).with_context(|| format!("cannot read {flag} {}", path.display()))
    };
    let mut source = vec![
        read(&files.cert, "--tls-cert")?,
        read(&files.key, "--tls-key")?,
    ];
    if let Some(client_ca) = &files.client_ca {
        source.push(read(client_ca, "--tls-client-ca")?);
    }
    Ok(source)
}

fn build(files: &TlsFiles, source: Vec<Vec<u8>>) -> anyhow::Result<Loaded> {
    let chain =
        certificates(&source[0]).with_context(|| format!("--tls-cert {}", files.cert.display()))?;
    let key = PrivateKeyDer::from_pem_slice(&source[1])
        .with_context(|| format!("--tls-key {} holds no PEM private key", files.key.display()))?;
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let builder = ServerConfig::builder_with_provider(Arc::clone(&provider))
        .with_safe_default_protocol_versions()
        .context("cannot set up TLS protocol versions")?;
    let builder = match source.get(2) {
        Some(client_ca) => {
            let mut roots = rustls::RootCertStore::empty();
            let path = files.client_ca.as_deref().unwrap_or(Path::new(""));
            for certificate in certificates(client_ca)
                .with_context(|| format!("--tls-client-ca {}", path.display()))?
            {
                roots.add(certificate).with_context(|| {
                    format!("--tls-client-ca {}: not a CA certificate", path.display())
                })?;
            }
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                Arc::new(roots),
                provider,
            )
            .build()
            .context("cannot build the client certificate verifier")?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let mut http = builder.with_single_cert(chain, key).context(
        "--tls-cert and --tls-key do not form a usable certificate (does the key match?)",
    )?;
    let mut grpc = http.clone();
    http.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    grpc.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Loaded {
        source,
        http: Arc::new(http),
        grpc: Arc::new(grpc),
    })
}

fn certificates(pem: &[u8]) -> anyhow::Result<Vec<CertificateDer<'static>>> {
    let certificates = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .context("malformed PEM certificate")?;
    if certificates.is_empty() {
        bail!("holds no PEM certificate");
    }
    Ok(certificates)
}
