#!/usr/bin/env bash
# The image, end to end and offline: builds it (--prebuilt --local-base, from the binary in
# $WEFT_BINARY, default target/release/weft), runs it on a read-only root filesystem as its
# non-root user with tmpfs for the writable places, and calls it through the published ports with
# stock tritonclient over HTTP and gRPC; then SIGTERM must drain and exit 0.
# Run by `cargo xtask test` (needs podman and debootstrap: `apt-get install podman runc
# debootstrap`; cargo xtask setup --container installs them).
set -euo pipefail
cd "$(dirname "$0")/../.."

tag=localhost/weft:smoke
key=weft-smoke-key-0123456789
python=${WEFT_TEST_PYTHON:-target/venv/bin/python}
podman=(podman --runtime runc)
for tool in podman runc debootstrap; do
    command -v "$tool" >/dev/null || { echo "smoke-test.sh: $tool is missing: run cargo xtask setup (it installs podman, runc and debootstrap)" >&2; exit 1; }
done

deploy/container/build.sh --prebuilt --local-base --binary "${WEFT_BINARY:-target/release/weft}" --tag "$tag"

name=weft-smoke-$$
cleanup() { "${podman[@]}" rm -f -t 0 "$name" >/dev/null 2>&1 || true; }
trap cleanup EXIT
"${podman[@]}" run -d --name "$name" --read-only \
    --tmpfs /tmp:rw,mode=1777 --tmpfs /var/lib/weft:rw,mode=1777 \
    --ulimit nofile=1024:1024 --ulimit nproc=1000:1000 \
    -p 127.0.0.1::8000 -p 127.0.0.1::8001 -p 127.0.0.1::8002 \
    -e WEFT_BOOTSTRAP_KEY="$key" \
    "$tag" serve --shutdown-grace-seconds 10 --metrics-listen 0.0.0.0:8002 >/dev/null

http=$("${podman[@]}" port "$name" 8000/tcp)
grpc=$("${podman[@]}" port "$name" 8001/tcp)
metrics=$("${podman[@]}" port "$name" 8002/tcp)
echo "smoke-test.sh: HTTP on $http, gRPC on $grpc" >&2

user=$("${podman[@]}" exec "$name" sh -c 'id -u')
if [ "$user" != 65532 ]; then
    echo "smoke-test.sh: the server runs as uid $user, not 65532" >&2
    exit 1
fi
if "${podman[@]}" exec "$name" sh -c 'touch /usr/local/bin/x' 2>/dev/null; then
    echo "smoke-test.sh: the root filesystem is writable" >&2
    exit 1
fi

WEFT_HTTP="$http" WEFT_GRPC="$grpc" WEFT_METRICS="$metrics" WEFT_KEY="$key" "$python" - <<'PY'
import os
import time
import urllib.request

import numpy as np
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient

key = os.environ["WEFT_KEY"]
http = httpclient.InferenceServerClient(os.environ["WEFT_HTTP"])
deadline = time.monotonic() + 120
while True:
    try:
        if http.is_server_ready():
            break
    except Exception:
        pass
    assert time.monotonic() < deadline, "the container did not become ready in 120 s"
    time.sleep(0.5)
headers = {"Authorization": f"Bearer {key}"}
x = np.full((2, 64), 0.5, dtype=np.float32)
tensor = httpclient.InferInput("x", [2, 64], "FP32")
tensor.set_data_from_numpy(x)
y_http = http.infer("mlp", [tensor], headers=headers).as_numpy("y")
assert y_http.shape == (2, 10), y_http.shape

rpc = grpcclient.InferenceServerClient(os.environ["WEFT_GRPC"])
assert rpc.is_server_live()
tensor = grpcclient.InferInput("x", [2, 64], "FP32")
tensor.set_data_from_numpy(x)
y_grpc = rpc.infer("mlp", [tensor], headers={"authorization": f"Bearer {key}"}).as_numpy("y")
assert np.array_equal(y_http, y_grpc), (y_http, y_grpc)
# The probes' port: health and the autoscaling gauge.
metrics = f"http://{os.environ['WEFT_METRICS']}"
assert urllib.request.urlopen(f"{metrics}/v2/health/ready").status == 200
text = urllib.request.urlopen(f"{metrics}/metrics").read().decode()
assert "weft_replica_load_ratio 0" in text, text[-500:]
print("smoke-test.sh: tritonclient HTTP and gRPC answered through the published ports")
PY

"${podman[@]}" stop -t 20 "$name" >/dev/null
status=$("${podman[@]}" inspect --format '{{.State.ExitCode}}' "$name")
if [ "$status" != 0 ]; then
    echo "smoke-test.sh: weft exited $status after SIGTERM:" >&2
    "${podman[@]}" logs "$name" >&2
    exit 1
fi
echo "smoke-test.sh: passed" >&2
