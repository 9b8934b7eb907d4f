#!/bin/bash
# SPDX-License-Identifier: Apache-2.0
# Contract test: starts a real piccolo-broker (as root, with a policy granting the API
# worker its volumes, [volumes] on the same state dir) and a real piccolo-api on 127.0.0.1
# on top of it, completes first-run setup (real gocryptfs volumes, SQLite store), logs in,
# then lets schemathesis drive every operation of the served /api/v1/openapi.json. It fails
# on any undocumented status code, response-schema or content-type mismatch, server error,
# or accepted invalid input (every check is enabled in schemathesis.toml).
#   usage: tests/contract/run.sh [TARGET_DIR]   (default: target/debug; must run as root)
# The worker runs as PICCOLO_CONTRACT_API_USER (default piccolo-api, as in production; export
# and import go through the broker's Archive service).
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

[ "$(id -u)" -eq 0 ] || { echo "contract test: must run as root (real broker, FUSE mounts)"; exit 2; }
api_user=${PICCOLO_CONTRACT_API_USER:-piccolo-api}
work=$(mktemp -d /tmp/piccolo-contract.XXXXXX)
chmod 0755 "$work"
pid=
bpid=
cleanup() {
  [ -n "$pid" ] && kill -TERM "$pid" 2>/dev/null && wait "$pid" 2>/dev/null || true
  [ -n "$bpid" ] && kill -TERM "$bpid" 2>/dev/null && wait "$bpid" 2>/dev/null || true
  for m in "$work"/state/mounts/*; do mountpoint -q "$m" 2>/dev/null && fusermount3 -uz "$m" || true; done
  rm -rf "$work"
}
trap cleanup EXIT
# Users and groups as systemd-sysusers would create them.
while read -r kind name rest; do
  case "$kind" in
    g) getent group "$name" >/dev/null || groupadd --system "$name" ;;
    u) id "$name" >/dev/null 2>&1 || useradd --system --no-create-home --shell /usr/sbin/nologin --user-group "$name" ;;
    m) usermod -a -G "$(echo "$rest" | awk '{print $1}')" "$name" ;;
  esac
done < <(grep -vE '^\s*(#|$)' "$repo/systemd/sysusers.d/piccolo.conf")
mkdir -p "$work"/{run,log,state/crypto,state/volumes,state/exports,api-run}
chmod 0755 "$work/state"
chown "$api_user:" "$work"/state/{crypto,volumes,exports} "$work/api-run"
chmod 0700 "$work"/state/{crypto,volumes,exports} "$work/api-run"
cat > "$work/policy.toml" <<POLICY
version = 1

[[rule]]
rpcs = ["CreateVolume", "MountVolume", "UnmountVolume", "VolumeStatus", "ExportArchive", "ImportArchive"]
users = ["$api_user"]
volumes = ["control", "bootstrap"]
reason = "contract test: the API worker owns persistence"

[[rule]]
rpcs = ["GetBootState", "SealSecret", "UnsealSecret"]
users = ["$api_user"]
reason = "contract test: boot state and TPM sealing (no TPM configured: answered 503)"
POLICY
cat > "$work/broker.toml" <<CONFIG
socket = "$work/run/broker.sock"
socket_group = "piccolo-broker"
policy = "$work/policy.toml"
audit_log = "$work/log/audit.jsonl"
audit_group = "piccolo-audit"

[volumes]
state_dir = "$work/state"
CONFIG
"$bins/piccolo-broker" --config "$work/broker.toml" >"$work/broker.log" 2>&1 &
bpid=$!
for _ in $(seq 100); do [ -S "$work/run/broker.sock" ] && break; sleep 0.1; done
port=$((20000 + RANDOM % 20000))
base="http://127.0.0.1:$port"
setpriv --reuid="$(id -u "$api_user")" --regid="$(id -g "$api_user")" --init-groups --no-new-privs \
  "$bins/piccolo-api" --listen "127.0.0.1:$port" --state-dir "$work/state" --runtime-dir "$work/api-run" \
  --broker-socket "$work/run/broker.sock" --kdf-memory-kib 8192 --kdf-passes 1 \
  >"$work/api.log" 2>&1 &
pid=$!
for _ in $(seq 100); do curl -sf "$base/api/v1/health/live" >/dev/null && break; sleep 0.1; done
code=$(cat "$work/api-run/setup-code")
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
