"""Stock `tritonclient[grpc]` against Weft's gRPC endpoint: every served RPC on a model and a
graph, bit-exact outputs for every datatype, streaming with an error in the middle, gzip, auth,
another tenant's names, an oversized message.

Run by the Rust end-to-end test `tritonclient_grpc_compatibility` (tests/tests/tritonclient.rs),
which starts `weft serve` with a gRPC listener on 127.0.0.1:0 and sets WEFT_GRPC_URL,
WEFT_API_KEY, WEFT_OTHER_KEY (a tenant that has the `secret` model), WEFT_MAX_REQUEST_BYTES,
WEFT_QUICKSTART_MODELS and WEFT_EXAMPLES."""
import json
import os
import queue

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from test_tritonclient import SAMPLES, mlp_reference
from test_tritonclient_graphs import features, mlp, model_path, softmax, texts, zscore
from weft_auth import api_key, authenticated_grpc_client, required_env


def url():
    return required_env("WEFT_GRPC_URL", "the Rust e2e test `tritonclient_grpc_compatibility`")


@pytest.fixture(scope="module")
def client():
    return authenticated_grpc_client(url())


def x_input(x):
    tensor = grpcclient.InferInput("x", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x)
    return tensor


def status_of(error):
    return str(error.status())


def test_health_and_server_metadata_need_no_key():
    anonymous = grpcclient.InferenceServerClient(url())
    assert anonymous.is_server_live()
    assert anonymous.is_server_ready()
    metadata = anonymous.get_server_metadata(as_json=True)
    assert metadata["name"] == "weft"
    assert {"binary_tensor_data", "statistics", "model_configuration"} <= set(metadata["extensions"])


def test_everything_else_needs_a_valid_key():
    anonymous = grpcclient.InferenceServerClient(url())
    wrong = authenticated_grpc_client(url(), key="weft_0000000000000000_not-a-real-key")
    x = np.zeros((1, 64), dtype=np.float32)
    for caller in [anonymous, wrong]:
        for call in [
            lambda c: c.get_model_metadata("mlp"),
            lambda c: c.is_model_ready("mlp"),
            lambda c: c.get_model_config("mlp"),
            lambda c: c.get_inference_statistics("mlp"),
            lambda c: c.get_model_repository_index(),
            lambda c: c.infer("mlp", [x_input(x)]),
        ]:
            with pytest.raises(InferenceServerException) as refused:
                call(caller)
            assert status_of(refused.value) == "StatusCode.UNAUTHENTICATED", refused.value
            assert "API key" in str(refused.value)


@pytest.mark.parametrize("name", ["mlp", "classify"])
def test_metadata_config_ready_and_index_for_a_model_and_a_graph(client, name):
    assert client.is_model_ready(name)
    assert client.is_model_ready(name, model_version="1")
    metadata = client.get_model_metadata(name, as_json=True)
    assert metadata["name"] == name and metadata["versions"] == ["1"]
    assert metadata["inputs"] == [{"name": "x", "datatype": "FP32", "shape": ["-1", "64"]}]
    config = client.get_model_config(name, as_json=True)["config"]
    assert config["name"] == name
    assert config["input"][0]["name"] == "x" and config["input"][0]["data_type"] == "TYPE_FP32"
    if name == "mlp":
        assert metadata["platform"] == "onnxruntime_onnx"
        assert config["max_batch_size"] == 64
        assert config["input"][0]["dims"] == ["64"]
        assert config["output"] == [{"name": "y", "data_type": "TYPE_FP32", "dims": ["10"]}]
        assert config["backend"] == "onnxruntime"
    else:
        assert metadata["platform"] == "weft_graph"
        assert [o["name"] for o in config["output"]] == ["probabilities", "label"]
        assert config["output"][1]["data_type"] == "TYPE_STRING"
    index = {entry["name"]: entry for entry in client.get_model_repository_index(as_json=True)["models"]}
    assert index[name]["state"] == "READY" and index[name]["version"] == "1"


def test_model_infer_matches_the_reference_and_says_its_cost(client):
    x = np.random.default_rng(5).standard_normal((3, 64)).astype(np.float32)
    result = client.infer("mlp", [x_input(x)], outputs=[grpcclient.InferRequestedOutput("y")],
                          request_id="g-1")
    np.testing.assert_allclose(result.as_numpy("y"), mlp_reference(x), rtol=1e-5, atol=1e-5)
    response = result.get_response(as_json=True)
    assert response["id"] == "g-1" and response["model_version"] == "1"
    assert {"compute_us", "queue_us", "plugin_us"} <= set(response["parameters"])


def test_every_datatype_round_trips_bit_exactly(client):
    inputs, outputs = [], []
    for datatype, array in SAMPLES.items():
        tensor = grpcclient.InferInput(f"in_{datatype.lower()}", list(array.shape), datatype)
        tensor.set_data_from_numpy(array)
        inputs.append(tensor)
        outputs.append(grpcclient.InferRequestedOutput(f"out_{datatype.lower()}"))
    result = client.infer("all_types", inputs, outputs=outputs)
    for datatype, array in SAMPLES.items():
        got = result.as_numpy(f"out_{datatype.lower()}")
        assert got is not None and got.shape == array.shape, datatype
        if datatype == "BYTES":
            assert list(got.flatten()) == list(array.flatten()), datatype
        else:
            assert got.dtype == array.dtype and got.tobytes() == array.tobytes(), datatype


def test_a_graph_with_trace_and_gzip(client):
    x = features(4)
    result = client.infer("classify", [x_input(x)], parameters={"trace": True},
                          compression_algorithm="gzip")
    expected = softmax(mlp(model_path("classify", "mlp"), zscore(x)))
    np.testing.assert_allclose(result.as_numpy("probabilities"), expected, rtol=1e-4, atol=1e-5)
    digits = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
    assert texts(result.as_numpy("label")) == [digits[i] for i in expected.argmax(axis=1)]
    # Structured parameters (the trace) travel as their JSON text.
    trace = json.loads(result.get_response().parameters["trace"].string_param)
    assert [node["node"] for node in trace] == ["normalize", "mlp", "softmax"]


def test_statistics_count_the_calls(client):
    before = client.get_inference_statistics("mlp", as_json=True)["model_stats"][0]
    x = np.zeros((2, 64), dtype=np.float32)
    client.infer("mlp", [x_input(x)])
    after = client.get_inference_statistics("mlp", "1", as_json=True)["model_stats"][0]
    assert int(after["inference_count"]) == int(before.get("inference_count", 0)) + 2
    assert int(after["inference_stats"]["success"]["count"]) >= 1
    every = client.get_inference_statistics(as_json=True)["model_stats"]
    assert {"mlp", "classify"} <= {stat["name"] for stat in every}


def test_errors_map_to_grpc_codes_in_tritons_words(client):
    x = np.zeros((1, 64), dtype=np.float32)
    with pytest.raises(InferenceServerException) as missing:
        client.infer("no_such_model", [x_input(x)])
    assert status_of(missing.value) == "StatusCode.NOT_FOUND"
    assert "Request for unknown model: 'no_such_model' is not found" in str(missing.value)
    with pytest.raises(InferenceServerException) as version:
        client.get_model_metadata("mlp", model_version="7")
    assert status_of(version.value) == "StatusCode.NOT_FOUND"
    with pytest.raises(InferenceServerException) as bad:
        client.infer("mlp", [x_input(np.zeros((1, 3), dtype=np.float32))])
    assert status_of(bad.value) == "StatusCode.INVALID_ARGUMENT"
    assert "input 'x'" in str(bad.value)
    assert not client.is_model_ready("no_such_model")


def test_another_tenants_names_are_not_found_exactly_like_missing_ones(client):
    # `secret` belongs to the other tenant; to this one it must look like no model at all.
    x = np.zeros((1, 64), dtype=np.float32)
    for name in ["secret", "no_such_model"]:
        with pytest.raises(InferenceServerException) as hidden:
            client.infer(name, [x_input(x)])
        assert status_of(hidden.value) == "StatusCode.NOT_FOUND"
        assert str(hidden.value).endswith(f"Request for unknown model: '{name}' is not found")
        for call in [client.get_model_metadata, client.get_model_config,
                     client.get_inference_statistics]:
            with pytest.raises(InferenceServerException) as hidden:
                call(name)
            assert status_of(hidden.value) == "StatusCode.NOT_FOUND"
            assert f"'{name}' is not found" in str(hidden.value)
        assert not client.is_model_ready(name)
    names = {entry["name"] for entry in client.get_model_repository_index(as_json=True)["models"]}
    assert "secret" not in names
    # The owner sees it.
    owner = authenticated_grpc_client(url(), key=required_env("WEFT_OTHER_KEY"))
    assert owner.is_model_ready("secret")
    assert owner.infer("secret", [x_input(x)]).as_numpy("y").shape == (1, 10)


def test_a_stream_answers_in_order_with_an_error_in_band(client):
    answers = queue.Queue()
    client.start_stream(callback=lambda result, error: answers.put((result, error)))
    try:
        xs = [np.full((1, 64), i, dtype=np.float32) for i in range(4)]
        for i, x in enumerate(xs):
            # The third request names a model that does not exist; the stream goes on.
            model = "no_such_model" if i == 2 else "mlp"
            client.async_stream_infer(model, [x_input(x)], request_id=f"s-{i}")
        # A graph in the same stream.
        client.async_stream_infer("classify", [x_input(features(2))], request_id="s-graph")
        got = [answers.get(timeout=30) for _ in range(5)]
    finally:
        client.stop_stream()
    for i, (result, error) in enumerate(got[:4]):
        if i == 2:
            assert result is None and error is not None
            assert "Request for unknown model: 'no_such_model' is not found" in str(error)
        else:
            assert error is None, error
            assert result.get_response().id == f"s-{i}"
            np.testing.assert_allclose(result.as_numpy("y"), mlp_reference(xs[i]), rtol=1e-5, atol=1e-5)
    result, error = got[4]
    assert error is None and result.as_numpy("probabilities").shape == (2, 10)


def test_an_oversized_message_is_refused_and_the_server_goes_on(client):
    limit = int(required_env("WEFT_MAX_REQUEST_BYTES"))
    rows = limit // (64 * 4) + 1
    big = np.zeros((rows, 64), dtype=np.float32)
    with pytest.raises(InferenceServerException) as refused:
        client.infer("mlp", [x_input(big)])
    assert status_of(refused.value) in {"StatusCode.RESOURCE_EXHAUSTED", "StatusCode.OUT_OF_RANGE"}
    assert "too large" in str(refused.value) or "exceeds" in str(refused.value)
    x = np.ones((1, 64), dtype=np.float32)
    np.testing.assert_allclose(client.infer("mlp", [x_input(x)]).as_numpy("y"), mlp_reference(x),
                               rtol=1e-5, atol=1e-5)


def test_typed_contents_from_a_raw_grpc_stub():
    # OIP clients generated from the proto may send typed contents instead of raw bytes; the
    # answer still comes in raw_output_contents.
    from tritonclient.grpc import service_pb2, service_pb2_grpc
    import grpc

    channel = grpc.insecure_channel(url())
    stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
    x = np.random.default_rng(9).standard_normal((1, 64)).astype(np.float32)
    request = service_pb2.ModelInferRequest(model_name="mlp")
    tensor = request.inputs.add(name="x", datatype="FP32", shape=[1, 64])
    tensor.contents.fp32_contents.extend(x.flatten().tolist())
    response = stub.ModelInfer(request, metadata=[("authorization", f"Bearer {api_key()}")])
    assert len(response.raw_output_contents) == 1
    y = np.frombuffer(response.raw_output_contents[0], dtype=np.float32).reshape(1, 10)
    np.testing.assert_allclose(y, mlp_reference(x), rtol=1e-5, atol=1e-5)
    channel.close()


def test_repository_load_and_unload(client):
    # Repository models stay loaded; unknown names are Triton's NOT_FOUND.
    client.load_model("mlp")
    with pytest.raises(InferenceServerException, match="stays loaded"):
        client.unload_model("mlp")
    with pytest.raises(InferenceServerException) as missing:
        client.load_model("no_such_model")
    assert status_of(missing.value) == "StatusCode.NOT_FOUND"
    # A tenant model loads on demand: its owner unloads it, it stays ready, and loads again.
    owner = authenticated_grpc_client(url(), key=required_env("WEFT_OTHER_KEY"))
    owner.unload_model("secret")
    assert owner.is_model_ready("secret")
    owner.load_model("secret")
    x = np.zeros((1, 64), dtype=np.float32)
    assert owner.infer("secret", [x_input(x)]).as_numpy("y").shape == (1, 10)
    # Another tenant cannot touch it.
    with pytest.raises(InferenceServerException) as hidden:
        client.unload_model("secret")
    assert status_of(hidden.value) == "StatusCode.NOT_FOUND"
