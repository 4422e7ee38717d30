"""Bearer API keys for stock `tritonclient[http]` and `tritonclient[grpc]`: Weft selects the
tenant by `Authorization: Bearer <key>` (gRPC metadata `authorization`), and tritonclient sends
extra headers through a client plugin (`InferenceServerClient.register_plugin`), so user code
needs no per-call `headers=`."""
import os

import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient._plugin import InferenceServerClientPlugin


class BearerAuth(InferenceServerClientPlugin):
    """Adds `Authorization: Bearer <key>` to every request the client sends."""

    def __init__(self, key):
        self._key = key

    def __call__(self, request):
        # Lower case: gRPC metadata keys must be, and HTTP headers ignore case.
        request.headers["authorization"] = f"Bearer {self._key}"


def required_env(name, runner="the Rust e2e tests"):
    """The environment variable `name`; fails loudly when the Rust test that runs the module
    (`runner`) did not set it."""
    value = os.environ.get(name)
    if not value:
        pytest.fail(f"{name} is not set: this module is run by {runner} (cargo xtask test), "
                    "which starts the servers and sets it")
    return value


def api_key():
    return required_env("WEFT_API_KEY")


def authenticated_client(url, key=None):
    client = httpclient.InferenceServerClient(url)
    client.register_plugin(BearerAuth(key or api_key()))
    return client


def authenticated_grpc_client(url, key=None):
    client = grpcclient.InferenceServerClient(url)
    client.register_plugin(BearerAuth(key or api_key()))
    return client
