"""Stock `tritonclient[http]` calling Weft graphs exactly as it calls models, binary and JSON.

Run by the Rust end-to-end test `tritonclient_calls_graphs` (tests/tests/tritonclient.rs), which
serves the classify, ensemble and text examples together (WEFT_URL) and the ab-route example
(WEFT_AB_URL), and sets WEFT_EXAMPLES to the examples folder."""
import os

import numpy as np
import onnx
import pytest
import tritonclient.http as httpclient
from onnx import numpy_helper
from tritonclient.utils import InferenceServerException
from weft_auth import authenticated_client, required_env


def env(name):
    return required_env(name, "the Rust e2e test `tritonclient_calls_graphs`")


@pytest.fixture(scope="module")
def client():
    return authenticated_client(env("WEFT_URL"))


@pytest.fixture(scope="module")
def ab_client():
    return authenticated_client(env("WEFT_AB_URL"))


def mlp(path, x):
    weights = {t.name: numpy_helper.to_array(t) for t in onnx.load(path).graph.initializer}
    hidden = np.maximum(x @ weights["w0"] + weights["b0"], 0)
    return hidden @ weights["w1"] + weights["b1"]


def model_path(example, name, version="1"):
    return os.path.join(env("WEFT_EXAMPLES"), example, "models", name, version, "model.onnx")


def zscore(x):
    mean = x.mean(axis=1, keepdims=True)
    std = x.std(axis=1, keepdims=True)
    return (x - mean) / np.where(std > np.finfo(np.float32).eps, std, 1)


def softmax(x):
    e = np.exp(x - x.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def texts(array):
    """BYTES outputs: bytes in binary mode, str in JSON mode (as with Triton)."""
    return [v.decode() if isinstance(v, bytes) else v for v in array.reshape(-1)]


def features(rows):
    return np.random.default_rng(rows).standard_normal((rows, 64)).astype(np.float32)


def infer_x(client, graph, x, binary, outputs, **kwargs):
    tensor = httpclient.InferInput("x", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x, binary_data=binary)
    wanted = [httpclient.InferRequestedOutput(name, binary_data=binary) for name in outputs]
    return client.infer(graph, [tensor], outputs=wanted, **kwargs)


def test_graphs_look_like_models(client):
    for graph in ["classify", "ensemble", "text"]:
        assert client.is_model_ready(graph)
        assert client.get_model_metadata(graph)["platform"] == "weft_graph"
    metadata = client.get_model_metadata("classify", model_version="1")
    assert metadata["inputs"] == [{"name": "x", "datatype": "FP32", "shape": [-1, 64]}]
    assert [o["name"] for o in metadata["outputs"]] == ["probabilities", "label"]
    index = {entry["name"]: entry for entry in client.get_model_repository_index()}
    assert index["classify"]["state"] == "READY"


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_classify(client, binary):
    x = features(4)
    result = infer_x(client, "classify", x, binary, ["probabilities", "label"], request_id="g-1")
    expected = softmax(mlp(model_path("classify", "mlp"), zscore(x)))
    np.testing.assert_allclose(result.as_numpy("probabilities"), expected, rtol=1e-4, atol=1e-5)
    digits = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
    labels = texts(result.as_numpy("label"))
    assert labels == [digits[i] for i in expected.argmax(axis=1)]
    assert result.get_response()["id"] == "g-1"


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_ensemble(client, binary):
    x = features(3)
    z = zscore(x)
    mean = (mlp(model_path("classify", "mlp"), z) + mlp(model_path("ensemble", "mlp-alt"), z)) / 2
    result = infer_x(client, "ensemble", x, binary, ["probabilities"])
    np.testing.assert_allclose(result.as_numpy("probabilities"), softmax(mean), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_text(client, binary):
    sentences = np.array([b"great, I love it", b"hate it, awful", b"fine I guess"], dtype=np.object_)
    tensor = httpclient.InferInput("text", [3], "BYTES")
    tensor.set_data_from_numpy(sentences, binary_data=binary)
    result = client.infer("text", [tensor],
                          outputs=[httpclient.InferRequestedOutput("label", binary_data=binary)])
    labels = texts(result.as_numpy("label"))
    assert labels == ["positive", "negative", "neutral"]


def test_trace_in_response_parameters(client):
    result = infer_x(client, "classify", features(1), True, ["probabilities"],
                     parameters={"trace": True})
    trace = result.get_response()["parameters"]["trace"]
    assert [node["node"] for node in trace] == ["normalize", "mlp", "softmax"]


def test_ab_route_is_sticky_and_answers_with_the_chosen_version(ab_client):
    x = features(1)
    versions = {v: mlp(model_path("ab-route", "mlp", v), x) for v in ["1", "2"]}
    for user in ["ana", "bo", "cy", "di", "ed"]:
        seen = set()
        for _ in range(3):
            result = infer_x(ab_client, "ab-route", x, True, ["y"],
                             parameters={"user": user, "trace": True})
            route = [n for n in result.get_response()["parameters"]["trace"] if n["node"] == "split"][0]["route"]
            seen.add(route)
            np.testing.assert_allclose(result.as_numpy("y"), versions[route[1:]], rtol=1e-4, atol=1e-5)
        assert len(seen) == 1, f"{user} moved between {seen}"


def test_bad_graph_input_is_a_client_error(client):
    tensor = httpclient.InferInput("x", [1, 3], "FP32")
    tensor.set_data_from_numpy(np.zeros((1, 3), dtype=np.float32))
    with pytest.raises(InferenceServerException, match="input 'x'"):
        client.infer("classify", [tensor])
