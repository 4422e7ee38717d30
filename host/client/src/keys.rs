//! `weft key ...`: making an ed25519 key pair on disk and managing the public halves the
//! server knows for this tenant.
//!
//! The secret key never leaves this machine: `key gen` writes it with mode 0600 and refuses to
//! overwrite an existing key (losing a key by accident means re-signing every plugin); only the
//! public key is ever sent. `key register` proves possession of the key the server would trust:
//! it asks for a challenge (`POST /api/v1/signing-keys/challenge`, which answers a single-use
//! nonce and the caller's tenant name), signs the registration message for that tenant and nonce
//! here, and sends the public key with the signature.

use std::ffi::OsString;
use std::fs::OpenOptions;
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use reqwest::Method;
use serde_json::{Value, json};
use weft_store::signing::{PublicKey, SecretKey};

use crate::cli::{KeyCommand, KeyGenArgs, KeyRegisterArgs, KeyRevokeArgs, TenantConnection};
use crate::http::{Payload, Server, list_as_tenant, print_json};

pub async fn run(command: KeyCommand) -> Result<()> {
    match command {
        KeyCommand::Gen(args) => key_gen(&args),
        KeyCommand::Register(args) => register(args).await,
        KeyCommand::List(connection) => list(connection).await,
        KeyCommand::Revoke(args) => revoke(args).await,
    }
}

/// `path` with `suffix` appended to its file name (`keys/ci` + `.key` = `keys/ci.key`).
pub fn with_suffix(path: &Path, suffix: &str) -> PathBuf {
    let mut name = OsString::from(path.as_os_str());
    name.push(suffix);
    PathBuf::from(name)
}

/// Creates `path` with `text`, failing if it exists; `secret` files are readable by the owner only.
fn write_new(path: &Path, text: &str, secret: bool) -> Result<()> {
    let mut options = OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(if secret { 0o600 } else { 0o644 });
    }
    #[cfg(not(unix))]
    let _ = secret;
    let mut file = options.open(path).map_err(|error| {
        if error.kind() == std::io::ErrorKind::AlreadyExists {
            anyhow::anyhow!(
                "{} already exists: refusing to overwrite it",
                path.display()
            )
        } else {
            anyhow::Error::new(error).context(format!("cannot create {}", path.display()))
        }
    })?;
    file.write_all(text.as_bytes())
        .and_then(|()| file.sync_all())
        .with_context(|| format!("cannot write {}", path.display()))
}

/// Writes PREFIX.key and PREFIX.pub; returns the key id.
pub fn generate_files(prefix: &Path) -> Result<(String, PathBuf, PathBuf)> {
    let secret_path = with_suffix(prefix, ".key");
    let public_path = with_suffix(prefix, ".pub");
    for path in [&secret_path, &public_path] {
        if path.exists() {
            bail!(
                "{} already exists: refusing to overwrite it",
                path.display()
            );
        }
    }
    let secret = SecretKey::generate().context("cannot generate a key")?;
    let public = secret.public();
    write_new(&secret_path, &secret.to_file_text(), true)?;
    if let Err(error) = write_new(&public_path, &public.to_file_text(), false) {
        // Do not leave half a pair behind; the secret was never used.
        let _ = std::fs::remove_file(&secret_path);
        return Err(error);
    }
    Ok((public.key_id(), secret_path, public_path))
}

fn key_gen(args: &KeyGenArgs) -> Result<()> {
    let (key_id, secret_path, public_path) = generate_files(&args.out)?;
    eprintln!(
        "wrote {} (secret: keep it private) and {}; register it with `weft key register {}`",
        secret_path.display(),
        public_path.display(),
        secret_path.display()
    );
    println!("{key_id}");
    Ok(())
}

/// Reads a secret key file for registration, saying what to pass when given the public half.
fn read_secret(path: &Path) -> Result<SecretKey> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    match SecretKey::from_file_text(&text) {
        Ok(secret) => Ok(secret),
        Err(_) if PublicKey::from_file_text(&text).is_ok() => bail!(
            "{} is a public key: registering proves you hold the key, so pass the secret key \
             file (PREFIX.key from `weft key gen`); it signs the server's challenge here and is \
             never sent",
            path.display()
        ),
        Err(error) => {
            Err(anyhow::Error::new(error)
                .context(format!("{} is not a secret key", path.display())))
        }
    }
}

/// The text field `name` of a server answer, or an error naming it.
fn answer_text<'a>(answer: &'a Value, name: &str) -> Result<&'a str> {
    answer
        .get(name)
        .and_then(Value::as_str)
        .with_context(|| format!("the server's challenge has no \"{name}\": {answer}"))
}

async fn register(args: KeyRegisterArgs) -> Result<()> {
    let secret = read_secret(&args.secret_file)?;
    let public = secret.public();
    let server = Server::new(&args.connection.server, &args.connection.api_key)?;
    let challenge = server
        .call(
            Method::POST,
            &["api", "v1", "signing-keys", "challenge"],
            Payload::Empty,
        )
        .await?;
    let nonce = answer_text(&challenge, "challenge")?;
    let tenant = answer_text(&challenge, "tenant")?;
    let answer = server
        .call(
            Method::POST,
            &["api", "v1", "signing-keys"],
            Payload::Json(json!({
                "public_key": public.to_base64(),
                "challenge": nonce,
                "signature": secret.sign_key_registration(tenant, nonce),
            })),
        )
        .await?;
    eprintln!(
        "registered signing key {} for tenant {tenant}; sign plugins with `weft plugin sign \
         --tenant {tenant} --key {} ...`",
        public.key_id(),
        args.secret_file.display()
    );
    print_json(&answer)
}

async fn list(connection: TenantConnection) -> Result<()> {
    list_as_tenant(&connection, "signing-keys").await
}

async fn revoke(args: KeyRevokeArgs) -> Result<()> {
    Server::new(&args.connection.server, &args.connection.api_key)?
        .call_and_print(Method::DELETE, &["api", "v1", "signing-keys", &args.id])
        .await
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    #[test]
    fn generates_a_pair_and_never_overwrites() {
        let dir = tempfile::tempdir().unwrap();
        let prefix = dir.path().join("ci");
        let (key_id, secret_path, public_path) = generate_files(&prefix).unwrap();
        assert_eq!(secret_path, dir.path().join("ci.key"));
        assert_eq!(public_path, dir.path().join("ci.pub"));
        let secret =
            SecretKey::from_file_text(&std::fs::read_to_string(&secret_path).unwrap()).unwrap();
        let public =
            PublicKey::from_file_text(&std::fs::read_to_string(&public_path).unwrap()).unwrap();
        assert_eq!(secret.public().key_id(), key_id);
        assert_eq!(public.key_id(), key_id);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&secret_path)
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        let before = std::fs::read(&secret_path).unwrap();
        let error = generate_files(&prefix).unwrap_err().to_string();
        assert!(error.contains("already exists"), "{error}");
        assert_eq!(std::fs::read(&secret_path).unwrap(), before);

        // A lone .pub also blocks, and no .key is left behind.
        let other = dir.path().join("other");
        std::fs::write(with_suffix(&other, ".pub"), "x").unwrap();
        assert!(generate_files(&other).is_err());
        assert!(!with_suffix(&other, ".key").exists());
    }
}
