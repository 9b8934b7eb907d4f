#!/bin/bash
# SPDX-License-Identifier: Apache-2.0
# Lints every unit in systemd/ with `systemd-analyze verify`. Unknown keys and bad values
# only warn (exit 0), so any output on stderr fails the check. ExecStart binaries are
# pointed at the freshly built ones, since verify checks they exist on this host.
# Drop-ins for units piccolo does not ship (systemd/NAME.service.d/) are verified on the
# shape of the upstream unit, tests/systemd/NAME.service.
#   usage: tests/systemd/verify-units.sh [TARGET_DIR]   (default: target/debug)
set -euo pipefail
repo=$(cd "$(dirname "$0")/../.." && pwd)
bins=$(realpath "${1:-$repo/target/debug}")
work=$(mktemp -d /tmp/piccolo-verify.XXXXXX)
trap 'rm -rf "$work"' EXIT
rc=0
shopt -s nullglob
for unit in "$repo"/systemd/*.service "$repo"/systemd/*.socket "$repo"/systemd/*.timer "$repo"/systemd/*.target; do
  name=$(basename "$unit")
  sed -E "s#^(Exec[A-Za-z]*=[-@:+!]*)/usr/bin/#\1$bins/#" "$unit" > "$work/$name"
done
for dir in "$repo"/systemd/*.service.d; do
  name=$(basename "$dir" .d)
  if [ ! -e "$work/$name" ]; then
    [ -f "$repo/tests/systemd/$name" ] || { echo "FAIL $name.d: no tests/systemd/$name to verify it on"; rc=1; continue; }
    cp "$repo/tests/systemd/$name" "$work/$name"
  fi
  mkdir -p "$work/$name.d"
  cp "$dir"/*.conf "$work/$name.d/"
done
# Units name each other (Requires=/After=); verify them together in one directory.
units=("$work"/*.service "$work"/*.socket "$work"/*.timer "$work"/*.target)
[ ${#units[@]} -gt 0 ] || { echo "no units found"; exit 1; }
for u in "${units[@]}"; do
  err=$(systemd-analyze verify --man=no "$u" 2>&1 >/dev/null) || true
  if [ -n "$err" ]; then echo "FAIL $(basename "$u"):"; echo "$err"; rc=1; else echo "ok   $(basename "$u")"; fi
done
# Flatcar's own updates stay off (decisions D1/D2): exactly these two settings.
conf="$repo/systemd/flatcar/update.conf"
if [ "$(cat "$conf" 2>/dev/null)" = "$(printf 'GROUP=disabled\nSERVER=')" ]; then
  echo "ok   flatcar/update.conf (GROUP=disabled, empty SERVER=)"
else
  echo "FAIL flatcar/update.conf must be exactly GROUP=disabled and an empty SERVER="; rc=1
fi
# piccolo-api tells its sockets apart by name (LISTEN_FDNAMES): http on 80, https on 443,
# both handed to piccolo-api.service, which requires both.
for pair in "piccolo-api.socket:80:http" "piccolo-api-tls.socket:443:https"; do
  IFS=: read -r sock port name <<<"$pair"
  f="$repo/systemd/$sock"
  if grep -qx "ListenStream=$port" "$f" && grep -qx "FileDescriptorName=$name" "$f" \
     && grep -qx "Service=piccolo-api.service" "$f" && grep -qx "Requires=$sock" "$repo/systemd/piccolo-api.service"; then
    echo "ok   $sock (port $port, descriptor name $name, required by piccolo-api.service)"
  else
    echo "FAIL $sock must listen on $port, be named $name, name piccolo-api.service, and be required by it"; rc=1
  fi
done
# Informational: systemd's own exposure score for each unit.
for u in "${units[@]}"; do
  score=$(systemd-analyze security --offline=true "$u" 2>/dev/null | tail -1 || true)
  echo "     $(basename "$u"): $score"
done
exit $rc
