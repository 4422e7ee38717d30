//! `model.toml`: a model's serving configuration, with Triton's names, in TOML.
//!
//! ```toml
//! platform = "onnx"
//! max_batch_size = 64              # 0: the model does not batch; dims then include dim 0
//! version_policy = { latest = 1 }  # or "all", or { specific = [1, 3] }
//!
//! [dynamic_batching]               # optional: merge concurrent requests (Triton's names)
//! preferred_batch_size = [16, 32]  # sizes worth sending at once
//! max_queue_delay_microseconds = 200   # longest the oldest request waits for a bigger batch
//! max_queue_size = 1024            # waiting requests beyond this get 503
//! default_timeout_microseconds = 0 # a request waiting longer gets 504; 0 = no limit
//!
//! isolation = "in_process"        # or "process": run it in a sandboxed model worker
//! allow_external_data = false      # repository models only: let ONNX Runtime read the
//!                                  # external-data files next to the model (trusted models)
//!
//! [ort]
//! instance_count = 2               # sessions that run concurrently (default: one per core
//!                                  # on the CPU, 1 on a GPU)
//! intra_op_threads = 1
//! optimization_level = "all"       # disable | basic | extended | all
//! execution = "cpu"                # or "cuda": ONNX Runtime's CUDA provider, never a silent
//!                                  # CPU fallback (the model is UNAVAILABLE with the reason)
//! device = 0                       # the CUDA device ordinal, with execution = "cuda"
//!
//! [[input]]                        # optional: checked against the model at load
//! name = "x"
//! datatype = "FP32"
//! dims = [64]                      # without the batch dim when max_batch_size > 0
//! ```
//! Unknown keys are errors, and every error names the file, line and key.

use std::path::Path;

use serde::Deserialize;
use weft_core::{DataType, Error, Result};

/// The parsed `model.toml`.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    /// Backend that runs the model. Only `"onnx"` exists today.
    pub platform: Platform,
    /// Largest dimension 0 in one request; 0 means the model takes whole tensors as they are.
    #[serde(default)]
    pub max_batch_size: usize,
    #[serde(default)]
    pub version_policy: VersionPolicy,
    #[serde(default)]
    pub ort: OrtOptions,
    /// Where the model runs. Repository models default to `in_process`; tenant uploads always
    /// run in a sandboxed model worker (`process`) and may not ask otherwise.
    /// `None`: the default of whoever owns the model.
    #[serde(default)]
    pub isolation: Option<Isolation>,
    /// Let ONNX Runtime follow the model's external-data references (files next to the model).
    /// Off by default even for repository models; refused for tenant uploads.
    #[serde(default)]
    pub allow_external_data: bool,
    /// Merge concurrent requests into one backend call; off when absent.
    pub dynamic_batching: Option<DynamicBatching>,
    /// Never unloaded once loaded (a tenant model otherwise unloads when the replica's
    /// --model-memory-budget needs its room and no request is using it).
    #[serde(default)]
    pub pin: bool,
    /// Declared inputs, checked against the model's own metadata at load.
    #[serde(default, rename = "input")]
    pub inputs: Vec<DeclaredTensor>,
    /// Declared outputs, checked likewise.
    #[serde(default, rename = "output")]
    pub outputs: Vec<DeclaredTensor>,
}

/// Where a model's ONNX Runtime sessions live.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Isolation {
    /// In the server's own process: the fastest path, for trusted (operator) models.
    #[default]
    InProcess,
    /// In a sandboxed model worker process (no filesystem, no network, memory-limited).
    Process,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Platform {
    Onnx,
}

/// Which numeric version folders are served (Triton's version_policy).
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum VersionPolicy {
    /// Every version folder.
    All,
    /// The N highest version numbers.
    Latest(usize),
    /// Exactly these versions; a listed version with no folder is reported unavailable.
    Specific(Vec<u64>),
}

impl Default for VersionPolicy {
    fn default() -> Self {
        VersionPolicy::Latest(1)
    }
}

impl VersionPolicy {
    /// The versions to serve out of those found on disk, ascending.
    pub fn select(&self, mut found: Vec<u64>) -> Vec<u64> {
        found.sort_unstable();
        match self {
            VersionPolicy::All => found,
            VersionPolicy::Latest(count) => {
                let skip = found.len().saturating_sub(*count);
                found.split_off(skip)
            }
            VersionPolicy::Specific(wanted) => {
                let mut wanted = wanted.clone();
                wanted.sort_unstable();
                wanted.dedup();
                wanted
            }
        }
    }
}

/// `[dynamic_batching]`, with Triton's names.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DynamicBatching {
    #[serde(default)]
    pub preferred_batch_size: Vec<usize>,
    #[serde(default = "default_queue_delay")]
    pub max_queue_delay_microseconds: u64,
    #[serde(default = "default_queue_size")]
    pub max_queue_size: usize,
    #[serde(default)]
    pub default_timeout_microseconds: u64,
}

/// The longest batch delay a model may ask for (a tenant's model too): far above any useful
/// delay, and far below what would overflow a deadline or hold requests for minutes.
pub const MAX_QUEUE_DELAY_MICROSECONDS: u64 = 10_000_000;

/// The longest queue timeout a model may ask for.
pub const MAX_QUEUE_TIMEOUT_MICROSECONDS: u64 = 3_600_000_000;

fn default_queue_delay() -> u64 {
    100
}

fn default_queue_size() -> usize {
    4096
}

/// ONNX Runtime session options.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OrtOptions {
    /// Sessions per model version; requests run on whichever is free, so up to this many run at
    /// once. 0 = one per CPU core.
    pub instance_count: usize,
    /// Threads ONNX Runtime uses inside one operator. 0 = cores / instance_count, at least 1.
    pub intra_op_threads: usize,
    /// Threads across independent operators (only with parallel execution).
    pub inter_op_threads: usize,
    pub optimization_level: OptimizationLevel,
    /// Where the sessions run.
    pub execution: ExecutionKind,
    /// The CUDA device ordinal (only with `execution = "cuda"`).
    pub device: Option<u32>,
}

impl Default for OrtOptions {
    fn default() -> Self {
        OrtOptions {
            instance_count: 0,
            intra_op_threads: 0,
            inter_op_threads: 1,
            optimization_level: OptimizationLevel::All,
            execution: ExecutionKind::Cpu,
            device: None,
        }
    }
}

/// `[ort] execution`: the CPU, or ONNX Runtime's CUDA execution provider.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ExecutionKind {
    #[default]
    Cpu,
    Cuda,
}

impl OrtOptions {
    /// The CUDA device the model runs on, or `None` on the CPU.
    pub fn cuda_device(&self) -> Option<u32> {
        match self.execution {
            ExecutionKind::Cpu => None,
            ExecutionKind::Cuda => Some(self.device.unwrap_or(0)),
        }
    }
}

impl OrtOptions {
    /// `(instance_count, intra_op_threads)` with the zero defaults resolved for `cores`, so that
    /// instances times threads does not oversubscribe the machine.
    pub fn resolved_threads(&self, cores: usize) -> (usize, usize) {
        let cores = cores.max(1);
        let instances = if self.instance_count == 0 {
            // One session per GPU, as Triton's default instance group; one per core on the
            // CPU.
            match self.execution {
                ExecutionKind::Cuda => 1,
                ExecutionKind::Cpu => cores,
            }
        } else {
            self.instance_count
        };
        let intra = if self.intra_op_threads == 0 {
            (cores / instances).max(1)
        } else {
            self.intra_op_threads
        };
        (instances, intra)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OptimizationLevel {
    Disable,
    Basic,
    Extended,
    All,
}

/// An input or output declared in `model.toml`.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeclaredTensor {
    pub name: String,
    pub datatype: DataType,
    /// Dimensions, -1 for variable; without the batch dimension when `max_batch_size > 0`.
    pub dims: Vec<i64>,
}

impl ModelConfig {
    /// Parses `text`, naming `path` (and toml's line, column and key) in any error.
    pub fn parse(path: &Path, text: &str) -> Result<Self> {
        let config: ModelConfig = parse_toml(path, text)?;
        if config.ort.execution == ExecutionKind::Cpu && config.ort.device.is_some() {
            return Err(Error::invalid(format!(
                "{}: [ort] device is a CUDA device ordinal; it needs execution = \"cuda\"",
                path.display()
            )));
        }
        if let Some(batching) = &config.dynamic_batching {
            let fail =
                |reason: String| Err(Error::invalid(format!("{}: {reason}", path.display())));
            if config.max_batch_size == 0 {
                return fail(
                    "[dynamic_batching] needs max_batch_size > 0 (the model must take a batch \
                     dimension)"
                        .into(),
                );
            }
            if let Some(bad) = batching
                .preferred_batch_size
                .iter()
                .find(|&&size| size == 0 || size > config.max_batch_size)
            {
                return fail(format!(
                    "preferred_batch_size {bad} is not within 1..={} (max_batch_size)",
                    config.max_batch_size
                ));
            }
            if batching.max_queue_size == 0 {
                return fail("max_queue_size must be above 0".into());
            }
            if batching.max_queue_delay_microseconds > MAX_QUEUE_DELAY_MICROSECONDS {
                return fail(format!(
                    "max_queue_delay_microseconds {} is more than {MAX_QUEUE_DELAY_MICROSECONDS} \
                     (10 s): a batch delay is a few hundred microseconds",
                    batching.max_queue_delay_microseconds
                ));
            }
            if batching.default_timeout_microseconds > MAX_QUEUE_TIMEOUT_MICROSECONDS {
                return fail(format!(
                    "default_timeout_microseconds {} is more than \
                     {MAX_QUEUE_TIMEOUT_MICROSECONDS} (1 h)",
                    batching.default_timeout_microseconds
                ));
            }
        }
        Ok(config)
    }
}

/// What [`parse_toml_within`] checks before the TOML parser sees a byte: the size of the text
/// and how deeply its arrays and inline tables nest. The `toml` crate (1.x) refuses nesting
/// past 80 itself unless some crate in the build turns on its `unbounded` feature; this bound
/// does not depend on that, and is far lower: no Weft file needs more than 2.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TomlLimits {
    pub max_bytes: usize,
    /// The limit's name in error messages, e.g. `toml.max_bytes`.
    pub bytes_key: &'static str,
    pub max_depth: usize,
    pub depth_key: &'static str,
}

impl Default for TomlLimits {
    /// For every TOML file but graphs (which have [`crate::graph::GraphLimits`]): 1 MiB, and
    /// nesting 16.
    fn default() -> Self {
        TomlLimits {
            max_bytes: 1 << 20,
            bytes_key: "toml.max_bytes",
            max_depth: 16,
            depth_key: "toml.max_depth",
        }
    }
}

/// Most of toml's error message a caller gets back: it quotes the offending line, which may be
/// the whole (megabyte-long) file.
const MAX_ERROR_CHARS: usize = 2_000;

/// Deserializes TOML content within the default [`TomlLimits`], prefixing any error with `path`;
/// toml's own message already names the line, column and key. Shared by every TOML file Weft
/// reads.
pub fn parse_toml<T: serde::de::DeserializeOwned>(path: &Path, text: &str) -> Result<T> {
    parse_toml_within(path, text, &TomlLimits::default())
}

/// [`parse_toml`] within `limits`, both checked (in one linear pass at most) before parsing.
pub fn parse_toml_within<T: serde::de::DeserializeOwned>(
    path: &Path,
    text: &str,
    limits: &TomlLimits,
) -> Result<T> {
    if text.len() > limits.max_bytes {
        return Err(Error::invalid(format!(
            "{}: the file is {} bytes; the limit is {} ({})",
            path.display(),
            text.len(),
            limits.max_bytes,
            limits.bytes_key
        )));
    }
    if let Some(line) = nesting_beyond(text, limits.max_depth) {
        return Err(Error::invalid(format!(
            "{}: line {line}: arrays and tables nest {} deep; the limit is {} ({})",
            path.display(),
            limits.max_depth.saturating_add(1),
            limits.max_depth,
            limits.depth_key
        )));
    }
    toml::from_str(text).map_err(|error| {
        let message = error.to_string();
        let message = message.trim_end();
        let message = match message.char_indices().nth(MAX_ERROR_CHARS) {
            Some((cut, _)) => format!("{}...", &message[..cut]),
            None => message.to_string(),
        };
        Error::invalid(format!("{}: {message}", path.display()))
    })
}

/// The 1-based line where `[` and `{` outside strings and comments first nest deeper than
/// `max_depth`, or `None`. One pass, no recursion, no allocation. It counts table headers'
/// brackets too (`[[node]]` is 2) and never counts less than the TOML parser nests: strings
/// end where TOML ends them (escapes in basic strings, up to two extra quotes before a
/// multi-line closing delimiter), and an unterminated single-line string ends at its line.
fn nesting_beyond(text: &str, max_depth: usize) -> Option<usize> {
    let bytes = text.as_bytes();
    let starts = |at: usize, token: &[u8]| bytes.get(at..at + token.len()) == Some(token);
    let (mut depth, mut line, mut at) = (0usize, 1usize, 0usize);
    while at < bytes.len() {
        match bytes[at] {
            b'\n' => {
                line += 1;
                at += 1;
            }
            b'#' => {
                while at < bytes.len() && bytes[at] != b'\n' {
                    at += 1;
                }
            }
            quote @ (b'"' | b'\'') => {
                let basic = quote == b'"';
                let triple = [quote; 3];
                if starts(at, &triple) {
                    at += 3;
                    while at < bytes.len() && !starts(at, &triple) {
                        match bytes[at] {
                            b'\\' if basic => {
                                if bytes.get(at + 1) == Some(&b'\n') {
                                    line += 1;
                                }
                                at += 2;
                            }
                            b'\n' => {
                                line += 1;
                                at += 1;
                            }
                            _ => at += 1,
                        }
                    }
                    // The delimiter, and the one or two quotes TOML lets precede it.
                    while at < bytes.len() && bytes[at] == quote {
                        at += 1;
                    }
                } else {
                    at += 1;
                    while at < bytes.len() && bytes[at] != quote && bytes[at] != b'\n' {
                        // An escape never hides the newline that ends the string.
                        let escape =
                            basic && bytes[at] == b'\\' && bytes.get(at + 1) != Some(&b'\n');
                        at += if escape { 2 } else { 1 };
                    }
                    if at < bytes.len() && bytes[at] == quote {
                        at += 1;
                    }
                }
            }
            b'[' | b'{' => {
                depth += 1;
                if depth > max_depth {
                    return Some(line);
                }
                at += 1;
            }
            b']' | b'}' => {
                depth = depth.saturating_sub(1);
                at += 1;
            }
            _ => at += 1,
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<ModelConfig> {
        ModelConfig::parse(Path::new("models/m/model.toml"), text)
    }

    #[test]
    fn minimal_config_takes_defaults() {
        let config = parse("platform = \"onnx\"").unwrap();
        assert_eq!(config.max_batch_size, 0);
        assert_eq!(config.version_policy, VersionPolicy::Latest(1));
        assert_eq!(config.ort, OrtOptions::default());
    }

    #[test]
    fn cuda_execution_parses_and_device_needs_it() {
        let config =
            parse("platform = \"onnx\"\n[ort]\nexecution = \"cuda\"\ndevice = 1\n").unwrap();
        assert_eq!(config.ort.execution, ExecutionKind::Cuda);
        assert_eq!(config.ort.cuda_device(), Some(1));
        let default_device = parse("platform = \"onnx\"\n[ort]\nexecution = \"cuda\"\n").unwrap();
        assert_eq!(default_device.ort.cuda_device(), Some(0));
        let error = parse("platform = \"onnx\"\n[ort]\ndevice = 1\n").unwrap_err();
        assert!(
            error.to_string().contains("needs execution = \"cuda\""),
            "{error}"
        );
        let error = parse("platform = \"onnx\"\n[ort]\nexecution = \"tpu\"\n").unwrap_err();
        assert!(error.to_string().contains("execution"), "{error}");
        assert!(error.to_string().contains("models/m/model.toml"), "{error}");
    }

    #[test]
    fn full_config_parses() {
        let config = parse(
            r#"
platform = "onnx"
max_batch_size = 8
version_policy = { specific = [3, 1] }
[ort]
instance_count = 2
intra_op_threads = 1
optimization_level = "basic"
[[input]]
name = "x"
datatype = "FP32"
dims = [64]
[[output]]
name = "y"
datatype = "FP32"
dims = [10]
"#,
        )
        .unwrap();
        assert_eq!(config.version_policy, VersionPolicy::Specific(vec![3, 1]));
        assert_eq!(config.ort.optimization_level, OptimizationLevel::Basic);
        assert_eq!(config.inputs[0].datatype, DataType::Fp32);
        assert_eq!(config.outputs[0].dims, vec![10]);
    }

    #[test]
    fn unknown_key_names_file_line_and_key() {
        let error = parse("platform = \"onnx\"\nmax_batch = 4\n")
            .unwrap_err()
            .to_string();
        assert!(error.starts_with("models/m/model.toml: "), "{error}");
        assert!(error.contains("line 2"), "{error}");
        assert!(error.contains("unknown field `max_batch`"), "{error}");
    }

    #[test]
    fn bad_datatype_is_reported_with_its_line() {
        let error = parse(
            "platform = \"onnx\"\n[[input]]\nname = \"x\"\ndatatype = \"FLOAT\"\ndims = [1]\n",
        )
        .unwrap_err()
        .to_string();
        assert!(
            error.contains("line 4") && error.contains("unknown datatype 'FLOAT'"),
            "{error}"
        );
    }

    #[test]
    fn dynamic_batching_takes_tritons_names_and_is_checked() {
        let config = parse(
            "platform = \"onnx\"\nmax_batch_size = 32\n[dynamic_batching]\n\
             preferred_batch_size = [8, 16]\nmax_queue_delay_microseconds = 500\n",
        )
        .unwrap();
        let batching = config.dynamic_batching.unwrap();
        assert_eq!(batching.preferred_batch_size, vec![8, 16]);
        assert_eq!(batching.max_queue_delay_microseconds, 500);
        assert_eq!(batching.max_queue_size, 4096);
        assert_eq!(batching.default_timeout_microseconds, 0);

        let error = parse("platform = \"onnx\"\n[dynamic_batching]\n")
            .unwrap_err()
            .to_string();
        assert!(error.contains("needs max_batch_size > 0"), "{error}");
        let error = parse(
            "platform = \"onnx\"\nmax_batch_size = 8\n[dynamic_batching]\npreferred_batch_size = [16]\n",
        )
        .unwrap_err()
        .to_string();
        assert!(
            error.contains("preferred_batch_size 16 is not within 1..=8"),
            "{error}"
        );
        let error =
            parse("platform = \"onnx\"\nmax_batch_size = 8\n[dynamic_batching]\nmax_delay = 1\n")
                .unwrap_err()
                .to_string();
        assert!(error.contains("unknown field `max_delay`"), "{error}");
    }

    #[test]
    fn batch_delays_and_timeouts_past_their_bounds_are_refused() {
        let config = |batching: &str| {
            ModelConfig::parse(
                Path::new("m/model.toml"),
                &format!(
                    "platform = \"onnx\"\nmax_batch_size = 8\n[dynamic_batching]\n{batching}\n"
                ),
            )
        };
        let error = config("max_queue_delay_microseconds = 18446744073709551615")
            .unwrap_err()
            .to_string();
        assert!(error.contains("max_queue_delay_microseconds"), "{error}");
        let error = config("default_timeout_microseconds = 18446744073709551615")
            .unwrap_err()
            .to_string();
        assert!(error.contains("default_timeout_microseconds"), "{error}");
        assert!(config("max_queue_delay_microseconds = 10000000").is_ok());
    }

    #[test]
    fn isolation_and_external_data_parse_and_default_closed() {
        let config = parse("platform = \"onnx\"").unwrap();
        assert_eq!(config.isolation, None);
        assert!(!config.allow_external_data);
        let config =
            parse("platform = \"onnx\"\nisolation = \"process\"\nallow_external_data = true")
                .unwrap();
        assert_eq!(config.isolation, Some(Isolation::Process));
        assert!(config.allow_external_data);
        let error = parse("platform = \"onnx\"\nisolation = \"vm\"")
            .unwrap_err()
            .to_string();
        assert!(error.contains("unknown variant `vm`"), "{error}");
    }

    #[test]
    fn version_policies_select_versions() {
        let found = vec![3, 1, 7, 2];
        assert_eq!(VersionPolicy::Latest(2).select(found.clone()), vec![3, 7]);
        assert_eq!(VersionPolicy::All.select(found.clone()), vec![1, 2, 3, 7]);
        assert_eq!(
            VersionPolicy::Specific(vec![9, 2]).select(found),
            vec![2, 9]
        );
        let policy: ModelConfig = parse("platform = \"onnx\"\nversion_policy = \"all\"").unwrap();
        assert_eq!(policy.version_policy, VersionPolicy::All);
    }

    #[test]
    fn nesting_is_counted_outside_strings_and_comments_only() {
        assert_eq!(nesting_beyond("a = [[1], {b = [2]}]", 3), None);
        assert_eq!(nesting_beyond("a = [[1], {b = [2]}]", 2), Some(1));
        assert_eq!(nesting_beyond("a = 1\nb = [[[1]]]", 2), Some(2));
        assert_eq!(nesting_beyond("[[node]]\n[node.params]", 2), None);
        // Strings of every kind, escapes, and comments hide their brackets.
        let hidden = [
            r#"a = "[[[[ \" [[[[""#,
            r"a = '[[[[ \' # [[[[",
            "a = \"\"\"\n[[[[\\\"\"\"[[[[\n\"\"\"",
            "a = '''[[[['''''",
            "# [[[[[[",
        ];
        for text in hidden {
            assert_eq!(nesting_beyond(text, 0), None, "{text}");
        }
        // A quote TOML would close (or an unterminated string's line end) does not hide what
        // follows.
        assert_eq!(nesting_beyond("a = '''x''''' [[1]]", 1), Some(1));
        assert_eq!(nesting_beyond("a = \"x\\\nb = [[1]]", 1), Some(2));
        assert_eq!(nesting_beyond("a = \"\" [[1]]", 1), Some(1));
        let deep = format!("a = {}", "[".repeat(100_000));
        assert_eq!(nesting_beyond(&deep, 16), Some(1));
    }

    #[test]
    fn every_toml_file_is_bounded_before_parsing() {
        let deep = format!(
            "platform = \"onnx\"\nversion_policy = {{ specific = {}1{} }}",
            "[".repeat(20),
            "]".repeat(20)
        );
        let error = parse(&deep).unwrap_err();
        assert_eq!(error.kind(), weft_core::ErrorKind::InvalidArgument);
        assert_eq!(
            error.to_string(),
            "models/m/model.toml: line 2: arrays and tables nest 17 deep; the limit is 16 \
             (toml.max_depth)"
        );
        let big = format!("platform = \"onnx\"\n# {}", "x".repeat(1 << 20));
        let error = parse(&big).unwrap_err().to_string();
        assert_eq!(
            error,
            format!(
                "models/m/model.toml: the file is {} bytes; the limit is 1048576 (toml.max_bytes)",
                big.len()
            )
        );
        // toml quotes the offending line; a long one is cut short.
        let long = format!("platform = \"onnx\"\nx = {}", "1".repeat(100_000));
        let error = parse(&long).unwrap_err().to_string();
        assert!(error.len() < 3_000 && error.ends_with("..."), "{error}");
    }

    #[test]
    fn thread_defaults_do_not_oversubscribe() {
        assert_eq!(OrtOptions::default().resolved_threads(2), (2, 1));
        let gpu = OrtOptions {
            execution: ExecutionKind::Cuda,
            ..OrtOptions::default()
        };
        assert_eq!(gpu.resolved_threads(16), (1, 16));
        assert_eq!(gpu.cuda_device(), Some(0));
        assert_eq!(OrtOptions::default().cuda_device(), None);
        let one = OrtOptions {
            instance_count: 1,
            ..OrtOptions::default()
        };
        assert_eq!(one.resolved_threads(4), (1, 4));
    }
}
