"""Models the end-to-end tests need, written as a Weft repository: `python make_test_models.py OUT`.

all_types: an Identity per Open Inference Protocol datatype: in_<dt> -> out_<dt>, shape [N, 3]
           (BYTES is an ONNX string tensor), to prove every type round-trips bit-exactly.
strings:   text BYTES[N, 3] -> same BYTES (ONNX string tensors), for string-specific errors.
cast_add:  a INT32[N], b FP16[N] -> sum_fp64 FP64 = double(a) + double(b), a_is_positive BOOL.
`cargo xtask setup` runs this into target/test-models."""
import os
import sys

import onnx
from onnx import TensorProto, helper

TYPES = {
    "bool": TensorProto.BOOL, "uint8": TensorProto.UINT8, "uint16": TensorProto.UINT16,
    "uint32": TensorProto.UINT32, "uint64": TensorProto.UINT64, "int8": TensorProto.INT8,
    "int16": TensorProto.INT16, "int32": TensorProto.INT32, "int64": TensorProto.INT64,
    "fp16": TensorProto.FLOAT16, "bf16": TensorProto.BFLOAT16, "fp32": TensorProto.FLOAT,
    "fp64": TensorProto.DOUBLE, "bytes": TensorProto.STRING,
}
CONFIG = 'platform = "onnx"\nmax_batch_size = 0\n'


def finish(graph):
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="weft-tests")
    model.ir_version = 8  # ONNX Runtime 1.22 rejects newer IR versions
    onnx.checker.check_model(model)
    return model


def all_types():
    nodes = [helper.make_node("Identity", [f"in_{n}"], [f"out_{n}"]) for n in TYPES]
    inputs = [helper.make_tensor_value_info(f"in_{n}", t, ["N", 3]) for n, t in TYPES.items()]
    outputs = [helper.make_tensor_value_info(f"out_{n}", t, ["N", 3]) for n, t in TYPES.items()]
    return finish(helper.make_graph(nodes, "all_types", inputs, outputs))


def strings():
    node = helper.make_node("Identity", ["text"], ["same"])
    return finish(helper.make_graph(
        [node], "strings",
        [helper.make_tensor_value_info("text", TensorProto.STRING, ["N", 3])],
        [helper.make_tensor_value_info("same", TensorProto.STRING, ["N", 3])]))


def cast_add():
    zero = helper.make_tensor("zero", TensorProto.INT32, [], [0])
    nodes = [
        helper.make_node("Cast", ["a"], ["a64"], to=TensorProto.DOUBLE),
        helper.make_node("Cast", ["b"], ["b64"], to=TensorProto.DOUBLE),
        helper.make_node("Add", ["a64", "b64"], ["sum_fp64"]),
        helper.make_node("Greater", ["a", "zero"], ["a_is_positive"]),
    ]
    graph = helper.make_graph(
        nodes, "cast_add",
        [helper.make_tensor_value_info("a", TensorProto.INT32, ["N"]),
         helper.make_tensor_value_info("b", TensorProto.FLOAT16, ["N"])],
        [helper.make_tensor_value_info("sum_fp64", TensorProto.DOUBLE, ["N"]),
         helper.make_tensor_value_info("a_is_positive", TensorProto.BOOL, ["N"])],
        [zero])
    return finish(graph)


def write(out, name, model):
    folder = os.path.join(out, "models", name)
    os.makedirs(os.path.join(folder, "1"), exist_ok=True)
    onnx.save(model, os.path.join(folder, "1", "model.onnx"))
    with open(os.path.join(folder, "model.toml"), "w") as f:
        f.write(CONFIG)


if __name__ == "__main__":
    out = sys.argv[1]
    write(out, "all_types", all_types())
    write(out, "cast_add", cast_add())
    write(out, "strings", strings())
    print("wrote", out)
