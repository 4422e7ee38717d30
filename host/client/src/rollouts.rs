//! `weft rollout apply|status|promote|abort|delete`: a tenant's canaries and experiments.
//!
//! The server validates and decides; these commands send the file, show the server's view
//! (phase, weights, each arm's window and the decision log with its numbers) and end a rollout
//! by hand.

use anyhow::{Context, Result};
use reqwest::Method;
use serde_json::json;

use crate::cli::{
    RolloutApplyArgs, RolloutCommand, RolloutNameArgs, RolloutPromoteArgs, RolloutStatusArgs,
};
use crate::graphs::graph_name;
use crate::http::{Payload, Server, print_json};

pub async fn run(command: RolloutCommand) -> Result<()> {
    match command {
        RolloutCommand::Apply(args) => apply(args).await,
        RolloutCommand::Status(args) => status(args).await,
        RolloutCommand::Promote(args) => promote(args).await,
        RolloutCommand::Abort(args) => end(args, "abort").await,
        RolloutCommand::Delete(args) => delete(args).await,
    }
}

async fn apply(args: RolloutApplyArgs) -> Result<()> {
    let text = std::fs::read_to_string(&args.file)
        .with_context(|| format!("cannot read {}", args.file.display()))?;
    let name = graph_name(&text).with_context(|| format!("{}", args.file.display()))?;
    let server = Server::new(&args.connection.server, &args.connection.api_key)?;
    let answer = server
        .call(
            Method::PUT,
            &["api", "v1", "rollouts", &name],
            Payload::Bytes {
                body: text.into(),
                content_type: "application/toml",
                headers: Vec::new(),
                progress: false,
            },
        )
        .await
        .with_context(|| format!("{}", args.file.display()))?;
    print_json(&answer)
}

async fn status(args: RolloutStatusArgs) -> Result<()> {
    let server = Server::new(&args.connection.server, &args.connection.api_key)?;
    match &args.name {
        Some(name) => {
            server
                .call_and_print(Method::GET, &["api", "v1", "rollouts", name])
                .await
        }
        None => {
            server
                .call_and_print(Method::GET, &["api", "v1", "rollouts"])
                .await
        }
    }
}

async fn promote(args: RolloutPromoteArgs) -> Result<()> {
    let server = Server::new(&args.connection.server, &args.connection.api_key)?;
    let body = match &args.arm {
        Some(arm) => json!({ "arm": arm }),
        None => json!({}),
    };
    let answer = server
        .call(
            Method::POST,
            &["api", "v1", "rollouts", &args.name, "promote"],
            Payload::Json(body),
        )
        .await?;
    print_json(&answer)
}

async fn end(args: RolloutNameArgs, action: &str) -> Result<()> {
    Server::new(&args.connection.server, &args.connection.api_key)?
        .call_and_print(Method::POST, &["api", "v1", "rollouts", &args.name, action])
        .await
}

async fn delete(args: RolloutNameArgs) -> Result<()> {
    Server::new(&args.connection.server, &args.connection.api_key)?
        .call_and_print(Method::DELETE, &["api", "v1", "rollouts", &args.name])
        .await
}
