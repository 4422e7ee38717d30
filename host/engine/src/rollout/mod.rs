//! Rollouts: a name clients call served by two or more arms (a canary's stable and
//! candidate, or an experiment's arms), with the candidate's share walked through steps and
//! judged on this process's own signals — failures, plugin traps, latency against the stable
//! and output drift on mirrored calls — over a sliding window of seconds.
//!
//! The engine owns what needs no store: the resource's schema ([`spec`]), the windows
//! ([`window`]), the pure decisions ([`decide`]) and the routing model ([`route`]). The
//! tenancy layer owns the rollout's record in the store and the controller that applies the
//! decisions.

pub mod decide;
pub mod route;
pub mod spec;
pub mod window;

pub use decide::{Action, Evidence, Verdict, judge, next_action};
pub use route::{ArmReport, RolloutArm, RolloutLive, RolloutModel};
pub use spec::{ArmSpec, RolloutKind, RolloutSpec};
pub use window::Counts;

#[cfg(test)]
mod tests;
