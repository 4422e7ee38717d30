"""The GPU device check (`cargo xtask gpu-check`): run on a machine with an NVIDIA GPU.

1. Datatypes: for every datatype the CUDA provider computes, one model served twice from one
   repository, `<name>_cpu` and `<name>_cuda`; the same random inputs through both over HTTP
   (tritonclient, binary) must agree within the datatype's tolerance (integers exactly).
2. Throughput: the reference `wide` behind the dynamic batcher on the GPU at c=64 over HTTP,
   against `weft bench --in-process` batches of 64 on the same GPU (the limit), with
   `nv_gpu_utilization` sampled from /metrics during the load.
3. No silent CPU fallback: a CUDA model on a device that does not exist, and every CUDA model
   under the CPU build of ONNX Runtime, are UNAVAILABLE with the reason.
4. Metrics: the nv_gpu_* families and the per-device batch and compute histograms are there,
   and /config reports KIND_GPU.

Prints each check and a Markdown table for BENCHMARKS.md; exits non-zero on any failure.
"""

import argparse
import ctypes
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
import urllib.request

import numpy as np
import onnx
import tritonclient.http as httpclient
from onnx import TensorProto, helper, numpy_helper

KEY = "weft-gpu-check-key"
HEADERS = {"Authorization": f"Bearer {KEY}"}

# V2 datatype -> (ONNX type, numpy type, rtol, atol). Floats compute MatMul + Softmax; every
# type goes through Cast on the device (the CUDA provider's Cast takes all of these).
FLOATS = {
    "FP32": (TensorProto.FLOAT, np.float32, 1e-4, 1e-5),
    "FP16": (TensorProto.FLOAT16, np.float16, 1e-2, 1e-3),
    "FP64": (TensorProto.DOUBLE, np.float64, 1e-10, 1e-12),
}
INTEGERS = {
    "INT32": (TensorProto.INT32, np.int32),
    "INT64": (TensorProto.INT64, np.int64),
}
CAST_ONLY = {
    "INT8": (TensorProto.INT8, np.int8),
    "INT16": (TensorProto.INT16, np.int16),
    "UINT8": (TensorProto.UINT8, np.uint8),
    "UINT16": (TensorProto.UINT16, np.uint16),
    "UINT32": (TensorProto.UINT32, np.uint32),
    "UINT64": (TensorProto.UINT64, np.uint64),
    "BOOL": (TensorProto.BOOL, np.bool_),
}

failures = []


def check(ok, what):
    print(("PASS " if ok else "FAIL ") + what, flush=True)
    if not ok:
        failures.append(what)


def save(model, folder, toml):
    os.makedirs(os.path.join(folder, "1"), exist_ok=True)
    onnx.save(model, os.path.join(folder, "1", "model.onnx"))
    with open(os.path.join(folder, "model.toml"), "w") as out:
        out.write(toml)


def model_of(nodes, inputs, outputs, initializers=()):
    graph = helper.make_graph(nodes, "check", inputs, outputs, list(initializers))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def float_model(onnx_type, np_type):
    rng = np.random.default_rng(3)
    w = numpy_helper.from_array((rng.standard_normal((64, 32)) * 0.2).astype(np_type), "w")
    b = numpy_helper.from_array((rng.standard_normal(32) * 0.1).astype(np_type), "b")
    x = helper.make_tensor_value_info("x", onnx_type, ["N", 64])
    y = helper.make_tensor_value_info("y", onnx_type, ["N", 32])
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["h"]),
        helper.make_node("Add", ["h", "b"], ["z"]),
        helper.make_node("Softmax", ["z"], ["y"], axis=-1),
    ]
    return model_of(nodes, [x], [y], [w, b])


def integer_model(onnx_type):
    x = helper.make_tensor_value_info("x", onnx_type, ["N", 64])
    y = helper.make_tensor_value_info("y", onnx_type, ["N", 64])
    nodes = [
        helper.make_node("Mul", ["x", "x"], ["sq"]),
        helper.make_node("Add", ["sq", "x"], ["y"]),
    ]
    return model_of(nodes, [x], [y])


def cast_model(onnx_type):
    x = helper.make_tensor_value_info("x", onnx_type, ["N", 64])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 64])
    two = numpy_helper.from_array(np.array(2.0, dtype=np.float32), "two")
    nodes = [
        helper.make_node("Cast", ["x"], ["f"], to=TensorProto.FLOAT),
        helper.make_node("Mul", ["f", "two"], ["y"]),
    ]
    return model_of(nodes, [x], [y], [two])


def toml(execution, device, batching=False):
    text = 'platform = "onnx"\nmax_batch_size = 64\n'
    if batching:
        text += "[dynamic_batching]\npreferred_batch_size = [64]\nmax_queue_delay_microseconds = 500\n"
    text += f'[ort]\nexecution = "{execution}"\n'
    if execution == "cuda":
        text += f"device = {device}\n"
    return text


def write_repository(root, wide_onnx, device):
    models = os.path.join(root, "models")
    shutil.rmtree(root, ignore_errors=True)
    os.makedirs(models)
    cases = {}
    for name, (onnx_type, np_type, rtol, atol) in FLOATS.items():
        cases[name] = (float_model(onnx_type, np_type), np_type, rtol, atol)
    for name, (onnx_type, np_type) in INTEGERS.items():
        cases[name] = (integer_model(onnx_type), np_type, 0, 0)
    for name, (onnx_type, np_type) in CAST_ONLY.items():
        cases[name] = (cast_model(onnx_type), np_type, 0, 0)
    for name, (model, *_rest) in cases.items():
        save(model, os.path.join(models, f"dt_{name.lower()}_cpu"), toml("cpu", device))
        save(model, os.path.join(models, f"dt_{name.lower()}_cuda"), toml("cuda", device))
    wide = onnx.load(wide_onnx)
    save(wide, os.path.join(models, "wide_cuda"), toml("cuda", device))
    save(wide, os.path.join(models, "wide_cuda_batched"), toml("cuda", device, batching=True))
    save(wide, os.path.join(models, "wide_cpu"), toml("cpu", device))
    save(wide, os.path.join(models, "wide_no_such_device"), toml("cuda", 99))
    return cases


class Weft:
    def __init__(self, args, ort_library, repository, data_dir):
        env = dict(os.environ, WEFT_LOG="warn", LD_LIBRARY_PATH=args.cuda_libraries)
        shutil.rmtree(data_dir, ignore_errors=True)
        self.process = subprocess.Popen(
            [args.weft, "serve", "--repository", repository, "--listen", "127.0.0.1:0",
             "--data-dir", data_dir, "--ort-library", ort_library, "--bootstrap-key", KEY],
            stdout=subprocess.PIPE, env=env, text=True)
        self.url = None
        for line in self.process.stdout:
            if line.startswith("weft listening on "):
                self.url = line.split("weft listening on ", 1)[1].strip()
                break
        if self.url is None:
            sys.exit("weft serve exited before listening; its log is above")
        threading.Thread(target=self.process.stdout.read, daemon=True).start()

    def get(self, path):
        request = urllib.request.Request(self.url + path, headers=HEADERS)
        with urllib.request.urlopen(request, timeout=30) as answer:
            return answer.read().decode()

    def index(self):
        request = urllib.request.Request(self.url + "/v2/repository/index", data=b"",
                                         headers=HEADERS, method="POST")
        with urllib.request.urlopen(request, timeout=30) as answer:
            return {entry["name"]: entry for entry in json.loads(answer.read())}

    def stop(self):
        self.process.kill()
        self.process.wait()


def infer(client, model, array, datatype):
    tensor = httpclient.InferInput("x", list(array.shape), datatype)
    tensor.set_data_from_numpy(array, binary_data=True)
    result = client.infer(model, [tensor], headers=HEADERS)
    return result.as_numpy("y")


def random_input(np_type, rng):
    shape = (8, 64)
    if np_type == np.bool_:
        return rng.integers(0, 2, shape).astype(np.bool_)
    if np.issubdtype(np_type, np.floating):
        return rng.standard_normal(shape).astype(np_type)
    info = np.iinfo(np_type)
    # Small enough that x*x + x does not overflow, so both providers compute the same integers.
    low, high = max(info.min, -1000), min(info.max, 1000)
    return rng.integers(low, high, shape).astype(np_type)


def weft_bench(args, extra, env=None):
    output = subprocess.run([args.weft, "bench", *extra], capture_output=True, text=True,
                            env=dict(os.environ, WEFT_LOG="warn", WEFT_API_KEY=KEY, **(env or {})))
    line = output.stdout.strip().splitlines()[-1] if output.stdout.strip() else ""
    print(line, flush=True)
    if output.returncode != 0 or " 0 errors" not in line:
        failures.append(f"weft bench {extra}: {line} {output.stderr[-2000:]}")
        return None
    return float(re.search(r"([0-9.]+) rows/s", line).group(1))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--weft", required=True)
    parser.add_argument("--ort-gpu", required=True)
    parser.add_argument("--ort-cpu", required=True)
    parser.add_argument("--cuda-libraries", required=True)
    parser.add_argument("--work", required=True)
    parser.add_argument("--device", type=int, default=0)
    parser.add_argument("--duration", default="10")
    args = parser.parse_args()

    try:
        ctypes.CDLL("libcuda.so.1")
    except OSError as error:
        sys.exit(f"no NVIDIA driver on this machine ({error}): the device check needs a GPU")

    here = os.path.dirname(os.path.abspath(__file__))
    repository = os.path.join(args.work, "repository")
    cases = write_repository(repository, os.path.join(here, "repository/models/wide/1/model.onnx"),
                             args.device)
    figures = {}

    server = Weft(args, args.ort_gpu, repository, os.path.join(args.work, "data"))
    try:
        index = server.index()
        for name in sorted(index):
            if name.endswith("_cuda") or name.endswith("_cpu") or name == "wide_cuda_batched":
                entry = index[name]
                check(entry.get("state") == "READY",
                      f"{name} is READY ({entry.get('state')}: {entry.get('reason', '')})")
        refused = index.get("wide_no_such_device", {})
        check(refused.get("state") == "UNAVAILABLE" and "99" in refused.get("reason", ""),
              f"a CUDA model on device 99 is UNAVAILABLE with the reason ({refused})")

        client = httpclient.InferenceServerClient(server.url.replace("http://", ""))
        rng = np.random.default_rng(5)
        for name, (_model, np_type, rtol, atol) in cases.items():
            array = random_input(np_type, rng)
            try:
                cpu = infer(client, f"dt_{name.lower()}_cpu", array, name)
                gpu = infer(client, f"dt_{name.lower()}_cuda", array, name)
            except Exception as error:  # noqa: BLE001 - any failure is this check's failure
                check(False, f"{name}: CUDA and CPU both answer ({error})")
                continue
            if rtol == 0:
                same = np.array_equal(cpu, gpu)
                worst = "exact" if same else "differs"
            else:
                same = np.allclose(gpu.astype(np.float64), cpu.astype(np.float64), rtol=rtol,
                                   atol=atol)
                worst = f"max |diff| {np.max(np.abs(gpu.astype(np.float64) - cpu)):.3g}"
            check(same, f"{name}: CUDA matches the CPU ({worst})")

        config = json.loads(server.get("/v2/models/wide_cuda/config"))
        group = (config.get("instance_group") or [{}])[0]
        check(group.get("kind") == "KIND_GPU" and group.get("gpus") == [args.device],
              f"/config of wide_cuda reports KIND_GPU on device {args.device} ({group})")

        samples = []
        stop = threading.Event()

        def sample():
            while not stop.wait(0.5):
                for line in server.get("/metrics").splitlines():
                    if line.startswith("nv_gpu_utilization{"):
                        samples.append(float(line.rsplit(" ", 1)[1]))

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        figures["http c=64"] = weft_bench(args, [
            "--model", "wide_cuda_batched", "--url", server.url, "--concurrency", "64",
            "--duration", args.duration, "--warmup", "3"])
        stop.set()
        sampler.join()
        busy = samples[2:] or samples
        figures["utilization"] = (sum(busy) / len(busy), max(busy)) if busy else None
        check(bool(busy), "nv_gpu_utilization is scraped during the load")
        metrics = server.get("/metrics")
        for family in ["nv_gpu_memory_total_bytes", "nv_gpu_memory_used_bytes",
                       "nv_gpu_power_usage", "nv_gpu_power_limit", "nv_energy_consumption",
                       "weft_gpu_batch_size", "weft_gpu_compute_duration_seconds",
                       "weft_model_gpu_memory_bytes"]:
            check(f"\n{family}" in metrics, f"/metrics has {family}")
    finally:
        server.stop()

    gpu_env = {"LD_LIBRARY_PATH": args.cuda_libraries}
    for model, rows, concurrency in [("wide_cuda", "64", "1"), ("wide_cuda", "64", "2"),
                                     ("wide_cpu", "64", "2")]:
        figures[f"{model} in-process batch {rows} c={concurrency}"] = weft_bench(args, [
            "--model", model, "--in-process", "--repository", repository, "--rows", rows,
            "--concurrency", concurrency, "--duration", args.duration, "--warmup", "3",
            "--ort-library", args.ort_gpu], env=gpu_env)

    # The CPU build of ONNX Runtime: every CUDA model is refused, none runs on the CPU.
    server = Weft(args, args.ort_cpu, repository, os.path.join(args.work, "data-cpu"))
    try:
        index = server.index()
        for name, entry in sorted(index.items()):
            if name.endswith("_cuda"):
                check(entry.get("state") == "UNAVAILABLE" and "CPU build" in entry.get("reason", ""),
                      f"{name} under the CPU build is UNAVAILABLE with the reason ({entry})")
    finally:
        server.stop()

    limit = max(filter(None, [figures.get("wide_cuda in-process batch 64 c=1"),
                              figures.get("wide_cuda in-process batch 64 c=2")]), default=None)
    http = figures.get("http c=64")
    print("\n| GPU check | figure |\n|---|---|")
    print(f"| wide_cuda_batched, HTTP binary, c=64 | {http or 'failed'} rows/s |")
    for key, value in figures.items():
        if key.startswith("wide_"):
            print(f"| {key} | {value or 'failed'} rows/s |")
    if http and limit:
        print(f"| HTTP c=64 / in-process limit | {http / limit:.2f}x |")
    if figures.get("utilization"):
        mean, peak = figures["utilization"]
        print(f"| nv_gpu_utilization during the c=64 load | mean {mean:.0%}, max {peak:.0%} |")
    if failures:
        print(f"\n{len(failures)} check(s) failed:")
        for failure in failures:
            print(" -", failure)
        sys.exit(1)
    print("\nevery GPU check passed")


if __name__ == "__main__":
    main()
