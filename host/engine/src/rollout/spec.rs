//! The rollout resource as a tenant writes it (TOML), parsed and bounded before anything
//! runs: names, arm references, steps, sticky assignment, analysis thresholds and the
//! experiment's output metric. Every refusal names the field and the limit.

use serde::Deserialize;
use weft_core::{Error, Result};

/// The most bytes a rollout file may have.
pub const MAX_SPEC_BYTES: usize = 16 * 1024;
/// The most steps a canary may walk.
pub const MAX_STEPS: usize = 32;
/// The most arms an experiment may split over.
pub const MAX_ARMS: usize = 8;
/// The longest analysis window, in seconds (the window keeps one bucket per second).
pub const MAX_WINDOW_SECONDS: u64 = 300;
/// The longest a step may hold: a week.
pub const MAX_HOLD_SECONDS: u64 = 7 * 24 * 3600;
/// The most mirrored calls in flight per rollout; a mirror past it is dropped and counted.
pub const MAX_SHADOW_IN_FLIGHT: usize = 256;

/// A canary (stable and candidate, walked through steps) or an experiment (fixed arms).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RolloutKind {
    #[default]
    Canary,
    Experiment,
}

/// What one arm serves: a model or a graph version, and for a graph optionally one plugin
/// pinned to another version than the current one.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ArmSpec {
    /// The arm's name in experiments; canaries name theirs `stable` and `candidate`.
    #[serde(default)]
    pub name: String,
    pub model: Option<String>,
    pub graph: Option<String>,
    pub version: u64,
    /// A plugin of the graph served at `plugin_version` instead of its current version.
    pub plugin: Option<String>,
    pub plugin_version: Option<String>,
    /// An experiment arm's share of traffic, in percent.
    #[serde(default)]
    pub weight: f64,
}

impl ArmSpec {
    /// The model or graph name the arm serves.
    pub fn served_name(&self) -> &str {
        self.model
            .as_deref()
            .or(self.graph.as_deref())
            .unwrap_or_default()
    }

    pub fn is_graph(&self) -> bool {
        self.graph.is_some()
    }

    /// `model 'm' version 2`, `graph 'g' version 1 with plugin 'p' 1.1.0`, for messages.
    pub fn describe(&self) -> String {
        let what = if self.is_graph() { "graph" } else { "model" };
        let mut text = format!("{what} '{}' version {}", self.served_name(), self.version);
        if let (Some(plugin), Some(version)) = (&self.plugin, &self.plugin_version) {
            text.push_str(&format!(" with plugin '{plugin}' {version}"));
        }
        text
    }
}

/// How a client keeps its arm: by a request header or a request parameter.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StickySpec {
    pub header: Option<String>,
    pub parameter: Option<String>,
}

/// One canary step: the candidate's share of traffic, the share of the stable's traffic
/// mirrored to the candidate, and how long the step holds before the next one.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StepSpec {
    #[serde(default)]
    pub weight: f64,
    #[serde(default)]
    pub shadow: f64,
    pub hold_seconds: u64,
}

/// How drift between candidate and stable outputs is measured on mirrored requests.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DriftMetric {
    /// The mean of |candidate - stable| over every element of the output.
    MeanAbsDiff,
    /// The share of rows whose largest element is at another index (classification).
    Top1Disagreement,
}

#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DriftSpec {
    pub output: String,
    pub metric: DriftMetric,
    pub max: f64,
}

/// The thresholds a window is judged by; a rule left out is not checked.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AnalysisSpec {
    #[serde(default = "default_window")]
    pub window_seconds: u64,
    /// The fewest candidate requests (served or mirrored) a window needs to be judged.
    #[serde(default = "default_min_requests")]
    pub min_requests: u64,
    pub max_error_rate: Option<f64>,
    pub max_trap_rate: Option<f64>,
    /// Candidate p50 over stable p50.
    pub max_p50_ratio: Option<f64>,
    pub max_p99_ratio: Option<f64>,
    /// Latencies under this many milliseconds never fail a ratio rule (noise, not a regression).
    #[serde(default = "default_latency_floor")]
    pub latency_floor_ms: f64,
    pub drift: Option<DriftSpec>,
}

fn default_window() -> u64 {
    10
}
fn default_min_requests() -> u64 {
    20
}
fn default_latency_floor() -> f64 {
    1.0
}

impl Default for AnalysisSpec {
    fn default() -> Self {
        AnalysisSpec {
            window_seconds: default_window(),
            min_requests: default_min_requests(),
            max_error_rate: None,
            max_trap_rate: None,
            max_p50_ratio: None,
            max_p99_ratio: None,
            latency_floor_ms: default_latency_floor(),
            drift: None,
        }
    }
}

/// How an experiment reduces one output of each answer to a number to compare arms by.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MetricReduce {
    /// The mean of the output's elements.
    Mean,
    /// The largest element.
    Max,
}

#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricSpec {
    pub output: String,
    pub reduce: MetricReduce,
}

/// One rollout, validated.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RolloutSpec {
    pub name: String,
    /// The name clients call; an unversioned call of it goes through the rollout.
    pub target: String,
    #[serde(default)]
    pub kind: RolloutKind,
    pub stable: Option<ArmSpec>,
    pub candidate: Option<ArmSpec>,
    #[serde(default)]
    pub arms: Vec<ArmSpec>,
    pub sticky: Option<StickySpec>,
    #[serde(default)]
    pub steps: Vec<StepSpec>,
    #[serde(default)]
    pub analysis: AnalysisSpec,
    pub metric: Option<MetricSpec>,
    /// The most mirrored calls in flight at once.
    #[serde(default = "default_shadow_in_flight")]
    pub shadow_max_in_flight: usize,
}

fn default_shadow_in_flight() -> usize {
    32
}

/// A name of a rollout, model, graph, plugin or arm: what the tenant namespace accepts.
fn check_name(field: &str, name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'))
        && !name.starts_with('.');
    if ok {
        Ok(())
    } else {
        Err(Error::invalid(format!(
            "{field} '{}' is not a valid name (1 to 64 of A-Z a-z 0-9 _ - ., not starting with '.')",
            name.chars().take(64).collect::<String>()
        )))
    }
}

fn check_percent(field: &str, value: f64) -> Result<()> {
    if value.is_finite() && (0.0..=100.0).contains(&value) {
        Ok(())
    } else {
        Err(Error::invalid(format!(
            "{field} is {value}; it must be a percentage from 0 to 100"
        )))
    }
}

fn check_positive(field: &str, value: Option<f64>) -> Result<()> {
    match value {
        Some(value) if !(value.is_finite() && value >= 0.0) => Err(Error::invalid(format!(
            "{field} is {value}; it must be a finite number >= 0"
        ))),
        _ => Ok(()),
    }
}

impl RolloutSpec {
    /// Parses and validates a rollout file; `path` only names it in messages.
    pub fn parse(path: &str, text: &str) -> Result<Self> {
        if text.len() > MAX_SPEC_BYTES {
            return Err(Error::invalid(format!(
                "{path}: a rollout file may have at most {MAX_SPEC_BYTES} bytes, this one has {}",
                text.len()
            )));
        }
        let spec: RolloutSpec = toml::from_str(text)
            .map_err(|error| Error::invalid(format!("{path}: {}", error.message())))?;
        spec.validate().map_err(|error| error.context(path))?;
        Ok(spec)
    }

    fn validate(&self) -> Result<()> {
        check_name("name", &self.name)?;
        check_name("target", &self.target)?;
        for arm in self.all_arms() {
            check_arm(arm)?;
        }
        match self.kind {
            RolloutKind::Canary => {
                let (Some(stable), Some(candidate)) = (&self.stable, &self.candidate) else {
                    return Err(Error::invalid(
                        "a canary needs a [stable] and a [candidate] table",
                    ));
                };
                if !self.arms.is_empty() {
                    return Err(Error::invalid(
                        "[[arms]] belong to experiments (kind = \"experiment\"); a canary has [stable] and [candidate]",
                    ));
                }
                if stable == candidate {
                    return Err(Error::invalid(
                        "the candidate is the stable; a canary compares two different versions",
                    ));
                }
                if self.steps.is_empty() || self.steps.len() > MAX_STEPS {
                    return Err(Error::invalid(format!(
                        "a canary needs 1 to {MAX_STEPS} [[steps]], it has {}",
                        self.steps.len()
                    )));
                }
                for (index, step) in self.steps.iter().enumerate() {
                    check_percent(&format!("steps[{index}].weight"), step.weight)?;
                    check_percent(&format!("steps[{index}].shadow"), step.shadow)?;
                    if step.hold_seconds > MAX_HOLD_SECONDS {
                        return Err(Error::invalid(format!(
                            "steps[{index}].hold_seconds is {}; at most {MAX_HOLD_SECONDS} (a week)",
                            step.hold_seconds
                        )));
                    }
                }
                if self.metric.is_some() {
                    return Err(Error::invalid(
                        "[metric] belongs to experiments; a canary measures drift with [analysis.drift]",
                    ));
                }
            }
            RolloutKind::Experiment => {
                if self.stable.is_some() || self.candidate.is_some() || !self.steps.is_empty() {
                    return Err(Error::invalid(
                        "an experiment has [[arms]] with weights, not [stable], [candidate] or [[steps]]",
                    ));
                }
                if self.arms.len() < 2 || self.arms.len() > MAX_ARMS {
                    return Err(Error::invalid(format!(
                        "an experiment needs 2 to {MAX_ARMS} [[arms]], it has {}",
                        self.arms.len()
                    )));
                }
                let mut total = 0.0;
                for (index, arm) in self.arms.iter().enumerate() {
                    check_name(&format!("arms[{index}].name"), &arm.name)?;
                    if self.arms[..index].iter().any(|seen| seen.name == arm.name) {
                        return Err(Error::invalid(format!("arm '{}' is named twice", arm.name)));
                    }
                    check_percent(&format!("arms[{index}].weight"), arm.weight)?;
                    total += arm.weight;
                }
                if (total - 100.0).abs() > 1e-6 {
                    return Err(Error::invalid(format!(
                        "the arms' weights add up to {total}; they must add up to 100"
                    )));
                }
            }
        }
        if let Some(sticky) = &self.sticky {
            match (&sticky.header, &sticky.parameter) {
                (Some(header), None) => {
                    let valid = !header.is_empty()
                        && header.len() <= 64
                        && header
                            .bytes()
                            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
                    if !valid {
                        return Err(Error::invalid(format!(
                            "sticky.header '{}' is not a header name (1 to 64 of A-Z a-z 0-9 - _)",
                            header.chars().take(64).collect::<String>()
                        )));
                    }
                }
                (None, Some(parameter)) => check_name("sticky.parameter", parameter)?,
                _ => {
                    return Err(Error::invalid(
                        "[sticky] takes exactly one of header or parameter",
                    ));
                }
            }
        }
        let analysis = &self.analysis;
        if analysis.window_seconds == 0 || analysis.window_seconds > MAX_WINDOW_SECONDS {
            return Err(Error::invalid(format!(
                "analysis.window_seconds is {}; it must be 1 to {MAX_WINDOW_SECONDS}",
                analysis.window_seconds
            )));
        }
        if analysis.min_requests == 0 || analysis.min_requests > 1_000_000 {
            return Err(Error::invalid(format!(
                "analysis.min_requests is {}; it must be 1 to 1000000",
                analysis.min_requests
            )));
        }
        for (field, value) in [
            ("analysis.max_error_rate", analysis.max_error_rate),
            ("analysis.max_trap_rate", analysis.max_trap_rate),
        ] {
            if let Some(rate) = value
                && !(rate.is_finite() && (0.0..=1.0).contains(&rate))
            {
                return Err(Error::invalid(format!(
                    "{field} is {rate}; it must be a fraction from 0 to 1"
                )));
            }
        }
        check_positive("analysis.max_p50_ratio", analysis.max_p50_ratio)?;
        check_positive("analysis.max_p99_ratio", analysis.max_p99_ratio)?;
        check_positive("analysis.latency_floor_ms", Some(analysis.latency_floor_ms))?;
        if let Some(drift) = &analysis.drift {
            check_name("analysis.drift.output", &drift.output)?;
            check_positive("analysis.drift.max", Some(drift.max))?;
            if self.kind == RolloutKind::Experiment {
                return Err(Error::invalid(
                    "analysis.drift compares a candidate with the stable; experiments compare arms with [metric]",
                ));
            }
        }
        if let Some(metric) = &self.metric {
            check_name("metric.output", &metric.output)?;
        }
        if self.shadow_max_in_flight == 0 || self.shadow_max_in_flight > MAX_SHADOW_IN_FLIGHT {
            return Err(Error::invalid(format!(
                "shadow_max_in_flight is {}; it must be 1 to {MAX_SHADOW_IN_FLIGHT}",
                self.shadow_max_in_flight
            )));
        }
        Ok(())
    }

    /// Every arm, in order: stable then candidate for a canary, the arms of an experiment.
    pub fn all_arms(&self) -> impl Iterator<Item = &ArmSpec> {
        self.stable
            .iter()
            .chain(self.candidate.iter())
            .chain(self.arms.iter())
    }

    /// The arm names clients and metrics see, in [`RolloutSpec::all_arms`] order.
    pub fn arm_names(&self) -> Vec<String> {
        match self.kind {
            RolloutKind::Canary => vec!["stable".into(), "candidate".into()],
            RolloutKind::Experiment => self.arms.iter().map(|arm| arm.name.clone()).collect(),
        }
    }
}

fn check_arm(arm: &ArmSpec) -> Result<()> {
    let which = if arm.name.is_empty() {
        "an arm".to_string()
    } else {
        format!("arm '{}'", arm.name)
    };
    match (&arm.model, &arm.graph) {
        (Some(name), None) => check_name("model", name)?,
        (None, Some(name)) => check_name("graph", name)?,
        _ => {
            return Err(Error::invalid(format!(
                "{which} names exactly one of model or graph"
            )));
        }
    }
    match (&arm.plugin, &arm.plugin_version) {
        (None, None) => {}
        (Some(plugin), Some(version)) => {
            if !arm.is_graph() {
                return Err(Error::invalid(format!(
                    "{which}: a plugin version can only be pinned inside a graph"
                )));
            }
            check_name("plugin", plugin)?;
            check_name("plugin_version", version)?;
        }
        _ => {
            return Err(Error::invalid(format!(
                "{which}: plugin and plugin_version go together"
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const CANARY: &str = r#"
name = "classifier-v2"
target = "classifier"
[stable]
model = "classifier"
version = 1
[candidate]
model = "classifier"
version = 2
[sticky]
header = "x-user-id"
[[steps]]
weight = 10
hold_seconds = 30
[[steps]]
weight = 50
shadow = 50
hold_seconds = 30
[analysis]
window_seconds = 10
max_error_rate = 0.05
max_p99_ratio = 1.5
drift = { output = "y", metric = "mean_abs_diff", max = 0.01 }
"#;

    #[test]
    fn a_canary_parses_with_its_defaults() {
        let spec = RolloutSpec::parse("r.toml", CANARY).unwrap();
        assert_eq!(spec.kind, RolloutKind::Canary);
        assert_eq!(spec.steps.len(), 2);
        assert_eq!(spec.analysis.min_requests, 20);
        assert_eq!(spec.arm_names(), ["stable", "candidate"]);
        assert_eq!(
            spec.candidate.as_ref().unwrap().describe(),
            "model 'classifier' version 2"
        );
    }

    #[test]
    fn an_experiment_parses_and_its_weights_must_add_up() {
        let text = r#"
name = "ab"
target = "scorer"
kind = "experiment"
[[arms]]
name = "a"
model = "scorer"
version = 1
weight = 50
[[arms]]
name = "b"
graph = "scorer-graph"
version = 3
plugin = "pre"
plugin_version = "1.1.0"
weight = 50
[metric]
output = "score"
reduce = "mean"
"#;
        let spec = RolloutSpec::parse("ab.toml", text).unwrap();
        assert_eq!(spec.arm_names(), ["a", "b"]);
        let error = RolloutSpec::parse("ab.toml", &text.replacen("weight = 50", "weight = 40", 1))
            .unwrap_err();
        assert!(error.message().contains("add up to 90"), "{error}");
    }

    #[test]
    fn bad_rollouts_are_refused_with_the_field_named() {
        let cases = [
            (
                CANARY.replace("version = 2", "version = 1"),
                "the candidate is the stable",
            ),
            (
                CANARY.replace("weight = 10", "weight = 110"),
                "steps[0].weight is 110",
            ),
            (
                CANARY.replace("window_seconds = 10", "window_seconds = 3600"),
                "window_seconds is 3600",
            ),
            (
                CANARY.replace("max_error_rate = 0.05", "max_error_rate = 5"),
                "max_error_rate is 5",
            ),
            (
                CANARY.replace("header = \"x-user-id\"", "header = \"x user\""),
                "sticky.header",
            ),
            (
                CANARY.replace("target = \"classifier\"", "target = \"../etc\""),
                "target '../etc'",
            ),
            (CANARY.replace("[sticky]", "[stickyy]"), "unknown field"),
            (
                CANARY.replace("model = \"classifier\"\nversion = 2", "version = 2"),
                "exactly one of model or graph",
            ),
            (
                CANARY.replace(
                    "target = \"classifier\"",
                    "target = \"classifier\"\nshadow_max_in_flight = 100000",
                ),
                "shadow_max_in_flight is 100000",
            ),
        ];
        for (text, expected) in cases {
            let error = RolloutSpec::parse("r.toml", &text).unwrap_err();
            assert!(error.message().contains(expected), "{expected}: {error}");
            assert!(error.message().starts_with("r.toml"), "{error}");
        }
        let huge = format!("{CANARY}#{}", "x".repeat(MAX_SPEC_BYTES));
        assert!(
            RolloutSpec::parse("r.toml", &huge)
                .unwrap_err()
                .message()
                .contains("at most")
        );
    }
}
