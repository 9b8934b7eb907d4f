#!/bin/bash
# Boot a real systemd (PID 1) in a systemd-nspawn container with a given set of
# unit files, report what happened, tear everything down.
#
#   usage: sd-boot-test.sh UNIT_DIR
#
# UNIT_DIR: *.service/*.socket/*.timer/*.target/*.path files (installed into
#   /etc/systemd/system and enabled), optional setup.sh (run in a chroot of the
#   container root before boot, with the in-root copy of UNIT_DIR as $1), and
#   optional expect.txt with lines "UNIT ActiveState" (exit 1 on any mismatch),
#   and optional check.sh, run on the host while the container is up with
#   $INIT_PID set (use `nsenter -t "$INIT_PID" -a CMD` to run CMD inside); its
#   failure fails the run; optional nspawn.args, extra systemd-nspawn arguments, one per
#   line (e.g. --bind=/dev/fuse, --private-network).
# Needs root, plus: apt-get install -y --no-install-recommends systemd-container debootstrap
# (Copied from the project notes; the check.sh hook is piccolo's addition.)
set -euo pipefail

UNIT_DIR=$(realpath "$1")
WORK=${SD_BOOT_WORK:-/tmp/sd-boot-test}
BASE=$WORK/base                   # pristine debootstrap root, built once
mkdir -p "$WORK"; RUN=$(mktemp -d "$WORK/run.XXXXXX")
NAME=sdtest-$$
MERGED=$RUN/merged
NSPAWN_PID=
CG_DIRS=()

log() { printf '### %s\n' "$*" >&2; }

teardown() {
  set +e
  if [ -n "$NSPAWN_PID" ] && kill -0 "$NSPAWN_PID" 2>/dev/null; then
    kill -TERM "$NSPAWN_PID"      # nspawn forwards as SIGRTMIN+3 -> clean halt
    for _ in $(seq 300); do kill -0 "$NSPAWN_PID" 2>/dev/null || break; sleep 0.1; done
    kill -0 "$NSPAWN_PID" 2>/dev/null && kill -KILL "$NSPAWN_PID"
    wait "$NSPAWN_PID" 2>/dev/null
  fi
  mountpoint -q "$MERGED" && umount "$MERGED"
  for cg in "${CG_DIRS[@]}"; do   # leftover (empty) cgroups, deepest first
    [ -d "$cg" ] && find "$cg" -depth -type d -exec rmdir {} + 2>/dev/null
  done
  rm -rf "$RUN"
}
trap teardown EXIT
trap "exit 130" INT TERM

# 1. base root (about 30-35 s, 200 MB; reused across runs)
if [ ! -x "$BASE/lib/systemd/systemd" ]; then
  log "debootstrap into $BASE"
  rm -rf "$BASE"
  debootstrap --variant=minbase --include=systemd,systemd-sysv,dbus \
    bookworm "$BASE" http://deb.debian.org/debian >"$WORK/debootstrap.log" 2>&1
  rm -f "$BASE"/var/cache/apt/archives/*.deb
  rm -rf "$BASE"/var/log/journal        # keep the journal volatile (/run) per run
  chroot "$BASE" systemctl set-default multi-user.target >/dev/null 2>&1
  chroot "$BASE" systemctl mask console-getty.service >/dev/null 2>&1
  echo sdtest > "$BASE/etc/hostname"    # debootstrap copies the host's name
fi

# 2. throwaway copy-on-write root: overlay(base + per-run upper)
mkdir -p "$RUN"/{upper,work,merged}
mount -t overlay overlay -o "lowerdir=$BASE,upperdir=$RUN/upper,workdir=$RUN/work" "$MERGED"

# 3. install + enable the unit set
units=()
for f in "$UNIT_DIR"/*.{service,socket,timer,target,path,mount}; do
  [ -e "$f" ] || continue
  cp "$f" "$MERGED/etc/systemd/system/"; units+=("$(basename "$f")")
done
cp -r "$UNIT_DIR" "$MERGED/opt/unitset"
if [ -f "$UNIT_DIR/setup.sh" ]; then
  chroot "$MERGED" /bin/sh /opt/unitset/setup.sh /opt/unitset
fi
systemctl --root="$MERGED" enable "${units[@]}" 2>&1 | grep -v '^Created symlink' >&2 || true

# 4. boot.  The container gets its own cgroup subtree so that nothing is left
#    in the host's root cgroup (host here: hybrid v1+v2, no systemd as PID 1).
if [ "$(stat -fc %T /sys/fs/cgroup/unified 2>/dev/null)" = cgroup2fs ]; then   # hybrid
  CG_DIRS=(/sys/fs/cgroup/unified/$NAME /sys/fs/cgroup/systemd/$NAME)
elif [ "$(stat -fc %T /sys/fs/cgroup)" = cgroup2fs ]; then                      # pure v2
  CG_DIRS=(/sys/fs/cgroup/$NAME)
else                                                                              # pure v1
  CG_DIRS=(/sys/fs/cgroup/systemd/$NAME)
fi
mkdir -p "${CG_DIRS[@]}"
nspawn_args=()
if [ -f "$UNIT_DIR/nspawn.args" ]; then mapfile -t nspawn_args < <(grep -v '^\s*$' "$UNIT_DIR/nspawn.args"); fi
T0=$(date +%s.%N)
(
  for cg in "${CG_DIRS[@]}"; do echo $BASHPID > "$cg/cgroup.procs"; done
  exec systemd-nspawn -D "$MERGED" --boot --register=no --keep-unit \
       --console=passive -M "$NAME" "${nspawn_args[@]}" >"$WORK/$NAME.console.log" 2>&1 </dev/null
) &
NSPAWN_PID=$!

INIT_PID=
for _ in $(seq 100); do INIT_PID=$(pgrep -P "$NSPAWN_PID" || true); [ -n "$INIT_PID" ] && break; sleep 0.1; done
[ -n "$INIT_PID" ] || { log "container init never appeared"; cat "$WORK/$NAME.console.log" >&2; exit 2; }
in_ct() { nsenter -t "$INIT_PID" -a "$@"; }

state=
for _ in $(seq 1200); do         # up to 120 s for the boot transaction to finish
  state=$(in_ct systemctl is-system-running 2>/dev/null || true)
  case "$state" in running|degraded|maintenance|stopping) break;; esac
  sleep 0.1
done
T1=$(date +%s.%N)
log "system state: $state   (boot to settled: $(awk "BEGIN{print $T1 - $T0}") s)"

# 5. report
log "systemctl list-units --all (unit set)"
in_ct systemctl list-units --all --no-pager "${units[@]}"
log "failed units (whole system)"
in_ct systemctl --failed --no-pager --plain --no-legend
for u in "${units[@]}"; do
  log "systemctl show $u"
  in_ct systemctl show --no-pager "$u" -p LoadState,ActiveState,SubState,Result,ExecMainStatus,StatusText,MainPID,User,NRestarts
  log "journal $u"
  in_ct journalctl --no-pager -b -o short-monotonic -u "$u"
done
log "systemd-analyze verify (inside the container, so ExecStart= paths resolve there)"
in_ct systemd-analyze verify "${units[@]/#//etc/systemd/system/}" 2>&1 || true
log "systemd-analyze"
in_ct systemd-analyze 2>&1 | head -2

rc=0
if [ -f "$UNIT_DIR/expect.txt" ]; then
  while read -r u want; do
    [ -z "$u" ] && continue
    got=$(in_ct systemctl show -P ActiveState "$u")
    if [ "$got" = "$want" ]; then echo "PASS $u $got"; else echo "FAIL $u want=$want got=$got"; rc=1; fi
  done < "$UNIT_DIR/expect.txt"
fi
if [ -f "$UNIT_DIR/check.sh" ]; then
  log "check.sh"
  if INIT_PID=$INIT_PID bash "$UNIT_DIR/check.sh"; then echo "PASS check.sh"; else echo "FAIL check.sh"; rc=1; fi
fi
exit $rc
