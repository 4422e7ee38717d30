"""Thousands of stored models and plugins, a few active: the benchmark of loading on demand
(issue 23).

Starts `weft serve` (release build) on an empty repository with an admin key, creates TENANTS
tenants and pushes to each MODELS copies of the quickstart `mlp` (one instance, tenant models
run in their tenant's sandboxed model worker), MODELS signed plugins (copies of the classify
example's `normalize` and `softmax`, under their own names, through `weft key` and `weft
plugin`) and MODELS graphs (the classify graph over one model and two of the plugins each).
Then it kills the server and starts it again on the same store under `--model-memory-budget`
(room for BUDGET_MODELS loaded models, each possibly in a model worker of its own tenant, which
the budget counts) and `--plugin-cache-budget` (room for BUDGET_PLUGINS compiled plugins of the
mean size the pushes reported). With `--no-plugins` it pushes and calls models alone. It
reports:

- start-up: seconds from spawning the process to its listening line and to the first ready;
- memory: RSS of the process tree (server and model workers) after start-up and its peak;
- a skewed workload: REQUESTS inference calls over the ACTIVE most popular graphs (or models),
  Zipf(1.1), CONCURRENCY callers: errors, hit rates (1 - loads / requests, models; 1 - loads /
  plugin calls, plugins) and evictions from the server's metrics, and latency p50/p99 of the
  calls that waited for a load (queue_us > 1 ms: a cold start) and of the others.

Usage (from the repository root, after `cargo build --release -p weft-cli`):
    target/venv/bin/python bench/lazy_models.py [--tenants 500] [--models 20] [--active 2000]
        [--requests 20000] [--concurrency 8] [--budget-models 400] [--budget-plugins 800]
"""
import argparse
import concurrent.futures
import json
import os
import random
import shutil
import signal
import subprocess
import threading
import time
import urllib.error
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ADMIN_KEY = "weft-bench-admin-key-0123456789"
GUESTS = os.environ.get("WEFT_GUESTS", os.path.join(ROOT, "target/guests/wasm32-wasip2/release"))
CONFIG = 'platform = "onnx"\nmax_batch_size = 64\n[ort]\ninstance_count = 1\n'
WORKER_BASELINE = 48 << 20


def call(method, url, key, body=None, headers=None):
    request = urllib.request.Request(url, data=body, method=method)
    request.add_header("Authorization", f"Bearer {key}")
    for name, value in (headers or {}).items():
        request.add_header(name, value)
    for attempt in range(50):
        try:
            with urllib.request.urlopen(request, timeout=120) as response:
                return response.status, json.loads(response.read() or b"{}")
        except urllib.error.HTTPError as error:
            if error.code == 429 and attempt < 49:
                time.sleep(float(error.headers.get("Retry-After", "1")))
                continue
            return error.code, json.loads(error.read() or b"{}")


def start(weft, data, extra):
    process = subprocess.Popen(
        [weft, "serve", "--repository", os.path.join(data, "repository"), "--data-dir",
         os.path.join(data, "store"), "--listen", "127.0.0.1:0", "--grpc-listen", "off",
         "--admin-key", ADMIN_KEY, "--ort-library",
         os.path.join(ROOT, "target/onnxruntime/libonnxruntime.so.1.22.1"), *extra],
        stdout=subprocess.PIPE, stderr=open(os.path.join(data, "server.log"), "a"), text=True,
        env={**os.environ, "WEFT_LOG": "warn"})
    started = time.monotonic()
    for line in process.stdout:
        if line.startswith("weft listening on "):
            url = line.split()[-1]
            listening = time.monotonic() - started
            while True:
                try:
                    if urllib.request.urlopen(f"{url}/v2/health/ready").status == 200:
                        break
                except OSError:
                    pass
                time.sleep(0.01)
            return process, url, listening, time.monotonic() - started
    raise SystemExit("weft serve exited before listening; see " + os.path.join(data, "server.log"))


def tree_rss_kib(pid):
    total, pending = 0, [pid]
    while pending:
        pid = pending.pop()
        try:
            for line in open(f"/proc/{pid}/status"):
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
            for task in os.listdir(f"/proc/{pid}/task"):
                pending += [int(c) for c in open(f"/proc/{pid}/task/{task}/children").read().split()]
        except OSError:
            pass
    return total


def metric(url, series):
    text = urllib.request.urlopen(f"{url}/metrics").read().decode()
    for line in text.splitlines():
        if line.startswith(series + " "):
            return float(line.split()[-1])
    return 0.0


def graph_toml(model):
    """The classify graph over model m<model> and plugins normalize<k>/softmax<k>, k = model // 2."""
    text = open(os.path.join(ROOT, "examples/classify/graphs/classify.toml")).read()
    k = model // 2
    return (text.replace('name = "classify"', f'name = "g{model}"')
            .replace('model = "mlp"', f'model = "m{model}"')
            .replace('plugin = "normalize"', f'plugin = "normalize{k}"')
            .replace('plugin = "softmax"', f'plugin = "softmax{k}"')
            .replace("deadline_ms = 1000", "deadline_ms = 30000"))


def push_plugins(weft, url, data, tenant, key, count):
    """Registers a signing key for the tenant, then signs and pushes `count` plugins."""
    prefix = os.path.join(data, "keys", f"t{tenant}")
    run = lambda *argv: subprocess.run([weft, *argv], check=True, capture_output=True, text=True)
    run("key", "gen", "--out", prefix)
    run("key", "register", "--server", url, "--api-key", key, prefix + ".key")
    for index in range(count):
        plugin = ("normalize", "softmax")[index % 2]
        name, wasm = f"{plugin}{index // 2}", os.path.join(GUESTS, f"{plugin}.wasm")
        signature = os.path.join(data, "keys", f"t{tenant}-{name}.sig")
        run("plugin", "sign", "--key", prefix + ".key", "--tenant", f"t{tenant}", "--name", name,
            "--version", "1", "--out", signature, wasm)
        run("plugin", "push", "--server", url, "--api-key", key, "--name", name, "--version", "1",
            "--signature", signature, wasm)


def percentile(values, p):
    values = sorted(values)
    return values[min(len(values) - 1, int(round((len(values) - 1) * p)))] if values else 0.0


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--weft", default=os.path.join(ROOT, "target/release/weft"))
    parser.add_argument("--tenants", type=int, default=500)
    parser.add_argument("--models", type=int, default=20)
    parser.add_argument("--active", type=int, default=2000)
    parser.add_argument("--requests", type=int, default=20000)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--budget-models", type=int, default=400)
    parser.add_argument("--budget-plugins", type=int, default=800)
    parser.add_argument("--no-plugins", action="store_true")
    args = parser.parse_args()
    plugins = not args.no_plugins
    if plugins and args.models % 2:
        parser.error("--models must be even: each graph uses a normalize and a softmax plugin pair")

    data = os.path.join(ROOT, "target/bench-lazy")
    shutil.rmtree(data, ignore_errors=True)
    os.makedirs(os.path.join(data, "repository"))
    os.makedirs(os.path.join(data, "keys"))
    onnx = open(os.path.join(ROOT, "examples/quickstart/models/mlp/1/model.onnx"), "rb").read()
    cost = len(onnx) + len(CONFIG)
    # Room for BUDGET_MODELS loaded models, each possibly in a model worker of its own tenant
    # (the budget counts a worker at --model-worker-baseline-bytes, 48 MiB by default).
    budget_bytes = args.budget_models * (cost + WORKER_BASELINE)
    budget = ["--model-memory-budget", str(budget_bytes)]

    process, url, _, _ = start(args.weft, data, budget)
    began = time.monotonic()
    keys = []
    for tenant in range(args.tenants):
        status, body = call("POST", f"{url}/api/v1/tenants", ADMIN_KEY,
                            json.dumps({"name": f"t{tenant}"}).encode(),
                            {"Content-Type": "application/json"})
        assert status == 201, body
        keys.append(body["api_key"]["key"])

    def push(pair):
        tenant, model = pair
        status, body = call("PUT", f"{url}/api/v1/models/m{model}/versions/1", keys[tenant],
                            CONFIG.encode() + onnx, {"Weft-Config-Length": str(len(CONFIG))})
        assert status == 201, body

    def push_tenant_plugins(tenant):
        push_plugins(args.weft, url, data, tenant, keys[tenant], args.models)

    def apply(pair):
        tenant, model = pair
        status, body = call("PUT", f"{url}/api/v1/graphs/g{model}", keys[tenant],
                            graph_toml(model).encode())
        assert status == 201, body

    pairs = [(t, m) for t in range(args.tenants) for m in range(args.models)]
    with concurrent.futures.ThreadPoolExecutor(args.concurrency) as pool:
        list(pool.map(push, pairs))
        if plugins:
            list(pool.map(push_tenant_plugins, range(args.tenants)))
            list(pool.map(apply, pairs))
    stored = f"{len(pairs)} models" + (f", {len(pairs)} plugins and {len(pairs)} graphs"
                                       if plugins else "")
    print(f"stored {stored} of {args.tenants} tenants in {time.monotonic() - began:.0f} s")
    if plugins:
        # Every pushed plugin stayed compiled (no plugin budget yet): their mean compiled size.
        compiled = metric(url, 'weft_plugin_cache_bytes{kind="resident"}') / len(pairs)
        plugin_budget = int(compiled * args.budget_plugins)
        budget += ["--plugin-cache-budget", str(plugin_budget)]
        print(f"mean compiled plugin {compiled / 1e3:.0f} kB; plugin budget "
              f"{plugin_budget / 1e6:.1f} MB ({args.budget_plugins} plugins)")
    process.send_signal(signal.SIGKILL)
    process.wait()

    process, url, listening, ready = start(args.weft, data, budget)
    rss_start = tree_rss_kib(process.pid)
    print(f"restart with {stored} stored: listening after {listening:.2f} s, "
          f"ready after {ready:.2f} s; RSS of the process tree {rss_start / 1024:.0f} MiB")

    rng = random.Random(23)
    active = rng.sample(pairs, min(args.active, len(pairs)))
    weights = [1.0 / (rank ** 1.1) for rank in range(1, len(active) + 1)]
    draws = rng.choices(active, weights=weights, k=args.requests)
    row = json.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 64],
                                  "data": [0.5] * 64}]}).encode()
    peak = [rss_start]
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            peak[0] = max(peak[0], tree_rss_kib(process.pid))
            time.sleep(0.5)

    sampler = threading.Thread(target=sample)
    sampler.start()

    def infer(pair):
        tenant, model = pair
        began = time.monotonic()
        target = f"g{model}" if plugins else f"m{model}"
        status, body = call("POST", f"{url}/v2/models/{target}/infer", keys[tenant], row,
                            {"Content-Type": "application/json"})
        elapsed = time.monotonic() - began
        return status, elapsed, (body.get("parameters") or {}).get("queue_us", 0)

    began = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(args.concurrency) as pool:
        results = list(pool.map(infer, draws))
    took = time.monotonic() - began
    stop.set()
    sampler.join()
    errors = sum(1 for status, _, _ in results if status != 200)
    cold = [elapsed * 1000 for status, elapsed, queued in results if status == 200 and queued > 1000]
    warm = [elapsed * 1000 for status, elapsed, queued in results if status == 200 and queued <= 1000]
    loads = metric(url, 'weft_model_loads_total{result="ok"}')
    evictions = metric(url, "weft_model_evictions_total")
    resident = metric(url, 'weft_model_resident_bytes{kind="resident"}')
    what = "graphs" if plugins else "models"
    print(f"workload: {len(results)} requests over {len(set(draws))} of {len(active)} active "
          f"{what} (Zipf 1.1, {args.concurrency} callers) in {took:.0f} s, {errors} errors")
    print(f"  model loads {loads:.0f}, hit rate {1 - loads / len(results):.3f}, evictions "
          f"{evictions:.0f}, resident {resident / 1e6:.1f} MB of a {budget_bytes / 1e6:.1f} MB "
          f"budget")
    if plugins:
        plugin_loads = metric(url, 'weft_plugin_loads_total{result="ok"}')
        plugin_failed = metric(url, 'weft_plugin_loads_total{result="failed"}')
        plugin_evictions = metric(url, "weft_plugin_evictions_total")
        plugin_resident = metric(url, 'weft_plugin_cache_bytes{kind="resident"}')
        calls = 2 * len(results)
        print(f"  plugin loads {plugin_loads:.0f} ({plugin_failed:.0f} failed), hit rate "
              f"{1 - plugin_loads / calls:.3f} of {calls} plugin calls, evictions "
              f"{plugin_evictions:.0f}, compiled {plugin_resident / 1e6:.1f} MB of a "
              f"{plugin_budget / 1e6:.1f} MB budget")
    print(f"  cold starts (waited > 1 ms for a load): {len(cold)}, p50 {percentile(cold, 0.5):.1f} ms, "
          f"p99 {percentile(cold, 0.99):.1f} ms")
    print(f"  warm: {len(warm)}, p50 {percentile(warm, 0.5):.2f} ms, p99 {percentile(warm, 0.99):.2f} ms")
    print(f"  RSS of the process tree: {rss_start / 1024:.0f} MiB after start-up, peak "
          f"{peak[0] / 1024:.0f} MiB")
    process.send_signal(signal.SIGTERM)
    process.wait(timeout=60)


if __name__ == "__main__":
    main()
