"""Triton's system shared memory extension with stock tritonclient, over HTTP and gRPC: inputs
read from and outputs written to regions the client registered, the status of each tenant's
own regions, bounds, and a tenant the operator did not enable refused.

Run by the Rust end-to-end test `tritonclient_system_shared_memory` (tests/tests/tritonclient.rs),
which starts `weft serve --system-shared-memory default` and sets WEFT_URL, WEFT_GRPC_URL,
WEFT_API_KEY (the enabled tenant), WEFT_OTHER_KEY (a tenant not enabled) and
WEFT_QUICKSTART_MODELS."""
import os
import uuid

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
import tritonclient.utils.shared_memory as shm
from tritonclient.utils import InferenceServerException

from test_tritonclient import mlp_reference
from weft_auth import authenticated_client, authenticated_grpc_client, required_env

RUNNER = "the Rust e2e test `tritonclient_system_shared_memory`"
PROTOCOLS = {"http": httpclient, "grpc": grpcclient}


def client_for(protocol, key=None):
    if protocol == "http":
        return authenticated_client(required_env("WEFT_URL", RUNNER), key=key)
    return authenticated_grpc_client(required_env("WEFT_GRPC_URL", RUNNER), key=key)


@pytest.fixture
def regions():
    """Shared memory objects made for one test, destroyed after it."""
    made = []

    def make(byte_size):
        key = f"/weft-test-{uuid.uuid4().hex[:12]}"
        handle = shm.create_shared_memory_region(key[1:], key, byte_size)
        made.append(handle)
        return key, handle

    yield make
    for handle in made:
        shm.destroy_shared_memory_region(handle)


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_inputs_and_outputs_through_shared_memory(protocol, regions):
    client = client_for(protocol)
    module = PROTOCOLS[protocol]
    client.unregister_system_shared_memory()
    x = np.random.default_rng(11).standard_normal((4, 64)).astype(np.float32)
    in_key, in_handle = regions(x.nbytes)
    out_key, out_handle = regions(4 * 10 * 4 + 64)
    shm.set_shared_memory_region(in_handle, [x])
    client.register_system_shared_memory("in", in_key, x.nbytes)
    # The output region starts 64 bytes into its object.
    client.register_system_shared_memory("out", out_key, 4 * 10 * 4, offset=64)

    tensor = module.InferInput("x", [4, 64], "FP32")
    tensor.set_shared_memory("in", x.nbytes)
    wanted = module.InferRequestedOutput("y")
    wanted.set_shared_memory("out", 4 * 10 * 4)
    result = client.infer("mlp", [tensor], outputs=[wanted])
    output = result.get_output("y")
    shape = [int(d) for d in (output["shape"] if protocol == "http" else output.shape)]
    assert shape == [4, 10]
    y = shm.get_contents_as_numpy(out_handle, np.float32, [4 * 10 + 16])[16:].reshape(4, 10)
    np.testing.assert_allclose(y, mlp_reference(x), rtol=1e-5, atol=1e-5)

    status = client.get_system_shared_memory_status()
    if protocol == "grpc":
        names = set(status.regions.keys())
    else:
        names = {region["name"] for region in status}
    assert names == {"in", "out"}
    one = client.get_system_shared_memory_status(region_name="out")
    if protocol == "http":
        assert one == [{"name": "out", "key": out_key, "offset": 64, "byte_size": 160}]
    else:
        assert one.regions["out"].key == out_key and one.regions["out"].offset == 64

    client.unregister_system_shared_memory("in")
    with pytest.raises(InferenceServerException) as gone:
        client.get_system_shared_memory_status(region_name="in")
    assert "Unable to find system shared memory region: 'in'" in str(gone.value)
    client.unregister_system_shared_memory()


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_bad_regions_and_places_are_refused_clearly(protocol, regions):
    client = client_for(protocol)
    module = PROTOCOLS[protocol]
    client.unregister_system_shared_memory()
    key, _ = regions(256)
    with pytest.raises(InferenceServerException, match="does not fit"):
        client.register_system_shared_memory("big", key, 4096)
    with pytest.raises(InferenceServerException, match="not a POSIX shared memory name"):
        client.register_system_shared_memory("escape", "/../etc/passwd", 16)
    with pytest.raises(InferenceServerException, match="no shared memory object"):
        client.register_system_shared_memory("none", "/weft-test-never-created", 16)
    client.register_system_shared_memory("small", key, 256)
    with pytest.raises(InferenceServerException, match="already registered"):
        client.register_system_shared_memory("small", key, 256)

    tensor = module.InferInput("x", [1, 64], "FP32")
    tensor.set_shared_memory("small", 256, offset=128)
    with pytest.raises(InferenceServerException, match="outside shared memory region 'small'"):
        client.infer("mlp", [tensor])
    tensor.set_shared_memory("nope", 256)
    with pytest.raises(InferenceServerException, match="Unable to find system shared memory region: 'nope'"):
        client.infer("mlp", [tensor])
    tensor = module.InferInput("x", [1, 64], "FP32")
    tensor.set_data_from_numpy(np.zeros((1, 64), dtype=np.float32))
    wanted = module.InferRequestedOutput("y")
    wanted.set_shared_memory("small", 8)
    with pytest.raises(InferenceServerException, match="more than the 8 bytes"):
        client.infer("mlp", [tensor], outputs=[wanted])
    client.unregister_system_shared_memory()


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_a_tenant_not_enabled_is_refused(protocol, regions):
    enabled = client_for(protocol)
    other = client_for(protocol, key=required_env("WEFT_OTHER_KEY", RUNNER))
    key, _ = regions(256)
    enabled.register_system_shared_memory("mine", key, 256)
    try:
        for call in [
            lambda: other.register_system_shared_memory("theirs", key, 256),
            lambda: other.get_system_shared_memory_status(),
            lambda: other.unregister_system_shared_memory(),
        ]:
            with pytest.raises(InferenceServerException) as refused:
                call()
            assert "not enabled for tenant 'bolt'" in str(refused.value)
        module = PROTOCOLS[protocol]
        tensor = module.InferInput("x", [1, 64], "FP32")
        tensor.set_shared_memory("mine", 256)
        with pytest.raises(InferenceServerException, match="not enabled for tenant 'bolt'"):
            other.infer("secret", [tensor])
    finally:
        enabled.unregister_system_shared_memory()
