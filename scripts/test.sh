#!/usr/bin/env bash
# The whole test suite, from a fresh Debian 12 machine: installs system packages and SPDK's RPC
# client, then runs formatting and lint checks, unit tests, and integration tests that start the
# real vstor binary and drive it with vstor rpc, spdk-rpc, libblkio and QEMU guests.
set -euo pipefail
cd "$(dirname "$0")/.."
start=$(date +%s)

./scripts/deps.sh

# SPDK's own JSON-RPC client, from PyPI, in a private virtualenv.
if [ ! -x .venv/bin/spdk-rpc ]; then
    python3 -m venv .venv
    .venv/bin/pip install -q spdk
fi
export SPDK_RPC="$PWD/.venv/bin/spdk-rpc"
export VSTOR_REQUIRE_SPDK_RPC=1
export VSTOR_REQUIRE_GUEST=1
export VSTOR_TEST_DIR="${VSTOR_TEST_DIR:-/var/tmp}"

echo "== cargo fmt --check"
cargo fmt --all -- --check
cargo fmt --manifest-path fuzz/Cargo.toml -- --check
echo "== cargo clippy -D warnings"
cargo clippy --workspace --all-targets --release -- -D warnings
cargo clippy --manifest-path fuzz/Cargo.toml --all-targets -- -D warnings
echo "== cargo test"
cargo test --workspace --release -- --test-threads="${VSTOR_TEST_THREADS:-4}"
echo "== fuzz: the committed seeds through every harness, then every target under ASan"
cargo test --manifest-path fuzz/Cargo.toml
# VSTOR_FUZZ_SECS=0 skips the timed run (seeds above still run).
if [ "${VSTOR_FUZZ_SECS:-60}" -gt 0 ]; then
    ./scripts/fuzz.sh "${VSTOR_FUZZ_SECS:-60}"
fi

echo "== all tests passed in $(( $(date +%s) - start )) s"
