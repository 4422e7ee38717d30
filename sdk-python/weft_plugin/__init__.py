"""weft_plugin: Weft plugins written in Python.

The Python twin of the Rust SDK (``sdk-guest``). A plugin is one module with one function
marked by a role decorator; ``weft plugin build app.py`` compiles it with componentize-py into
a WebAssembly component against the matching ``weft:plugin`` world (``wit/``), whose bindings
componentize-py generates as ``wit_world``. This package only wraps them:

* :class:`Tensor` -- a host tensor read lazily (``shape`` and ``datatype`` copy nothing, a
  tensor passed through is never copied), converted to and from Python lists, ``array.array``
  and ``bytes``/``memoryview``;
* :class:`Params` -- the node's ``params`` (and ``request.*`` parameters) as a dict with
  checked ``float``/``int`` readers;
* :func:`infer` -- one line to call a model granted to the node, through ``wasi:nn``;
* :func:`transformer`, :func:`combiner`, :func:`router` -- the role decorators;
* :class:`InvalidInput`, :class:`ModelError` -- exceptions that become the call's error (HTTP
  400 and a model failure). Any other exception becomes the call's error too, with its type,
  message and the line that raised it.

NumPy is not available inside the component; tensor bytes go through the standard ``array``
and ``struct`` modules.
"""

import array
import struct
import sys
import traceback
from typing import Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

from componentize_py_types import Err
from wit_world.imports import graph as _graph
from wit_world.imports import host as _host
from wit_world.imports import tensor as _nn
from wit_world.imports import types as _types

__all__ = [
    "Datatype",
    "Tensor",
    "Params",
    "PluginError",
    "InvalidInput",
    "ModelError",
    "infer",
    "log",
    "transformer",
    "combiner",
    "router",
]

Datatype = _types.Datatype

# array.array type codes of the fixed-size datatypes (WebAssembly is little-endian, as the
# protocol's bytes are, so the native layout is the wire layout).
_ARRAY_CODES = {
    Datatype.UINT8: "B",
    Datatype.UINT16: "H",
    Datatype.UINT32: "I",
    Datatype.UINT64: "Q",
    Datatype.INT8: "b",
    Datatype.INT16: "h",
    Datatype.INT32: "i",
    Datatype.INT64: "q",
    Datatype.FP32: "f",
    Datatype.FP64: "d",
}

_ELEMENT_SIZES = {
    Datatype.BOOL: 1,
    Datatype.FP16: 2,
    Datatype.BF16: 2,
    **{datatype: array.array(code).itemsize for datatype, code in _ARRAY_CODES.items()},
}

_NN_TYPES = {
    Datatype.FP16: _nn.TensorType.FP16,
    Datatype.FP32: _nn.TensorType.FP32,
    Datatype.FP64: _nn.TensorType.FP64,
    Datatype.BF16: _nn.TensorType.BF16,
    Datatype.UINT8: _nn.TensorType.U8,
    Datatype.INT32: _nn.TensorType.I32,
    Datatype.INT64: _nn.TensorType.I64,
}
_WEFT_TYPES = {nn: weft for weft, nn in _NN_TYPES.items()}


class PluginError(Exception):
    """The plugin's own failure: the call fails with this message."""


class InvalidInput(PluginError):
    """The caller's fault: the call fails with HTTP 400 and this message."""


class ModelError(PluginError):
    """A model call failed."""


def _element_count(shape: Sequence[int]) -> int:
    count = 1
    for dim in shape:
        count *= dim
    return count


class Tensor:
    """A tensor: a datatype, a shape and little-endian row-major bytes.

    Tensors handed to a plugin stay in the host until :meth:`data` (or a conversion) is called,
    so reading ``shape`` or passing the tensor on costs no copy. Tensors a plugin makes hold
    their bytes here and are handed to the host when returned.
    """

    __slots__ = ("_host", "_datatype", "_shape", "_data")

    def __init__(self, datatype: "Datatype", shape: Sequence[int], data: Union[bytes, bytearray, memoryview]):
        self._host = None
        self._datatype = datatype
        self._shape = [int(d) for d in shape]
        self._data = bytes(data)
        if datatype != Datatype.BYTES:
            expected = _element_count(self._shape) * _ELEMENT_SIZES[datatype]
            if len(self._data) != expected:
                raise InvalidInput(
                    f"a {datatype.name} tensor of shape {self._shape} needs {expected} bytes, "
                    f"not {len(self._data)}"
                )

    @classmethod
    def _from_host(cls, resource) -> "Tensor":
        tensor = cls.__new__(cls)
        tensor._host = resource
        tensor._datatype = None
        tensor._shape = None
        tensor._data = None
        return tensor

    # -- what it is -------------------------------------------------------------------------
    @property
    def datatype(self) -> "Datatype":
        if self._datatype is None:
            self._datatype = self._host.datatype()
        return self._datatype

    @property
    def shape(self) -> List[int]:
        if self._shape is None:
            self._shape = list(self._host.shape())
        return list(self._shape)

    def element_count(self) -> int:
        return _element_count(self.shape)

    def data(self) -> bytes:
        """The raw bytes (copied out of the host once)."""
        if self._data is None:
            self._data = self._host.data()
        return self._data

    def expect(self, datatype: "Datatype") -> None:
        """Raises :class:`InvalidInput` unless the tensor is of ``datatype``."""
        if self.datatype != datatype:
            raise InvalidInput(f"expected a {datatype.name} tensor, got {self.datatype.name}")

    # -- to Python values -------------------------------------------------------------------
    def to_array(self) -> array.array:
        """The elements as an ``array.array`` (numeric datatypes other than FP16/BF16)."""
        code = _ARRAY_CODES.get(self.datatype)
        if code is None:
            raise InvalidInput(f"a {self.datatype.name} tensor has no array form; use to_list()")
        values = array.array(code)
        values.frombytes(self.data())
        return values

    def to_memoryview(self) -> memoryview:
        """The elements as a typed ``memoryview`` over the bytes (no copy beyond reading them)."""
        code = _ARRAY_CODES.get(self.datatype)
        if code is None:
            raise InvalidInput(f"a {self.datatype.name} tensor has no memoryview form; use to_list()")
        return memoryview(self.data()).cast(code)

    def to_list(self) -> list:
        """The elements as a flat list: numbers, bools, or ``bytes`` for BYTES."""
        datatype = self.datatype
        data = self.data()
        if datatype in _ARRAY_CODES:
            return self.to_array().tolist()
        if datatype == Datatype.BOOL:
            return [b != 0 for b in data]
        if datatype == Datatype.FP16:
            return list(struct.unpack(f"<{len(data) // 2}e", data))
        if datatype == Datatype.BF16:
            halves = struct.unpack(f"<{len(data) // 2}H", data)
            return list(struct.unpack(f"<{len(halves)}f", struct.pack(f"<{len(halves)}I", *(h << 16 for h in halves))))
        return _split_bytes(data)

    def rows(self) -> List[list]:
        """The elements as a list of rows over the last dimension."""
        values = self.to_list()
        width = self.shape[-1] if self.shape and self.shape[-1] > 0 else max(len(values), 1)
        return [values[i : i + width] for i in range(0, len(values), width)]

    # -- from Python values -----------------------------------------------------------------
    @classmethod
    def from_list(cls, datatype: "Datatype", shape: Sequence[int], values: Iterable) -> "Tensor":
        """Makes a tensor of ``datatype`` from a flat iterable of values."""
        values = list(values)
        if datatype != Datatype.BYTES and len(values) != _element_count(shape):
            raise InvalidInput(f"shape {list(shape)} holds {_element_count(shape)} elements, not {len(values)}")
        if datatype in _ARRAY_CODES:
            try:
                return cls(datatype, shape, array.array(_ARRAY_CODES[datatype], values).tobytes())
            except (OverflowError, TypeError) as error:
                raise InvalidInput(f"values do not fit {datatype.name}: {error}") from None
        if datatype == Datatype.BOOL:
            return cls(datatype, shape, bytes(1 if v else 0 for v in values))
        if datatype == Datatype.FP16:
            return cls(datatype, shape, struct.pack(f"<{len(values)}e", *values))
        if datatype == Datatype.BF16:
            words = struct.unpack(f"<{len(values)}I", struct.pack(f"<{len(values)}f", *values))
            return cls(datatype, shape, struct.pack(f"<{len(words)}H", *(w >> 16 for w in words)))
        return cls.from_bytes_elements(shape, values)

    @classmethod
    def from_array(cls, shape: Sequence[int], values: array.array) -> "Tensor":
        """Makes a tensor from an ``array.array``; its type code picks the datatype."""
        for datatype, code in _ARRAY_CODES.items():
            if code == values.typecode:
                return cls(datatype, shape, values.tobytes())
        raise InvalidInput(f"array type code '{values.typecode}' has no datatype")

    @classmethod
    def from_f32(cls, shape: Sequence[int], values: Iterable[float]) -> "Tensor":
        return cls.from_list(Datatype.FP32, shape, values)

    @classmethod
    def from_bytes_elements(cls, shape: Sequence[int], elements: Iterable[Union[bytes, str]]) -> "Tensor":
        """Makes a BYTES tensor; ``str`` elements are UTF-8 encoded."""
        out = bytearray()
        count = 0
        for element in elements:
            raw = element.encode() if isinstance(element, str) else bytes(element)
            out += struct.pack("<I", len(raw)) + raw
            count += 1
        if count != _element_count(shape):
            raise InvalidInput(f"shape {list(shape)} holds {_element_count(shape)} elements, not {count}")
        return cls(Datatype.BYTES, shape, out)

    def _to_host(self):
        if self._host is not None:
            return self._host
        return _types.Tensor.create(self._datatype, self._shape, self._data)

    def __repr__(self) -> str:
        return f"Tensor({self.datatype.name}, shape={self.shape})"


def _split_bytes(data: bytes) -> List[bytes]:
    elements, at = [], 0
    while at + 4 <= len(data):
        (length,) = struct.unpack_from("<I", data, at)
        at += 4
        elements.append(data[at : at + length])
        at += length
    return elements


class Params(dict):
    """Node parameters (graph ``params``; request parameters appear as ``request.<name>``)."""

    def float(self, key: str, default: Optional[float] = None) -> Optional[float]:
        value = self.get(key)
        if value is None:
            return default
        try:
            return float(value)
        except ValueError:
            raise InvalidInput(f"param '{key}' = '{value}' is not a number") from None

    def int(self, key: str, default: Optional[int] = None) -> Optional[int]:
        value = self.get(key)
        if value is None:
            return default
        try:
            return int(value)
        except ValueError:
            raise InvalidInput(f"param '{key}' = '{value}' is not an integer") from None


Outputs = Union[Mapping[str, Tensor], Iterable[Tuple[str, Tensor]]]


def _nn_error(model: str, error) -> ModelError:
    value = getattr(error, "value", error)
    try:
        return ModelError(f"model '{model}': {value.code().name}: {value.data()}")
    except Exception:  # not a wasi-nn error resource
        return ModelError(f"model '{model}': {value}")


def infer(model: str, inputs: Outputs) -> Dict[str, Tensor]:
    """Calls a model granted to this node by name through ``wasi:nn``; returns its outputs."""
    pairs = list(inputs.items()) if isinstance(inputs, Mapping) else list(inputs)
    nn_inputs = []
    for name, tensor in pairs:
        ty = _NN_TYPES.get(tensor.datatype)
        if ty is None:
            raise InvalidInput(f"input '{name}' is {tensor.datatype.name}, which wasi-nn cannot carry")
        nn_inputs.append((name, _nn.Tensor(tensor.shape, ty, tensor.data())))
    try:
        graph = _graph.load_by_name(model)
        context = graph.init_execution_context()
        outputs = context.compute(nn_inputs)
    except Err as error:
        raise _nn_error(model, error) from None
    return {
        name: Tensor(_WEFT_TYPES[output.ty()], output.dimensions(), output.data())
        for name, output in outputs
    }


class _Log:
    """``log.info("...")`` writes a line to the host's log, tagged with plugin and request."""

    def _write(self, level, message: str) -> None:
        _host.log(level, str(message))

    def trace(self, message: str) -> None:
        self._write(_host.Level.TRACE, message)

    def debug(self, message: str) -> None:
        self._write(_host.Level.DEBUG, message)

    def info(self, message: str) -> None:
        self._write(_host.Level.INFO, message)

    def warn(self, message: str) -> None:
        self._write(_host.Level.WARN, message)

    def error(self, message: str) -> None:
        self._write(_host.Level.ERROR, message)


log = _Log()


# -- roles ----------------------------------------------------------------------------------

def _inputs(named) -> Dict[str, Tensor]:
    return {n.name: Tensor._from_host(n.tensor) for n in named}


def _outputs(outputs: Outputs) -> List["_types.NamedTensor"]:
    if not isinstance(outputs, (Mapping, list, tuple)):
        raise PluginError(
            "a transform returns a dict of name to Tensor (or (name, Tensor) pairs), "
            f"not a {type(outputs).__name__}"
        )
    pairs = outputs.items() if isinstance(outputs, Mapping) else outputs
    named = []
    for name, tensor in pairs:
        if not isinstance(tensor, Tensor):
            raise PluginError(f"output '{name}' is a {type(tensor).__name__}, not a weft_plugin.Tensor")
        named.append(_types.NamedTensor(str(name), tensor._to_host()))
    return named


def _wit_error(error: BaseException):
    if isinstance(error, Err):
        return error
    if isinstance(error, InvalidInput):
        return Err(_types.Error_InvalidInput(str(error)))
    if isinstance(error, ModelError):
        return Err(_types.Error_Model(str(error)))
    if isinstance(error, PluginError):
        return Err(_types.Error_Other(str(error)))
    where = ""
    frames = traceback.extract_tb(error.__traceback__)
    if frames:
        frame = frames[-1]
        where = f" (at {frame.filename.rsplit('/', 1)[-1]} line {frame.lineno})"
    return Err(_types.Error_Other(f"{type(error).__name__}: {error}{where}"))


def _guarded(call: Callable, *args):
    try:
        return call(*args)
    except MemoryError:
        # Out of guest memory: trap, so the host reports the memory limit.
        raise
    except BaseException as error:  # every exception fails only this call, with its message
        raise _wit_error(error) from None


def _install(function: Callable, world) -> Callable:
    module = sys.modules.get(function.__module__)
    if module is None:
        raise RuntimeError(f"cannot find module {function.__module__} of {function.__name__}")
    if getattr(module, "WitWorld", None) is not None:
        raise RuntimeError("a plugin module has one role: it already defines WitWorld")
    module.WitWorld = world
    return function


def transformer(function: Callable[[Dict[str, Tensor], Params], Outputs]) -> Callable:
    """Marks ``function(inputs, params) -> outputs`` as the plugin's ``transform``.

    ``inputs`` is a dict of input name to :class:`Tensor`, ``params`` a :class:`Params`; it
    returns a dict (or pairs) of output name to :class:`Tensor`. An input returned unchanged is
    passed on without a copy.
    """

    class WitWorld:
        def transform(self, inputs, params):
            return _guarded(lambda: _outputs(function(_inputs(inputs), Params(params))))

    return _install(function, WitWorld)


def combiner(function: Callable[[Dict[str, Dict[str, Tensor]], Params], Outputs]) -> Callable:
    """Marks ``function(branches, params) -> outputs`` as the plugin's ``combine``.

    ``branches`` is a dict of child name to that child's outputs (a dict of name to
    :class:`Tensor`), in the order the graph lists the children.
    """

    class WitWorld:
        def combine(self, branches, params):
            return _guarded(
                lambda: _outputs(function({b.name: _inputs(b.outputs) for b in branches}, Params(params)))
            )

    return _install(function, WitWorld)


def router(function: Callable[[Dict[str, Tensor], Params], str]) -> Callable:
    """Marks ``function(inputs, params) -> child name`` as the plugin's ``route``."""

    def route(inputs, params):
        chosen = function(_inputs(inputs), Params(params))
        if not isinstance(chosen, str):
            raise PluginError(f"a router returns a child's name (str), not a {type(chosen).__name__}")
        return chosen

    class WitWorld:
        def route(self, inputs, params):
            return _guarded(route, inputs, params)

    return _install(function, WitWorld)
