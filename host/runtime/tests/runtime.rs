//! Runtime tests with real guest components (tests/guests/, plugins/) and fake models: data
//! paths, grants, security, every limit, isolation between calls, role detection, and caching.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::{context, f32_tensor, f32s, guests_dir, load, runtime};
use weft_core::{
    BoxFuture, DataType, ErrorKind, Model, ModelMetadata, NamedTensor, Tensor, TensorSpec,
};
use weft_runtime::{CallContext, CallLimits, FailureCause, PluginRuntime, Role, RuntimeConfig};

/// Doubles an FP32 input `x` into output `y`.
struct Doubler(ModelMetadata);

impl Doubler {
    fn shared() -> Arc<dyn Model> {
        Arc::new(Doubler(ModelMetadata {
            platform: "fake".into(),
            inputs: vec![TensorSpec {
                name: "x".into(),
                datatype: DataType::Fp32,
                shape: vec![-1, 2],
            }],
            outputs: vec![TensorSpec {
                name: "y".into(),
                datatype: DataType::Fp32,
                shape: vec![-1, 2],
            }],
            max_batch_size: 0,
        }))
    }
}

impl Model for Doubler {
    fn metadata(&self) -> &ModelMetadata {
        &self.0
    }
    fn infer<'a>(
        &'a self,
        _: &'a weft_core::RequestContext,
        inputs: Vec<NamedTensor>,
    ) -> BoxFuture<'a, weft_core::Result<Vec<NamedTensor>>> {
        Box::pin(async move {
            let x = &inputs[0].tensor;
            let doubled: Vec<f32> = f32s(x).iter().map(|v| v * 2.0).collect();
            Ok(vec![NamedTensor::new(
                "y",
                f32_tensor(x.shape().to_vec(), &doubled),
            )])
        })
    }
}

fn granted(model: &str) -> CallContext {
    let mut grants: HashMap<String, Arc<dyn Model>> = HashMap::new();
    grants.insert("double".into(), Doubler::shared());
    CallContext {
        grants: Arc::new(grants),
        params: vec![("model".into(), model.into())],
        ..CallContext::default()
    }
}

#[tokio::test]
async fn echo_returns_the_same_tensors_without_copying() {
    let runtime = runtime();
    let plugin = load(&runtime, "runtime_echo");
    assert_eq!(plugin.role(), Role::Transformer);
    assert_eq!(plugin.digest().len(), 64);
    let input = NamedTensor::new("x", f32_tensor(vec![1, 3], &[1.0, 2.0, 3.0]));
    let outputs = plugin
        .transform(&CallContext::default(), vec![input.clone()])
        .await
        .unwrap();
    assert_eq!(outputs, vec![input.clone()]);
    assert_eq!(
        outputs[0].tensor.data().as_ptr(),
        input.tensor.data().as_ptr(),
        "passed through, not copied"
    );
}

#[tokio::test]
async fn every_datatype_round_trips_through_guest_memory_and_params_arrive() {
    let runtime = runtime();
    let plugin = load(&runtime, "runtime_copy");
    let mut inputs = Vec::new();
    for datatype in DataType::ALL {
        let tensor = match datatype {
            DataType::Bytes => {
                let data = weft_core::encode_bytes_elements([&b"a"[..], b"\xff\x00", b""]).unwrap();
                Tensor::new(datatype, vec![3], Bytes::from(data)).unwrap()
            }
            DataType::Bool => {
                Tensor::new(datatype, vec![3], Bytes::from_static(&[1, 0, 1])).unwrap()
            }
            _ => {
                let size = datatype.element_size().unwrap();
                let data: Vec<u8> = (0..3 * size).map(|i| (i * 37 + 11) as u8).collect();
                Tensor::new(datatype, vec![3], Bytes::from(data)).unwrap()
            }
        };
        inputs.push(NamedTensor::new(format!("in_{datatype}"), tensor));
    }
    let context = context(&[("mode", "copy"), ("k", "v w")]);
    let outputs = plugin.transform(&context, inputs.clone()).await.unwrap();
    assert_eq!(&outputs[..inputs.len()], &inputs[..]);
    let echoed = &outputs[inputs.len()];
    assert_eq!(echoed.name, "params");
    let texts: Vec<&[u8]> = weft_core::bytes_elements(echoed.tensor.data())
        .unwrap()
        .collect();
    assert_eq!(texts, vec![&b"mode=copy"[..], b"k=v w"]);
}

#[tokio::test]
async fn granted_model_is_called_through_wasi_nn() {
    let runtime = runtime();
    let plugin = load(&runtime, "runtime_call_model");
    let input = NamedTensor::new("x", f32_tensor(vec![2, 2], &[1.0, -2.0, 3.5, 0.0]));
    let outputs = plugin
        .transform(&granted("double"), vec![input])
        .await
        .unwrap();
    assert_eq!(outputs.len(), 1);
    assert_eq!(outputs[0].name, "y");
    assert_eq!(outputs[0].tensor.shape(), &[2, 2]);
    assert_eq!(f32s(&outputs[0].tensor), vec![2.0, -4.0, 7.0, 0.0]);
}

#[tokio::test]
async fn model_errors_reach_the_plugin_as_wasi_nn_errors() {
    let runtime = runtime();
    let plugin = load(&runtime, "runtime_call_model");
    let wrong_shape = NamedTensor::new("x", f32_tensor(vec![1, 3], &[1.0, 2.0, 3.0]));
    let failure = plugin
        .transform(&granted("double"), vec![wrong_shape])
        .await
        .unwrap_err();
    assert_eq!(failure.cause, FailureCause::Guest);
    let message = failure.to_string();
    assert!(
        message.contains("InvalidArgument")
            && message.contains("expected shape [-1, 2] but got [1, 3]"),
        "{message}"
    );
}

#[tokio::test]
async fn ungranted_model_is_not_found() {
    let runtime = runtime();
    let plugin = load(&runtime, "runtime_call_model");
    let input = NamedTensor::new("x", f32_tensor(vec![1, 2], &[1.0, 2.0]));
    let failure = plugin
        .transform(&granted("someone_elses_model"), vec![input])
        .await
        .unwrap_err();
    let message = failure.to_string();
    assert!(
        message.contains("NotFound") && message.contains("'someone_elses_model' is not granted"),
        "{message}"
    );
}

/// A [`Doubler`] that reports running on GPU 0.
struct GpuDoubler(Arc<dyn Model>);

impl Model for GpuDoubler {
    fn metadata(&self) -> &ModelMetadata {
        self.0.metadata()
    }
    fn serving(&self) -> weft_core::ServingConfig {
        weft_core::ServingConfig {
            gpu: Some(0),
            ..weft_core::ServingConfig::default()
        }
    }
    fn infer<'a>(
        &'a self,
        request: &'a weft_core::RequestContext,
        inputs: Vec<NamedTensor>,
    ) -> BoxFuture<'a, weft_core::Result<Vec<NamedTensor>>> {
        self.0.infer(request, inputs)
    }
}

#[tokio::test]
async fn an_execution_target_is_honoured_or_refused_never_swapped() {
    let runtime = runtime();
    let plugin = load(&runtime, "runtime_call_model");
    let mut grants: HashMap<String, Arc<dyn Model>> = HashMap::new();
    grants.insert("cpu_model".into(), Doubler::shared());
    grants.insert("gpu_model".into(), Arc::new(GpuDoubler(Doubler::shared())));
    let grants = Arc::new(grants);
    let call = |model: &str, target: &str| CallContext {
        grants: Arc::clone(&grants),
        params: vec![
            ("model".into(), model.into()),
            ("target".into(), target.into()),
        ],
        ..CallContext::default()
    };
    let input = || vec![NamedTensor::new("x", f32_tensor(vec![1, 2], &[1.0, 2.0]))];
    // Where the model is: computed.
    for (model, target) in [("gpu_model", "gpu"), ("cpu_model", "cpu")] {
        let outputs = plugin
            .transform(&call(model, target), input())
            .await
            .unwrap();
        assert_eq!(
            f32s(&outputs[0].tensor),
            vec![2.0, 4.0],
            "{model} on {target}"
        );
    }
    // Where it is not: refused with where it runs.
    for (model, target, says) in [
        (
            "cpu_model",
            "gpu",
            "model 'cpu_model' runs on the CPU, not a GPU",
        ),
        (
            "gpu_model",
            "cpu",
            "model 'gpu_model' runs on GPU 0, not the CPU",
        ),
    ] {
        let message = plugin
            .transform(&call(model, target), input())
            .await
            .unwrap_err()
            .to_string();
        assert!(
            message.contains("UnsupportedOperation") && message.contains(says),
            "{model} on {target}: {message}"
        );
    }
    // A name that is not granted is still not found, whatever the target.
    let message = plugin
        .transform(&call("someone_elses_model", "gpu"), input())
        .await
        .unwrap_err()
        .to_string();
    assert!(
        message.contains("Security") && message.contains("not allowed"),
        "{message}"
    );
}

#[tokio::test]
async fn raw_model_bytes_are_refused_with_security() {
    let runtime = runtime();
    let plugin = load(&runtime, "runtime_raw_load");
    let failure = plugin
        .transform(&CallContext::default(), vec![])
        .await
        .unwrap_err();
    let message = failure.to_string();
    assert!(
        message.contains("Security") && message.contains("not allowed"),
        "{message}"
    );
}

fn limits(deadline_ms: u64) -> CallLimits {
    CallLimits {
        deadline: Duration::from_millis(deadline_ms),
        memory_bytes: 16 << 20,
        max_output_bytes: 1 << 20,
        ..CallLimits::default()
    }
}

#[tokio::test]
async fn spinning_forever_hits_the_deadline_and_the_next_call_works() {
    let runtime = runtime();
    let plugin = load(&runtime, "runtime_spin");
    let context = CallContext {
        limits: Some(limits(200)),
        ..CallContext::default()
    };
    let started = Instant::now();
    let failure = plugin.transform(&context, vec![]).await.unwrap_err();
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "took {:?}",
        started.elapsed()
    );
    assert_eq!(failure.cause, FailureCause::Deadline);
    assert_eq!(failure.error.kind(), ErrorKind::DeadlineExceeded);
    assert!(
        failure
            .to_string()
            .contains("plugin 'runtime_spin': deadline of 200ms exceeded"),
        "{failure}"
    );

    let finite = CallContext {
        params: vec![("iterations".into(), "1000".into())],
        ..context
    };
    assert!(plugin.transform(&finite, vec![]).await.is_ok());
}

#[tokio::test]
async fn allocating_forever_hits_the_memory_limit() {
    let runtime = runtime();
    let plugin = load(&runtime, "runtime_allocate");
    let context = CallContext {
        limits: Some(limits(5_000)),
        ..CallContext::default()
    };
    let failure = plugin.transform(&context, vec![]).await.unwrap_err();
    assert_eq!(failure.cause, FailureCause::Memory, "{failure}");
    assert!(
        failure
            .to_string()
            .contains("memory limit of 16777216 bytes exceeded"),
        "{failure}"
    );
}

#[tokio::test]
async fn a_trap_fails_only_its_call() {
    let runtime = runtime();
    let plugin = load(&runtime, "runtime_trap");
    let failure = plugin
        .transform(&CallContext::default(), vec![])
        .await
        .unwrap_err();
    assert_eq!(failure.cause, FailureCause::Trap);
    assert!(failure.to_string().contains("unreachable"), "{failure}");
    // Marked as a trap, and the mark survives the context callers add (rollouts count it).
    assert!(failure.error.clone().context("graph 'g'").is_trap());
    let echo = load(&runtime, "runtime_echo");
    assert!(
        echo.transform(&CallContext::default(), vec![])
            .await
            .is_ok()
    );
}

#[tokio::test]
async fn a_panicking_guest_reports_its_panic_message() {
    let runtime = runtime();
    let plugin = load(&runtime, "runtime_panic");
    let failure = plugin
        .transform(&CallContext::default(), vec![])
        .await
        .unwrap_err();
    assert_eq!(failure.cause, FailureCause::Trap);
    assert!(
        failure.to_string().contains("the guest gave up on purpose"),
        "{failure}"
    );
}

#[tokio::test]
async fn huge_output_hits_the_output_limit_and_a_small_one_then_works() {
    let runtime = runtime();
    let plugin = load(&runtime, "runtime_huge_output");
    let input = NamedTensor::new("x", f32_tensor(vec![1024], &vec![0.5; 1024]));
    let context = CallContext {
        limits: Some(limits(5_000)),
        ..CallContext::default()
    };
    let failure = plugin
        .transform(&context, vec![input.clone()])
        .await
        .unwrap_err();
    assert_eq!(failure.cause, FailureCause::OutputTooLarge);
    assert!(
        failure
            .to_string()
            .contains("output limit of 1048576 bytes exceeded"),
        "{failure}"
    );
    let small = CallContext {
        params: vec![("copies".into(), "2".into())],
        ..context
    };
    assert_eq!(
        plugin.transform(&small, vec![input]).await.unwrap().len(),
        2
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_spinning_plugin_does_not_block_another() {
    let runtime = runtime();
    let spin = load(&runtime, "runtime_spin");
    let echo = load(&runtime, "runtime_echo");
    let spinning = tokio::spawn(async move {
        let context = CallContext {
            limits: Some(limits(1_500)),
            ..CallContext::default()
        };
        spin.transform(&context, vec![]).await
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    let started = Instant::now();
    for _ in 0..20 {
        echo.transform(&CallContext::default(), vec![])
            .await
            .unwrap();
    }
    assert!(
        started.elapsed() < Duration::from_millis(1_000),
        "echo waited {:?} behind the spinner",
        started.elapsed()
    );
    assert!(
        !spinning.is_finished(),
        "the spinner should still be running"
    );
    assert_eq!(
        spinning.await.unwrap().unwrap_err().cause,
        FailureCause::Deadline
    );
}

#[tokio::test]
async fn role_is_detected_and_enforced() {
    let runtime = runtime();
    let router = load(&runtime, "param_router");
    assert_eq!(router.role(), Role::Router);
    let failure = router
        .transform(&CallContext::default(), vec![])
        .await
        .unwrap_err();
    assert!(
        failure
            .to_string()
            .contains("is a router, not a transformer"),
        "{failure}"
    );
    assert_eq!(load(&runtime, "mean_combine").role(), Role::Combiner);
    let error = runtime.load("junk", b"\0asm not really").unwrap_err();
    assert!(
        error
            .to_string()
            .contains("plugin 'junk': not a valid WebAssembly component"),
        "{error}"
    );
}

#[tokio::test]
async fn compiled_plugins_are_reused_from_the_cache() {
    let cache = tempfile::tempdir().unwrap();
    let config = RuntimeConfig {
        cache_dir: Some(cache.path().to_path_buf()),
        ..RuntimeConfig::default()
    };
    let bytes = std::fs::read(guests_dir().join("runtime_echo.wasm")).unwrap();
    let first = PluginRuntime::new(config.clone()).unwrap();
    first.load("echo", &bytes).unwrap();
    assert_eq!(
        first
            .stats()
            .cache_misses
            .load(std::sync::atomic::Ordering::Relaxed),
        1
    );
    let entries = std::fs::read_dir(cache.path()).unwrap().count();
    assert_eq!(entries, 1);
    // A new runtime (as after a restart) loads it from disk and it still runs.
    let second = PluginRuntime::new(config).unwrap();
    let plugin = second.load("echo", &bytes).unwrap();
    assert_eq!(
        second
            .stats()
            .cache_hits
            .load(std::sync::atomic::Ordering::Relaxed),
        1
    );
    assert!(
        plugin
            .transform(&CallContext::default(), vec![])
            .await
            .is_ok()
    );
}

#[tokio::test]
async fn filesystem_is_closed_unless_an_asset_directory_is_granted_and_then_read_only() {
    let runtime = runtime();
    let plugin = load(&runtime, "runtime_read_asset");
    let closed = plugin
        .transform(&CallContext::default(), vec![])
        .await
        .unwrap_err();
    assert!(
        closed.to_string().contains("cannot read /assets/vocab.txt"),
        "{closed}"
    );

    let assets = tempfile::tempdir().unwrap();
    std::fs::write(assets.path().join("vocab.txt"), b"hello world").unwrap();
    let granted = CallContext {
        assets: Some(assets.path().to_path_buf()),
        ..CallContext::default()
    };
    let outputs = plugin.transform(&granted, vec![]).await.unwrap();
    let content: Vec<&[u8]> = weft_core::bytes_elements(outputs[0].tensor.data())
        .unwrap()
        .collect();
    assert_eq!(content, vec![&b"hello world"[..]]);

    let escape = CallContext {
        params: vec![("file".into(), "../../etc/passwd".into())],
        ..granted.clone()
    };
    assert!(
        plugin.transform(&escape, vec![]).await.is_err(),
        "paths must not escape the asset directory"
    );
    let write = CallContext {
        params: vec![("write".into(), "yes".into())],
        ..granted
    };
    assert!(plugin.transform(&write, vec![]).await.is_err());
    assert_eq!(
        std::fs::read(assets.path().join("vocab.txt")).unwrap(),
        b"hello world"
    );
}

#[tokio::test]
async fn fuel_limit_stops_a_spinning_plugin_when_fuel_is_metered() {
    let config = RuntimeConfig {
        meter_fuel: true,
        ..RuntimeConfig::default()
    };
    let runtime = PluginRuntime::new(config).unwrap();
    let plugin = load(&runtime, "runtime_spin");
    let context = CallContext {
        limits: Some(CallLimits {
            fuel: Some(1_000_000),
            ..limits(10_000)
        }),
        ..CallContext::default()
    };
    let failure = plugin.transform(&context, vec![]).await.unwrap_err();
    assert_eq!(failure.cause, FailureCause::Fuel, "{failure}");
    assert!(
        failure
            .to_string()
            .contains("fuel limit of 1000000 exhausted"),
        "{failure}"
    );
}

fn instantiations(runtime: &PluginRuntime) -> u64 {
    runtime
        .stats()
        .instantiations
        .load(std::sync::atomic::Ordering::Relaxed)
}

#[tokio::test]
async fn clean_calls_reuse_a_warm_instance_and_failures_never_do() {
    let runtime = runtime();
    let copy = load(&runtime, "runtime_copy");
    for i in 0..5 {
        let x = NamedTensor::new("x", f32_tensor(vec![1, 2], &[i as f32, 1.0]));
        let out = copy.transform(&context(&[]), vec![x]).await.unwrap();
        assert_eq!(f32s(&out[0].tensor), vec![i as f32, 1.0]);
    }
    assert_eq!(
        instantiations(&runtime),
        1,
        "one instance served five calls"
    );

    // A trap discards its instance: every trapping call starts fresh.
    let trap = load(&runtime, "runtime_trap");
    for _ in 0..3 {
        assert!(
            trap.transform(&CallContext::default(), vec![])
                .await
                .is_err()
        );
    }
    assert_eq!(instantiations(&runtime), 4);

    // So does a deadline: the next call after a spin to the deadline gets a fresh instance.
    let spin = load(&runtime, "runtime_spin");
    let mut slow = context(&[]);
    slow.limits = Some(limits(50));
    let failure = spin.transform(&slow, vec![]).await.unwrap_err();
    assert_eq!(failure.cause, FailureCause::Deadline);
    assert!(
        spin.transform(&context(&[("iterations", "10")]), vec![])
            .await
            .is_ok()
    );
    assert_eq!(instantiations(&runtime), 6);

    // A plugin that writes output is not kept (its capture buffers belong to the instance).
    let panic = load(&runtime, "runtime_panic");
    for _ in 0..2 {
        assert!(
            panic
                .transform(&CallContext::default(), vec![])
                .await
                .is_err()
        );
    }
    assert_eq!(instantiations(&runtime), 8);
}

/// Concurrent calls take their CPU turn before an instance: a call queued for a turn holds no
/// instance, so the calls that run reuse the warm ones instead of each instantiating afresh
/// (with the instance taken first, 64 queued calls made 64 instances).
#[tokio::test]
async fn concurrent_calls_queued_for_a_cpu_turn_reuse_warm_instances() {
    let runtime = PluginRuntime::new(RuntimeConfig {
        cpu_turns: 1,
        ..RuntimeConfig::default()
    })
    .unwrap();
    let copy = load(&runtime, "runtime_copy");
    let calls: Vec<_> = (0..64)
        .map(|i| {
            let copy = copy.clone();
            tokio::spawn(async move {
                let x = NamedTensor::new("x", f32_tensor(vec![1, 2], &[i as f32, 1.0]));
                let out = copy.transform(&context(&[]), vec![x]).await.unwrap();
                assert_eq!(f32s(&out[0].tensor), vec![i as f32, 1.0]);
            })
        })
        .collect();
    for call in calls {
        call.await.unwrap();
    }
    let made = instantiations(&runtime);
    assert!(
        (1..=8).contains(&made),
        "64 concurrent calls made {made} instances"
    );
}

#[tokio::test]
async fn warm_instances_are_reused_only_for_the_same_tenant() {
    let runtime = runtime();
    let copy = load(&runtime, "runtime_copy");
    let call = |tenant: &str| {
        let mut context = context(&[]);
        context.request = weft_core::RequestContext::for_tenant(tenant);
        context
    };
    let x = || NamedTensor::new("x", f32_tensor(vec![1, 2], &[1.0, 2.0]));
    copy.transform(&call("acme"), vec![x()]).await.unwrap();
    copy.transform(&call("acme"), vec![x()]).await.unwrap();
    assert_eq!(
        instantiations(&runtime),
        1,
        "acme's second call reused its instance"
    );
    copy.transform(&call("bolt"), vec![x()]).await.unwrap();
    assert_eq!(
        instantiations(&runtime),
        2,
        "bolt never gets the instance acme's call left warm"
    );
    copy.transform(&call("acme"), vec![x()]).await.unwrap();
    copy.transform(&call("bolt"), vec![x()]).await.unwrap();
    assert_eq!(
        instantiations(&runtime),
        2,
        "each tenant keeps its own warm instance"
    );
}

#[tokio::test]
async fn reuse_can_be_turned_off() {
    let runtime = PluginRuntime::new(RuntimeConfig {
        reuse_instances: false,
        ..RuntimeConfig::default()
    })
    .unwrap();
    let echo = load(&runtime, "runtime_echo");
    for _ in 0..3 {
        echo.transform(&CallContext::default(), vec![])
            .await
            .unwrap();
    }
    assert_eq!(instantiations(&runtime), 3);
}

#[tokio::test]
async fn a_warm_instance_sees_only_the_grants_of_its_current_call() {
    let runtime = runtime();
    let plugin = load(&runtime, "runtime_call_model");
    let x = || NamedTensor::new("x", f32_tensor(vec![1, 2], &[1.0, 2.0]));
    let out = plugin
        .transform(&granted("double"), vec![x()])
        .await
        .unwrap();
    assert_eq!(f32s(&out[0].tensor), vec![2.0, 4.0]);
    // Same warm instance, a call that grants nothing: the model is out of reach.
    let mut ungranted = granted("double");
    ungranted.grants = Arc::default();
    let failure = plugin.transform(&ungranted, vec![x()]).await.unwrap_err();
    assert!(
        failure.to_string().contains("'double' is not granted"),
        "{failure}"
    );
    assert_eq!(instantiations(&runtime), 1);
}
