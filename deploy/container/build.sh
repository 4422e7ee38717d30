#!/usr/bin/env bash
# Builds the Weft image with podman from the repository root.
#
#   --prebuilt          put the host's binary (--binary, default target/release/weft) and ONNX
#                       Runtime library (target/onnxruntime) in the image instead of compiling
#                       in the builder stage
#   --binary PATH       the binary --prebuilt uses (debug info is stripped from the copy)
#   --local-base        build the base image here (debootstrap of Debian bookworm, minbase) and
#                       use it for both stages: no container registry needed
#   --tag NAME          the image's name (default localhost/weft:dev)
set -euo pipefail
cd "$(dirname "$0")/../.."

tag=localhost/weft:dev
prebuilt=0
local_base=0
binary=target/release/weft
while [ $# -gt 0 ]; do
    case "$1" in
        --prebuilt) prebuilt=1 ;;
        --local-base) local_base=1 ;;
        --binary) binary="$2"; shift ;;
        --tag) tag="$2"; shift ;;
        *) echo "build.sh: unknown option $1" >&2; exit 2 ;;
    esac
    shift
done

# runc and explicit ulimits: what podman needs in a sandboxed VM (crun and the default nproc
# limit fail there); harmless elsewhere.
podman=(podman --runtime runc)
build_args=()
if [ "$local_base" = 1 ]; then
    base=localhost/weft-base:bookworm
    if ! "${podman[@]}" image exists "$base"; then
        rootfs=$(mktemp -d)
        trap 'rm -rf "$rootfs"' EXIT
        echo "build.sh: building $base with debootstrap (Debian bookworm, minbase)" >&2
        debootstrap --variant=minbase --include=ca-certificates bookworm "$rootfs" \
            "${DEBIAN_MIRROR:-http://deb.debian.org/debian}" >/dev/null
        tar -C "$rootfs" -c . | "${podman[@]}" import - "$base" >/dev/null
    fi
    build_args+=(--build-arg "BUILDER_IMAGE=$base" --build-arg "RUNTIME_IMAGE=$base")
fi

staged=deploy/container/prebuilt
rm -rf "$staged"
if [ "$prebuilt" = 1 ]; then
    library=$(ls target/onnxruntime/libonnxruntime.so.* 2>/dev/null | head -n 1)
    if [ ! -f "$binary" ] || [ -z "$library" ]; then
        echo "build.sh: --prebuilt needs $binary and target/onnxruntime/ (cargo build --release -p weft-cli; cargo xtask setup)" >&2
        exit 1
    fi
    mkdir -p "$staged"
    strip --strip-debug -o "$staged/weft" "$binary"
    cp "$library" "$staged/"
fi

"${podman[@]}" build --network host --ulimit nofile=1024:1024 --ulimit nproc=1000:1000 \
    -f deploy/container/Containerfile -t "$tag" "${build_args[@]}" .
rm -rf "$staged"
echo "build.sh: built $tag" >&2
