"""Hostile ONNX models for Weft's upload checks: `python make_hostile_models.py OUT SECRET_PATH`.

Every model is otherwise valid (input x FP32[N, 4] -> output y FP32[N, 4], opset 17, IR version 8);
weft-onnx-check must refuse all but clean.onnx before ONNX Runtime sees the bytes.

clean.onnx              control: y = x + w, w an embedded FP32[4] initializer.
external_absolute.onnx  w's data is external, location = SECRET_PATH (an absolute path, e.g. the
                        server's state.json): ORT 1.22 would read that file as weights.
external_relative.onnx  w's data is external, location 'state.json' (relative to the model dir).
external_climb.onnx     w's data is external, location '../../../etc/hostname'.
external_in_if.onnx     an If whose then_branch subgraph has an external-data initializer.
external_sparse.onnx    a sparse initializer whose values tensor has external data.
external_constant.onnx  a Constant node whose `value` attribute tensor has external data.
custom_domain.onnx      a node ReadFile in domain 'com.evil.customops' (opset imported).
big_initializer.onnx    96 MiB of embedded zeros (FP32[25165824]) reduced into y; to exceed a small
                        tenant memory quota.
load_bomb.onnx          tiny on disk (a few hundred bytes): ConstantOfShape of the constant shape
                        [2^28, 4] makes a 4 GiB FP32 zero tensor that ORT's constant folding (or the
                        first inference) would allocate; ReduceMean folds it back to [4] for Add.

External data is made by setting data_location = EXTERNAL and external_data entries directly on
the proto; no external-data file is written, the hostile models are written as raw bytes (onnx's
save helpers may touch external data) and onnx.checker is run only on models that cannot make it
follow a path."""
import os
import sys

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

X = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])
Y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])


def model(nodes, name, initializers=(), sparse=(), extra_opsets=()):
    graph = helper.make_graph(nodes, name, [X], [Y], list(initializers), sparse_initializer=list(sparse))
    opsets = [helper.make_opsetid("", 17)] + [helper.make_opsetid(d, v) for d, v in extra_opsets]
    m = helper.make_model(graph, opset_imports=opsets, producer_name="weft-hostile-tests")
    m.ir_version = 8  # ONNX Runtime 1.22 rejects newer IR versions
    return m


def weights(name):
    return numpy_helper.from_array(np.arange(4, dtype=np.float32), name)


def external(name, location, shape=(4,)):
    """An FP32 tensor whose data ONNX Runtime would read from `location`."""
    t = TensorProto(name=name, data_type=TensorProto.FLOAT, dims=list(shape))
    t.data_location = TensorProto.EXTERNAL
    length = 4 * int(np.prod(shape))
    for key, value in (("location", location), ("offset", "0"), ("length", str(length))):
        entry = t.external_data.add()
        entry.key, entry.value = key, value
    return t


def add_w(name, w):
    return model([helper.make_node("Add", ["x", "w"], ["y"], name="add0")], name, [w])


def clean():
    return add_w("clean", weights("w"))


def external_in_if():
    then = helper.make_graph(
        [helper.make_node("Add", ["x", "tw"], ["then_y"], name="then_add")], "then", [],
        [helper.make_tensor_value_info("then_y", TensorProto.FLOAT, ["N", 4])],
        [external("tw", "/etc/passwd")])
    els = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["else_y"], name="else_id")], "else", [],
        [helper.make_tensor_value_info("else_y", TensorProto.FLOAT, ["N", 4])])
    cond = numpy_helper.from_array(np.array(True), "cond")
    node = helper.make_node("If", ["cond"], ["y"], name="if0", then_branch=then, else_branch=els)
    return model([node], "external_in_if", [cond])


def external_sparse():
    values = external("w_values", "/etc/passwd", shape=(1,))
    indices = numpy_helper.from_array(np.array([0], dtype=np.int64), "w_indices")
    sparse = helper.make_sparse_tensor(values, indices, [4])
    node = helper.make_node("Add", ["x", "w_values"], ["y"], name="add0")
    return model([node], "external_sparse", sparse=[sparse])


def external_constant():
    nodes = [
        helper.make_node("Constant", [], ["c"], name="c0", value=external("c", "/etc/passwd")),
        helper.make_node("Add", ["x", "c"], ["y"], name="add0"),
    ]
    return model(nodes, "external_constant")


def custom_domain():
    node = helper.make_node("ReadFile", ["x"], ["y"], name="rf0", domain="com.evil.customops")
    return model([node], "custom_domain", extra_opsets=[("com.evil.customops", 1)])


def big_initializer(mib=96, name="big_initializer"):
    big = numpy_helper.from_array(np.zeros(mib * 2**20 // 4, dtype=np.float32), "big")
    nodes = [
        helper.make_node("ReduceMean", ["big"], ["m"], name="mean0", keepdims=0),  # scalar
        helper.make_node("Add", ["x", "m"], ["y"], name="add0"),
    ]
    return model(nodes, name, [big])


def load_bomb():
    # Tiny on disk: only the 2-element shape is stored. Folding ConstantOfShape allocates
    # 2^28 * 4 FP32 = 4 GiB.
    shape = numpy_helper.from_array(np.array([2**28, 4], dtype=np.int64), "shape")
    nodes = [
        helper.make_node("ConstantOfShape", ["shape"], ["zeros"], name="bomb",
                         value=numpy_helper.from_array(np.array([0.0], dtype=np.float32))),
        helper.make_node("ReduceMean", ["zeros"], ["m"], name="mean0", axes=[0], keepdims=0),  # [4]
        helper.make_node("Add", ["x", "m"], ["y"], name="add0"),
    ]
    return model(nodes, "load_bomb", [shape])


def slow_matmul(steps=192):
    """Not hostile: x[n,n] through `steps` chained MatMuls, seconds of compute for n = 1024 on
    one thread, so a test can kill its worker while a call is running (or time it out after
    1 s). 48 steps took only 0.66 s on an AVX-512 core, so 192: 2.6 s there, more elsewhere."""
    xs = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", "N"])
    ys = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", "N"])
    nodes, prev = [], "x"
    for i in range(steps):
        out = "y" if i == steps - 1 else f"m{i}"
        nodes.append(helper.make_node("MatMul", [prev, "x"], [out], name=f"mm{i}"))
        prev = out
    graph = helper.make_graph(nodes, "slow_matmul", [xs], [ys])
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="weft-tests")
    m.ir_version = 8
    return m


def main():
    out, secret = sys.argv[1], sys.argv[2]
    os.makedirs(out, exist_ok=True)
    models = {
        "clean": clean(),
        "external_absolute": add_w("external_absolute", external("w", secret)),
        "external_relative": add_w("external_relative", external("w", "state.json")),
        "external_climb": add_w("external_climb", external("w", "../../../etc/hostname")),
        "external_in_if": external_in_if(),
        "external_sparse": external_sparse(),
        "external_constant": external_constant(),
        "custom_domain": custom_domain(),
        "big_initializer": big_initializer(),
        # Fits a 64 MiB budget once, not as four instances.
        "medium_initializer": big_initializer(20, "medium_initializer"),
        "load_bomb": load_bomb(),
        "slow_matmul": slow_matmul(),
    }
    for name in ("clean", "big_initializer", "load_bomb", "slow_matmul"):  # safe to check: no paths to follow
        onnx.checker.check_model(models[name], full_check=True)
    for name, m in models.items():
        with open(os.path.join(out, f"{name}.onnx"), "wb") as f:
            f.write(m.SerializeToString())


if __name__ == "__main__":
    main()
