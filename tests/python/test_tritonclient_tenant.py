"""Stock `tritonclient[http]` calling a graph a tenant built itself: plugins it signed and pushed
and a graph it applied over the control plane, on a model the operator shares with it.

Run by the Rust end-to-end test `tritonclient_calls_a_tenants_signed_graph`
(tests/tests/tritonclient.rs), which creates the tenants, pushes everything and sets WEFT_URL,
WEFT_API_KEY (the tenant's key), WEFT_OTHER_KEY (another tenant's) and WEFT_SIGNER (the key id
that signed the plugins)."""

import numpy as np
import pytest
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException
from weft_auth import authenticated_client, required_env


def env(name):
    return required_env(name, "the Rust e2e test `tritonclient_calls_a_tenants_signed_graph`")


@pytest.fixture(scope="module")
def client():
    return authenticated_client(env("WEFT_URL"))


@pytest.mark.parametrize("binary", [True, False])
def test_the_tenants_graph_answers_with_probabilities_and_provenance(client, binary):
    assert client.is_model_ready("classify")
    assert client.get_model_metadata("classify")["platform"] == "weft_graph"
    x = httpclient.InferInput("x", [2, 64], "FP32")
    x.set_data_from_numpy(np.linspace(-2, 2, 128, dtype=np.float32).reshape(2, 64),
                          binary_data=binary)
    outputs = [httpclient.InferRequestedOutput("probabilities", binary_data=binary),
               httpclient.InferRequestedOutput("label", binary_data=binary)]
    result = client.infer("classify", [x], outputs=outputs)
    probabilities = result.as_numpy("probabilities")
    assert probabilities.shape == (2, 10)
    np.testing.assert_allclose(probabilities.sum(axis=1), [1.0, 1.0], rtol=1e-5)
    assert result.as_numpy("label").shape == (2, 1)
    provenance = result.get_response()["parameters"]["provenance"]
    assert sorted(p["plugin"] for p in provenance) == ["normalize", "softmax"]
    assert all(p["key_id"] == env("WEFT_SIGNER") for p in provenance)
    assert all(p["digest"].startswith("sha256:") for p in provenance)


def test_another_tenant_cannot_see_it():
    other = authenticated_client(env("WEFT_URL"), key=env("WEFT_OTHER_KEY"))
    assert not other.is_model_ready("classify")
    with pytest.raises(InferenceServerException) as refused:
        other.get_model_metadata("classify")
    assert "Request for unknown model: 'classify' is not found" in str(refused.value)
