#!/bin/bash
# SPDX-License-Identifier: Apache-2.0
# Boots a real systemd (PID 1) in a container with piccolo's broker and API unit sets as
# shipped (piccolo-api.service sandboxed, socket-activated by piccolo-api{,-tls}.socket;
# sysusers, tmpfiles, the production policy; gocryptfs over the host's /dev/fuse; no TPM)
# and checks, over HTTP on the unit's sockets:
#   the worker is up as piccolo-api with no capabilities in its own mount namespace; the
#   operator reads the setup code from the journal; first-run setup makes the broker mount
#   the volumes (gocryptfs, FUSE) *after* the worker started, and those mounts appear inside
#   the worker's namespace; login, a password change (writes the control store), lock
#   (423, volumes gone in both namespaces, no plaintext left under the mountpoint), unlock
#   with the new password (the bearer token issued before the lock verifies again: its
#   signing key came back from the store); a stop locks, and the next connection
#   socket-activates a fresh worker that unlocks the same store.
#   usage: tests/sd-boot/run-api.sh [TARGET_DIR]   (default: target/debug)
set -euo pipefail
repo=$(cd "$(dirname "$0")/../.." && pwd)
bins=$(realpath "${1:-$repo/target/debug}")
set_dir=$(mktemp -d /tmp/piccolo-sdboot-api.XXXXXX)
trap 'rm -rf "$set_dir"' EXIT
# shellcheck source=tests/sd-boot/lib.sh
. "$repo/tests/sd-boot/lib.sh"

[ -c /dev/fuse ] || { echo "run-api.sh: /dev/fuse missing on the host" >&2; exit 1; }
cp "$repo/systemd/piccolo-broker.service" "$repo/systemd/piccolo-api.service" \
   "$repo/systemd/piccolo-api.socket" "$repo/systemd/piccolo-api-tls.socket" "$set_dir/"
stage_unit_set "$set_dir" "$bins" piccolo-broker piccolo-broker-tpm piccoloctl piccolo-api
stage_host_bins "$set_dir" "$(command -v gocryptfs)" "$(command -v fusermount3)"
# The broker mounts FUSE: the container needs the device. Its own network namespace keeps
# ports 80/443 off the host (curl runs in it through nsenter -n).
printf '%s\n' --bind=/dev/fuse --private-network > "$set_dir/nspawn.args"

cat > "$set_dir/setup.sh" <<'SETUP'
#!/bin/sh
set -e
sh "$1/files/setup-base.sh" "$1"
# systemd-sysusers.service only runs after an /usr update; create the accounts now.
systemd-sysusers
SETUP

cat > "$set_dir/check.sh" <<'CHECK'
#!/bin/bash
# Host side, container running; $INIT_PID is the container's PID 1.
set -u
in_ct() { nsenter -t "$INIT_PID" -a "$@"; }
fail=0
check() { if eval "$2"; then echo "ok   $1"; else echo "FAIL $1"; fail=1; fi; }
tmp=$(mktemp -d /tmp/piccolo-sdboot-api-check.XXXXXX)
trap 'rm -rf "$tmp"' EXIT
# api METHOD PATH [TOKEN] [JSON]: sets $code and $body (curl in the container's network).
api() {
  rm -f "$tmp/body"
  local args=(-sS --max-time 120 -o "$tmp/body" -w '%{http_code}' -X "$1" "http://127.0.0.1$2")
  [ -n "${3:-}" ] && args+=(-H "authorization: Bearer $3")
  [ -n "${4:-}" ] && args+=(-H 'content-type: application/json' --data "$4")
  code=$(nsenter -t "$INIT_PID" -n curl "${args[@]}" 2>"$tmp/err") || code="curl: $(cat "$tmp/err")"
  body=$(cat "$tmp/body" 2>/dev/null)
  echo "  $1 $2 -> $code $body" | sed -E 's/("(token|recovery_key|csrf_token)":")[^"]*/\1…/g'
}
mp=/var/lib/piccolo/mounts/control
# Mount table and control.db as seen by PID 1 (the broker's namespace) and by the worker.
host_mounts() { in_ct awk -v mp="$1" '$5 == mp {print $5, $(NF-2)}' /proc/self/mountinfo; }
api_pid() { in_ct systemctl show -P MainPID piccolo-api.service; }
# In the worker's namespace a broker mount arrives twice: once on the (slave) root and once
# on the ReadWritePaths= bind mount of mounts/ above it, which hides the first; both leave
# with the unmount. Hence unique lines, plus the type of what the path resolves to.
api_mounts() {
  in_ct sh -c 'nsenter -t "$(systemctl show -P MainPID piccolo-api.service)" -m sh -c '\''awk -v mp="$1" "\$5 == mp {print \$5, \$(NF-2)}" /proc/self/mountinfo | sort -u; stat -f -c "%T" "$1"'\'' sh "$1"' sh "$1"
}
fuse_in_api() { [ "$(api_mounts "$1" | tr '\n' ' ')" = "$1 fuse.gocryptfs fuseblk " ]; }
api_stat() { in_ct sh -c 'nsenter -t "$(systemctl show -P MainPID piccolo-api.service)" -m stat -c "%d:%i %U %s" "$1"' sh "$1" 2>&1; }
PW1='first password 1'
PW2='second password 2'

# 1. The worker as the boot left it: started by the boot transaction, sandboxed.
for _ in $(seq 100); do [ "$(in_ct systemctl show -P ActiveState piccolo-api.service)" = active ] && break; sleep 0.2; done
show=$(in_ct systemctl show piccolo-api.service -p ActiveState,SubState,StatusText,User,NRestarts)
echo "$show"
check "piccolo-api active, READY from the worker" '[[ "$show" == *ActiveState=active* && "$show" == *"StatusText=serving"* && "$show" == *User=piccolo-api* ]]'
for s in piccolo-api.socket piccolo-api-tls.socket; do
  st=$(in_ct systemctl show -P ActiveState "$s")
  check "$s active ($st)" '[ "$st" = active ]'
done
pid0=$(api_pid)
st=$(in_ct sh -c "grep -E '^(Uid|CapEff|CapBnd|NoNewPrivs)' /proc/$pid0/status | tr -s '\t' ' '")
echo "$st"
uid=$(in_ct id -u piccolo-api)
check "worker runs as piccolo-api with no capabilities" '[[ "$st" == *"Uid: $uid $uid $uid $uid"* && "$st" == *"CapEff: 0000000000000000"* && "$st" == *"CapBnd: 0000000000000000"* && "$st" == *"NoNewPrivs: 1"* ]]'
home=$(in_ct getent passwd piccolo-api | cut -d: -f6)
check "piccolo-api's home is the state dir tmpfiles made ($home)" '[ "$home" = /var/lib/piccolo ] && in_ct test -d "$home"'
ns=$(in_ct sh -c "echo \$(readlink /proc/1/ns/mnt) \$(readlink /proc/$pid0/ns/mnt)")
check "worker has its own mount namespace ($ns)" '[ "${ns% *}" != "${ns#* }" ]'
ro=$(in_ct sh -c "nsenter -t $pid0 -m -S $uid -G $uid sh -c 'touch /var/lib/piccolo/x 2>&1; touch /usr/x 2>&1'")
check "ProtectSystem=strict holds: state dir root and /usr read-only for the worker" '[[ $(grep -c "Read-only file system" <<<"$ro") -eq 2 ]]' || echo "$ro"

api GET /api/v1/health/live
check "health over the socket-activated port 80" '[ "$code" = 200 ]'
# Port 443 (piccolo-api-tls.socket): the self-signed certificate the journal names is the
# one served, and port 80 sends a browser there.
tls=$(nsenter -t "$INIT_PID" -n curl -sk --max-time 30 -o /dev/null -w '%{http_code}' https://127.0.0.1/api/v1/health/live 2>&1)
check "health over https on the socket-activated port 443 ($tls)" '[ "$tls" = 200 ]'
fp_log=$(in_ct journalctl -b -u piccolo-api.service -o cat | sed -nE 's/.*self-signed.*SHA-256 fingerprint ([0-9A-F:]{95}).*/\1/p' | tail -1)
fp_tls=$(nsenter -t "$INIT_PID" -n openssl s_client -connect 127.0.0.1:443 </dev/null 2>/dev/null | openssl x509 -noout -fingerprint -sha256 | cut -d= -f2)
check "the served certificate is the one whose fingerprint the journal shows" '[ -n "$fp_log" ] && [ "$fp_log" = "$fp_tls" ]' || echo "journal $fp_log, served $fp_tls"
redir=$(nsenter -t "$INIT_PID" -n curl -s --max-time 30 -o /dev/null -w '%{http_code} %{redirect_url}' -H 'accept: text/html' http://127.0.0.1/setup 2>&1)
check "a browser on port 80 is sent to https ($redir)" '[ "$redir" = "307 https://127.0.0.1/setup" ]'
api GET /api/v1/crypto/status
check "fresh box: uninitialised" '[ "$code" = 200 ] && [ "$(jq -r .state <<<"$body")" = uninitialised ]'
check "no volume mounted before setup" '[ -z "$(host_mounts $mp)" ]'

# 2. The operator reads the one-time setup code from the journal.
setup_code=$(in_ct journalctl -b -u piccolo-api.service -o cat | sed -nE 's/.*first-run setup code: ([0-9A-Z]{4}(-[0-9A-Z]{4}){3}).*/\1/p' | tail -1)
check "setup code in the journal" '[ -n "$setup_code" ]'
file=$(in_ct stat -c '%U %a' /run/piccolo-api/setup-code 2>&1)
check "setup code file piccolo-api 0600 ($file)" '[ "$file" = "piccolo-api 600" ]'
api POST /api/v1/setup "" '{"setup_code":"AAAA-AAAA-AAAA-AAAA","password":"'"$PW1"'"}'
check "wrong setup code refused (401)" '[ "$code" = 401 ]'
api POST /api/v1/setup "" '{"setup_code":"'"$setup_code"'","password":"'"$PW1"'"}'
check "first-run setup (201)" '[ "$code" = 201 ] && [ "$(jq -r .state <<<"$body")" = unlocked ]'
check "setup code file gone" '! in_ct test -e /run/piccolo-api/setup-code'

# 3. The broker's FUSE mounts, made after the worker started, inside the worker's namespace.
hm=$(host_mounts $mp); am=$(api_mounts $mp)
echo "  PID 1 namespace: $hm"; echo "  worker namespace: $am"
in_ct sh -c 'nsenter -t "$(systemctl show -P MainPID piccolo-api.service)" -m grep -E " /var/lib/piccolo/mounts(/control)? " /proc/self/mountinfo' | sed 's/^/  worker mountinfo: /'
check "control volume mounted (fuse.gocryptfs) in PID 1's namespace" '[ "$hm" = "$mp fuse.gocryptfs" ]'
check "... and propagated into the worker's namespace" 'fuse_in_api $mp'
check "... the same worker process (no restart since)" '[ "$(api_pid)" = "$pid0" ]'
db_host=$(in_ct stat -c '%d:%i %U %s' $mp/control.db 2>&1); db_api=$(api_stat $mp/control.db)
echo "  control.db: PID 1 sees $db_host, worker sees $db_api"
check "control.db written by the worker through the mount (same file both sides, piccolo-api's)" '[ "$db_host" = "$db_api" ] && [[ "$db_api" == *" piccolo-api "* ]]'

# 4. Sessions and a store write.
api POST /api/v1/auth/login "" '{"password":"'"$PW1"'"}'
t1=$(jq -r .token <<<"$body" 2>/dev/null)
check "login (200)" '[ "$code" = 200 ] && [ -n "$t1" ]'
api GET /api/v1/auth/session "$t1"
check "authenticated GET (200)" '[ "$code" = 200 ]'
api POST /api/v1/auth/password "$t1" '{"current_password":"'"$PW1"'","new_password":"'"$PW2"'"}'
t2=$(jq -r .token <<<"$body" 2>/dev/null)
check "password change: key set rewrapped, new token key written to the store (200)" '[ "$code" = 200 ] && [ -n "$t2" ]'
api GET /api/v1/auth/session "$t1"
check "the old session ended (401)" '[ "$code" = 401 ]'

# 5. Lock: 423, the volume gone in both namespaces, nothing left under the mountpoint.
api POST /api/v1/crypto/lock "$t2"
check "lock (200, locked)" '[ "$code" = 200 ] && [ "$(jq -r .state <<<"$body")" = locked ]'
api GET /api/v1/auth/session "$t2"
check "valid session while locked: 423 locked" '[ "$code" = 423 ] && [ "$(jq -r .error.code <<<"$body")" = locked ]'
check "control unmounted in PID 1's namespace" '[ -z "$(host_mounts $mp)" ]'
check "... and in the worker's" '! api_mounts $mp | grep -q fuse'
left=$(in_ct find $mp -mindepth 1 2>&1)
check "no plaintext under the bare mountpoint" '[ -z "$left" ]' || echo "$left"
check "ciphertext present (gocryptfs.conf)" 'in_ct test -s /var/lib/piccolo/ciphertext/control/data/gocryptfs.conf'

# 6. Unlock with the new password: the store comes back with what was written.
api POST /api/v1/crypto/unlock "" '{"password":"'"$PW1"'"}'
check "unlock with the old password refused (401)" '[ "$code" = 401 ]'
api POST /api/v1/crypto/unlock "" '{"password":"'"$PW2"'"}'
check "unlock with the new password (200, unlocked)" '[ "$code" = 200 ] && [ "$(jq -r .state <<<"$body")" = unlocked ]'
check "control remounted, visible to the worker" 'fuse_in_api $mp'
api GET /api/v1/auth/session "$t2"
check "token from before the lock verifies: its key was read back from the store (200)" '[ "$code" = 200 ]'

# 7. Stop (locks: control unmounted, bootstrap stays), then a connection socket-activates
#    a fresh worker on the same store.
in_ct systemctl stop piccolo-api.service
res=$(in_ct systemctl show piccolo-api.service -p ActiveState,Result,ExecMainStatus)
check "stop: clean exit ($(tr '\n' ' ' <<<"$res"))" '[[ "$res" == *ActiveState=inactive* && "$res" == *Result=success* && "$res" == *ExecMainStatus=0* ]]'
check "stop locked the store: control unmounted" '[ -z "$(host_mounts $mp)" ]'
check "bootstrap stays mounted" '[ -n "$(host_mounts /var/lib/piccolo/mounts/bootstrap)" ]'
api GET /api/v1/crypto/status
check "socket activation starts the worker again: locked (200)" '[ "$code" = 200 ] && [ "$(jq -r .state <<<"$body")" = locked ]'
pid1=$(api_pid)
check "a new worker process ($pid0 -> $pid1)" '[ "$pid1" != 0 ] && [ "$pid1" != "$pid0" ]'
api POST /api/v1/crypto/unlock "" '{"password":"'"$PW2"'"}'
check "unlock after the restart (200)" '[ "$code" = 200 ]'
check "the new worker sees the remount too" 'fuse_in_api $mp'
api POST /api/v1/auth/login "" '{"password":"'"$PW2"'"}'
t3=$(jq -r .token <<<"$body" 2>/dev/null)
api GET /api/v1/auth/session "$t3"
check "login and authenticated GET after the restart (200)" '[ "$code" = 200 ]'

log=$(in_ct journalctl -b -u piccolo-api.service -u piccolo-broker.service -o cat -p warning)
check "no errors from the worker or the broker in the journal" '! grep -E " ERROR |level=error" <<<"$log"' || echo "$log"
raw=$(in_ct journalctl -b -u piccolo-api.service -o cat)
check "the worker's journal lines carry no terminal colour codes" '! grep -q $'"'"'\e\['"'"' <<<"$raw"'
verify=$(in_ct systemd-analyze verify --man=no /etc/systemd/system/piccolo-api.service /etc/systemd/system/piccolo-api.socket /etc/systemd/system/piccolo-api-tls.socket 2>&1)
check "systemd-analyze verify is silent inside the container" '[ -z "$verify" ]' || echo "$verify"
exit $fail
CHECK

printf '%s\n' "piccolo-broker.service active" "piccolo-api.socket active" "piccolo-api-tls.socket active" \
  > "$set_dir/expect.txt"
bash "$repo/tests/sd-boot/sd-boot-test.sh" "$set_dir"

# The same boot with mount propagation cut (a drop-in with MountFlags=private): the worker
# must refuse to start (services/api/src/mounts.rs) rather than report volumes mounted that
# it cannot see and put the store in plaintext on the bare mountpoint.
echo "### variant: piccolo-api.service with MountFlags=private" >&2
set_dir2=$(mktemp -d /tmp/piccolo-sdboot-api.XXXXXX)
trap 'rm -rf "$set_dir" "$set_dir2"' EXIT
cp -r "$set_dir"/. "$set_dir2"/
rm "$set_dir2/check.sh"
printf '[Service]\nMountFlags=private\n' > "$set_dir2/files/10-private.conf"
cat >> "$set_dir2/setup.sh" <<'SETUP'
install -D -m 0644 "$1/files/10-private.conf" /etc/systemd/system/piccolo-api.service.d/10-private.conf
SETUP
cat > "$set_dir2/check.sh" <<'CHECK'
#!/bin/bash
set -u
in_ct() { nsenter -t "$INIT_PID" -a "$@"; }
fail=0
check() { if eval "$2"; then echo "ok   $1"; else echo "FAIL $1"; fail=1; fi; }
log=
for _ in $(seq 150); do
  log=$(in_ct journalctl -b -u piccolo-api.service -o cat)
  grep -q 'is on a private mount' <<<"$log" && break
  sleep 0.2
done
grep -m1 'is on a private mount' <<<"$log" | cut -c1-220
check "the worker refuses to start on a private mount" 'grep -q "refusing to start" <<<"$log"'
check "it never served (no READY, no setup code)" '! grep -qE "piccolo-api serving|setup code" <<<"$log"'
st=$(in_ct systemctl show piccolo-api.service -p ActiveState,ExecMainStatus)
check "piccolo-api not active ($(tr '\n' ' ' <<<"$st"))" '[[ "$st" != *ActiveState=active* && "$st" != *ExecMainStatus=0* ]]'
left=$(in_ct find /var/lib/piccolo/mounts /var/lib/piccolo/crypto -mindepth 1 2>&1)
check "nothing written: no key set, nothing under mounts/" '[ -z "$left" ]' || echo "$left"
exit $fail
CHECK
echo "piccolo-broker.service active" > "$set_dir2/expect.txt"
bash "$repo/tests/sd-boot/sd-boot-test.sh" "$set_dir2"
