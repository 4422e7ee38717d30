//! Rollouts in the tenancy layer, with fake models on a real embedded store: applying and
//! validating the resource, the controller's decisions (rollback on errors, traps and drift,
//! walking the steps to a promotion), sticky arms across steps and restarts, hand-made ends,
//! delete integrity and tenant isolation. The controller is driven by hand
//! (`control_rollouts`), so every decision here is deterministic.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::Arc;

use common::*;
use serde_json::Value;
use weft_core::{DataType, ErrorKind, NamedTensor, Parameters, RequestContext, Result, Tensor};
use weft_store::{RolloutPhase, Store};
use weft_tenancy::backends::NoObserver;
use weft_tenancy::lifecycle::ArtifactKind;
use weft_tenancy::{Tenancy, TenancyConfig};

/// A canary of model `m` from version 1 to 2 in two steps (50 %, then 100 %) with `extra`
/// appended (analysis rules, sticky settings).
fn canary(steps: &str, extra: &str) -> String {
    format!(
        r#"name = "m-canary"
target = "m"
[stable]
model = "m"
version = 1
[candidate]
model = "m"
version = 2
{steps}
[analysis]
window_seconds = 60
min_requests = 20
max_error_rate = 0.05
max_trap_rate = 0.0
{extra}
"#
    )
}

const TWO_STEPS: &str =
    "[[steps]]\nweight = 50\nhold_seconds = 0\n[[steps]]\nweight = 100\nhold_seconds = 0\n";

/// A world with tenant `acme` holding `m` version 1 (echo) and version 2 behaving as
/// `candidate`, and the rollout `text` applied.
fn rolled_out(candidate: &str, text: &str) -> World {
    let world = world(&["acme", "other"]);
    world.push_model("acme", "m", 1).unwrap();
    world.push_model_as("acme", "m", 2, candidate).unwrap();
    let (_, changed) = world
        .tenancy
        .apply_rollout("acme", "m-canary", text)
        .unwrap();
    assert!(changed);
    world
}

/// One call of `target` as `tenant` with the value `value` twice, optionally with a sticky key.
async fn call(
    tenancy: &Tenancy,
    tenant: &str,
    target: &str,
    key: Option<&str>,
    value: f32,
) -> Result<(Vec<NamedTensor>, Parameters)> {
    let scope = tenancy.scope(tenant).unwrap();
    let (_, model) = scope.registry.resolve(target, None)?;
    let mut context = RequestContext::for_tenant(tenant);
    if let Some(key) = key {
        context = context.with_sticky_key(key);
    }
    let bytes: Vec<u8> = [value, value]
        .iter()
        .flat_map(|v| v.to_le_bytes())
        .collect();
    let input = NamedTensor::new(
        "x",
        Tensor::new(DataType::Fp32, vec![1, 2], bytes.into()).unwrap(),
    );
    model
        .infer_with_parameters(&context, vec![input], &Parameters::new())
        .await
}

fn arm_of(parameters: &Parameters) -> String {
    parameters
        .get("rollout_arm")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_string()
}

fn phase(world: &World) -> RolloutPhase {
    world.store.state().tenants["acme"].rollouts["m-canary"].phase
}

#[tokio::test]
async fn a_candidate_failing_a_fifth_of_its_calls_is_rolled_back_with_its_numbers() {
    let world = rolled_out("fail", &canary(TWO_STEPS, ""));
    let mut failures = 0;
    let mut candidate_calls_after = 0;
    let mut rolled_back = false;
    for index in 0..400 {
        let result = call(&world.tenancy, "acme", "m", None, index as f32).await;
        match &result {
            Err(_) => failures += 1,
            Ok((_, parameters)) if rolled_back && arm_of(parameters) == "candidate" => {
                candidate_calls_after += 1
            }
            Ok(_) => {}
        }
        // The controller ticks after every call here: it decides on the first judged window.
        if !rolled_back {
            let decisions = world.tenancy.control_rollouts();
            rolled_back = decisions
                .iter()
                .any(|(_, _, action)| action == "rolled_back");
        }
    }
    assert!(rolled_back);
    assert_eq!(phase(&world), RolloutPhase::RolledBack);
    assert_eq!(
        candidate_calls_after, 0,
        "no call reaches the candidate after"
    );
    // The window needs 20 candidate calls, a fifth of which fail: about 4 client failures.
    assert!(failures <= 6, "{failures} client failures");
    let record = &world.store.state().tenants["acme"].rollouts["m-canary"];
    let event = record.events.last().unwrap();
    assert_eq!(event.action, "rolled_back");
    assert!(event.reason.contains("error rate"), "{}", event.reason);
    assert!(event.evidence["candidate_failures"].as_u64().unwrap() >= 1);
    assert!(event.evidence["error_rate"].as_f64().unwrap() > 0.05);
    let view = world.tenancy.rollout("acme", "m-canary").unwrap();
    assert_eq!(view["phase"], "rolled_back");
    assert_eq!(view["weights"]["candidate"], 0.0);
    assert_eq!(view["weights"]["stable"], 100.0);
}

#[tokio::test]
async fn a_healthy_candidate_walks_every_step_and_is_promoted() {
    let world = rolled_out("echo", &canary(TWO_STEPS, ""));
    let mut actions = Vec::new();
    for index in 0..400 {
        let (_, parameters) = call(&world.tenancy, "acme", "m", None, index as f32)
            .await
            .unwrap();
        assert_eq!(parameters["rollout"], "m-canary");
        for (_, _, action) in world.tenancy.control_rollouts() {
            actions.push(action);
        }
        if phase(&world) == RolloutPhase::Promoted {
            break;
        }
    }
    assert_eq!(actions, ["advanced", "promoted"]);
    for index in 0..20 {
        let (_, parameters) = call(&world.tenancy, "acme", "m", None, index as f32)
            .await
            .unwrap();
        assert_eq!(arm_of(&parameters), "candidate");
        assert_eq!(parameters["rollout_version"], 2);
    }
    // A call that names a version still reaches exactly that version.
    let scope = world.tenancy.scope("acme").unwrap();
    let (version, _) = scope.registry.resolve("m", Some("1")).unwrap();
    assert_eq!(version, 1);
    let events: Vec<String> = world.store.state().tenants["acme"].rollouts["m-canary"]
        .events
        .iter()
        .map(|event| event.action.clone())
        .collect();
    assert_eq!(events, ["applied", "advanced", "promoted"]);
}

#[tokio::test]
async fn a_trapping_candidate_is_rolled_back_on_the_trap_rule() {
    let text = canary(TWO_STEPS, "").replace("max_error_rate = 0.05\n", "");
    let world = rolled_out("trap", &text);
    let mut rolled_back = None;
    for index in 0..200 {
        let _ = call(&world.tenancy, "acme", "m", None, index as f32).await;
        if let Some(decision) = world.tenancy.control_rollouts().pop() {
            rolled_back = Some(decision);
            break;
        }
    }
    assert_eq!(rolled_back.unwrap().2, "rolled_back");
    let record = &world.store.state().tenants["acme"].rollouts["m-canary"];
    let event = record.events.last().unwrap();
    assert!(event.reason.contains("trap rate"), "{}", event.reason);
    assert!(!event.reason.contains("error rate"), "{}", event.reason);
}

#[tokio::test]
async fn drift_is_caught_on_mirrored_calls_alone_and_no_client_sees_the_candidate() {
    let steps = "[[steps]]\nweight = 0\nshadow = 100\nhold_seconds = 3600\n";
    let drift = "[analysis.drift]\noutput = \"y\"\nmetric = \"mean_abs_diff\"\nmax = 0.5\n";
    let world = rolled_out("double", &canary(steps, drift));
    let mut decision = None;
    for index in 0..400 {
        let (outputs, parameters) = call(&world.tenancy, "acme", "m", None, 1.0 + index as f32)
            .await
            .unwrap();
        assert_eq!(arm_of(&parameters), "stable");
        let answer = &outputs[0].tensor.data()[..4];
        assert_eq!(
            f32::from_le_bytes(answer.try_into().unwrap()),
            1.0 + index as f32,
            "the client gets the stable's answer"
        );
        // Mirrors finish on their own tasks: give them a moment before the tick.
        tokio::task::yield_now().await;
        tokio::time::sleep(std::time::Duration::from_millis(1)).await;
        if let Some(made) = world.tenancy.control_rollouts().pop() {
            decision = Some(made);
            break;
        }
    }
    assert_eq!(decision.unwrap().2, "rolled_back");
    let event = world.store.state().tenants["acme"].rollouts["m-canary"]
        .events
        .last()
        .cloned()
        .unwrap();
    assert!(event.reason.contains("drift"), "{}", event.reason);
    assert!(event.evidence["compared"].as_u64().unwrap() >= 20);
    assert_eq!(event.evidence["candidate_failures"], 0);
}

#[tokio::test]
async fn sticky_clients_keep_their_arm_across_steps_and_restarts() {
    let steps =
        "[[steps]]\nweight = 30\nhold_seconds = 0\n[[steps]]\nweight = 60\nhold_seconds = 3600\n";
    let text = canary(steps, "[sticky]\nheader = \"x-user\"\n");
    let world = rolled_out("echo", &text);
    let keys: Vec<String> = (0..200).map(|i| format!("user-{i}")).collect();
    let mut first = Vec::new();
    for key in &keys {
        let (_, parameters) = call(&world.tenancy, "acme", "m", Some(key), 1.0)
            .await
            .unwrap();
        first.push(arm_of(&parameters));
    }
    let on_candidate = first.iter().filter(|arm| *arm == "candidate").count();
    assert!(
        (30..=90).contains(&on_candidate),
        "{on_candidate} of 200 at 30 %"
    );
    // The same keys again land where they did.
    for (key, arm) in keys.iter().zip(&first) {
        let (_, parameters) = call(&world.tenancy, "acme", "m", Some(key), 1.0)
            .await
            .unwrap();
        assert_eq!(&arm_of(&parameters), arm, "{key}");
    }
    let decisions = world.tenancy.control_rollouts();
    assert_eq!(decisions.len(), 1, "{decisions:?}");
    assert_eq!(decisions[0].2, "advanced");
    // At 60 % every client of the candidate stays there; some of the stable's move over.
    let mut second = Vec::new();
    for key in &keys {
        let (_, parameters) = call(&world.tenancy, "acme", "m", Some(key), 1.0)
            .await
            .unwrap();
        second.push(arm_of(&parameters));
    }
    for (before, after) in first.iter().zip(&second) {
        if before == "candidate" {
            assert_eq!(after, "candidate");
        }
    }
    assert!(second.iter().filter(|arm| *arm == "candidate").count() > on_candidate);
    // A restart (a new process on the same store) resumes the step and every assignment.
    let World {
        _dir: dir,
        store,
        tenancy,
        sandbox,
        models,
        ..
    } = world;
    drop((tenancy, store));
    let restarted = Tenancy::new(TenancyConfig {
        store: Arc::new(Store::open(dir.path()).unwrap()),
        platform: weft_engine::ModelRegistry::default(),
        plugins: sandbox as _,
        models: models as _,
        observer: Arc::new(NoObserver),
        admin_key: None,
        bootstrap_key: None,
        residency: None,
        plugin_residency: None,
    })
    .unwrap();
    for (key, arm) in keys.iter().zip(&second) {
        let (_, parameters) = call(&restarted, "acme", "m", Some(key), 1.0).await.unwrap();
        assert_eq!(&arm_of(&parameters), arm, "{key} after a restart");
    }
}

#[tokio::test]
async fn rollouts_are_ended_by_hand_and_experiments_pick_a_winner() {
    let world = rolled_out("echo", &canary(TWO_STEPS, ""));
    world.tenancy.abort_rollout("acme", "m-canary").unwrap();
    for index in 0..20 {
        let (_, parameters) = call(&world.tenancy, "acme", "m", None, index as f32)
            .await
            .unwrap();
        assert_eq!(arm_of(&parameters), "stable");
    }
    let error = world
        .tenancy
        .promote_rollout("acme", "m-canary", Some("stable"))
        .unwrap_err();
    assert_eq!(error.kind(), ErrorKind::InvalidArgument);
    world
        .tenancy
        .promote_rollout("acme", "m-canary", None)
        .unwrap();
    let (_, parameters) = call(&world.tenancy, "acme", "m", None, 1.0).await.unwrap();
    assert_eq!(arm_of(&parameters), "candidate");
    world.tenancy.delete_rollout("acme", "m-canary").unwrap();

    let experiment = r#"name = "ab"
target = "m-ab"
kind = "experiment"
[[arms]]
name = "one"
model = "m"
version = 1
weight = 50
[[arms]]
name = "two"
model = "m"
version = 2
weight = 50
[metric]
output = "y"
reduce = "mean"
"#;
    world
        .tenancy
        .apply_rollout("acme", "ab", experiment)
        .unwrap();
    let mut seen = std::collections::BTreeSet::new();
    for index in 0..100 {
        let (_, parameters) = call(&world.tenancy, "acme", "m-ab", None, index as f32)
            .await
            .unwrap();
        seen.insert(arm_of(&parameters));
    }
    assert_eq!(seen.len(), 2, "{seen:?}");
    let view = world.tenancy.rollout("acme", "ab").unwrap();
    let arms = view["arms"].as_array().unwrap();
    let requests: u64 = arms
        .iter()
        .map(|arm| arm["total"]["requests"].as_u64().unwrap())
        .sum();
    assert_eq!(requests, 100);
    assert!(arms.iter().all(|arm| arm["total"]["metric"].is_number()));
    assert!(arms.iter().all(|arm| {
        !arm["total"]["latency_ms_histogram"]
            .as_array()
            .unwrap()
            .is_empty()
    }));
    let error = world
        .tenancy
        .promote_rollout("acme", "ab", None)
        .unwrap_err();
    assert!(error.message().contains("one, two"), "{error}");
    world
        .tenancy
        .promote_rollout("acme", "ab", Some("two"))
        .unwrap();
    for index in 0..20 {
        let (_, parameters) = call(&world.tenancy, "acme", "m-ab", None, index as f32)
            .await
            .unwrap();
        assert_eq!(arm_of(&parameters), "two");
    }
    assert_eq!(
        world.store.state().tenants["acme"].rollouts["ab"]
            .winner
            .as_deref(),
        Some("two")
    );
}

#[tokio::test]
async fn bad_rollouts_are_refused_and_arms_cannot_be_deleted_from_under_one() {
    let world = world(&["acme"]);
    world.push_model("acme", "m", 1).unwrap();
    world.push_model("acme", "m", 2).unwrap();
    let text = canary(TWO_STEPS, "");
    let cases = [
        (
            text.replace("version = 2", "version = 7"),
            "'m' version 7 is not found",
        ),
        (text.clone(), "applied as 'other-name'"),
        (text.replace("[analysis]", "[analysis]\nbogus = 1"), "bogus"),
        (
            text.replace("model = \"m\"\nversion = 2", "graph = \"m\"\nversion = 2"),
            "is a model",
        ),
    ];
    for (index, (text, expected)) in cases.iter().enumerate() {
        let name = if index == 1 { "other-name" } else { "m-canary" };
        let error = world.tenancy.apply_rollout("acme", name, text).unwrap_err();
        assert!(error.message().contains(expected), "{index}: {error}");
    }
    world
        .tenancy
        .apply_rollout("acme", "m-canary", &text)
        .unwrap();
    // Applying the same text again changes nothing; a second rollout of the same target is refused.
    let (_, changed) = world
        .tenancy
        .apply_rollout("acme", "m-canary", &text)
        .unwrap();
    assert!(!changed);
    let twin = text.replace("name = \"m-canary\"", "name = \"twin\"");
    let error = world
        .tenancy
        .apply_rollout("acme", "twin", &twin)
        .unwrap_err();
    assert_eq!(error.kind(), ErrorKind::Conflict);
    let error = world
        .tenancy
        .delete_artifact("acme", ArtifactKind::Model, "m", Some("2"))
        .unwrap_err();
    assert_eq!(error.kind(), ErrorKind::Conflict);
    assert!(error.message().contains("rollout 'm-canary'"), "{error}");
    world.tenancy.delete_rollout("acme", "m-canary").unwrap();
    world
        .tenancy
        .delete_artifact("acme", ArtifactKind::Model, "m", Some("2"))
        .unwrap();
    // The tenant's rollouts are bounded (every phase counts until deleted).
    let numbered = |index: usize| {
        text.replace("name = \"m-canary\"", &format!("name = \"r{index}\""))
            .replace("target = \"m\"", &format!("target = \"t{index}\""))
    };
    world.push_model("acme", "m", 2).unwrap();
    for index in 0..weft_tenancy::rollouts::MAX_ROLLOUTS {
        world
            .tenancy
            .apply_rollout("acme", &format!("r{index}"), &numbered(index))
            .unwrap();
    }
    let error = world
        .tenancy
        .apply_rollout("acme", "r99", &numbered(99))
        .unwrap_err();
    assert_eq!(error.kind(), ErrorKind::PermissionDenied, "{error}");
}

#[tokio::test]
async fn another_tenants_rollouts_and_targets_are_invisible() {
    let world = rolled_out("echo", &canary(TWO_STEPS, ""));
    let text = canary(TWO_STEPS, "");
    for error in [
        world.tenancy.rollout("other", "m-canary").unwrap_err(),
        world
            .tenancy
            .promote_rollout("other", "m-canary", None)
            .unwrap_err(),
        world
            .tenancy
            .abort_rollout("other", "m-canary")
            .unwrap_err(),
        world
            .tenancy
            .delete_rollout("other", "m-canary")
            .unwrap_err(),
    ] {
        assert_eq!(error.kind(), ErrorKind::NotFound, "{error}");
        assert_eq!(error.message(), "unknown rollout 'm-canary'");
    }
    assert_eq!(
        world.tenancy.list_rollouts("other").unwrap()["rollouts"],
        serde_json::json!([])
    );
    let error = call(&world.tenancy, "other", "m", None, 1.0)
        .await
        .unwrap_err();
    assert_eq!(error.kind(), ErrorKind::NotFound);
    // The other tenant cannot point a rollout of its own at acme's models either.
    let error = world
        .tenancy
        .apply_rollout("other", "m-canary", &text)
        .unwrap_err();
    assert_eq!(error.kind(), ErrorKind::NotFound, "{error}");
    assert!(!error.message().contains("acme"), "{error}");
}

#[tokio::test]
async fn a_rolled_back_rollout_is_not_deleted_into_its_candidate_and_ends_are_idempotent() {
    let world = rolled_out("fail", &canary(TWO_STEPS, ""));
    world.tenancy.abort_rollout("acme", "m-canary").unwrap();
    let revision = world.store.state().tenants["acme"].revision;
    world.tenancy.abort_rollout("acme", "m-canary").unwrap();
    assert_eq!(
        world.store.state().tenants["acme"].revision,
        revision,
        "aborting again writes nothing"
    );
    // Without the rollout, `m` would serve its latest version: the candidate.
    let error = world
        .tenancy
        .delete_rollout("acme", "m-canary")
        .unwrap_err();
    assert_eq!(error.kind(), ErrorKind::Conflict);
    assert!(
        error.message().contains("delete that version first"),
        "{error}"
    );
    // The candidate no longer serves, so it may go; then the rollout may too.
    world
        .tenancy
        .delete_artifact("acme", ArtifactKind::Model, "m", Some("2"))
        .unwrap();
    world.tenancy.delete_rollout("acme", "m-canary").unwrap();
    let (outputs, _) = call(&world.tenancy, "acme", "m", None, 3.0).await.unwrap();
    assert_eq!(
        f32::from_le_bytes(outputs[0].tensor.data()[..4].try_into().unwrap()),
        3.0
    );
    // The stable of a rolled-back canary still serves, so it stays.
    let world = rolled_out("fail", &canary(TWO_STEPS, ""));
    world.tenancy.abort_rollout("acme", "m-canary").unwrap();
    let error = world
        .tenancy
        .delete_artifact("acme", ArtifactKind::Model, "m", Some("1"))
        .unwrap_err();
    assert_eq!(error.kind(), ErrorKind::Conflict, "{error}");
}
