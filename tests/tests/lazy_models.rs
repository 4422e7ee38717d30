//! Tenant models load on demand under `--model-memory-budget`: a push leaves its version
//! loaded while the budget has room, the least recently used idle model is unloaded to make
//! room, an unloaded model loads again on its next request (the wait in `queue_us`), pinned
//! models stay, Triton's repository extension loads and unloads by name (tenant-scoped), and a
//! restart registers every stored model without loading one.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use serde_json::{Value, json};
use support::tenants::*;
use support::*;

const CONFIG: &str = "platform = \"onnx\"\nmax_batch_size = 64\n[ort]\ninstance_count = 1\n";
/// What `--model-worker-baseline-bytes` charges for a tenant's model worker (its default).
const WORKER: u64 = 48 << 20;
const PINNED: &str =
    "platform = \"onnx\"\nmax_batch_size = 64\npin = true\n[ort]\ninstance_count = 1\n";

/// A metric's value from `/metrics` (the first series whose line starts with `series `).
async fn metric(server: &Server, series: &str) -> f64 {
    let text = reqwest::get(server.url("/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    text.lines()
        .find_map(|line| line.strip_prefix(&format!("{series} ")))
        .map(|value| value.parse().unwrap())
        .unwrap_or_else(|| panic!("no {series} in /metrics"))
}

/// The index entries' reasons by model name.
async fn reasons(server: &Server, key: &str) -> std::collections::HashMap<String, String> {
    let (status, index) = send(
        client_with_key(key)
            .post(server.url("/v2/repository/index"))
            .body(""),
    )
    .await;
    assert_eq!(status, 200, "{index}");
    index
        .as_array()
        .unwrap()
        .iter()
        .map(|entry| {
            assert_eq!(entry["state"], "READY", "{entry}");
            (
                entry["name"].as_str().unwrap().to_string(),
                entry["reason"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect()
}

async fn queue_us(server: &Server, key: &str, model: &str) -> u64 {
    let (status, body) = infer(server, key, model).await;
    assert_eq!(status, 200, "{model}: {body}");
    body["parameters"]["queue_us"].as_u64().unwrap()
}

async fn post(server: &Server, key: &str, path: &str) -> (u16, Value) {
    send(client_with_key(key).post(server.url(path)).body("")).await
}

#[tokio::test(flavor = "multi_thread")]
async fn tenant_models_load_on_demand_and_give_way_under_the_budget() {
    let onnx = mlp_onnx();
    // Room for two loaded models (each costs its file size, one instance), not three.
    let cost = (onnx.len() + CONFIG.len()) as u64;
    // The tenant's model worker and two loaded models (each its file size, one instance).
    let limit = WORKER + cost * 5 / 2;
    let budget = limit.to_string();
    let repo = Repo::new().with_model(&quickstart(), "mlp");
    let data = tempfile::tempdir().unwrap();
    let server = Server::try_start_in(repo.path(), &["--model-memory-budget", &budget], data)
        .unwrap_or_else(|log| panic!("{log}"));
    let key = create_tenant(&server, "acme", json!({ "shared_models": ["mlp"] })).await;
    let other = create_tenant(&server, "bolt", json!({})).await;
    for (name, config) in [("a", CONFIG), ("b", CONFIG), ("c", CONFIG), ("p", PINNED)] {
        let (status, body) = push_model(&server, &key, name, 1, config, &onnx).await;
        assert_eq!(status, 201, "{name}: {body}");
    }
    // Every push loaded its version; the budget kept two: the pinned one and the newest.
    let resident = metric(&server, "weft_model_resident_bytes{kind=\"resident\"}").await;
    assert!(resident <= limit as f64, "{resident} over the budget");
    assert!(metric(&server, "weft_model_evictions_total").await >= 2.0);
    let index = reasons(&server, &key).await;
    assert_eq!(index["p"], "", "pinned stays loaded: {index:?}");
    assert!(
        index["a"].contains("loads on its first request"),
        "{index:?}"
    );

    // An unloaded model answers its next request after loading again, the wait as queue time;
    // then it is loaded and waits no more.
    let loads_before = metric(&server, "weft_model_loads_total{result=\"ok\"}").await;
    assert!(queue_us(&server, &key, "a").await > 0);
    assert_eq!(queue_us(&server, &key, "a").await, 0);
    assert_eq!(
        metric(&server, "weft_model_loads_total{result=\"ok\"}").await,
        loads_before + 1.0
    );
    // Every model keeps answering, each in turn evicting another; the pinned one stays.
    for name in ["b", "c", "a", "b", "p", "c"] {
        let (status, body) = infer(&server, &key, name).await;
        assert_eq!(status, 200, "{name}: {body}");
    }
    assert_eq!(reasons(&server, &key).await["p"], "");

    // Triton's repository extension, in the tenant's namespace.
    let (status, body) = post(&server, &key, "/v2/repository/models/a/unload").await;
    assert_eq!(status, 200, "{body}");
    assert!(reasons(&server, &key).await["a"].contains("first request"));
    let (status, body) = post(&server, &key, "/v2/repository/models/a/load").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(reasons(&server, &key).await["a"], "");
    let (status, body) = post(&server, &key, "/v2/repository/models/p/unload").await;
    assert_eq!(status, 409, "{body}");
    assert!(body["error"].as_str().unwrap().contains("pinned"), "{body}");
    let (status, body) = post(&server, &key, "/v2/repository/models/mlp/unload").await;
    assert_eq!(status, 409, "{body}");
    for (caller, name) in [(&key, "nope"), (&other, "a")] {
        let (status, body) = post(
            &server,
            caller,
            &format!("/v2/repository/models/{name}/load"),
        )
        .await;
        assert_eq!(status, 404, "{body}");
        assert_eq!(
            body["error"],
            format!("Request for unknown model: '{name}' is not found")
        );
    }

    // A restart registers every stored model and loads none until asked.
    let data = server.crash();
    let server = Server::try_start_in(repo.path(), &["--model-memory-budget", &budget], data)
        .unwrap_or_else(|log| panic!("{log}"));
    assert_eq!(
        metric(&server, "weft_model_resident_bytes{kind=\"resident\"}").await,
        0.0
    );
    assert_eq!(
        metric(&server, "weft_model_loads_total{result=\"ok\"}").await,
        0.0
    );
    let index = reasons(&server, &key).await;
    for name in ["a", "b", "c", "p"] {
        assert!(index[name].contains("first request"), "{name}: {index:?}");
    }
    assert!(queue_us(&server, &key, "c").await > 0);
    let (status, body) = infer(&server, &key, "p").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        metric(&server, "weft_model_loads_total{result=\"ok\"}").await,
        2.0
    );
}

/// Sums VmRSS (KiB) of `pid` and its descendants (the model workers).
fn tree_rss_kib(pid: u32) -> u64 {
    let mut total = 0;
    let mut pending = vec![pid];
    while let Some(pid) = pending.pop() {
        if let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) {
            total += status
                .lines()
                .find_map(|line| line.strip_prefix("VmRSS:"))
                .and_then(|value| value.split_whitespace().next()?.parse::<u64>().ok())
                .unwrap_or(0);
        }
        // Children are listed per thread that started them.
        let tasks = std::fs::read_dir(format!("/proc/{pid}/task"))
            .into_iter()
            .flatten();
        for task in tasks.flatten() {
            if let Ok(children) = std::fs::read_to_string(task.path().join("children")) {
                pending.extend(
                    children
                        .split_whitespace()
                        .filter_map(|c| c.parse::<u32>().ok()),
                );
            }
        }
    }
    total
}

/// Graph `g<k>` of the scale test: plugins `normalize<k % 5>` and `softmax<k % 5>` around model
/// `m<k>`, with a deadline that leaves room for cold starts on a loaded CI machine.
fn scale_graph(k: usize) -> String {
    classify_graph(&format!("g{k}"), 1, &format!("m{k}"))
        .replace(
            "plugin = \"normalize\"",
            &format!("plugin = \"normalize{}\"", k % 5),
        )
        .replace(
            "plugin = \"softmax\"",
            &format!("plugin = \"softmax{}\"", k % 5),
        )
        .replace("deadline_ms = 1000", "deadline_ms = 20000")
}

/// The CI-sized version of the 10,000-model benchmark (BENCHMARKS.md): 12 tenants with 10
/// models, 10 plugins and 10 graphs over them each, budgets for 8 loaded models and about 10
/// compiled plugins, a restart that loads and compiles nothing, then a skewed (Zipf) workload
/// over all 120 graphs in which every request succeeds, both budgets hold, models and plugins
/// are evicted and reloaded, the process tree's memory stays bounded, and a new plugin version
/// pushed afterwards is served (hot swap).
#[tokio::test(flavor = "multi_thread")]
async fn a_skewed_workload_over_many_stored_models_stays_in_the_budget() {
    const TENANTS: usize = 12;
    const MODELS: usize = 10;
    let onnx = mlp_onnx();
    let cost = (onnx.len() + CONFIG.len()) as u64;
    // Eight models, each possibly in a model worker of its own tenant.
    let limit = 8 * (WORKER + cost);
    let budget = limit.to_string();
    let repo = Repo::new();
    let data = tempfile::tempdir().unwrap();
    let server = Server::try_start_in(repo.path(), &["--model-memory-budget", &budget], data)
        .unwrap_or_else(|log| panic!("{log}"));
    let mut keys = Vec::new();
    let mut signers = Vec::new();
    for tenant in 0..TENANTS {
        let key = create_tenant(&server, &format!("t{tenant}"), json!({})).await;
        signers.push(signing_key(&server, &key).await);
        keys.push(key);
    }
    let pushes = keys.iter().zip(&signers).map(|(key, signer)| {
        let (server, onnx) = (&server, &onnx);
        async move {
            for model in 0..MODELS {
                let (status, body) =
                    push_model(server, key, &format!("m{model}"), 1, CONFIG, onnx).await;
                assert_eq!(status, 201, "{body}");
            }
            for k in 0..MODELS / 2 {
                for plugin in ["normalize", "softmax"] {
                    let name = format!("{plugin}{k}");
                    let (status, body) =
                        push_plugin(server, key, signer, &name, "1", guest(plugin)).await;
                    assert_eq!(status, 201, "{name}: {body}");
                }
            }
            for k in 0..MODELS {
                let (status, body) =
                    apply_graph(server, key, &format!("g{k}"), &scale_graph(k)).await;
                assert_eq!(status, 201, "g{k}: {body}");
            }
        }
    });
    futures_util::future::join_all(pushes).await;
    // Every pushed plugin stayed compiled (no plugin budget yet): their mean compiled size.
    let plugins = (TENANTS * MODELS) as f64;
    let compiled = metric(&server, "weft_plugin_cache_bytes{kind=\"resident\"}").await / plugins;
    assert!(compiled > 0.0);
    // Room for about ten compiled plugins of the 120.
    let plugin_limit = (compiled * 10.0) as u64;
    let plugin_budget = plugin_limit.to_string();
    let flags = [
        "--model-memory-budget",
        &budget,
        "--plugin-cache-budget",
        &plugin_budget,
    ];

    let data = server.crash();
    let started = std::time::Instant::now();
    let server =
        Server::try_start_in(repo.path(), &flags, data).unwrap_or_else(|log| panic!("{log}"));
    let ready_in = started.elapsed();
    assert!(
        ready_in < std::time::Duration::from_secs(30),
        "ready after {ready_in:?}"
    );
    for series in [
        "weft_model_loads_total{result=\"ok\"}",
        "weft_plugin_loads_total{result=\"ok\"}",
        "weft_plugin_cache_bytes{kind=\"resident\"}",
    ] {
        assert_eq!(metric(&server, series).await, 0.0, "{series} at start");
    }
    let rss_at_start = tree_rss_kib(server.pid());

    // Zipf(1.1) over the 120 models, from a fixed-seed generator, 8 callers at a time.
    let weights: Vec<f64> = (1..=TENANTS * MODELS)
        .map(|rank| 1.0 / (rank as f64).powf(1.1))
        .collect();
    let total: f64 = weights.iter().sum();
    let mut seed = 0x9e37_79b9_7f4a_7c15_u64;
    let mut draws = Vec::new();
    for _ in 0..480 {
        seed = seed
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        let mut point = (seed >> 11) as f64 / (1u64 << 53) as f64 * total;
        let rank = weights
            .iter()
            .position(|weight| {
                point -= weight;
                point <= 0.0
            })
            .unwrap_or(weights.len() - 1);
        draws.push(rank);
    }
    let mut touched = std::collections::HashSet::new();
    let mut peak_rss = 0;
    for chunk in draws.chunks(8) {
        let calls = chunk.iter().map(|&rank| {
            let (key, graph) = (&keys[rank % TENANTS], format!("g{}", rank / TENANTS));
            let server = &server;
            async move {
                let (status, body) = infer(server, key, &graph).await;
                assert_eq!(status, 200, "t{} {graph}: {body}", rank % TENANTS);
            }
        });
        futures_util::future::join_all(calls).await;
        touched.extend(chunk.iter().copied());
        peak_rss = peak_rss.max(tree_rss_kib(server.pid()));
        let resident = metric(&server, "weft_model_resident_bytes{kind=\"resident\"}").await;
        assert!(resident <= limit as f64, "{resident} bytes over the budget");
        let compiled = metric(&server, "weft_plugin_cache_bytes{kind=\"resident\"}").await;
        assert!(
            compiled <= plugin_limit as f64,
            "{compiled} compiled bytes over the plugin budget"
        );
    }
    let loads = metric(&server, "weft_model_loads_total{result=\"ok\"}").await;
    let evictions = metric(&server, "weft_model_evictions_total").await;
    assert!(
        touched.len() > 8,
        "the workload must touch more models than fit"
    );
    assert!(
        evictions > 0.0 && loads >= touched.len() as f64,
        "{loads} loads, {evictions} evictions"
    );
    let plugin_loads = metric(&server, "weft_plugin_loads_total{result=\"ok\"}").await;
    let plugin_evictions = metric(&server, "weft_plugin_evictions_total").await;
    assert!(
        plugin_evictions > 0.0 && plugin_loads > 10.0,
        "{plugin_loads} plugin loads, {plugin_evictions} plugin evictions"
    );
    for series in [
        "weft_model_loads_total{result=\"failed\"}",
        "weft_plugin_loads_total{result=\"failed\"}",
    ] {
        assert_eq!(metric(&server, series).await, 0.0, "{series}");
    }
    println!(
        "ready in {ready_in:?}; {} requests over {} graphs: {loads} model loads (hit rate \
         {:.2}), {evictions} evictions; {plugin_loads} plugin loads, {plugin_evictions} \
         evictions; RSS of the process tree {rss_at_start} KiB at start, peak {peak_rss} KiB",
        draws.len(),
        touched.len(),
        1.0 - loads / draws.len() as f64
    );
    // What the process tree gained stays within the budget (which counts each tenant's model
    // worker), with a quarter for what no budget sees (allocator slack, the server's own
    // buffers). Without eviction it would be 78 models in 12 workers.
    let grown = peak_rss.saturating_sub(rss_at_start) * 1024;
    let budgets = limit + plugin_limit;
    assert!(
        grown <= budgets + budgets / 4,
        "grew {grown} bytes against budgets of {budgets}: {peak_rss} KiB peak, \
         {rss_at_start} KiB at start"
    );

    // Hot swap under the plugin budget: a new version of a plugin serves the next call, which
    // compiles it on demand, and its series appear under its new version.
    let (status, body) = push_plugin(
        &server,
        &keys[0],
        &signers[0],
        "normalize0",
        "2",
        guest("normalize"),
    )
    .await;
    assert_eq!(status, 201, "{body}");
    let (status, body) = infer(&server, &keys[0], "g0").await;
    assert_eq!(status, 200, "{body}");
    assert!(
        metric(
            &server,
            "weft_plugin_calls_total{plugin=\"t0/normalize0@2\"}"
        )
        .await
            >= 1.0
    );
}
