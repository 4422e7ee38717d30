//! `weft model ...`: pushing an ONNX model with its model.toml, listing and deleting versions.
//!
//! A push is one request whose body is the config bytes followed by the ONNX bytes, with
//! `Weft-Config-Length` saying where the config ends ([`model_body`]); the server loads the model
//! before storing either part, so a bad pair never lands half-stored.

use anyhow::{Context, Result, bail};
use bytes::Bytes;
use reqwest::Method;

use crate::cli::{ModelCommand, ModelDeleteArgs, ModelPushArgs, TenantConnection};
use crate::http::{Payload, Server, delete_as_tenant, list_as_tenant, print_json};

pub async fn run(command: ModelCommand) -> Result<()> {
    match command {
        ModelCommand::Push(args) => push(args).await,
        ModelCommand::List(connection) => list(connection).await,
        ModelCommand::Delete(args) => delete(args).await,
    }
}

/// The push body: `config` then `onnx`, and the `Weft-Config-Length` header value.
pub fn model_body(config: &[u8], onnx: &[u8]) -> (Bytes, String) {
    let mut body = Vec::with_capacity(config.len() + onnx.len());
    body.extend_from_slice(config);
    body.extend_from_slice(onnx);
    (Bytes::from(body), config.len().to_string())
}

async fn push(args: ModelPushArgs) -> Result<()> {
    let config = std::fs::read(&args.config)
        .with_context(|| format!("cannot read {}", args.config.display()))?;
    // The server parses it too; checking here gives the error with the file's name, early.
    let text = std::str::from_utf8(&config)
        .with_context(|| format!("{} is not UTF-8 text", args.config.display()))?;
    text.parse::<toml::Table>()
        .with_context(|| format!("{} is not valid TOML", args.config.display()))?;
    let onnx = std::fs::read(&args.file)
        .with_context(|| format!("cannot read {}", args.file.display()))?;
    if onnx.is_empty() {
        bail!("{} is empty", args.file.display());
    }
    let (body, config_length) = model_body(&config, &onnx);
    let server = Server::new(&args.connection.server, &args.connection.api_key)?;
    let version = args.version.to_string();
    let answer = server
        .call(
            Method::PUT,
            &["api", "v1", "models", &args.name, "versions", &version],
            Payload::Bytes {
                body,
                content_type: "application/octet-stream",
                headers: vec![("Weft-Config-Length", config_length)],
                progress: args.progress,
            },
        )
        .await?;
    print_json(&answer)
}

async fn list(connection: TenantConnection) -> Result<()> {
    list_as_tenant(&connection, "models").await
}

async fn delete(args: ModelDeleteArgs) -> Result<()> {
    let version = args.version.map(|version| version.to_string());
    delete_as_tenant(&args.connection, "models", &args.name, version.as_deref()).await
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    #[test]
    fn body_is_config_then_onnx() {
        let config = "name = \"mlp\"\nbackend = \"onnx\"\n".as_bytes();
        let onnx = [0x08u8, 0x08, 0x12, 0x00, 0xff];
        let (body, length) = model_body(config, &onnx);
        assert_eq!(length, config.len().to_string());
        let split: usize = length.parse().unwrap();
        assert_eq!(&body[..split], config);
        assert_eq!(&body[split..], &onnx);
        assert_eq!(body.len(), config.len() + onnx.len());
    }

    #[test]
    fn empty_config_is_framed_as_zero() {
        let (body, length) = model_body(b"", b"onnx");
        assert_eq!(length, "0");
        assert_eq!(&body[..], b"onnx");
    }
}
