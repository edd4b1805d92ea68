#!/usr/bin/env bash
# Builds herd's container image from this checkout, pulling nothing:
# herd:<version> and herd:latest. Needs cargo, binutils (strip) and podman
# or buildah.
#
#   bash deploy/image.sh
#
# The release binary is built (or reused when up to date), stripped and
# staged with the shared libraries `ldd` lists, the CA certificates,
# deploy/herd.toml as /etc/herd/herd.toml and an unprivileged user
# (65532), then built
# FROM scratch with deploy/Containerfile.
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"

version=$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -n 1)
revision=$(git rev-parse HEAD 2>/dev/null || echo unknown)
source=${HERD_IMAGE_SOURCE:-$(git remote get-url origin 2>/dev/null || echo unknown)}

if command -v podman >/dev/null; then
  build=(podman build)
elif command -v buildah >/dev/null; then
  build=(buildah bud)
else
  echo "image.sh: needs podman or buildah (apt-get install podman)" >&2
  exit 2
fi

cargo build --release --locked --bin herd
binary=${CARGO_TARGET_DIR:-target}/release/herd

stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
rootfs=$stage/rootfs
mkdir -p "$rootfs/usr/local/bin" "$rootfs/etc/herd"
strip --strip-all -o "$rootfs/usr/local/bin/herd" "$binary"
# The shared libraries the binary links, at the paths the loader looks.
ldd "$binary" | grep -o '/[^ ]*' | while read -r lib; do
  install -D -m 0755 "$(readlink -f "$lib")" "$rootfs$lib"
done
install -m 0644 deploy/herd.toml "$rootfs/etc/herd/herd.toml"
# CA certificates, for a cluster's Redis at rediss://.
certs=/etc/ssl/certs/ca-certificates.crt
if [ ! -f "$certs" ]; then
  echo "image.sh: needs $certs (apt-get install ca-certificates)" >&2
  exit 2
fi
install -D -m 0644 "$certs" "$rootfs$certs"
echo 'herd:x:65532:65532:herd:/nonexistent:/sbin/nologin' > "$rootfs/etc/passwd"
echo 'herd:x:65532:' > "$rootfs/etc/group"
cp deploy/Containerfile "$stage/Containerfile"

"${build[@]}" \
  --build-arg "VERSION=$version" \
  --build-arg "REVISION=$revision" \
  --build-arg "SOURCE=$source" \
  -t "herd:$version" -t "herd:latest" \
  -f "$stage/Containerfile" "$stage"
echo "built herd:$version and herd:latest"
