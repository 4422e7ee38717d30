"""Stock `tritonclient[http]` against a running Weft server, binary (default) and JSON modes.

Run by the Rust end-to-end test `tritonclient_compatibility` (tests/tests/tritonclient.rs), which
starts `weft serve` on 127.0.0.1:0 and sets WEFT_URL and WEFT_QUICKSTART_MODELS."""
import os

import ml_dtypes
import numpy as np
import onnx
import pytest
import tritonclient.http as httpclient
from onnx import numpy_helper
from tritonclient.utils import InferenceServerException
from weft_auth import authenticated_client


def url():
    value = os.environ.get("WEFT_URL")
    if not value:
        pytest.fail("WEFT_URL is not set: this module is run by the Rust e2e test "
                    "`tritonclient_compatibility` (cargo xtask test), which starts the server")
    return value


@pytest.fixture(scope="module")
def client():
    return authenticated_client(url())


def mlp_reference(x):
    path = os.path.join(os.environ["WEFT_QUICKSTART_MODELS"], "mlp", "1", "model.onnx")
    weights = {t.name: numpy_helper.to_array(t) for t in onnx.load(path).graph.initializer}
    hidden = np.maximum(x @ weights["w0"] + weights["b0"], 0)
    return hidden @ weights["w1"] + weights["b1"]


def test_a_client_without_key_is_refused_with_401_but_health_stays_open():
    anonymous = httpclient.InferenceServerClient(url())
    assert anonymous.is_server_live()
    with pytest.raises(InferenceServerException) as refused:
        anonymous.get_model_metadata("mlp")
    assert "401" in str(refused.value.status()) or "API key" in str(refused.value)
    wrong = authenticated_client(url(), key="weft_0000000000000000_not-a-real-key")
    with pytest.raises(InferenceServerException) as refused:
        wrong.infer("mlp", [])
    assert "API key" in str(refused.value)


def test_health_and_metadata(client):
    assert client.is_server_live()
    assert client.is_server_ready()
    assert client.is_model_ready("mlp")
    assert not client.is_model_ready("no_such_model")
    server = client.get_server_metadata()
    assert server["name"] == "weft" and "binary_tensor_data" in server["extensions"]
    metadata = client.get_model_metadata("mlp")
    assert metadata["inputs"] == [{"name": "x", "datatype": "FP32", "shape": [-1, 64]}]
    assert metadata["outputs"] == [{"name": "y", "datatype": "FP32", "shape": [-1, 10]}]
    assert client.get_model_metadata("mlp", model_version="1")["versions"] == ["1"]
    # Triton's model_configuration extension, as get_model_config reads it.
    assert "model_configuration" in server["extensions"]
    config = client.get_model_config("mlp")
    assert config["max_batch_size"] == 64
    assert config["input"] == [{"name": "x", "data_type": "TYPE_FP32", "dims": [64]}]
    assert config["output"] == [{"name": "y", "data_type": "TYPE_FP32", "dims": [10]}]
    assert client.get_model_config("mlp", model_version="1") == config


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_mlp_matches_numpy_reference(client, binary):
    x = np.random.default_rng(3).standard_normal((2, 64)).astype(np.float32)
    tensor = httpclient.InferInput("x", [2, 64], "FP32")
    tensor.set_data_from_numpy(x, binary_data=binary)
    result = client.infer("mlp", [tensor], outputs=[httpclient.InferRequestedOutput("y", binary_data=binary)],
                          request_id="tc-1")
    y = result.as_numpy("y")
    assert y.shape == (2, 10) and y.dtype == np.float32
    assert result.get_response()["id"] == "tc-1"
    np.testing.assert_allclose(y, mlp_reference(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_labeler_bytes_and_bool(client, binary):
    ids = httpclient.InferInput("class_ids", [3], "INT64")
    ids.set_data_from_numpy(np.array([1, 9, 42], dtype=np.int64), binary_data=binary)
    keep = httpclient.InferInput("keep", [3], "BOOL")
    keep.set_data_from_numpy(np.array([True, False, True]), binary_data=binary)
    outputs = [httpclient.InferRequestedOutput(n, binary_data=binary) for n in ("labels", "dropped")]
    result = client.infer("labeler", [ids, keep], outputs=outputs)
    # tritonclient returns BYTES as bytes from binary data and as str from JSON strings.
    labels = [v if isinstance(v, bytes) else v.encode() for v in result.as_numpy("labels")]
    assert labels == [b"one", b"nine", b"unknown"]
    assert list(result.as_numpy("dropped")) == [False, True, False]


SAMPLES = {
    "BOOL": np.array([[True, False, True]]),
    "UINT8": np.array([[0, 255, 7]], dtype=np.uint8),
    "UINT16": np.array([[0, 65535, 7]], dtype=np.uint16),
    "UINT32": np.array([[0, 2**32 - 1, 7]], dtype=np.uint32),
    "UINT64": np.array([[0, 2**64 - 1, 7]], dtype=np.uint64),
    "INT8": np.array([[-128, 127, 0]], dtype=np.int8),
    "INT16": np.array([[-32768, 32767, -1]], dtype=np.int16),
    "INT32": np.array([[-2**31, 2**31 - 1, -1]], dtype=np.int32),
    "INT64": np.array([[-2**63, 2**63 - 1, -1]], dtype=np.int64),
    "FP16": np.array([[1.5, -0.25, 65504.0]], dtype=np.float16),
    "BF16": np.array([[1.5, -0.25, 3.0]], dtype=ml_dtypes.bfloat16),
    "FP32": np.array([[1.5, -0.25, np.finfo(np.float32).max]], dtype=np.float32),
    "FP64": np.array([[1.5, -0.25, 1e300]], dtype=np.float64),
    "BYTES": np.array([[b"", "héllo".encode(), b"tab\tnew\nline"]], dtype=np.object_),
}


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_every_datatype_round_trips(client, binary):
    inputs, outputs = [], []
    for datatype, array in SAMPLES.items():
        tensor = httpclient.InferInput(f"in_{datatype.lower()}", list(array.shape), datatype)
        # tritonclient itself only sends BF16 as binary data.
        as_binary = binary or datatype == "BF16"
        tensor.set_data_from_numpy(array, binary_data=as_binary)
        inputs.append(tensor)
        outputs.append(httpclient.InferRequestedOutput(f"out_{datatype.lower()}", binary_data=as_binary))
    result = client.infer("all_types", inputs, outputs=outputs)
    for datatype, array in SAMPLES.items():
        got = result.as_numpy(f"out_{datatype.lower()}")
        assert got.shape == array.shape, datatype
        if datatype == "BYTES":
            got = [v if isinstance(v, bytes) else v.encode() for v in got.flatten()]
            assert got == list(array.flatten()), datatype
        else:
            assert got.dtype == array.dtype and got.tobytes() == array.tobytes(), datatype


def test_unknown_model_is_404(client):
    tensor = httpclient.InferInput("x", [1, 64], "FP32")
    tensor.set_data_from_numpy(np.zeros((1, 64), dtype=np.float32))
    with pytest.raises(InferenceServerException) as error:
        client.infer("no_such_model", [tensor])
    # Triton's own text: its clients look for the prefix "Request for unknown model".
    assert "404" in str(error.value.status())
    assert error.value.message() == "Request for unknown model: 'no_such_model' is not found"
