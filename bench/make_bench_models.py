"""Generate the benchmark models into bench/repository/models/*/1/model.onnx (git ignores them).

mlp:  the quickstart mlp (x[N,64] -> 256 -> relu -> 10, seed 7); linked, not generated.
wide: x[N,512] -> 2048 -> relu -> 2048 -> relu -> 512, seed 11 (~25 MB, compute-bound).
identity: y = x, x[N,262144] FP32 (1 MiB a row): moving large tensors costs all its time, the
      transport comparison (HTTP binary, gRPC, shared memory).
Both are bit-identical to ../shared/bench/make_models.py's, the models every host is compared on:
the same generator (examples/quickstart/make_models.py's `mlp`), the same seeds.
`cargo xtask bench` runs this once; it needs `onnx` and `numpy` (target/venv)."""
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "examples", "quickstart"))
from make_models import mlp  # noqa: E402

import onnx  # noqa: E402
from onnx import TensorProto, helper  # noqa: E402


def identity(width):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", width])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", width])
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "identity", [x], [y])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def save(name, model):
    path = os.path.join(HERE, "repository", "models", name, "1", "model.onnx")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    onnx.save(model, path)
    print("wrote", path)


if __name__ == "__main__":
    save("wide", mlp("wide", [512, 2048, 2048, 512], 11))
    save("identity", identity(262144))
