//! Hostile plugins against the runtime's bounds: host-side bytes budgeted per call, logs capped
//! and escaped, instance slots and warm instances shared fairly between tenants, warm instances
//! expiring when idle.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{f32_tensor, load, runtime};
use weft_core::{ErrorKind, NamedTensor};
use weft_runtime::{CallContext, CallLimits, FailureCause, PluginRuntime, RuntimeConfig};

fn limits(deadline_ms: u64, memory_mb: usize) -> CallLimits {
    CallLimits {
        deadline: Duration::from_millis(deadline_ms),
        memory_bytes: memory_mb << 20,
        ..CallLimits::default()
    }
}

fn tenant(name: &str, limits: CallLimits) -> CallContext {
    CallContext {
        limits: Some(limits),
        request: weft_core::RequestContext::for_tenant(name),
        ..CallContext::default()
    }
}

fn input() -> Vec<NamedTensor> {
    vec![NamedTensor::new("x", f32_tensor(vec![1, 2], &[1.0, 2.0]))]
}

#[tokio::test]
async fn creating_host_tensors_in_a_loop_hits_the_host_memory_budget() {
    let runtime = runtime();
    let flood = load(&runtime, "hostile_tensor_flood");
    let started = Instant::now();
    let failure = flood
        .transform(&tenant("a", limits(5_000, 16)), input())
        .await
        .unwrap_err();
    assert_eq!(failure.cause, FailureCause::HostMemory, "{failure}");
    let message = failure.to_string();
    assert!(
        message.contains("host memory limit of 16777216 bytes"),
        "{message}"
    );
    assert!(message.contains("tensor.create"), "{message}");
    // Stopped by the budget, not by the deadline.
    assert!(started.elapsed() < Duration::from_secs(4));
    assert_eq!(flood.stats().failures_by(&FailureCause::HostMemory), 1);
    let peak = flood
        .stats()
        .peak_host_bytes
        .load(std::sync::atomic::Ordering::Relaxed);
    assert!(peak <= 16 << 20, "peak host bytes {peak}");
    // The runtime and other plugins are fine afterwards.
    let echo = load(&runtime, "runtime_echo");
    echo.transform(&tenant("a", limits(2_000, 16)), input())
        .await
        .unwrap();
}

/// Collects formatted log output.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(bytes);
        Ok(bytes.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[tokio::test]
async fn a_logging_loop_is_capped_per_call_and_cannot_forge_lines() {
    let captured = Captured::default();
    let writer = captured.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_ansi(false)
        .with_writer(move || writer.clone())
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);
    let runtime = runtime();
    let flood = load(&runtime, "hostile_log_flood");
    let mut context = tenant("a", limits(1_000, 16));
    context.params = vec![("lines".into(), "100000".into())];
    flood.transform(&context, input()).await.unwrap();
    let text = String::from_utf8(captured.0.lock().unwrap().clone()).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    let from_plugin = lines.iter().filter(|l| l.contains("FORGED")).count();
    assert!(
        (1..=100).contains(&from_plugin),
        "{from_plugin} plugin lines logged"
    );
    let truncated = lines
        .iter()
        .filter(|l| l.contains("plugin log truncated"))
        .count();
    assert_eq!(truncated, 1, "{text}");
    assert!(
        !lines.iter().any(|l| l.starts_with("2026-01-01T00:00:00Z")),
        "a plugin forged a log line: {text}"
    );
    assert!(
        !text.contains('\u{1b}'),
        "an escape sequence reached the log"
    );
    assert!(text.contains("\\n2026-01-01T00:00:00Z"), "{text}");
    assert!(text.len() < 200_000, "{} bytes of log", text.len());
}

fn small_pool() -> PluginRuntime {
    // 8 slots: 2 may be warm, 6 in flight, at most 3 for one tenant.
    PluginRuntime::new(RuntimeConfig {
        max_instances: 8,
        tenant_instances: 3,
        tenant_warm_instances: 1,
        ..RuntimeConfig::default()
    })
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenant_filling_the_pool_with_spinning_calls_leaves_the_others_their_share() {
    let runtime = small_pool();
    let spin = load(&runtime, "runtime_spin");
    let echo = load(&runtime, "runtime_echo");
    let mut attackers = Vec::new();
    for _ in 0..12 {
        let spin = spin.clone();
        attackers.push(tokio::spawn(async move {
            spin.transform(&tenant("attacker", limits(1_500, 16)), input())
                .await
        }));
    }
    // Wait for the attacker's calls to take what they can (instantiating may be
    // slow on a loaded machine); at no point may one tenant hold more than 3.
    let filling = Instant::now();
    let (in_use, most) = loop {
        let (in_use, most) = runtime.instances_in_use();
        assert!(most <= 3, "one tenant holds {most} slots ({in_use} in use)");
        if most == 3 || filling.elapsed() > Duration::from_millis(1_000) {
            break (in_use, most);
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    assert_eq!(
        most, 3,
        "one tenant holds at most its share ({in_use} in use)"
    );
    // The victim's calls get their own slots and CPU turns while the attacker spins.
    let mut latencies = Vec::new();
    for _ in 0..20 {
        let started = Instant::now();
        echo.transform(&tenant("victim", limits(1_000, 16)), input())
            .await
            .unwrap();
        latencies.push(started.elapsed());
    }
    latencies.sort();
    let worst = latencies[latencies.len() - 1];
    assert!(
        worst < Duration::from_millis(500),
        "victim's worst call {worst:?}"
    );
    for attacker in attackers {
        let failure = attacker.await.unwrap().unwrap_err();
        assert_eq!(failure.error.kind(), ErrorKind::DeadlineExceeded);
    }
    assert_eq!(runtime.instances_in_use().0, 0);
}

#[tokio::test]
async fn warm_instances_are_capped_per_tenant_and_expire_when_idle() {
    let runtime = PluginRuntime::new(RuntimeConfig {
        max_instances: 16,
        tenant_warm_instances: 1,
        warm_idle: Duration::from_millis(100),
        ..RuntimeConfig::default()
    })
    .unwrap();
    let echo = load(&runtime, "runtime_echo");
    let copy = load(&runtime, "runtime_copy");
    echo.transform(&tenant("a", limits(2_000, 16)), input())
        .await
        .unwrap();
    copy.transform(&tenant("a", limits(2_000, 16)), input())
        .await
        .unwrap();
    assert_eq!(
        runtime.warm_instances(),
        (1, 1),
        "one warm instance per tenant"
    );
    echo.transform(&tenant("b", limits(2_000, 16)), input())
        .await
        .unwrap();
    assert_eq!(runtime.warm_instances(), (2, 1));
    // The epoch thread sweeps idle instances about once a second.
    tokio::time::sleep(Duration::from_millis(1_600)).await;
    assert_eq!(runtime.warm_instances(), (0, 0));
}

#[tokio::test]
async fn an_oversized_component_is_refused_before_compiling() {
    let runtime = PluginRuntime::new(RuntimeConfig {
        max_component_bytes: 1024,
        ..RuntimeConfig::default()
    })
    .unwrap();
    let bytes = std::fs::read(common::guests_dir().join("runtime_echo.wasm")).unwrap();
    let error = runtime.load("big", &bytes).unwrap_err();
    assert_eq!(error.kind(), ErrorKind::InvalidArgument);
    assert!(
        error
            .to_string()
            .contains("the largest component accepted is 1024 bytes"),
        "{error}"
    );
}
