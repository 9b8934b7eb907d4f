#!/bin/bash
# SPDX-License-Identifier: Apache-2.0
# Decision D5 in a real systemd (PID 1 in a container), booted twice with piccolo's broker
# and health units, Flatcar's update-engine.service shape (ExecStart: the update_engine
# stand-in on the container's real system bus, with Flatcar's D-Bus policy) and piccolo's
# drop-in 10-piccolod-dependency.conf:
#   fail: piccolo-health exits 1  -> update-engine.service never starts ("Dependency failed"),
#         and the broker answers UNAVAILABLE for update_engine;
#   pass: piccolo-health succeeds -> update-engine.service starts after it, and the broker
#         reaches it over the system bus (root yes, a worker without a rule no).
#   usage: tests/sd-boot/run-update-engine.sh [TARGET_DIR]   (default: target/debug)
set -euo pipefail
repo=$(cd "$(dirname "$0")/../.." && pwd)
# shellcheck source=tests/sd-boot/lib.sh
. "$repo/tests/sd-boot/lib.sh"
bins=$(realpath "${1:-$repo/target/debug}")
sets=()
trap 'rm -rf "${sets[@]}"' EXIT

# make_set VARIANT -> prints the unit-set directory
make_set() {
  local variant=$1 set_dir
  set_dir=$(mktemp -d /tmp/piccolo-sdboot-ue.XXXXXX)
  cp "$repo/systemd/piccolo-broker.service" "$repo/systemd/piccolo-health.service" "$set_dir/"
  # Flatcar's unit shape; the stand-in instead of /usr/sbin/update_engine, and no
  # ConditionVirtualization=!container (this is a container).
  sed -e 's#^ExecStart=.*#ExecStart=/usr/bin/piccolo-update-engine-standin#' \
      -e '/^ConditionVirtualization=/d' "$repo/tests/systemd/update-engine.service" > "$set_dir/update-engine.service"
  stage_unit_set "$set_dir" "$bins" piccolo-broker piccolo-broker-tpm piccoloctl piccolo-update-engine-standin
  mkdir -p "$set_dir/files/dropin"
  cp "$repo"/systemd/update-engine.service.d/*.conf "$set_dir/files/dropin/"
  cp "$repo/systemd/flatcar/update.conf" "$set_dir/files/update.conf"
  if [ "$variant" = fail ]; then
    printf '#!/bin/sh\necho "piccolo-health: simulated failure" >&2\nexit 1\n' > "$set_dir/files/bin/piccolo-health"
  else
    # Healthy means: the broker answers this worker (as the unit's user, in its sandbox).
    printf '#!/bin/sh\nset -e\n/usr/bin/piccoloctl info >/dev/null\necho "piccolo-health: broker answers"\n' \
      > "$set_dir/files/bin/piccolo-health"
  fi
  chmod 0755 "$set_dir/files/bin/piccolo-health"
  # Flatcar's com.coreos.update1.conf: root owns and calls; everyone else is denied.
  cat > "$set_dir/files/com.coreos.update1.conf" <<'XML'
<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-BUS Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <policy user="root">
    <allow own="com.coreos.update1"/>
    <allow send_destination="com.coreos.update1"/>
  </policy>
  <policy context="default">
    <deny send_destination="com.coreos.update1"/>
  </policy>
</busconfig>
XML

  cat > "$set_dir/setup.sh" <<'SETUP'
#!/bin/sh
set -e
sh "$1/files/setup-base.sh" "$1"
install -D -m 0644 "$1/files/update.conf" /etc/flatcar/update.conf
install -D -m 0644 "$1/files/com.coreos.update1.conf" /etc/dbus-1/system.d/com.coreos.update1.conf
install -D -m 0644 "$1"/files/dropin/10-piccolod-dependency.conf \
  /etc/systemd/system/update-engine.service.d/10-piccolod-dependency.conf
systemd-sysusers
SETUP

  cat > "$set_dir/check.sh" <<'CHECK'
#!/bin/bash
# Host side, container running; $INIT_PID is the container's PID 1; $1 = variant.
set -u
variant=$(cat "$(dirname "$0")/variant")
in_ct() { nsenter -t "$INIT_PID" -a "$@"; }
fail=0
check() { if eval "$2"; then echo "ok   $1"; else echo "FAIL $1"; fail=1; fi; }
show() { in_ct systemctl show "$1" -p "$2" --value; }

ue=$(in_ct systemctl show update-engine.service -p ActiveState,SubState,Result,ExecMainStartTimestampMonotonic,Requires,After,DropInPaths)
health=$(in_ct systemctl show piccolo-health.service -p ActiveState,SubState,Result,ExecMainStatus,ExecMainExitTimestampMonotonic,User)
echo "$ue"; echo "$health"
check "the drop-in is loaded" '[[ "$ue" == *"DropInPaths=/etc/systemd/system/update-engine.service.d/10-piccolod-dependency.conf"* ]]'
check "update-engine requires and is ordered after piccolo-health" '[[ $(show update-engine.service Requires) == *piccolo-health.service* && $(show update-engine.service After) == *piccolo-health.service* ]]'
check "piccolo-health runs as piccolo-updater" '[ "$(show piccolo-health.service User)" = piccolo-updater ]'
check "broker is up" '[ "$(show piccolo-broker.service ActiveState)" = active ]'
journal=$(in_ct journalctl --no-pager -b -o cat)
st=$(in_ct /usr/bin/piccoloctl update-engine status 2>&1); st_rc=$?
echo "piccoloctl update-engine status (rc $st_rc): $st"

if [ "$variant" = fail ]; then
  check "piccolo-health failed (exit 1)" '[[ "$health" == *ActiveState=failed* && "$health" == *ExecMainStatus=1* ]]'
  check "update-engine stayed inactive" '[ "$(show update-engine.service ActiveState)" = inactive ]'
  check "update-engine's process never started" '[ "$(show update-engine.service ExecMainStartTimestampMonotonic)" = 0 ]'
  check "journal: Dependency failed for update-engine.service" 'grep -q "Dependency failed for update-engine.service" <<<"$journal"'
  check "journal: the start job failed with result dependency" 'grep -q "update-engine.service/start failed with result .dependency." <<<"$journal"'
  check "nobody owns com.coreos.update1: the broker says update_engine is not running" '[ $st_rc -eq 1 ] && [[ "$st" == *"not running"* ]]'
else
  check "piccolo-health passed" '[[ "$health" == *ActiveState=active* && "$health" == *Result=success* ]]'
  check "journal: the health check reached the broker" 'grep -q "piccolo-health: broker answers" <<<"$journal"'
  check "update-engine is running" '[ "$(show update-engine.service ActiveState)" = active ]'
  h=$(show piccolo-health.service ExecMainExitTimestampMonotonic); u=$(show update-engine.service ExecMainStartTimestampMonotonic)
  check "update-engine started after the health check ended ($h < $u)" '[ "$h" -gt 0 ] && [ "$u" -gt "$h" ]'
  check "the broker reaches update_engine on the system bus" '[ $st_rc -eq 0 ] && [[ "$st" == *UPDATE_STATUS_IDLE* ]]'
  w=$(in_ct /usr/bin/piccoloctl update-engine watch --count 1 2>&1)
  check "watch: the current status first ($w)" '[[ "$w" == "current  UPDATE_STATUS_IDLE"* ]]'
  api=$(in_ct setpriv --reuid=piccolo-api --regid=piccolo-api --init-groups /usr/bin/piccoloctl update-engine status 2>&1); api_rc=$?
  check "piccolo-api is denied by the broker policy (rc $api_rc)" '[ $api_rc -eq 3 ]'
  ds=$(in_ct setpriv --reuid=piccolo-api --regid=piccolo-api --init-groups dbus-send --system --print-reply \
       --dest=com.coreos.update1 /com/coreos/update1 com.coreos.update1.Manager.GetStatus 2>&1)
  check "the system bus refuses piccolo-api calling update_engine directly" '[[ "$ds" == *AccessDenied* ]]'
  ds=$(in_ct dbus-send --system --print-reply --dest=com.coreos.update1 /com/coreos/update1 com.coreos.update1.Manager.GetStatus 2>&1)
  check "root may call it" '[[ "$ds" == *UPDATE_STATUS_IDLE* ]]'

  # A broker crash (Restart=on-failure) restarts the chain: update_engine is stopped, the
  # health check runs again once the broker is back, and only then update_engine restarts.
  h0=$(show piccolo-health.service ExecMainStartTimestampMonotonic)
  in_ct sh -c 'kill -9 "$(systemctl show -P MainPID piccolo-broker.service)"'
  for _ in $(seq 100); do
    [ "$(show piccolo-broker.service NRestarts)" = 1 ] && [ "$(show update-engine.service ActiveState)" = active ] \
      && [ "$(show update-engine.service ExecMainStartTimestampMonotonic)" -gt "$u" ] && break
    sleep 0.1
  done
  h1=$(show piccolo-health.service ExecMainStartTimestampMonotonic); h1x=$(show piccolo-health.service ExecMainExitTimestampMonotonic)
  u1=$(show update-engine.service ExecMainStartTimestampMonotonic)
  check "broker crash: the broker was restarted once" '[ "$(show piccolo-broker.service NRestarts)" = 1 ]'
  check "broker crash: the health check ran again ($h0 -> $h1)" '[ "$h1" -gt "$h0" ] && [ "$(show piccolo-health.service Result)" = success ]'
  check "broker crash: update_engine restarted after the new check ($h1x < $u1)" '[ "$(show update-engine.service ActiveState)" = active ] && [ "$u1" -gt "$h1x" ]'
fi
exit $fail
CHECK
  echo "$variant" > "$set_dir/variant"
  if [ "$variant" = fail ]; then
    printf 'piccolo-broker.service active\npiccolo-health.service failed\nupdate-engine.service inactive\n' > "$set_dir/expect.txt"
  else
    printf 'piccolo-broker.service active\npiccolo-health.service active\nupdate-engine.service active\n' > "$set_dir/expect.txt"
  fi
  echo "$set_dir"
}

rc=0
for variant in fail pass; do
  set_dir=$(make_set "$variant")
  sets+=("$set_dir")
  echo "=== update_engine health gating: health check variant \"$variant\""
  if bash "$repo/tests/sd-boot/sd-boot-test.sh" "$set_dir"; then
    echo "PASS variant $variant"
  else
    echo "FAIL variant $variant"; rc=1
  fi
done
exit $rc
