#!/bin/sh
# talkbox post-image ($1 = BINARIES_DIR, $2 = genimage.cfg). Same layout as image/build:
# rootfs.erofs + dm-verity hash tree appended -> root.img (both slots), one signed UKI per slot,
# GPT disk, RAUC bundle. Keys come from the environment (CI secrets / HSM), never from the tree:
#   TALKBOX_SB_KEY/TALKBOX_SB_CERT (Secure Boot db), TALKBOX_RAUC_KEY/TALKBOX_RAUC_CERT.
set -eu
BINARIES_DIR=$1 GENIMAGE_CFG=$2
case "$BR2_ARCH" in x86_64) EFI=x64 BOOT=BOOTX64.EFI CON=ttyS0 ;; aarch64) EFI=aa64 BOOT=BOOTAA64.EFI CON=ttyAMA0 ;; esac
SDBOOT_DIR=${TALKBOX_SDBOOT_DIR:-$TARGET_DIR/usr/lib/systemd/boot/efi}
VERSION=${TALKBOX_VERSION:-$(date -u +%Y%m%d%H%M)}
# stage1.cpio.gz: busybox + veritysetup + image/stage1/init, as image/build makes it (not yet
# ported to this script: see buildroot/README.md).
cd "$BINARIES_DIR"
SIZE=$(stat -c %s rootfs.erofs)
cp rootfs.erofs root.img
"$HOST_DIR/sbin/veritysetup" format root.img root.img --hash-offset="$SIZE" \
  --data-blocks=$((SIZE / 4096)) --root-hash-file=roothash >/dev/null
mkdir -p esp/EFI/BOOT esp/EFI/Linux esp/loader
printf 'timeout 0\nconsole-mode keep\neditor no\n' > esp/loader/loader.conf
# Buildroot has no sbsigntool package: the build host's sbsign (Debian sbsigntool).
sign() { "${SBSIGN:-sbsign}" --key "$TALKBOX_SB_KEY" --cert "$TALKBOX_SB_CERT" --output "$2" "$1"; }
sign "$SDBOOT_DIR/systemd-boot$EFI.efi" "esp/EFI/BOOT/$BOOT"
for s in A B; do
  printf 'ID=talkbox\nIMAGE_ID=talkbox\nIMAGE_VERSION=%s\nVERSION_ID=%s\n' "$VERSION" "$VERSION" > osrel
  printf 'console=%s panic=5 quiet lockdown=integrity talkbox.root=PARTLABEL=root%s talkbox.roothash=%s talkbox.hashoffset=%s rauc.slot=%s' \
    "$CON" "$s" "$(cat roothash)" "$SIZE" "$s" > cmdline
  # section addresses as in image/build (objcopy + the systemd stub; ukify needs systemd >= 253)
  "$HOST_DIR/bin/objcopy" --add-section .osrel=osrel --change-section-vma .osrel=0x20000 \
    --add-section .cmdline=cmdline --change-section-vma .cmdline=0x30000 \
    --add-section .linux=bzImage --change-section-vma .linux=0x2000000 \
    --add-section .initrd=stage1.cpio.gz --change-section-vma .initrd=0x4000000 \
    "$SDBOOT_DIR/linux$EFI.efi.stub" uki-slot$s.efi
  sign uki-slot$s.efi uki-slot$s.signed.efi
done
cp uki-slotA.signed.efi "esp/EFI/Linux/talkbox-$VERSION-slotA+3.efi"
support/scripts/genimage.sh -c "$GENIMAGE_CFG"
if [ -n "${TALKBOX_RAUC_KEY:-}" ]; then
  rm -rf rauc-bundle; mkdir rauc-bundle
  cp root.img rauc-bundle/rootfs.img
  cp uki-slotA.signed.efi rauc-bundle/uki-slotA.efi; cp uki-slotB.signed.efi rauc-bundle/uki-slotB.efi
  cp "$TARGET_DIR/usr/lib/talkbox/rauc-hook" rauc-bundle/hook
  printf '[update]\ncompatible=talkbox-%s\nversion=%s\n[bundle]\nformat=verity\n[hooks]\nfilename=hook\n[image.rootfs]\nfilename=rootfs.img\nhooks=post-install\n' \
    "$BR2_ARCH" "$VERSION" > rauc-bundle/manifest.raucm
  "$HOST_DIR/bin/rauc" bundle --cert="$TALKBOX_RAUC_CERT" --key="$TALKBOX_RAUC_KEY" rauc-bundle "talkbox-$BR2_ARCH-$VERSION.raucb"
fi
