#!/bin/bash
# SPDX-License-Identifier: Apache-2.0
# The whole test suite, as CI runs it: host set-up, formatting, lints, unit and
# integration tests against real components, unit-file lint, real-systemd boot test.
# Integration tests need root (they create system users and run as them).
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo"
step() { printf '\n=== %s\n' "$*"; }

step "host packages"
bash scripts/setup-host.sh
step "cargo fmt --check"
cargo fmt --all -- --check
step "cargo clippy"
cargo clippy --workspace --all-targets -- -D warnings
step "cargo test"
cargo test --workspace --no-fail-fast
step "HTTP API contract (schemathesis)"
bash tests/contract/run.sh target/debug
step "systemd-analyze verify"
bash tests/systemd/verify-units.sh target/debug
step "real systemd boot"
for t in tests/sd-boot/run-*.sh; do
  echo "--- $t"
  bash "$t" target/debug
done
