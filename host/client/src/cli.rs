//! The client subcommands' command line: clap enums and argument structs, with `WEFT_*`
//! environment fallbacks for the server address and keys.
//!
//! Kept apart from the code that runs them so the `weft` binary (host/server's cli.rs) can merge
//! these enums into its own with `#[command(flatten)]`, and so parsing is testable on its own.
//! The graph commands are a separate enum ([`GraphClientCommand`]) because the binary already has
//! a `weft graph` group (`graph check`, which works offline) that these join.

use std::fmt;
use std::path::PathBuf;

use clap::Subcommand;

/// The server address every client command needs.
pub const DEFAULT_SERVER: &str = "http://127.0.0.1:8000";

/// Server address plus a tenant API key: what tenant commands (uploads, lists, inference) need.
#[derive(Clone, clap::Args)]
pub struct TenantConnection {
    /// Base URL of the Weft server.
    #[arg(long, env = "WEFT_SERVER", default_value = DEFAULT_SERVER)]
    pub server: String,
    /// The tenant's API key (`weft_...`), sent as `Authorization: Bearer`.
    #[arg(long, env = "WEFT_API_KEY", hide_env_values = true)]
    pub api_key: String,
}

/// Server address plus the operator's admin key: what tenant administration needs.
#[derive(Clone, clap::Args)]
pub struct AdminConnection {
    /// Base URL of the Weft server.
    #[arg(long, env = "WEFT_SERVER", default_value = DEFAULT_SERVER)]
    pub server: String,
    /// The operator's admin key (the one given to `weft serve --admin-key`).
    #[arg(long, env = "WEFT_ADMIN_KEY", hide_env_values = true)]
    pub admin_key: String,
}

// Hand-written so that a stray `{:?}` never prints a key.
impl fmt::Debug for TenantConnection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TenantConnection")
            .field("server", &self.server)
            .field("api_key", &"<redacted>")
            .finish()
    }
}

impl fmt::Debug for AdminConnection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AdminConnection")
            .field("server", &self.server)
            .field("admin_key", &"<redacted>")
            .finish()
    }
}

/// The client subcommands of `weft` (all but `weft graph ...`, see [`GraphClientCommand`]).
#[derive(Debug, Subcommand)]
pub enum ClientCommand {
    /// Plugin signing keys: generate a key pair, register or revoke its public half.
    #[command(subcommand)]
    Key(KeyCommand),
    /// Sign, upload, list and delete a tenant's Wasm plugins.
    #[command(subcommand)]
    Plugin(PluginCommand),
    /// Upload, list and delete a tenant's ONNX models.
    #[command(subcommand)]
    Model(ModelCommand),
    /// Administer tenants (needs the operator's admin key).
    #[command(subcommand)]
    Tenant(TenantCommand),
    /// Send a V2 JSON inference request to a model or graph and print the response.
    Infer(InferArgs),
    /// Canary rollouts and A/B experiments: apply a rollout file, watch it, end it by hand.
    #[command(subcommand)]
    Rollout(RolloutCommand),
    /// Batch inference jobs: submit a JSON Lines file of V2 requests, follow it, fetch results.
    #[command(subcommand)]
    Job(JobCommand),
}

/// `weft job ...`
#[derive(Debug, Subcommand)]
pub enum JobCommand {
    /// Submit a job: FILE (JSON Lines, one V2 inference request per line) run through
    /// --target, chunk by chunk, at a lower priority than real-time requests.
    Submit(JobSubmitArgs),
    /// Show a job (rows done, failed and total, rows/s, ETA); without an id, every job.
    Status(JobStatusArgs),
    /// Follow a job with a progress bar until it ends; fails unless it succeeded.
    Wait(JobWaitArgs),
    /// Cancel a job: a queued one at once, a running one at its next row.
    Cancel(JobIdArgs),
    /// Download a finished job's output file (or --errors), in input order.
    Results(JobResultsArgs),
    /// Delete an ended job and its files.
    Delete(JobIdArgs),
}

#[derive(Debug, clap::Args)]
pub struct JobSubmitArgs {
    #[command(flatten)]
    pub connection: TenantConnection,
    /// The model or graph to run every row through.
    #[arg(long)]
    pub target: String,
    /// Its version (default: the current one).
    #[arg(long)]
    pub version: Option<u64>,
    /// Rows per committed chunk (what a crash can cost; default 1000).
    #[arg(long)]
    pub chunk_rows: Option<u64>,
    /// Seconds the job may take (default and most: the tenant's max_job_seconds).
    #[arg(long)]
    pub deadline_seconds: Option<u64>,
    /// Run a file the tenant's jobs already hold (its digest) instead of uploading FILE.
    #[arg(long, value_name = "DIGEST")]
    pub input: Option<String>,
    /// Follow the job until it ends, as `weft job wait` does.
    #[arg(long)]
    pub wait: bool,
    /// Print upload and job progress even when stderr is not a terminal.
    #[arg(long)]
    pub progress: bool,
    /// The input: JSON Lines of V2 inference requests.
    #[arg(value_name = "FILE.jsonl")]
    pub file: Option<PathBuf>,
}

#[derive(Debug, clap::Args)]
pub struct JobStatusArgs {
    #[command(flatten)]
    pub connection: TenantConnection,
    /// Job id (default: list every job).
    pub id: Option<String>,
}

#[derive(Debug, clap::Args)]
pub struct JobWaitArgs {
    #[command(flatten)]
    pub connection: TenantConnection,
    /// Job id.
    pub id: String,
    /// How often to ask, in milliseconds.
    #[arg(long, default_value_t = 500)]
    pub interval_ms: u64,
    /// Print progress lines even when stderr is not a terminal.
    #[arg(long)]
    pub progress: bool,
}

#[derive(Debug, clap::Args)]
pub struct JobIdArgs {
    #[command(flatten)]
    pub connection: TenantConnection,
    /// Job id.
    pub id: String,
}

#[derive(Debug, clap::Args)]
pub struct JobResultsArgs {
    #[command(flatten)]
    pub connection: TenantConnection,
    /// Job id.
    pub id: String,
    /// The error file instead of the output file.
    #[arg(long)]
    pub errors: bool,
    /// Write to this file instead of stdout.
    #[arg(long, short)]
    pub output: Option<PathBuf>,
}

/// `weft rollout ...`
#[derive(Debug, Subcommand)]
pub enum RolloutCommand {
    /// Apply a rollout TOML file (its `name` key names it). The same file again changes
    /// nothing; a changed file starts the rollout again at its first step.
    Apply(RolloutApplyArgs),
    /// Show a rollout: its phase, step, weights, each arm's numbers and every decision with
    /// the numbers behind it. Without a name, every rollout of this tenant.
    Status(RolloutStatusArgs),
    /// End a rollout now: a canary's candidate (or an experiment's --arm) takes all traffic.
    Promote(RolloutPromoteArgs),
    /// Stop a rollout now: the stable (an experiment's first arm) takes all traffic again.
    Abort(RolloutNameArgs),
    /// Delete a rollout: its target name serves as it did before the rollout.
    Delete(RolloutNameArgs),
}

#[derive(Debug, clap::Args)]
pub struct RolloutApplyArgs {
    #[command(flatten)]
    pub connection: TenantConnection,
    /// Rollout TOML file.
    #[arg(value_name = "FILE.toml")]
    pub file: PathBuf,
}

#[derive(Debug, clap::Args)]
pub struct RolloutStatusArgs {
    #[command(flatten)]
    pub connection: TenantConnection,
    /// Rollout name (default: list every rollout).
    pub name: Option<String>,
}

#[derive(Debug, clap::Args)]
pub struct RolloutPromoteArgs {
    #[command(flatten)]
    pub connection: TenantConnection,
    /// Rollout name.
    pub name: String,
    /// The winning arm of an experiment.
    #[arg(long)]
    pub arm: Option<String>,
}

#[derive(Debug, clap::Args)]
pub struct RolloutNameArgs {
    #[command(flatten)]
    pub connection: TenantConnection,
    /// Rollout name.
    pub name: String,
}

/// `weft key ...`
#[derive(Debug, Subcommand)]
pub enum KeyCommand {
    /// Generate an ed25519 key pair: PREFIX.key (secret, mode 0600) and PREFIX.pub. Prints the key id.
    Gen(KeyGenArgs),
    /// Register a key with the server, so plugins it signs may be pushed: asks the server for a
    /// challenge and answers it with a signature by the key (proof of possession); only the
    /// public key and that signature are sent.
    Register(KeyRegisterArgs),
    /// List the signing keys registered for this tenant.
    List(TenantConnection),
    /// Revoke a registered signing key: plugins it signed stop loading.
    Revoke(KeyRevokeArgs),
}

#[derive(Debug, clap::Args)]
pub struct KeyGenArgs {
    /// Path prefix of the files to write: PREFIX.key and PREFIX.pub (neither may exist).
    #[arg(long, value_name = "PREFIX")]
    pub out: PathBuf,
}

#[derive(Debug, clap::Args)]
pub struct KeyRegisterArgs {
    #[command(flatten)]
    pub connection: TenantConnection,
    /// Secret key file written by `weft key gen` (PREFIX.key). It signs the server's challenge
    /// here and never leaves this machine.
    #[arg(value_name = "PREFIX.key")]
    pub secret_file: PathBuf,
}

#[derive(Debug, clap::Args)]
pub struct KeyRevokeArgs {
    #[command(flatten)]
    pub connection: TenantConnection,
    /// Key id, as printed by `weft key gen` or `weft key list`.
    pub id: String,
}

/// `weft plugin ...`
#[derive(Debug, Subcommand)]
pub enum PluginCommand {
    /// Build a Python plugin (one module using `weft_plugin`) into a component with
    /// componentize-py, against the weft:plugin world of its role (offline).
    Build(PluginBuildArgs),
    /// Sign a plugin component with a secret key for one tenant, writing a detached signature
    /// file (offline).
    Sign(PluginSignArgs),
    /// Upload a signed plugin component as a new version.
    Push(PluginPushArgs),
    /// List this tenant's plugins and their versions.
    List(TenantConnection),
    /// Delete a plugin (all versions) or one version of it.
    Delete(PluginDeleteArgs),
}

/// The roles a plugin can have, named as in the `weft:plugin` worlds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum PluginRole {
    Transformer,
    Combiner,
    Router,
}

#[derive(Debug, clap::Args)]
pub struct PluginBuildArgs {
    /// The plugin's role [default: read from its decorator: @transformer, @combiner or @router].
    #[arg(long)]
    pub role: Option<PluginRole>,
    /// Where to write the component [default: the module's path with .wasm, e.g. app.wasm].
    #[arg(long, short, value_name = "FILE.wasm")]
    pub out: Option<PathBuf>,
    /// The componentize-py program (0.25; `pip install componentize-py==0.25.1`).
    #[arg(long, env = "WEFT_COMPONENTIZE_PY", default_value = "componentize-py")]
    pub componentize_py: PathBuf,
    /// The plugin's Python module (e.g. app.py); other modules in its directory may be imported.
    #[arg(value_name = "APP.py")]
    pub file: PathBuf,
}

#[derive(Debug, clap::Args)]
pub struct PluginSignArgs {
    /// Secret key file written by `weft key gen` (PREFIX.key).
    #[arg(long, value_name = "PREFIX.key")]
    pub key: PathBuf,
    /// The tenant that will push the plugin (the name `weft tenant create` gave it; `weft key
    /// register` prints it). The signature is valid for this tenant only.
    #[arg(long, env = "WEFT_TENANT")]
    pub tenant: String,
    /// Plugin name the signature is for.
    #[arg(long)]
    pub name: String,
    /// Plugin version the signature is for.
    #[arg(long)]
    pub version: String,
    /// Where to write the signature [default: FILE.sig, e.g. plugin.wasm.sig].
    #[arg(long, value_name = "FILE.sig")]
    pub out: Option<PathBuf>,
    /// The plugin component (.wasm).
    #[arg(value_name = "FILE.wasm")]
    pub file: PathBuf,
}

#[derive(Debug, clap::Args)]
pub struct PluginPushArgs {
    #[command(flatten)]
    pub connection: TenantConnection,
    /// Plugin name.
    #[arg(long)]
    pub name: String,
    /// Plugin version (a new one: versions are immutable).
    #[arg(long)]
    pub version: String,
    /// Signature file from `weft plugin sign` [default: FILE.sig, e.g. plugin.wasm.sig].
    #[arg(long, value_name = "FILE.sig")]
    pub signature: Option<PathBuf>,
    /// Print upload progress on stderr even when it is not a terminal (bodies over 1 MiB).
    #[arg(long)]
    pub progress: bool,
    /// The plugin component (.wasm).
    #[arg(value_name = "FILE.wasm")]
    pub file: PathBuf,
}

#[derive(Debug, clap::Args)]
pub struct PluginDeleteArgs {
    #[command(flatten)]
    pub connection: TenantConnection,
    /// Plugin name.
    pub name: String,
    /// Delete only this version (default: every version).
    #[arg(long)]
    pub version: Option<String>,
}

/// `weft model ...`
#[derive(Debug, Subcommand)]
pub enum ModelCommand {
    /// Upload an ONNX model and its model.toml as a new version; the server loads it before storing.
    Push(ModelPushArgs),
    /// List this tenant's models and their versions.
    List(TenantConnection),
    /// Delete a model (all versions) or one version of it.
    Delete(ModelDeleteArgs),
}

#[derive(Debug, clap::Args)]
pub struct ModelPushArgs {
    #[command(flatten)]
    pub connection: TenantConnection,
    /// Model name.
    #[arg(long)]
    pub name: String,
    /// Model version (a new one, 1 or more: versions are immutable).
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    pub version: u64,
    /// The model's configuration (model.toml).
    #[arg(long, value_name = "model.toml")]
    pub config: PathBuf,
    /// Print upload progress on stderr even when it is not a terminal (bodies over 1 MiB).
    #[arg(long)]
    pub progress: bool,
    /// The ONNX model file.
    #[arg(value_name = "FILE.onnx")]
    pub file: PathBuf,
}

#[derive(Debug, clap::Args)]
pub struct ModelDeleteArgs {
    #[command(flatten)]
    pub connection: TenantConnection,
    /// Model name.
    pub name: String,
    /// Delete only this version (default: every version).
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    pub version: Option<u64>,
}

/// The server-side `weft graph ...` commands; the binary adds them next to its offline `check`.
#[derive(Debug, Subcommand)]
pub enum GraphClientCommand {
    /// Upload graph TOML files, each as a new version of the graph its `name` key names.
    Apply(GraphApplyArgs),
    /// List this tenant's graphs and their versions.
    List(TenantConnection),
    /// Delete a graph (all versions) or one version of it.
    Delete(GraphDeleteArgs),
}

#[derive(Debug, clap::Args)]
pub struct GraphApplyArgs {
    #[command(flatten)]
    pub connection: TenantConnection,
    /// Only check the files against this tenant's plugins, models and shared names, exactly as
    /// an apply would (same errors); store nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Graph TOML files.
    #[arg(required = true, value_name = "FILE.toml")]
    pub files: Vec<PathBuf>,
}

#[derive(Debug, clap::Args)]
pub struct GraphDeleteArgs {
    #[command(flatten)]
    pub connection: TenantConnection,
    /// Graph name.
    pub name: String,
    /// Delete only this version (default: every version).
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    pub version: Option<u64>,
}

/// `weft tenant ...` (admin key).
#[derive(Debug, Subcommand)]
pub enum TenantCommand {
    /// Create a tenant; prints it and its first API key, which is shown only this once.
    Create(TenantCreateArgs),
    /// List tenants.
    List(AdminConnection),
    /// Show one tenant: quotas, shared models, keys, usage.
    Show(TenantNameArgs),
    /// Change a tenant's quotas or shared models.
    Update(TenantUpdateArgs),
    /// Delete a tenant and everything it stored.
    Delete(TenantNameArgs),
    /// Create or revoke a tenant's API keys.
    #[command(subcommand)]
    Key(TenantKeyCommand),
}

#[derive(Debug, clap::Args)]
pub struct TenantCreateArgs {
    #[command(flatten)]
    pub connection: AdminConnection,
    /// Tenant name.
    pub name: String,
    /// Quotas as a JSON object; fields left out keep their defaults,
    /// e.g. '{"requests_per_second": 50, "max_models": 5}'.
    #[arg(long, value_name = "JSON")]
    pub quotas: Option<String>,
    /// A platform (repository) model or graph this tenant may use; repeat for more, "*" for all.
    #[arg(long = "share", value_name = "MODEL")]
    pub shared_models: Vec<String>,
}

#[derive(Debug, clap::Args)]
pub struct TenantUpdateArgs {
    #[command(flatten)]
    pub connection: AdminConnection,
    /// Tenant name.
    pub name: String,
    /// New quotas as a JSON object (fields left out are unchanged).
    #[arg(long, value_name = "JSON")]
    pub quotas: Option<String>,
    /// Replace the shared models with these (repeat for more, "*" for all).
    #[arg(long = "share", value_name = "MODEL", conflicts_with = "share_none")]
    pub shared_models: Vec<String>,
    /// Share no platform models any more.
    #[arg(long)]
    pub share_none: bool,
}

#[derive(Debug, clap::Args)]
pub struct TenantNameArgs {
    #[command(flatten)]
    pub connection: AdminConnection,
    /// Tenant name.
    pub name: String,
}

/// `weft tenant key ...`
#[derive(Debug, Subcommand)]
pub enum TenantKeyCommand {
    /// Create another API key for a tenant; prints it (shown only this once).
    Create(TenantNameArgs),
    /// Revoke one of a tenant's API keys.
    Revoke(TenantKeyRevokeArgs),
}

#[derive(Debug, clap::Args)]
pub struct TenantKeyRevokeArgs {
    #[command(flatten)]
    pub connection: AdminConnection,
    /// Tenant name.
    pub name: String,
    /// API key id (the 16 hex characters after `weft_`).
    pub id: String,
}

#[derive(Debug, clap::Args)]
pub struct InferArgs {
    #[command(flatten)]
    pub connection: TenantConnection,
    /// Model or graph name.
    pub model: String,
    /// Model version (default: the server's choice).
    #[arg(long)]
    pub version: Option<String>,
    /// V2 JSON request body: a file, or - for stdin.
    #[arg(long, value_name = "FILE|-", default_value = "-")]
    pub input: PathBuf,
}
