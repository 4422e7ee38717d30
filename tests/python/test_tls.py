"""TLS on both listeners with stock clients: tritonclient over HTTPS and gRPC with TLS, mutual TLS
refusing a client without a certificate (or with one from another CA), and a certificate rotated
under the running server served to new connections while an open connection goes on.

Run by the Rust end-to-end test `tls_on_both_listeners_mutual_tls_and_reload` (tests/tests/tls.rs),
which makes a test CA and certificates in WEFT_CERTS (ca.pem; server, rotated, client and
stranger .pem/.key), starts a TLS server (WEFT_URL, WEFT_GRPC_URL, reloading every second) and a
mutual-TLS one (WEFT_MTLS_URL, WEFT_MTLS_GRPC_URL)."""
import os
import socket
import ssl
import time

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from weft_auth import BearerAuth, api_key, required_env

RUNNER = "the Rust e2e test `tls_on_both_listeners_mutual_tls_and_reload`"


def env(name):
    return required_env(name, RUNNER)


def cert(name):
    return os.path.join(env("WEFT_CERTS"), name)


def https_client(url, client_cert=None):
    def context():
        ctx = ssl.create_default_context(cafile=cert("ca.pem"))
        if client_cert:
            ctx.load_cert_chain(cert(f"{client_cert}.pem"), cert(f"{client_cert}.key"))
        return ctx
    client = httpclient.InferenceServerClient(url, ssl=True, ssl_context_factory=context)
    client.register_plugin(BearerAuth(api_key()))
    return client


def grpc_tls_client(url, client_cert=None):
    extra = {}
    if client_cert:
        extra = {"private_key": cert(f"{client_cert}.key"),
                 "certificate_chain": cert(f"{client_cert}.pem")}
    client = grpcclient.InferenceServerClient(url, ssl=True, root_certificates=cert("ca.pem"), **extra)
    client.register_plugin(BearerAuth(api_key()))
    return client


def x_input(module):
    tensor = module.InferInput("x", [1, 64], "FP32")
    tensor.set_data_from_numpy(np.ones((1, 64), dtype=np.float32))
    return tensor


def served_common_name(url, client_cert=None):
    """The CN of the certificate a new connection to `url` is served."""
    host, port = url.rsplit(":", 1)
    ctx = ssl.create_default_context(cafile=cert("ca.pem"))
    with socket.create_connection((host, int(port)), timeout=10) as raw:
        with ctx.wrap_socket(raw, server_hostname="localhost") as tls:
            subject = dict(part[0] for part in tls.getpeercert()["subject"])
            return subject["commonName"]


def test_https_and_grpc_with_tls():
    http = https_client(env("WEFT_URL"))
    assert http.is_server_ready()
    assert http.infer("mlp", [x_input(httpclient)]).as_numpy("y").shape == (1, 10)
    rpc = grpc_tls_client(env("WEFT_GRPC_URL"))
    assert rpc.is_server_live()
    assert rpc.infer("mlp", [x_input(grpcclient)]).as_numpy("y").shape == (1, 10)


def test_plaintext_clients_get_no_answer_from_a_tls_listener():
    plain = grpcclient.InferenceServerClient(env("WEFT_GRPC_URL"))
    with pytest.raises(InferenceServerException):
        plain.is_server_live(client_timeout=5)
    host, port = env("WEFT_URL").rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=5) as raw:
        raw.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n\r\n")
        answer = raw.recv(1024)
        assert b"200 OK" not in answer


def test_mutual_tls_needs_a_certificate_from_the_trusted_ca():
    with_cert = grpc_tls_client(env("WEFT_MTLS_GRPC_URL"), client_cert="client")
    assert with_cert.infer("mlp", [x_input(grpcclient)]).as_numpy("y").shape == (1, 10)
    assert https_client(env("WEFT_MTLS_URL"), client_cert="client").is_server_live()
    for client_cert in [None, "stranger"]:
        without = grpc_tls_client(env("WEFT_MTLS_GRPC_URL"), client_cert=client_cert)
        with pytest.raises(InferenceServerException) as refused:
            without.is_server_live(client_timeout=5)
        assert "UNAVAILABLE" in str(refused.value.status()) or "DEADLINE" in str(refused.value.status())
        with pytest.raises((ssl.SSLError, ConnectionError, InferenceServerException, OSError)):
            https_client(env("WEFT_MTLS_URL"), client_cert=client_cert).is_server_live()


def test_a_rotated_certificate_serves_new_connections_and_open_ones_go_on():
    url = env("WEFT_GRPC_URL")
    assert served_common_name(url) == "weft-one"
    # A connection opened before the rotation.
    channel = grpc.secure_channel(url, grpc.ssl_channel_credentials(open(cert("ca.pem"), "rb").read()))
    from tritonclient.grpc import service_pb2, service_pb2_grpc
    stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
    assert stub.ServerLive(service_pb2.ServerLiveRequest()).live

    # Rotate as cert-manager does: whole files replaced, the key first.
    for suffix in ["key", "pem"]:
        staged = cert(f"staged.{suffix}")
        with open(cert(f"rotated.{suffix}"), "rb") as source, open(staged, "wb") as target:
            target.write(source.read())
        os.replace(staged, cert(f"server.{suffix}"))
    deadline = time.monotonic() + 15
    while served_common_name(url) != "weft-two":
        assert time.monotonic() < deadline, "the rotated certificate was not served within 15 s"
        time.sleep(0.2)
    assert served_common_name(env("WEFT_URL")) == "weft-two"
    # The open connection was not dropped.
    metadata = [("authorization", f"Bearer {api_key()}")]
    assert stub.ModelReady(service_pb2.ModelReadyRequest(name="mlp"), metadata=metadata).ready
    channel.close()
    assert https_client(env("WEFT_URL")).is_server_ready()
