#!/usr/bin/env bash
# Runs every check and test Verge has, on a fresh machine: installs what the tests
# need first (as root, via apt-get), then formatting, lints, and the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."

# System packages the tests use. The foundation needs only the Rust toolchain and a C
# compiler (SQLite is built from source); later runtimes add runc, qemu, etcd-server...
APT_PACKAGES=(gcc)
missing=()
for p in "${APT_PACKAGES[@]}"; do
  dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
done
if ((${#missing[@]})); then
  if [ "$(id -u)" -eq 0 ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}"
  else
    echo "missing packages: ${missing[*]} (run as root to install them)" >&2
    exit 1
  fi
fi

echo "== fmt"
cargo fmt --all -- --check
echo "== clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings
echo "== tests"
if cargo nextest --version >/dev/null 2>&1; then
  cargo nextest run --workspace --locked --no-fail-fast
else
  cargo test --workspace --locked --no-fail-fast
fi
echo "== all tests passed"
