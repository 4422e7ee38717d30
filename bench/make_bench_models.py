"""Generate the benchmark models into bench/repository/models/*/1/model.onnx (git ignores them).

mlp:  the quickstart mlp (x[N,64] -> 256 -> relu -> 10, seed 7); linked, not generated.
wide: x[N,512] -> 2048 -> relu -> 2048 -> relu -> 512, seed 11 (~25 MB, compute-bound).
Both are bit-identical to ../shared/bench/make_models.py's, the models every host is compared on:
the same generator (examples/quickstart/make_models.py's `mlp`), the same seeds.
`cargo xtask bench` runs this once; it needs `onnx` and `numpy` (target/venv)."""
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "examples", "quickstart"))
from make_models import mlp  # noqa: E402

import onnx  # noqa: E402

if __name__ == "__main__":
    path = os.path.join(HERE, "repository", "models", "wide", "1", "model.onnx")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    onnx.save(mlp("wide", [512, 2048, 2048, 512], 11), path)
    print("wrote", path)
