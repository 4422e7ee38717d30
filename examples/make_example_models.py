"""Regenerate the graph examples' ONNX models (they are committed; run this only to change them).

ensemble/models/mlp-alt: a second MLP with the quickstart `mlp`'s shape (x[N,64] -> y[N,10])
                         and other weights (seed 11), for the ensemble's second branch.
ab-route/models/mlp/2:   the challenger version of `mlp` (seed 8); version 1 is the quickstart's.
text/models/sentiment:   ids INT64[N,16] -> logits FP32[N,3] (negative, neutral, positive): a
                         bag of words whose embeddings vote for a class, mean-pooled; the ids are
                         what the `tokenize` plugin makes with the vocabulary in
                         text/graphs/sentiment.toml.
Needs `onnx` and `numpy` (`cargo xtask setup` puts them in target/venv)."""
import os
import sys

import numpy as np
from onnx import TensorProto, helper, numpy_helper

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "quickstart"))
from make_models import finish, mlp  # noqa: E402

import onnx  # noqa: E402

# Word i of the vocabulary gets id i + 2 (0 pads, 1 is unknown): see plugins/tokenize.
VOCAB = ["good", "great", "love", "excellent", "bad", "awful", "hate", "terrible", "okay", "fine"]
CLASS_OF_WORD = [2, 2, 2, 2, 0, 0, 0, 0, 1, 1]


def sentiment():
    embedding = np.zeros((len(VOCAB) + 2, 3), dtype=np.float32)
    embedding[1] = [0.0, 0.2, 0.0]  # unknown words lean neutral
    for word, cls in enumerate(CLASS_OF_WORD):
        embedding[word + 2, cls] = 1.0
    nodes = [
        helper.make_node("Gather", ["embedding", "ids"], ["vectors"], axis=0),
        helper.make_node("ReduceSum", ["vectors", "axis"], ["votes"], keepdims=0),
        helper.make_node("Mul", ["votes", "temperature"], ["logits"]),
    ]
    inits = [
        numpy_helper.from_array(embedding, "embedding"),
        numpy_helper.from_array(np.array([1], dtype=np.int64), "axis"),
        numpy_helper.from_array(np.array(2.0, dtype=np.float32), "temperature"),
    ]
    graph = helper.make_graph(
        nodes, "sentiment",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, ["N", 16])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 3])], inits)
    return finish(graph, [helper.make_opsetid("", 17)])


def save(model, *parts):
    path = os.path.join(HERE, *parts, "model.onnx")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    onnx.save(model, path)
    print("wrote", path)


if __name__ == "__main__":
    save(mlp("mlp", [64, 256, 10], 11), "ensemble", "models", "mlp-alt", "1")
    save(mlp("mlp", [64, 256, 10], 8), "ab-route", "models", "mlp", "2")
    save(sentiment(), "text", "models", "sentiment", "1")
