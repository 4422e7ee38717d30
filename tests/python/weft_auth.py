"""Bearer API keys for stock `tritonclient[http]`: Weft selects the tenant by
`Authorization: Bearer <key>`, and tritonclient sends extra headers through a client plugin
(`InferenceServerClient.register_plugin`), so user code needs no per-call `headers=`."""
import os

import pytest
import tritonclient.http as httpclient
from tritonclient._plugin import InferenceServerClientPlugin


class BearerAuth(InferenceServerClientPlugin):
    """Adds `Authorization: Bearer <key>` to every request the client sends."""

    def __init__(self, key):
        self._key = key

    def __call__(self, request):
        request.headers["Authorization"] = f"Bearer {self._key}"


def api_key():
    value = os.environ.get("WEFT_API_KEY")
    if not value:
        pytest.fail("WEFT_API_KEY is not set: these modules are run by the Rust e2e tests "
                    "(cargo xtask test), which start the server with a key")
    return value


def authenticated_client(url, key=None):
    client = httpclient.InferenceServerClient(url)
    client.register_plugin(BearerAuth(key or api_key()))
    return client
