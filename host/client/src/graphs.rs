//! `weft graph apply|list|delete`: uploading graph TOML files and managing their versions.
//!
//! The offline `weft graph check` lives in the binary (it needs the engine); these join it in the
//! same `weft graph` group through [`crate::GraphClientCommand`]. The server validates an applied
//! graph exactly as `check` does, so its error text is shown as it is.

use std::path::Path;

use anyhow::{Context, Result, anyhow};
use reqwest::Method;
use serde_json::{Value, json};

use crate::cli::{GraphApplyArgs, GraphClientCommand, GraphDeleteArgs, TenantConnection};
use crate::http::{Payload, Server, delete_as_tenant, list_as_tenant, print_json};

pub async fn run(command: GraphClientCommand) -> Result<()> {
    match command {
        GraphClientCommand::Apply(args) => apply(args).await,
        GraphClientCommand::List(connection) => list(connection).await,
        GraphClientCommand::Delete(args) => delete(args).await,
    }
}

/// The graph's name: the TOML document's top-level `name` string.
pub fn graph_name(text: &str) -> Result<String> {
    let table: toml::Table = text.parse().context("not valid TOML")?;
    match table.get("name") {
        Some(toml::Value::String(name)) => Ok(name.clone()),
        Some(_) => Err(anyhow!("the top-level `name` key is not a string")),
        None => Err(anyhow!(
            "no top-level `name` key (e.g. name = \"my-graph\" before any [table])"
        )),
    }
}

async fn apply_one(server: &Server, file: &Path, dry_run: bool) -> Result<Value> {
    let text = std::fs::read_to_string(file).context("cannot read it")?;
    let name = graph_name(&text)?;
    // So validation errors name this file, exactly as `weft graph check` does.
    let mut headers = vec![("Weft-File-Name", file.display().to_string())];
    if dry_run {
        headers.push(("Weft-Dry-Run", "true".to_string()));
    }
    server
        .call(
            Method::PUT,
            &["api", "v1", "graphs", &name],
            Payload::Bytes {
                body: text.into(),
                content_type: "application/toml",
                headers,
                progress: false,
            },
        )
        .await
}

/// Applies every file, reporting each failure as it happens; fails at the end if any did.
async fn apply(args: GraphApplyArgs) -> Result<()> {
    let server = Server::new(&args.connection.server, &args.connection.api_key)?;
    let mut applied = Vec::new();
    let mut failed = 0usize;
    for file in &args.files {
        match apply_one(&server, file, args.dry_run).await {
            Ok(answer) => applied.push(answer),
            Err(error) => {
                failed += 1;
                eprintln!("weft: {}: {error:#}", file.display());
            }
        }
    }
    if !applied.is_empty() {
        let key = if args.dry_run { "checked" } else { "applied" };
        print_json(&json!({ key: applied }))?;
    }
    if failed > 0 {
        anyhow::bail!("{failed} of {} graph files failed", args.files.len());
    }
    Ok(())
}

async fn list(connection: TenantConnection) -> Result<()> {
    list_as_tenant(&connection, "graphs").await
}

async fn delete(args: GraphDeleteArgs) -> Result<()> {
    let version = args.version.map(|version| version.to_string());
    delete_as_tenant(&args.connection, "graphs", &args.name, version.as_deref()).await
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    #[test]
    fn name_comes_from_the_top_level_key() {
        let text = "name = \"pipeline\"\n\n[[nodes]]\nname = \"inner\"\n";
        assert_eq!(graph_name(text).unwrap(), "pipeline");
    }

    #[test]
    fn missing_or_odd_names_are_clear() {
        let error = graph_name("[[nodes]]\nname = \"inner\"\n").unwrap_err();
        assert!(error.to_string().contains("no top-level `name`"), "{error}");
        let error = graph_name("name = 3\n").unwrap_err();
        assert!(error.to_string().contains("not a string"), "{error}");
        let error = graph_name("name = \n").unwrap_err();
        assert!(error.to_string().contains("not valid TOML"), "{error}");
    }
}
