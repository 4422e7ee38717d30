"""Unit tests of weft_plugin outside a component: tensor conversions for every datatype, params,
and what the role decorators hand the host (passed-through tensors, errors from exceptions).

componentize-py generates the `wit_world` bindings the package imports; host functions are
replaced by fakes. Run by tests/tests/python_plugins.rs with WEFT_COMPONENTIZE_PY set (`cargo
xtask setup` installs componentize-py into target/venv-componentize).
"""

import array
import atexit
import itertools
import os
import shutil
import subprocess
import sys
import tempfile
import types
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _bindings():
    componentize = os.environ.get("WEFT_COMPONENTIZE_PY")
    if not componentize:
        raise RuntimeError("set WEFT_COMPONENTIZE_PY to componentize-py (run `cargo xtask setup`)")
    out = tempfile.mkdtemp(prefix="weft-bindings-")
    atexit.register(shutil.rmtree, out, ignore_errors=True)
    subprocess.run(
        [componentize, "-d", str(ROOT / "wit"), "-w", "weft:plugin/transformer", "bindings", out],
        check=True,
    )
    sys.path[:0] = [out, str(ROOT / "sdk-python")]


_bindings()

import weft_plugin as wp  # noqa: E402
from componentize_py_types import Err  # noqa: E402
from wit_world.imports import types as wit  # noqa: E402

D = wp.Datatype


class FakeHostTensor:
    """What the host lends a plugin: datatype, shape and bytes, read through methods."""

    def __init__(self, tensor):
        self.tensor = tensor
        self.reads = 0

    def datatype(self):
        return self.tensor.datatype

    def shape(self):
        return self.tensor.shape

    def data(self):
        self.reads += 1
        return self.tensor.data()


@pytest.fixture(autouse=True)
def fake_create(monkeypatch):
    """`types.tensor.create` in the host: records what the plugin made."""
    monkeypatch.setattr(wit.Tensor, "create", classmethod(lambda cls, d, s, b: ("made", d, list(s), bytes(b))))


_modules = itertools.count()


def plugin_module(source):
    """A fresh module holding one plugin (a module has one role)."""
    module = types.ModuleType(f"plugin_{next(_modules)}")
    sys.modules[module.__name__] = module
    exec(source, module.__dict__)
    return module


@pytest.mark.parametrize(
    "datatype, values",
    [
        (D.FP32, [0.5, -1.25, 3.0, 0.125]),
        (D.FP64, [0.1, -2.5, 1e300, 0.0]),
        (D.FP16, [0.5, -1.5, 2.0, 65504.0]),
        (D.BF16, [1.0, -2.0, 0.5, 256.0]),
        (D.INT8, [-128, 127, 0, -1]),
        (D.INT16, [-32768, 32767, 1, 2]),
        (D.INT32, [-(2**31), 2**31 - 1, 5, 6]),
        (D.INT64, [-(2**63), 2**63 - 1, 7, 8]),
        (D.UINT8, [0, 255, 1, 2]),
        (D.UINT16, [0, 65535, 3, 4]),
        (D.UINT32, [0, 2**32 - 1, 5, 6]),
        (D.UINT64, [0, 2**64 - 1, 7, 8]),
        (D.BOOL, [True, False, True, True]),
        (D.BYTES, [b"a", b"", b"\x00\xff", "h\u00e9llo".encode()]),
    ],
)
def test_every_datatype_round_trips(datatype, values):
    tensor = wp.Tensor.from_list(datatype, [2, 2], values)
    assert tensor.datatype == datatype and tensor.shape == [2, 2]
    assert tensor.to_list() == values
    # Through the host and back: the same bytes.
    again = wp.Tensor._from_host(FakeHostTensor(tensor))
    assert again.to_list() == values and again.shape == [2, 2]


def test_layouts_are_the_protocol_ones():
    assert wp.Tensor.from_list(D.INT32, [2], [1, -1]).data() == b"\x01\x00\x00\x00\xff\xff\xff\xff"
    assert wp.Tensor.from_list(D.BYTES, [2], ["ab", b"c"]).data() == b"\x02\x00\x00\x00ab\x01\x00\x00\x00c"
    assert wp.Tensor.from_list(D.BOOL, [2], [True, False]).data() == b"\x01\x00"
    floats = wp.Tensor.from_f32([1, 2], [1.0, 2.0])
    assert floats.to_array() == array.array("f", [1.0, 2.0])
    assert wp.Tensor.from_array([2], array.array("q", [3, 4])).datatype == D.INT64
    view = wp.Tensor.from_list(D.UINT16, [3], [1, 2, 65535]).to_memoryview()
    assert view.format == "H" and view.tolist() == [1, 2, 65535]
    assert wp.Tensor(D.INT8, [2], memoryview(b"\x01\xff")).to_list() == [1, -1]
    assert wp.Tensor.from_f32([2, 3], range(6)).rows() == [[0, 1, 2], [3, 4, 5]]


def test_bad_tensors_are_invalid_input():
    with pytest.raises(wp.InvalidInput, match="needs 8 bytes, not 3"):
        wp.Tensor(D.FP32, [2], b"abc")
    with pytest.raises(wp.InvalidInput, match="holds 4 elements, not 3"):
        wp.Tensor.from_list(D.FP32, [2, 2], [1, 2, 3])
    with pytest.raises(wp.InvalidInput, match="do not fit INT8"):
        wp.Tensor.from_list(D.INT8, [1], [300])
    with pytest.raises(wp.InvalidInput, match="no array form"):
        wp.Tensor.from_list(D.FP16, [1], [1.0]).to_array()


def test_params_read_numbers_or_say_which_is_wrong():
    params = wp.Params([("scale", "0.5"), ("top_k", "3"), ("mode", "fast")])
    assert params.float("scale") == 0.5 and params.int("top_k") == 3
    assert params.float("missing", 2.0) == 2.0 and params.get("mode") == "fast"
    with pytest.raises(wp.InvalidInput, match="param 'mode' = 'fast' is not a number"):
        params.float("mode")


def named(name, tensor):
    return wit.NamedTensor(name, FakeHostTensor(tensor))


def test_a_transformer_passes_inputs_through_without_copying_and_makes_new_ones():
    module = plugin_module(
        "from weft_plugin import Tensor, transformer\n"
        "@transformer\n"
        "def t(inputs, params):\n"
        "    x = inputs['x']\n"
        "    return {'x': x, 'double': Tensor.from_f32(x.shape, [2 * v for v in x.to_list()])}\n"
    )
    host_x = FakeHostTensor(wp.Tensor.from_f32([2], [1.0, 2.0]))
    outputs = module.WitWorld().transform([wit.NamedTensor("x", host_x)], [])
    assert [o.name for o in outputs] == ["x", "double"]
    assert outputs[0].tensor is host_x  # handed back as it came
    assert outputs[1].tensor == ("made", D.FP32, [2], array.array("f", [2.0, 4.0]).tobytes())
    assert host_x.reads == 1


def test_exceptions_become_the_calls_error():
    module = plugin_module(
        "from weft_plugin import InvalidInput, ModelError, transformer\n"
        "@transformer\n"
        "def t(inputs, params):\n"
        "    kind = params.get('kind')\n"
        "    if kind == 'invalid': raise InvalidInput('bad rows')\n"
        "    if kind == 'model': raise ModelError('model down')\n"
        "    if kind == 'value': raise ValueError('boom')\n"
        "    return 'not tensors'\n"
    )
    x = [named("x", wp.Tensor.from_f32([1], [1.0]))]
    expected = {
        "invalid": wit.Error_InvalidInput("bad rows"),
        "model": wit.Error_Model("model down"),
        "value": wit.Error_Other("ValueError: boom (at <string> line 7)"),
    }
    for kind, error in expected.items():
        with pytest.raises(Err) as raised:
            module.WitWorld().transform(x, [("kind", kind)])
        assert raised.value.value == error
    with pytest.raises(Err) as raised:
        module.WitWorld().transform(x, [])
    assert raised.value.value == wit.Error_Other(
        "a transform returns a dict of name to Tensor (or (name, Tensor) pairs), not a str"
    )


def test_a_router_returns_a_name_and_a_combiner_sees_each_branch():
    router = plugin_module(
        "from weft_plugin import router\n"
        "@router\n"
        "def r(inputs, params):\n"
        "    return params.get('request.route', 3)\n"
    )
    assert router.WitWorld().route([], [("request.route", "b")]) == "b"
    with pytest.raises(Err) as raised:
        router.WitWorld().route([], [])
    assert raised.value.value == wit.Error_Other("a router returns a child's name (str), not a int")

    combiner = plugin_module(
        "from weft_plugin import Tensor, combiner\n"
        "@combiner\n"
        "def c(branches, params):\n"
        "    rows = [b['y'].to_list() for b in branches.values()]\n"
        "    return {'y': Tensor.from_f32([len(rows[0])], [sum(v) / len(v) for v in zip(*rows)])}\n"
    )
    branches = [
        wit.Branch("a", [named("y", wp.Tensor.from_f32([2], [1.0, 2.0]))]),
        wit.Branch("b", [named("y", wp.Tensor.from_f32([2], [3.0, 6.0]))]),
    ]
    (output,) = combiner.WitWorld().combine(branches, [])
    assert output.tensor == ("made", D.FP32, [2], array.array("f", [2.0, 4.0]).tobytes())


def test_a_module_has_one_role():
    with pytest.raises(RuntimeError, match="one role"):
        plugin_module(
            "from weft_plugin import router, transformer\n"
            "@router\n"
            "def r(inputs, params): return 'a'\n"
            "@transformer\n"
            "def t(inputs, params): return inputs\n"
        )
