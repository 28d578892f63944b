#!/usr/bin/env bash
# Installs the system packages vstor's tests and demos use on Debian 12 (idempotent).
# qemu-utils is deliberately absent: Debian 12's QEMU 7.2 conflicts with the backported qemu-utils
# some machines carry, and the tests do not need qemu-img.
set -euo pipefail
pkgs=(qemu-system-x86 fio busybox-static linux-image-cloud-amd64 cpio util-linux sg3-utils python3 python3-venv g++)
missing=()
for p in "${pkgs[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    SUDO=""
    [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    echo "deps: installing ${missing[*]}"
    $SUDO apt-get update -q
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends "${missing[@]}"
fi
