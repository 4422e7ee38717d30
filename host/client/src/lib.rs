//! The `weft` command line's client side: subcommands that work on signing keys and signature
//! files locally, and talk HTTP to a running Weft server (`/api/v1` control plane, `/v2` data
//! plane) for everything else.
//!
//! The `weft` binary (host/server's cli.rs) owns the top-level parser and dispatches here:
//! [`ClientCommand`] (key, plugin, model, tenant, infer) is flattened into its command enum and
//! run with [`run`]; [`GraphClientCommand`] (apply, list, delete) is flattened into its existing
//! `weft graph` group next to the offline `check`, and run with [`run_graph`]. Keeping this in its
//! own crate keeps the client free of the engine, wasmtime and ONNX Runtime.

mod cli;
mod graphs;
mod http;
mod infer;
mod jobs;
mod keys;
mod models;
mod plugins;
mod progress;
mod python;
mod rollouts;
mod tenants;

pub use cli::{
    AdminConnection, ClientCommand, DEFAULT_SERVER, GraphApplyArgs, GraphClientCommand,
    GraphDeleteArgs, InferArgs, JobCommand, JobIdArgs, JobResultsArgs, JobStatusArgs,
    JobSubmitArgs, JobWaitArgs, KeyCommand, KeyGenArgs, KeyRegisterArgs, KeyRevokeArgs,
    ModelCommand, ModelDeleteArgs, ModelPushArgs, PluginBuildArgs, PluginCommand, PluginDeleteArgs,
    PluginPushArgs, PluginRole, PluginSignArgs, RolloutApplyArgs, RolloutCommand, RolloutNameArgs,
    RolloutPromoteArgs, RolloutStatusArgs, TenantCommand, TenantConnection, TenantCreateArgs,
    TenantKeyCommand, TenantKeyRevokeArgs, TenantNameArgs, TenantUpdateArgs,
};

/// Runs a client subcommand. Needs a tokio runtime with I/O enabled (reqwest's requirement).
/// Output meant for scripts (JSON answers, key ids) goes to stdout, notes and progress to stderr.
pub async fn run(command: ClientCommand) -> anyhow::Result<()> {
    match command {
        ClientCommand::Key(command) => keys::run(command).await,
        ClientCommand::Plugin(command) => plugins::run(command).await,
        ClientCommand::Model(command) => models::run(command).await,
        ClientCommand::Tenant(command) => tenants::run(command).await,
        ClientCommand::Infer(args) => infer::run(args).await,
        ClientCommand::Rollout(command) => rollouts::run(command).await,
        ClientCommand::Job(command) => jobs::run(command).await,
    }
}

/// Runs `weft graph apply|list|delete`.
pub async fn run_graph(command: GraphClientCommand) -> anyhow::Result<()> {
    graphs::run(command).await
}

#[cfg(test)]
mod tests;
