//! `weft tenant ...`: the operator's tenant administration (admin key), including issuing and
//! revoking tenants' API keys.
//!
//! A new API key is printed once, in the server's answer on stdout (so scripts can take it with
//! e.g. `jq -r .api_key.key`), with a reminder on stderr: the server keeps only its hash.

use anyhow::{Context, Result, bail};
use reqwest::Method;
use serde_json::{Map, Value, json};

use crate::cli::{
    AdminConnection, TenantCommand, TenantCreateArgs, TenantKeyCommand, TenantKeyRevokeArgs,
    TenantNameArgs, TenantUpdateArgs,
};
use crate::http::{Payload, Server, print_json};

pub async fn run(command: TenantCommand) -> Result<()> {
    match command {
        TenantCommand::Create(args) => create(args).await,
        TenantCommand::List(connection) => {
            admin(&connection)?
                .call_and_print(Method::GET, &["api", "v1", "tenants"])
                .await
        }
        TenantCommand::Show(args) => {
            admin(&args.connection)?
                .call_and_print(Method::GET, &["api", "v1", "tenants", &args.name])
                .await
        }
        TenantCommand::Update(args) => update(args).await,
        TenantCommand::Delete(args) => {
            admin(&args.connection)?
                .call_and_print(Method::DELETE, &["api", "v1", "tenants", &args.name])
                .await
        }
        TenantCommand::Key(TenantKeyCommand::Create(args)) => create_key(args).await,
        TenantCommand::Key(TenantKeyCommand::Revoke(args)) => revoke_key(args).await,
    }
}

fn admin(connection: &AdminConnection) -> Result<Server> {
    Server::new(&connection.server, &connection.admin_key)
}

/// `--quotas` text: a JSON object (the server checks the field names and values).
pub fn parse_quotas(text: &str) -> Result<Map<String, Value>> {
    match serde_json::from_str(text).context("--quotas is not JSON")? {
        Value::Object(quotas) => Ok(quotas),
        _ => bail!(
            "--quotas must be a JSON object, e.g. '{{\"requests_per_second\": 50, \"max_models\": 5}}'"
        ),
    }
}

/// The `POST /api/v1/tenants` body.
pub fn create_body(name: &str, quotas: Option<&str>, shared_models: &[String]) -> Result<Value> {
    let mut body = json!({ "name": name, "shared_models": shared_models });
    if let Some(quotas) = quotas {
        body["quotas"] = Value::Object(parse_quotas(quotas)?);
    }
    Ok(body)
}

/// The `PATCH /api/v1/tenants/{tenant}` body: only what the command line asks to change.
pub fn update_body(args: &TenantUpdateArgs) -> Result<Value> {
    let mut body = Map::new();
    if let Some(quotas) = &args.quotas {
        body.insert("quotas".into(), Value::Object(parse_quotas(quotas)?));
    }
    if args.share_none || !args.shared_models.is_empty() {
        body.insert("shared_models".into(), json!(args.shared_models));
    }
    if body.is_empty() {
        bail!("nothing to change: give --quotas, --share or --share-none");
    }
    Ok(Value::Object(body))
}

fn remind_once(what: &str, answer: &Value, key: &Value) {
    let id = key.get("id").and_then(Value::as_str).unwrap_or("?");
    if answer.is_object() {
        eprintln!(
            "{what}; its API key {id} is in the answer above and is shown only this once: store it now"
        );
    }
}

async fn create(args: TenantCreateArgs) -> Result<()> {
    let body = create_body(&args.name, args.quotas.as_deref(), &args.shared_models)?;
    let server = admin(&args.connection)?;
    let answer = server
        .call(Method::POST, &["api", "v1", "tenants"], Payload::Json(body))
        .await?;
    print_json(&answer)?;
    remind_once(
        &format!("created tenant {}", args.name),
        &answer,
        &answer["api_key"],
    );
    Ok(())
}

async fn update(args: TenantUpdateArgs) -> Result<()> {
    let body = update_body(&args)?;
    let server = admin(&args.connection)?;
    let answer = server
        .call(
            Method::PATCH,
            &["api", "v1", "tenants", &args.name],
            Payload::Json(body),
        )
        .await?;
    print_json(&answer)
}

async fn create_key(args: TenantNameArgs) -> Result<()> {
    let server = admin(&args.connection)?;
    let answer = server
        .call(
            Method::POST,
            &["api", "v1", "tenants", &args.name, "keys"],
            Payload::Empty,
        )
        .await?;
    print_json(&answer)?;
    remind_once(
        &format!("created a key for tenant {}", args.name),
        &answer,
        &answer,
    );
    Ok(())
}

async fn revoke_key(args: TenantKeyRevokeArgs) -> Result<()> {
    admin(&args.connection)?
        .call_and_print(
            Method::DELETE,
            &["api", "v1", "tenants", &args.name, "keys", &args.id],
        )
        .await
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    #[test]
    fn create_body_has_partial_quotas_and_shares() {
        let body = create_body(
            "acme",
            Some(r#"{"requests_per_second": 50, "max_models": 5}"#),
            &["mlp".into(), "resnet".into()],
        )
        .unwrap();
        assert_eq!(
            body,
            json!({
                "name": "acme",
                "quotas": {"requests_per_second": 50, "max_models": 5},
                "shared_models": ["mlp", "resnet"],
            })
        );
        let body = create_body("acme", None, &[]).unwrap();
        assert_eq!(body, json!({"name": "acme", "shared_models": []}));
    }

    #[test]
    fn quotas_must_be_an_object() {
        assert!(parse_quotas("[1]").is_err());
        assert!(parse_quotas("{nope").is_err());
        assert_eq!(parse_quotas("{}").unwrap().len(), 0);
    }

    #[test]
    fn update_sends_only_changes() {
        let args = |quotas: Option<&str>, shared: &[&str], none: bool| TenantUpdateArgs {
            connection: AdminConnection {
                server: "http://h".into(),
                admin_key: "k".into(),
            },
            name: "acme".into(),
            quotas: quotas.map(String::from),
            shared_models: shared.iter().map(|s| s.to_string()).collect(),
            share_none: none,
        };
        assert!(update_body(&args(None, &[], false)).is_err());
        assert_eq!(
            update_body(&args(None, &[], true)).unwrap(),
            json!({"shared_models": []})
        );
        assert_eq!(
            update_body(&args(Some(r#"{"burst": 10}"#), &["*"], false)).unwrap(),
            json!({"quotas": {"burst": 10}, "shared_models": ["*"]})
        );
    }
}
