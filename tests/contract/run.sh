#!/bin/bash
# SPDX-License-Identifier: Apache-2.0
# Contract test: starts a real piccolo-api on 127.0.0.1, completes first-run setup, logs in,
# then lets schemathesis drive every operation of the served /api/v1/openapi.json. It fails
# on any undocumented status code, response-schema or content-type mismatch, server error,
# or accepted invalid input (every check is enabled in schemathesis.toml).
#   usage: tests/contract/run.sh [TARGET_DIR]   (default: target/debug)
# Schemathesis comes from PyPI into a venv (PICCOLO_CONTRACT_VENV, default
# /tmp/piccolo-contract-venv), pinned below.
set -euo pipefail
repo=$(cd "$(dirname "$0")/../.." && pwd)
bins=$(realpath "${1:-$repo/target/debug}")
venv=${PICCOLO_CONTRACT_VENV:-/tmp/piccolo-contract-venv}
version=4.32.5
examples=${PICCOLO_CONTRACT_EXAMPLES:-25}

if ! "$venv/bin/schemathesis" --version 2>/dev/null | grep -q "$version"; then
  /usr/bin/python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet "schemathesis==$version"
fi

work=$(mktemp -d /tmp/piccolo-contract.XXXXXX)
pid=
cleanup() {
  [ -n "$pid" ] && kill -TERM "$pid" 2>/dev/null && wait "$pid" 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT
port=$((20000 + RANDOM % 20000))
base="http://127.0.0.1:$port"
"$bins/piccolo-api" --listen "127.0.0.1:$port" --state-dir "$work/state" --runtime-dir "$work/run" \
  --broker-socket "$work/no-broker.sock" --kdf-memory-kib 8192 --kdf-passes 1 \
  >"$work/api.log" 2>&1 &
pid=$!
for _ in $(seq 100); do curl -sf "$base/api/v1/health/live" >/dev/null && break; sleep 0.1; done
code=$(cat "$work/run/setup-code")
password="contract-test-password"
curl -sf -X POST "$base/api/v1/setup" -H 'content-type: application/json' \
  -d "{\"setup_code\":\"$code\",\"password\":\"$password\"}" >/dev/null
login() {
  curl -sf -X POST "$base/api/v1/auth/login" -H 'content-type: application/json' -d "{\"password\":\"$password\"}" |
    /usr/bin/python3 -c 'import json,sys; print(json.load(sys.stdin)["token"])'
}
st() {
  (cd "$repo/tests/contract" && "$venv/bin/schemathesis" --config-file schemathesis.toml run "$base/api/v1/openapi.json" \
    --max-examples "$examples" --seed 1 --workers 1 "$@")
}
# Operations that end the session or the unlocked state go last, so the first pass sees a
# live session throughout.
destructive='^(logout|lock|change_password|import|reset_password)$'
rc=0
echo "--- pass 1: every operation that keeps the session, authenticated"
st -H "Authorization: Bearer $(login)" --exclude-operation-id-regex "$destructive" || rc=1
# Each session-ending operation gets its own pass with a fresh session (unlocked first).
for op in change_password import reset_password lock logout; do
  echo "--- pass 2: $op"
  curl -sf -X POST "$base/api/v1/crypto/unlock" -H 'content-type: application/json' \
    -d "{\"password\":\"$password\"}" >/dev/null
  st -H "Authorization: Bearer $(login)" --include-operation-id "$op" || rc=1
done
echo "--- pass 3: everything, unauthenticated"
st || rc=1
if [ $rc -ne 0 ]; then echo "contract test FAILED; server log:"; tail -50 "$work/api.log"; fi
exit $rc
