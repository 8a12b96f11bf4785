#!/usr/bin/env bash
# Runs every check and test Verge has, on a fresh machine: installs what the tests
# need first (as root, via apt-get), then formatting, lints, and the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."

# System packages the tests use: a C compiler (SQLite is built from source), QEMU and a
# static busybox for the VM driver's tests (they boot a busybox initrd; qemu-img makes
# the overlays of disk images from the artifact cache), runc and
# Debian's OCI registry for the container driver's (busybox again, as an image); etcd
# for the store's etcd backend and the hub replicas (started by the tests on loopback),
# and protoc, which the etcd client's build needs (crates/store-etcd); Prometheus,
# which scrapes the hub's federation endpoint in the observability tests; Chromium
# and its WebDriver, which drive the web console in its tests.
APT_PACKAGES=(gcc qemu-system-x86 qemu-utils busybox-static runc docker-registry
  etcd-server etcd-client protobuf-compiler prometheus chromium chromium-driver
  redis-server)
# Each tool the tests run, and the package that provides it. The machine image may ship
# a newer build of a package than Debian's (qemu-utils, for one), and installing another
# package can remove it; so after installing, every tool is run, and what does not run
# is installed again (Debian's build, which matches the rest).
TOOLS=(
  "gcc --version:gcc"
  "qemu-system-x86_64 --version:qemu-system-x86"
  "qemu-img --version:qemu-utils"
  "busybox true:busybox-static"
  "runc --version:runc"
  "docker-registry --version:docker-registry"
  "etcd --version:etcd-server"
  "etcdctl version:etcd-client"
  "protoc --version:protobuf-compiler"
  "prometheus --version:prometheus"
  "chromium --version:chromium"
  "chromedriver --version:chromium-driver"
  "redis-server --version:redis-server"
  "redis-cli --version:redis-tools"
)
apt_install() {
  if [ "$(id -u)" -ne 0 ]; then
    echo "missing packages: $* (run as root to install them)" >&2
    exit 1
  fi
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@"
}
missing=()
for p in "${APT_PACKAGES[@]}"; do
  dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
done
if ((${#missing[@]})); then apt_install "${missing[@]}"; fi
broken_tools() {
  local t
  for t in "${TOOLS[@]}"; do
    ${t%%:*} >/dev/null 2>&1 || echo "${t##*:}"
  done
}
broken=($(broken_tools))
if ((${#broken[@]})); then
  echo "tools that do not run after installing: ${broken[*]}; installing their packages again" >&2
  apt_install "${broken[@]}"
  broken=($(broken_tools))
  if ((${#broken[@]})); then
    echo "still not runnable: ${broken[*]}" >&2
    exit 1
  fi
fi

# A kernel for the VM tests: Debian's cloud kernel, extracted from its package (not
# installed: nothing on this machine boots it), with the modules a guest loads to see
# virtio disks. Cached across runs.
KERNEL_CACHE=/var/cache/verge-test
if ! ls "$KERNEL_CACHE"/boot/vmlinuz-* "$KERNEL_CACHE"/lib/modules/*/kernel/drivers/block/virtio_blk.ko >/dev/null 2>&1; then
  mkdir -p "$KERNEL_CACHE"
  kernel_pkg() { apt-cache depends linux-image-cloud-amd64 2>/dev/null | awk '/Depends: linux-image-/ {print $2; exit}'; }
  pkg=$(kernel_pkg)
  if [ -z "$pkg" ]; then apt-get update -qq && pkg=$(kernel_pkg); fi
  (cd "$KERNEL_CACHE" && apt-get download -qq "$pkg" 2>/dev/null \
    && dpkg-deb --fsys-tarfile "$pkg"_*.deb | tar -x --wildcards './boot/vmlinuz-*' \
      './lib/modules/*/kernel/drivers/virtio/*.ko' './lib/modules/*/kernel/drivers/block/virtio_blk.ko' \
    && rm -f "$pkg"_*.deb)
fi

# The Wasm component the function tests run, built from guests/hello-fn.
rustup target add wasm32-wasip2 >/dev/null
# (its own target dir, whatever CARGO_TARGET_DIR says: the tests look for it there)
cargo build --quiet --locked --release --target wasm32-wasip2 \
  --manifest-path guests/hello-fn/Cargo.toml --target-dir guests/hello-fn/target

# A one-shot run gains nothing from incremental compilation, and its caches more than
# double the size of target/ (a CI machine once ran out of disk in the build).
export CARGO_INCREMENTAL="${CARGO_INCREMENTAL:-0}"
echo "== disk: $(df -h --output=avail . | tail -1 | tr -d ' ') free"

echo "== fmt"
cargo fmt --all -- --check
echo "== clippy"
# Every driver is built and tested, including those outside the default build.
FEATURES=verge/container,verge/function,verge/etcd
cargo clippy --workspace --all-targets --locked --features "$FEATURES" -- -D warnings
echo "== tests"
if cargo nextest --version >/dev/null 2>&1; then
  cargo nextest run --workspace --locked --no-fail-fast --features "$FEATURES"
else
  cargo test --workspace --locked --no-fail-fast --features "$FEATURES"
fi
echo "== all tests passed (disk: $(df -h --output=avail . | tail -1 | tr -d ' ') free, target/ $(du -sh target 2>/dev/null | cut -f1))"
