#!/usr/bin/env bash
# Builds the guest initramfs for vstor's QEMU tests: static busybox, the Debian cloud kernel's
# virtio/SCSI modules, fio with every library it links, sg3_utils if installed, and the test
# scripts in scripts/. Output: an uncompressed cpio (boots faster under TCG than a gzipped one).
# Usage: mkinitramfs.sh OUT.cpio
set -euo pipefail
out=$1
here=$(cd "$(dirname "$0")" && pwd)
kver=$(ls /lib/modules | grep -m1 cloud-amd64)
root=$(mktemp -d)
trap 'rm -rf "$root"' EXIT
mkdir -p "$root"/{bin,sbin,usr/bin,usr/sbin,lib,lib64,proc,sys,dev,tmp,tests,lib/modules,etc}
cp /bin/busybox "$root/bin/busybox"
for m in virtio_ring virtio virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci virtio_blk \
         scsi_common scsi_mod sd_mod sg virtio_scsi; do
    f=$(find "/lib/modules/$kver" -name "$m.ko*" | head -1)
    [ -n "$f" ] && cp "$f" "$root/lib/modules/"
done
copy_bin() {
    local b=$1
    [ -x "$b" ] || return 0
    mkdir -p "$root$(dirname "$b")"
    cp "$b" "$root$b"
    ldd "$b" 2>/dev/null | awk '/=>/ {print $3} /ld-linux/ {print $1}' | grep '^/' | while read -r l; do
        mkdir -p "$root$(dirname "$l")"
        [ -e "$root$l" ] || cp -L "$l" "$root$l"
    done
}
copy_bin /usr/bin/fio
copy_bin /usr/sbin/blkdiscard
for t in sg_inq sg_vpd sg_readcap; do copy_bin "/usr/bin/$t"; done
cp "$here"/scripts/*.sh "$root/tests/"
cp "$here/init" "$root/init"
chmod +x "$root/init" "$root"/tests/*.sh
(cd "$root" && find . -print0 | cpio --null -o -H newc --quiet) > "$out.tmp"
mv "$out.tmp" "$out"
