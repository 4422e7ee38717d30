//! `weft plugin ...`: signing a component offline, pushing it with its detached signature,
//! listing and deleting versions.
//!
//! A signature is for one tenant (`--tenant`, `WEFT_TENANT`): the signed message names it, so
//! a signed component cannot be pushed to another tenant that holds the same key.
//!
//! `push` checks the signature file against the component, name and version before sending
//! anything: a stale `.sig` (the component was rebuilt after signing) is the common mistake, and
//! saying so locally is clearer than the server's "signature does not verify".

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use bytes::Bytes;
use reqwest::Method;
use weft_store::signing::{PluginSignature, SecretKey, sha256_hex};

use crate::cli::{
    PluginCommand, PluginDeleteArgs, PluginPushArgs, PluginSignArgs, TenantConnection,
};
use crate::http::{Payload, Server, delete_as_tenant, list_as_tenant, print_json};
use crate::keys::with_suffix;

/// The first bytes of every WebAssembly module or component.
const WASM_MAGIC: &[u8] = b"\0asm";

pub async fn run(command: PluginCommand) -> Result<()> {
    match command {
        PluginCommand::Build(args) => crate::python::build(&args),
        PluginCommand::Sign(args) => sign(&args),
        PluginCommand::Push(args) => push(args).await,
        PluginCommand::List(connection) => list(connection).await,
        PluginCommand::Delete(args) => delete(args).await,
    }
}

/// Where the signature of `file` goes unless told: `plugin.wasm` -> `plugin.wasm.sig`.
pub fn default_signature_path(file: &Path) -> PathBuf {
    with_suffix(file, ".sig")
}

fn read(path: &Path) -> Result<Vec<u8>> {
    std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))
}

fn sign(args: &PluginSignArgs) -> Result<()> {
    let key_text = std::fs::read_to_string(&args.key)
        .with_context(|| format!("cannot read secret key file {}", args.key.display()))?;
    let key = SecretKey::from_file_text(&key_text)
        .with_context(|| format!("{} is not a usable secret key", args.key.display()))?;
    let component = read(&args.file)?;
    if !component.starts_with(WASM_MAGIC) {
        bail!(
            "{} is not a WebAssembly file (it does not start with \\0asm)",
            args.file.display()
        );
    }
    weft_store::check_name("tenant", &args.tenant)?;
    let signature = key.sign_plugin(&component, &args.tenant, &args.name, &args.version);
    let out = args
        .out
        .clone()
        .unwrap_or_else(|| default_signature_path(&args.file));
    std::fs::write(&out, signature.to_file_text())
        .with_context(|| format!("cannot write {}", out.display()))?;
    eprintln!(
        "wrote {}: tenant {}, plugin {} version {}, sha256 {}, key id {}",
        out.display(),
        signature.tenant,
        signature.plugin,
        signature.version,
        signature.digest,
        signature.key_id
    );
    Ok(())
}

/// Checks that `signature` (read from `signature_path`) is for these bytes, name and version.
pub fn check_signature(
    signature: &PluginSignature,
    signature_path: &Path,
    component: &[u8],
    file: &Path,
    name: &str,
    version: &str,
) -> Result<()> {
    let digest = sha256_hex(component);
    let sig = signature_path.display();
    if signature.digest != digest {
        bail!(
            "{sig} does not match {}: it signs bytes with sha256 {}, but the file's sha256 is \
             {digest} (was the plugin rebuilt after signing?); sign it again with `weft plugin sign`",
            file.display(),
            signature.digest
        );
    }
    if signature.plugin != name {
        bail!(
            "{sig} signs plugin '{}', not '{name}': push with --name {} or sign again with --name {name}",
            signature.plugin,
            signature.plugin
        );
    }
    if signature.version != version {
        bail!(
            "{sig} signs version '{}', not '{version}': push with --version {} or sign again with \
             --version {version}",
            signature.version,
            signature.version
        );
    }
    Ok(())
}

async fn push(args: PluginPushArgs) -> Result<()> {
    let component = read(&args.file)?;
    let signature_path = args
        .signature
        .clone()
        .unwrap_or_else(|| default_signature_path(&args.file));
    let signature_text = std::fs::read_to_string(&signature_path).with_context(|| {
        format!(
            "cannot read signature file {} (make one with `weft plugin sign`)",
            signature_path.display()
        )
    })?;
    let signature = PluginSignature::from_file_text(&signature_text)
        .with_context(|| format!("{} is not a signature file", signature_path.display()))?;
    check_signature(
        &signature,
        &signature_path,
        &component,
        &args.file,
        &args.name,
        &args.version,
    )?;
    let server = Server::new(&args.connection.server, &args.connection.api_key)?;
    let notes = crate::progress::wants_progress(component.len(), args.progress);
    let path = [
        "api",
        "v1",
        "plugins",
        &args.name,
        "versions",
        &args.version,
    ];
    let call = server.call(
        Method::PUT,
        &path,
        Payload::Bytes {
            body: Bytes::from(component),
            content_type: "application/wasm",
            headers: vec![
                ("Weft-Signature", signature.signature),
                ("Weft-Signing-Key", signature.key_id),
            ],
            progress: args.progress,
        },
    );
    // The server compiles the component before it answers (once: the compiled code is cached),
    // which for a large one (a Python plugin, ~18 MB) takes seconds.
    let answer = if notes {
        crate::progress::with_wait_notes(
            call,
            "waiting while the server uploads, compiles and checks the plugin",
        )
        .await?
    } else {
        call.await?
    };
    print_json(&answer)
}

async fn list(connection: TenantConnection) -> Result<()> {
    list_as_tenant(&connection, "plugins").await
}

async fn delete(args: PluginDeleteArgs) -> Result<()> {
    delete_as_tenant(
        &args.connection,
        "plugins",
        &args.name,
        args.version.as_deref(),
    )
    .await
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    fn signed(component: &[u8]) -> PluginSignature {
        SecretKey::generate()
            .unwrap()
            .sign_plugin(component, "acme", "resize", "1.0.0")
    }

    #[test]
    fn matching_signature_passes() {
        let component = b"\0asm component";
        let signature = signed(component);
        check_signature(
            &signature,
            Path::new("p.wasm.sig"),
            component,
            Path::new("p.wasm"),
            "resize",
            "1.0.0",
        )
        .unwrap();
    }

    #[test]
    fn stale_signature_is_caught_before_sending() {
        let signature = signed(b"\0asm old build");
        let error = check_signature(
            &signature,
            Path::new("p.wasm.sig"),
            b"\0asm new build",
            Path::new("p.wasm"),
            "resize",
            "1.0.0",
        )
        .unwrap_err()
        .to_string();
        assert!(
            error.contains("p.wasm.sig does not match p.wasm"),
            "{error}"
        );
        assert!(error.contains(&signature.digest), "{error}");
        assert!(error.contains(&sha256_hex(b"\0asm new build")), "{error}");
    }

    #[test]
    fn other_name_or_version_is_caught() {
        let component = b"\0asm component";
        let signature = signed(component);
        let sig = Path::new("p.sig");
        let file = Path::new("p.wasm");
        let error = check_signature(&signature, sig, component, file, "crop", "1.0.0")
            .unwrap_err()
            .to_string();
        assert!(
            error.contains("signs plugin 'resize', not 'crop'"),
            "{error}"
        );
        let error = check_signature(&signature, sig, component, file, "resize", "2.0.0")
            .unwrap_err()
            .to_string();
        assert!(
            error.contains("signs version '1.0.0', not '2.0.0'"),
            "{error}"
        );
    }

    #[test]
    fn sign_writes_a_file_push_accepts() {
        let dir = tempfile::tempdir().unwrap();
        let (_, key_path, _) = crate::keys::generate_files(&dir.path().join("k")).unwrap();
        let wasm = dir.path().join("p.wasm");
        std::fs::write(&wasm, b"\0asm\x0d\0\x01\0").unwrap();
        sign(&PluginSignArgs {
            key: key_path,
            tenant: "acme".into(),
            name: "p".into(),
            version: "1".into(),
            out: None,
            file: wasm.clone(),
        })
        .unwrap();
        let sig_path = dir.path().join("p.wasm.sig");
        let signature =
            PluginSignature::from_file_text(&std::fs::read_to_string(&sig_path).unwrap()).unwrap();
        check_signature(
            &signature,
            &sig_path,
            &std::fs::read(&wasm).unwrap(),
            &wasm,
            "p",
            "1",
        )
        .unwrap();

        let not_wasm = dir.path().join("p.txt");
        std::fs::write(&not_wasm, b"hello").unwrap();
        assert_eq!(signature.tenant, "acme");
        let error = sign(&PluginSignArgs {
            key: dir.path().join("k.key"),
            tenant: "acme".into(),
            name: "p".into(),
            version: "1".into(),
            out: None,
            file: not_wasm,
        })
        .unwrap_err()
        .to_string();
        assert!(error.contains("not a WebAssembly file"), "{error}");
    }
}
