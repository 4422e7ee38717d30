"""softmax: a transformer turning FP32 scores into probabilities over the last dimension, the
Python twin of plugins/softmax.

Params: ``top_k`` (optional) also returns ``labels`` (BYTES [rows, k]) and ``scores`` (FP32
[rows, k]) for the k most likely classes, named by ``labels`` (comma-separated; defaults to the
class index). Non-FP32 inputs pass through.
"""

import math

from weft_plugin import Datatype, Tensor, transformer


def softmax(row):
    top = max(row, default=0.0)
    exps = [math.exp(v - top) for v in row]
    total = sum(exps)
    return [e / total for e in exps] if total > 0 else exps


@transformer
def softmax_transform(inputs, params):
    top_k = params.int("top_k")
    names = [n.strip() for n in params["labels"].split(",")] if "labels" in params else []
    outputs = {}
    for name, tensor in inputs.items():
        if tensor.datatype != Datatype.FP32:
            outputs[name] = tensor
            continue
        rows = [softmax(row) for row in tensor.rows()]
        if top_k is not None:
            k = min(top_k, len(rows[0]) if rows else 0)
            labels, scores = [], []
            for row in rows:
                order = sorted(range(len(row)), key=lambda c: -row[c])[:k]
                labels += [names[c] if c < len(names) else str(c) for c in order]
                scores += [row[c] for c in order]
            outputs["labels"] = Tensor.from_bytes_elements([len(rows), k], labels)
            outputs["scores"] = Tensor.from_f32([len(rows), k], scores)
        outputs[name] = Tensor.from_f32(tensor.shape, [v for row in rows for v in row])
    return outputs
