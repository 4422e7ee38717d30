"""Regenerate the quickstart's ONNX models (they are committed; run this only to change them).

mlp:     the reference model of ../shared/bench/make_models.py: x[N,64] -> 256 -> relu -> y[N,10],
         fixed seed 7, so Weft serves bit-identical weights to the other hosts it is compared with.
labeler: non-float types end to end: class_ids INT64[N] and keep BOOL[N] in; labels BYTES[N]
         (LabelEncoder 0..9 -> "zero".."nine", else "unknown") and dropped BOOL[N] = not keep out.
Needs the `onnx` and `numpy` packages (`cargo xtask setup` puts them in target/venv)."""
import os

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

HERE = os.path.dirname(os.path.abspath(__file__))


def finish(graph, opsets):
    model = helper.make_model(graph, opset_imports=opsets, producer_name="weft")
    model.ir_version = 8  # ONNX Runtime 1.22 rejects newer IR versions
    onnx.checker.check_model(model)
    return model


def mlp(name, dims, seed):
    rng = np.random.default_rng(seed)
    nodes, inits = [], []
    prev = "x"
    for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
        w = (rng.standard_normal((a, b)) / np.sqrt(a)).astype(np.float32)
        bias = (rng.standard_normal(b) * 0.01).astype(np.float32)
        inits += [numpy_helper.from_array(w, f"w{i}"), numpy_helper.from_array(bias, f"b{i}")]
        nodes.append(helper.make_node("MatMul", [prev, f"w{i}"], [f"m{i}"]))
        out = "y" if i == len(dims) - 2 else f"a{i}"
        nodes.append(helper.make_node("Add", [f"m{i}", f"b{i}"], [out if i == len(dims) - 2 else f"h{i}"]))
        if i < len(dims) - 2:
            nodes.append(helper.make_node("Relu", [f"h{i}"], [out]))
        prev = out
    graph = helper.make_graph(
        nodes, name,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", dims[0]])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", dims[-1]])], inits)
    return finish(graph, [helper.make_opsetid("", 17)])


def labeler():
    words = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
    nodes = [
        helper.make_node("LabelEncoder", ["class_ids"], ["labels"], domain="ai.onnx.ml",
                         keys_int64s=list(range(10)), values_strings=words, default_string="unknown"),
        helper.make_node("Not", ["keep"], ["dropped"]),
    ]
    graph = helper.make_graph(
        nodes, "labeler",
        [helper.make_tensor_value_info("class_ids", TensorProto.INT64, ["N"]),
         helper.make_tensor_value_info("keep", TensorProto.BOOL, ["N"])],
        [helper.make_tensor_value_info("labels", TensorProto.STRING, ["N"]),
         helper.make_tensor_value_info("dropped", TensorProto.BOOL, ["N"])])
    return finish(graph, [helper.make_opsetid("", 17), helper.make_opsetid("ai.onnx.ml", 3)])


def save(model, name):
    path = os.path.join(HERE, "models", name, "1", "model.onnx")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    onnx.save(model, path)
    print("wrote", path)


if __name__ == "__main__":
    save(mlp("mlp", [64, 256, 10], 7), "mlp")
    save(labeler(), "labeler")
