################################################################################
#
# talkbox
#
################################################################################

# The workspace with its crates vendored: buildroot/make-source-tarball writes
# dl/talkbox-$(TALKBOX_VERSION).tar.gz (git archive + VENDOR/ + .cargo/config.toml) on a
# machine that has the crates; Buildroot leaves a tarball that already holds VENDOR/ alone and
# builds it with `cargo build --offline --locked`. The workspace's rust-version (1.88) must not
# exceed the rust-bin of the Buildroot release (2026.02.x: 1.88.0).
TALKBOX_VERSION = 0.1.0
TALKBOX_SITE = file://$(BR2_EXTERNAL_TALKBOX_PATH)/dl
TALKBOX_LICENSE = AGPL-3.0-or-later
TALKBOX_CARGO_BUILD_OPTS = -p appliance --bin talkbox
TALKBOX_CARGO_INSTALL_OPTS = --path appliance

define TALKBOX_USERS
	talkbox -1 talkbox -1 * /var/lib/talkbox /usr/sbin/nologin - talkbox services
endef

# The same unit, sysusers file and image layer as the Debian-based test image (image/).
define TALKBOX_INSTALL_INIT_SYSTEMD
	$(INSTALL) -D -m 0644 $(@D)/appliance/systemd/talkbox.service \
		$(TARGET_DIR)/usr/lib/systemd/system/talkbox.service
	$(INSTALL) -D -m 0644 $(@D)/appliance/systemd/talkbox.sysusers \
		$(TARGET_DIR)/usr/lib/sysusers.d/talkbox.conf
	cp -a $(@D)/image/rootfs/. $(TARGET_DIR)/
endef

$(eval $(cargo-package))
