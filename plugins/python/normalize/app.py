"""normalize: a transformer for FP32 inputs, the Python twin of plugins/normalize.

Params: ``mode`` = ``zscore`` (default) or ``scale``. ``zscore`` uses ``mean`` and ``std``
when given, otherwise each row's own mean and standard deviation over the last dimension;
``scale`` computes ``x * scale + shift`` (defaults 1 and 0). Non-FP32 inputs pass through
untouched.
"""

import math

from weft_plugin import Datatype, InvalidInput, Params, Tensor, transformer


def normalize_row(row, params: Params):
    mode = params.get("mode", "zscore")
    if mode == "scale":
        scale = params.float("scale", 1.0)
        shift = params.float("shift", 0.0)
        return [v * scale + shift for v in row]
    if mode == "zscore":
        n = max(len(row), 1)
        mean = params.float("mean")
        if mean is None:
            mean = sum(row) / n
        std = params.float("std")
        if std is None:
            std = math.sqrt(sum((v - mean) ** 2 for v in row) / n)
        if std <= 1.1920929e-07:
            std = 1.0
        return [(v - mean) / std for v in row]
    raise InvalidInput(f"normalize: unknown mode '{mode}' (zscore or scale)")


@transformer
def normalize(inputs, params):
    outputs = {}
    for name, tensor in inputs.items():
        if tensor.datatype != Datatype.FP32:
            outputs[name] = tensor
            continue
        values = [v for row in tensor.rows() for v in normalize_row(row, params)]
        outputs[name] = Tensor.from_f32(tensor.shape, values)
    return outputs
