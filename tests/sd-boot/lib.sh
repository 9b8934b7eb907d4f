# SPDX-License-Identifier: Apache-2.0
# Shared by tests/sd-boot/run-*.sh (sourced, not run).
#
# stage_unit_set SET_DIR BINS_DIR BIN...: copies piccolo's sysusers, tmpfiles and policy
# files, the named binaries and the shared libraries they link (the container's minimal
# root may lack e.g. libtss2) into SET_DIR/files, and writes SET_DIR/files/setup-base.sh,
# the chroot step every unit set needs: `sh "$1/files/setup-base.sh" "$1"` in setup.sh.
stage_unit_set() {
  local set_dir=$1 bins=$2 b
  shift 2
  mkdir -p "$set_dir/files/bin" "$set_dir/files/lib"
  cp "$repo/systemd/sysusers.d/piccolo.conf" "$set_dir/files/sysusers.conf"
  cp "$repo/systemd/tmpfiles.d/piccolo.conf" "$set_dir/files/tmpfiles.conf"
  cp "$repo/policy/broker.toml" "$set_dir/files/broker.toml"
  for b in "$@"; do
    install -m 0755 "$bins/$b" "$set_dir/files/bin/$b"
    ldd "$bins/$b" | awk '/=> \//{print $3}' | while read -r lib; do cp -n "$lib" "$set_dir/files/lib/"; done
  done
  cat > "$set_dir/files/setup-base.sh" <<'SETUP'
#!/bin/sh
# Runs in a chroot of the container root before boot; $1 = the unit set.
set -e
install -m 0755 "$1"/files/bin/* /usr/bin/
for lib in "$1"/files/lib/*; do
  name=$(basename "$lib")
  ldconfig -p | grep -q " $name " || install -m 0644 "$lib" /usr/local/lib/
done
ldconfig
install -D -m 0644 "$1/files/sysusers.conf" /etc/sysusers.d/piccolo.conf
install -D -m 0644 "$1/files/tmpfiles.conf" /etc/tmpfiles.d/piccolo.conf
install -D -m 0644 "$1/files/broker.toml" /etc/piccolo/broker.toml
SETUP
}

# stage_host_bins SET_DIR PATH...: copies host binaries (e.g. /usr/bin/gocryptfs) and the
# shared libraries they link into SET_DIR/files, like stage_unit_set does for piccolo's;
# call it after stage_unit_set (setup-base.sh installs them with the rest).
stage_host_bins() {
  local set_dir=$1 b
  shift
  for b in "$@"; do
    install -m 0755 "$b" "$set_dir/files/bin/$(basename "$b")"
    ldd "$b" | awk '/=> \//{print $3}' | while read -r lib; do cp -n "$lib" "$set_dir/files/lib/"; done
  done
}
