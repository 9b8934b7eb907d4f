#!/bin/bash
# SPDX-License-Identifier: Apache-2.0
# Boots a real systemd (PID 1) in a container with piccolo's broker unit set and checks:
# the broker becomes active through its own READY=1, the socket has the right owner and
# mode, `piccoloctl info` works for a worker user and is refused for nobody, and the
# unit verifies cleanly inside the container.
#   usage: tests/sd-boot/run-broker.sh [TARGET_DIR]   (default: target/debug)
set -euo pipefail
repo=$(cd "$(dirname "$0")/../.." && pwd)
bins=$(realpath "${1:-$repo/target/debug}")
set_dir=$(mktemp -d /tmp/piccolo-sdboot.XXXXXX)
trap 'rm -rf "$set_dir"' EXIT
# shellcheck source=tests/sd-boot/lib.sh
. "$repo/tests/sd-boot/lib.sh"

cp "$repo/systemd/piccolo-broker.service" "$set_dir/"
stage_unit_set "$set_dir" "$bins" piccolo-broker piccolo-broker-tpm piccoloctl

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

show=$(in_ct systemctl show piccolo-broker.service -p ActiveState,SubState,Type,StatusText,NRestarts,Result)
echo "$show"
check "broker active and running" '[[ "$show" == *ActiveState=active* && "$show" == *SubState=running* ]]'
check "readiness came from the broker (Type=notify, STATUS set)" '[[ "$show" == *Type=notify* && "$show" == *"StatusText=serving on /run/piccolo/broker.sock"* ]]'
check "no restarts" '[[ "$show" == *NRestarts=0* ]]'

dir=$(in_ct stat -c '%U:%G %a' /run/piccolo)
sock=$(in_ct stat -c '%U:%G %a %F' /run/piccolo/broker.sock)
echo "dir: $dir; socket: $sock"
check "socket dir root:piccolo-broker 0750" '[ "$dir" = "root:piccolo-broker 750" ]'
check "socket root:piccolo-broker 0660" '[ "$sock" = "root:piccolo-broker 660 socket" ]'
log=$(in_ct stat -c '%U:%G %a' /var/log/piccolo/audit.jsonl)
check "audit log root:piccolo-audit 0640 ($log)" '[ "$log" = "root:piccolo-audit 640" ]'

caps=$(in_ct sh -c 'grep -E "^Cap(Eff|Bnd)" /proc/$(systemctl show -P MainPID piccolo-broker.service)/status')
echo "$caps"
check "broker keeps only its capabilities (0x6002cb)" '[[ "$caps" == *"CapBnd:	00000000006002cb"* && "$caps" == *"CapEff:	00000000006002cb"* ]]'
# Volumes: FUSE mounts the broker makes must reach the workers, so it shares PID 1's mount
# namespace (no sandboxing option in the unit may imply a private one).
mntns=$(in_ct sh -c 'echo "$(readlink /proc/1/ns/mnt) $(readlink /proc/$(systemctl show -P MainPID piccolo-broker.service)/ns/mnt)"')
echo "mount namespaces (PID 1, broker): $mntns"
check "broker runs in the host mount namespace" '[ "${mntns% *}" = "${mntns#* }" ] && [[ "$mntns" == mnt:* ]]'

api=$(in_ct setpriv --reuid=piccolo-api --regid=piccolo-api --init-groups /usr/bin/piccoloctl info 2>&1); api_rc=$?
echo "$api"
check "piccoloctl info works for piccolo-api" '[ $api_rc -eq 0 ] && [[ "$api" == *"policy sha256"* ]]'
# The TPM helper is installed next to the broker and runs inside the broker's sandbox; the
# container has no TPM, so it answers "no TPM" (not "TPM helper ... not present").
check "GetInfo finds the TPM helper next to the broker" '[[ "$api" == *"no TPM (/dev/tpmrm0 not present)"* ]]'
tpm=$(in_ct /usr/bin/piccoloctl tpm identity 2>&1); tpm_rc=$?
echo "$tpm"
check "a TPM call runs the helper under the unit's sandbox" '[ $tpm_rc -eq 1 ] && [[ "$tpm" == *"FailedPrecondition: no TPM"* ]]'
nob=$(in_ct setpriv --reuid=nobody --regid=nogroup --clear-groups /usr/bin/piccoloctl info 2>&1); nob_rc=$?
echo "$nob"
check "piccoloctl info is refused for nobody" '[ $nob_rc -ne 0 ] && [[ "$nob" == *"permission denied"* ]]'

verify=$(in_ct systemd-analyze verify --man=no /etc/systemd/system/piccolo-broker.service 2>&1)
check "systemd-analyze verify is silent inside the container" '[ -z "$verify" ]' || echo "$verify"

in_ct systemctl reload piccolo-broker.service
sleep 0.5
check "SIGHUP reload was audited" 'in_ct grep -q broker.policy_reloaded /var/log/piccolo/audit.jsonl'
in_ct systemctl stop piccolo-broker.service
res=$(in_ct systemctl show piccolo-broker.service -p Result,ExecMainStatus)
check "SIGTERM: clean exit 0 ($res)" '[[ "$res" == *Result=success* && "$res" == *ExecMainStatus=0* ]]'
check "audit chain verifies after the stop" 'in_ct /usr/bin/piccoloctl audit verify'
exit $fail
CHECK

echo "piccolo-broker.service active" > "$set_dir/expect.txt"
# Not exec: the EXIT trap removes the unit-set dir.
bash "$repo/tests/sd-boot/sd-boot-test.sh" "$set_dir"
