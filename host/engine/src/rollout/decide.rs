//! The decisions of a canary, as pure functions of the window's numbers: judge a window
//! against the analysis rules (pass, fail with the rules it broke, or not enough data yet),
//! then say what the rollout does next (hold, advance, promote or roll back). Nothing here
//! reads a clock or a store, so every rule is unit-tested on plain numbers.

use serde::Serialize;

use super::spec::{AnalysisSpec, RolloutSpec};
use super::window::Counts;

/// The numbers a verdict was reached on, recorded with every decision.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Evidence {
    pub stable_requests: u64,
    pub candidate_requests: u64,
    pub candidate_failures: u64,
    pub candidate_traps: u64,
    pub error_rate: f64,
    pub trap_rate: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stable_p50_ms: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub candidate_p50_ms: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stable_p99_ms: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub candidate_p99_ms: Option<f64>,
    pub compared: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub drift: Option<f64>,
}

#[derive(Clone, Debug, PartialEq)]
pub enum Verdict {
    /// Every rule that has enough data passes, and the candidate saw enough requests.
    Pass,
    /// The rules that broke, each as a sentence with its numbers.
    Fail(Vec<String>),
    /// Not enough candidate requests in the window to say.
    Pending,
}

/// Judges one window. `stable` is what the stable served; `candidate` is everything the
/// candidate answered (served and mirrored), with drift from the mirrored comparisons.
pub fn judge(analysis: &AnalysisSpec, stable: &Counts, candidate: &Counts) -> (Verdict, Evidence) {
    let evidence = Evidence {
        stable_requests: stable.requests,
        candidate_requests: candidate.requests,
        candidate_failures: candidate.failures,
        candidate_traps: candidate.traps,
        error_rate: candidate.failure_rate(),
        trap_rate: candidate.trap_rate(),
        stable_p50_ms: stable.quantile_ms(0.5),
        candidate_p50_ms: candidate.quantile_ms(0.5),
        stable_p99_ms: stable.quantile_ms(0.99),
        candidate_p99_ms: candidate.quantile_ms(0.99),
        compared: candidate.compared,
        drift: candidate.drift(),
    };
    let enough = candidate.requests >= analysis.min_requests;
    let mut broken = Vec::new();
    if enough {
        if let Some(max) = analysis.max_error_rate
            && evidence.error_rate > max
        {
            broken.push(format!(
                "error rate {:.3} > {max} ({} of {} requests failed)",
                evidence.error_rate, candidate.failures, candidate.requests
            ));
        }
        if let Some(max) = analysis.max_trap_rate
            && evidence.trap_rate > max
        {
            broken.push(format!(
                "plugin trap rate {:.3} > {max} ({} of {} requests trapped)",
                evidence.trap_rate, candidate.traps, candidate.requests
            ));
        }
        if stable.requests >= analysis.min_requests {
            for (label, max, stable_ms, candidate_ms) in [
                (
                    "p50",
                    analysis.max_p50_ratio,
                    evidence.stable_p50_ms,
                    evidence.candidate_p50_ms,
                ),
                (
                    "p99",
                    analysis.max_p99_ratio,
                    evidence.stable_p99_ms,
                    evidence.candidate_p99_ms,
                ),
            ] {
                if let (Some(max), Some(stable_ms), Some(candidate_ms)) =
                    (max, stable_ms, candidate_ms)
                    && candidate_ms > analysis.latency_floor_ms
                    && candidate_ms > stable_ms * max
                {
                    broken.push(format!(
                        "{label} latency {candidate_ms:.3} ms > {max} x stable's {stable_ms:.3} ms"
                    ));
                }
            }
        }
    }
    if let Some(drift) = &analysis.drift
        && candidate.compared >= analysis.min_requests
        && let Some(measured) = evidence.drift
        && measured > drift.max
    {
        broken.push(format!(
            "output '{}' drift ({:?}) {measured:.4} > {} over {} mirrored requests",
            drift.output, drift.metric, drift.max, candidate.compared
        ));
    }
    let verdict = if !broken.is_empty() {
        Verdict::Fail(broken)
    } else if enough {
        Verdict::Pass
    } else {
        Verdict::Pending
    };
    (verdict, evidence)
}

/// What a canary does after a verdict.
#[derive(Clone, Debug, PartialEq)]
pub enum Action {
    Hold,
    /// Go on to this step.
    Advance(usize),
    /// The last step held and passed: the candidate takes all traffic.
    Promote,
    /// Candidate traffic to 0 %, for these reasons.
    RollBack(Vec<String>),
}

/// The next action of a canary at `step` that has held for `held_seconds`. A failing window
/// rolls back at once, whatever the hold; a passing one advances once the step has held.
pub fn next_action(
    spec: &RolloutSpec,
    step: usize,
    held_seconds: u64,
    verdict: &Verdict,
) -> Action {
    match verdict {
        Verdict::Fail(reasons) => Action::RollBack(reasons.clone()),
        Verdict::Pending => Action::Hold,
        Verdict::Pass => {
            let hold = spec.steps.get(step).map_or(0, |step| step.hold_seconds);
            if held_seconds < hold {
                Action::Hold
            } else if step + 1 < spec.steps.len() {
                Action::Advance(step + 1)
            } else {
                Action::Promote
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rollout::window::{Outcome, Window};
    use std::time::{Duration, Instant};

    fn counts(requests: u64, failures: u64, traps: u64, millis: u64) -> Counts {
        let origin = Instant::now();
        let mut window = Window::new(10, origin);
        for index in 0..requests {
            window.record(
                origin,
                &Outcome {
                    latency: Duration::from_millis(millis),
                    failed: index < failures,
                    trapped: index < traps,
                    metric: None,
                },
            );
        }
        window.recent(origin)
    }

    fn analysis() -> AnalysisSpec {
        AnalysisSpec {
            min_requests: 20,
            max_error_rate: Some(0.05),
            max_trap_rate: Some(0.0),
            max_p99_ratio: Some(2.0),
            ..AnalysisSpec::default()
        }
    }

    #[test]
    fn a_failing_candidate_fails_with_its_numbers_and_a_quiet_one_is_pending() {
        let stable = counts(100, 0, 0, 2);
        let (verdict, evidence) = judge(&analysis(), &stable, &counts(40, 8, 0, 2));
        let Verdict::Fail(reasons) = verdict else {
            panic!("{verdict:?}")
        };
        assert!(
            reasons[0].contains("error rate 0.200 > 0.05 (8 of 40"),
            "{reasons:?}"
        );
        assert_eq!(evidence.candidate_failures, 8);
        assert_eq!(
            judge(&analysis(), &stable, &counts(19, 19, 0, 2)).0,
            Verdict::Pending
        );
        assert_eq!(
            judge(&analysis(), &stable, &counts(40, 1, 0, 2)).0,
            Verdict::Pass
        );
    }

    #[test]
    fn traps_latency_and_drift_each_fail_the_window() {
        let stable = counts(100, 0, 0, 2);
        let trapped = judge(&analysis(), &stable, &counts(40, 1, 1, 2)).0;
        assert!(
            matches!(&trapped, Verdict::Fail(r) if r[0].contains("trap rate")),
            "{trapped:?}"
        );
        let slow = judge(&analysis(), &stable, &counts(40, 0, 0, 10)).0;
        assert!(
            matches!(&slow, Verdict::Fail(r) if r[0].contains("p99 latency")),
            "{slow:?}"
        );
        // Under the floor, a ratio is noise.
        let fast_stable = counts(100, 0, 0, 0);
        let floor = AnalysisSpec {
            latency_floor_ms: 5.0,
            ..analysis()
        };
        assert_eq!(
            judge(&floor, &fast_stable, &counts(40, 0, 0, 2)).0,
            Verdict::Pass
        );

        let drift = AnalysisSpec {
            drift: Some(crate::rollout::spec::DriftSpec {
                output: "y".into(),
                metric: crate::rollout::spec::DriftMetric::MeanAbsDiff,
                max: 0.1,
            }),
            ..analysis()
        };
        let mut mirrored = counts(30, 0, 0, 2);
        mirrored.compared = 30;
        mirrored.drift_sum = 30.0 * 0.5;
        let drifted = judge(&drift, &stable, &mirrored).0;
        assert!(
            matches!(&drifted, Verdict::Fail(r) if r[0].contains("drift")),
            "{drifted:?}"
        );
        mirrored.drift_sum = 30.0 * 0.01;
        assert_eq!(judge(&drift, &stable, &mirrored).0, Verdict::Pass);
    }

    #[test]
    fn steps_advance_after_their_hold_and_the_last_one_promotes() {
        // Two steps (10 % then 50 %), each holding 1 s.
        let spec = crate::rollout::tests::canary("");
        assert_eq!(next_action(&spec, 0, 0, &Verdict::Pass), Action::Hold);
        assert_eq!(next_action(&spec, 0, 1, &Verdict::Pass), Action::Advance(1));
        assert_eq!(next_action(&spec, 1, 1, &Verdict::Pass), Action::Promote);
        assert_eq!(next_action(&spec, 0, 99, &Verdict::Pending), Action::Hold);
        assert_eq!(
            next_action(&spec, 0, 0, &Verdict::Fail(vec!["x".into()])),
            Action::RollBack(vec!["x".into()])
        );
    }
}
