#!/bin/sh
# talkbox post-build ($1 = TARGET_DIR): the same layer image/build puts on the Debian root.
set -eu
TARGET_DIR=$1
cat > "$TARGET_DIR/etc/fstab" <<'FSTAB'
/dev/disk/by-partlabel/data /var ext4 defaults,nosuid,nodev,x-systemd.makefs,x-systemd.growfs 0 2
/dev/disk/by-partlabel/esp  /efi vfat umask=0077,nosuid,nodev,noexec,noauto,x-systemd.automount 0 2
tmpfs /tmp tmpfs nosuid,nodev,mode=1777,size=64M 0 0
FSTAB
mkdir -p "$TARGET_DIR/efi" "$TARGET_DIR/etc/systemd/system/multi-user.target.wants" \
  "$TARGET_DIR/etc/systemd/system/boot-complete.target.requires"
for u in talkbox talkbox-healthy talkbox-update-stick nftables systemd-networkd systemd-timesyncd; do
  [ -e "$TARGET_DIR/usr/lib/systemd/system/$u.service" ] && \
    ln -sf "/usr/lib/systemd/system/$u.service" "$TARGET_DIR/etc/systemd/system/multi-user.target.wants/$u.service"
done
ln -sf /usr/lib/systemd/system/talkbox-healthy.service \
  "$TARGET_DIR/etc/systemd/system/boot-complete.target.requires/talkbox-healthy.service"
: > "$TARGET_DIR/etc/machine-id"
