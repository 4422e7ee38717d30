"""Python plugins against Rust plugins, on one server, measured in the same run.

Run by `cargo xtask bench-python` (which builds everything first); standard library only.
A tenant pushes the Rust and the Python `normalize` and `softmax` (signed, over the `weft`
CLI) and applies four graphs: `norm-rust` / `norm-py` (one normalize node) and
`classify-rust` / `classify-py` (normalize -> mlp -> softmax). Then, alternating Rust and
Python so machine noise hits both:

1. push: wall time of `weft plugin push` (upload, compile, checks) per plugin;
2. cold after push: the first call of each norm graph (instantiation and first run);
3. warm: sequential calls of each norm graph, p50/p99 of the request and of the server's
   `plugin_us` (time inside the plugin hop);
4. cold after restart: the server restarted on the same store; time to listening and the first
   call of each norm graph (the plugin loads from the compile cache on first use);
5. classify at c=1 and c=64 through `weft bench` (JSON, one row of 64).
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request

ADMIN_KEY = "bench-python-admin-key"
ZSCORE = 'params = { mode = "zscore" }'


def one_node_graph(name, plugin):
    return f"""name = "{name}"
version = 1
[[input]]
name = "x"
datatype = "FP32"
shape = [-1, 64]
[[output]]
name = "y"
datatype = "FP32"
shape = [-1, 64]
from = "node.x"
[[node]]
name = "node"
kind = "transformer"
plugin = "{plugin}"
inputs = ["request"]
{ZSCORE}
"""


def classify_graph(name, normalize, softmax):
    return f"""name = "{name}"
version = 1
[[input]]
name = "x"
datatype = "FP32"
shape = [-1, 64]
[[output]]
name = "probabilities"
datatype = "FP32"
shape = [-1, 10]
from = "softmax.y"
[[node]]
name = "normalize"
kind = "transformer"
plugin = "{normalize}"
inputs = ["request"]
{ZSCORE}
[[node]]
name = "mlp"
kind = "model"
model = "mlp"
inputs = ["normalize"]
[[node]]
name = "softmax"
kind = "output_transformer"
plugin = "{softmax}"
inputs = ["mlp"]
"""


class Weft:
    def __init__(self, args, work):
        self.args = args
        self.work = work
        self.repo = os.path.join(work, "repo")
        self.data = os.path.join(work, "data")
        os.makedirs(os.path.join(self.repo, "models"), exist_ok=True)
        os.symlink(os.path.abspath(args.mlp), os.path.join(self.repo, "models", "mlp"))
        self.process = None
        self.url = None
        self.key = None

    def start(self):
        started = time.perf_counter()
        self.process = subprocess.Popen(
            [
                self.args.weft, "serve", "--repository", self.repo, "--data-dir", self.data,
                "--listen", "127.0.0.1:0", "--grpc-listen", "off", "--admin-key", ADMIN_KEY,
                "--ort-library", self.args.ort,
            ],
            stdout=subprocess.PIPE,
            stderr=open(os.path.join(self.work, "server.log"), "a"),
            text=True,
        )
        for line in self.process.stdout:
            if line.startswith("weft listening on "):
                self.url = line.split()[-1]
                return time.perf_counter() - started
        sys.exit("weft exited before listening; see " + os.path.join(self.work, "server.log"))

    def stop(self):
        self.process.terminate()
        self.process.wait(timeout=30)

    def cli(self, *args, key=None, admin=False):
        env = dict(os.environ, WEFT_SERVER=self.url)
        if key:
            env["WEFT_API_KEY"] = key
        if admin:
            env["WEFT_ADMIN_KEY"] = ADMIN_KEY
        done = subprocess.run([self.args.weft, *args], env=env, capture_output=True, text=True)
        if done.returncode != 0:
            sys.exit(f"weft {' '.join(args)} failed:\n{done.stdout}\n{done.stderr}")
        return done.stdout

    def infer(self, model, rows=1):
        body = json.dumps({
            "inputs": [{"name": "x", "datatype": "FP32", "shape": [rows, 64],
                        "data": [((i * 37) % 101) / 7.0 - 2.0 for i in range(rows * 64)]}],
        }).encode()
        request = urllib.request.Request(
            f"{self.url}/v2/models/{model}/infer", data=body,
            headers={"Authorization": f"Bearer {self.key}", "Content-Type": "application/json"},
        )
        started = time.perf_counter()
        with urllib.request.urlopen(request, timeout=120) as response:
            answer = json.loads(response.read())
        return (time.perf_counter() - started) * 1e3, answer["parameters"].get("plugin_us", 0) / 1e3


def percentile(values, p):
    values = sorted(values)
    return values[min(len(values) - 1, int(len(values) * p))]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--weft", required=True)
    parser.add_argument("--ort", required=True)
    parser.add_argument("--rust-guests", required=True)
    parser.add_argument("--python-guests", required=True)
    parser.add_argument("--mlp", required=True, help="the mlp model folder")
    parser.add_argument("--warm-calls", type=int, default=300)
    parser.add_argument("--duration", type=int, default=10)
    args = parser.parse_args()
    work = tempfile.mkdtemp(prefix="weft-bench-python-")
    weft = Weft(args, work)
    weft.start()

    # Quotas out of the way: this measures plugins, not the rate limiter.
    quotas = json.dumps({"requests_per_second": 1e6, "burst": 1000000, "max_concurrent_requests": 1024})
    created = json.loads(weft.cli("tenant", "create", "bench", "--share", "mlp", "--quotas", quotas,
                                  admin=True))
    weft.key = created["api_key"]["key"]
    prefix = os.path.join(work, "bench")
    weft.cli("key", "gen", "--out", prefix)
    weft.cli("key", "register", prefix + ".key", key=weft.key)
    plugins = {
        "normalize": os.path.join(args.rust_guests, "normalize.wasm"),
        "normalize-py": os.path.join(args.python_guests, "normalize-py.wasm"),
        "softmax": os.path.join(args.rust_guests, "softmax.wasm"),
        "softmax-py": os.path.join(args.python_guests, "softmax-py.wasm"),
    }
    print(f"machine: {os.cpu_count()} cores; weft {args.weft}")
    print("push (upload, compile, checks), wall time:")
    for name, path in plugins.items():
        weft.cli("plugin", "sign", "--key", prefix + ".key", "--tenant", "bench", "--name", name,
                 "--version", "1", path)
        started = time.perf_counter()
        weft.cli("plugin", "push", "--name", name, "--version", "1", path, key=weft.key)
        print(f"  {name:13} {os.path.getsize(path) / 1e6:6.2f} MB  {time.perf_counter() - started:6.2f} s")

    graphs = {
        "norm-rust": one_node_graph("norm-rust", "normalize"),
        "norm-py": one_node_graph("norm-py", "normalize-py"),
        "classify-rust": classify_graph("classify-rust", "normalize", "softmax"),
        "classify-py": classify_graph("classify-py", "normalize-py", "softmax-py"),
    }
    for name, text in graphs.items():
        path = os.path.join(work, f"{name}.toml")
        with open(path, "w") as file:
            file.write(text)
        weft.cli("graph", "apply", path, key=weft.key)

    pairs = [("norm-rust", "norm-py")]
    print("cold after push: first call, ms (request / plugin hop):")
    for rust, python in pairs:
        for graph in (rust, python):
            total, plugin = weft.infer(graph)
            print(f"  {graph:13} {total:8.2f} / {plugin:8.2f}")

    print(f"warm: {args.warm_calls} sequential calls each, ms (request p50 p99 / plugin hop p50 p99):")
    samples = {graph: ([], []) for pair in pairs for graph in pair}
    for _ in range(args.warm_calls):
        for graph in samples:
            total, plugin = weft.infer(graph)
            samples[graph][0].append(total)
            samples[graph][1].append(plugin)
    for graph, (totals, hops) in samples.items():
        print(f"  {graph:13} {statistics.median(totals):7.3f} {percentile(totals, 0.99):7.3f}"
              f" / {statistics.median(hops):7.3f} {percentile(hops, 0.99):7.3f}")

    weft.stop()
    ready = weft.start()
    print(f"cold after restart: listening after {ready:.2f} s; first call, ms (request / plugin hop):")
    for rust, python in pairs:
        for graph in (rust, python):
            total, plugin = weft.infer(graph)
            print(f"  {graph:13} {total:8.2f} / {plugin:8.2f}")

    print(f"classify graph through `weft bench` (JSON, 1 row, {args.duration} s each):")
    for concurrency in (1, 64):
        for graph in ("classify-rust", "classify-py"):
            done = subprocess.run(
                [args.weft, "bench", "--model", graph, "--url", weft.url, "--api-key", weft.key,
                 "--concurrency", str(concurrency), "--duration", str(args.duration),
                 "--warmup", "2", "--encoding", "json"],
                capture_output=True, text=True,
            )
            line = (done.stdout + done.stderr).strip().splitlines()[-1]
            print(f"  c={concurrency:<3} {line}")
    weft.stop()
    print(f"(work folder with the server log: {work})")


if __name__ == "__main__":
    main()
