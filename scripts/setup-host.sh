#!/bin/bash
# SPDX-License-Identifier: Apache-2.0
# Installs the system packages the build, the local stack and the tests need
# (.ci/apt-packages, plus systemd-container and debootstrap for the real-systemd boot
# tests, without recommends: libnss-mymachines would rewrite /etc/nsswitch.conf).
# Does nothing when everything is already installed. Needs root for apt.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
mapfile -t pkgs < <(grep -vE '^\s*(#|$)' "$repo/.ci/apt-packages")
norec=(systemd-container debootstrap)
missing=()
for p in "${pkgs[@]}" "${norec[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -eq 0 ]; then exit 0; fi
if [ "$(id -u)" -ne 0 ]; then
  echo "setup-host: missing packages: ${missing[*]}; run as root (or: sudo $0)" >&2
  exit 1
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update
apt-get install -y "${pkgs[@]}"
apt-get install -y --no-install-recommends "${norec[@]}"
