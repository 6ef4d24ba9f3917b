# customize.sh of the debian recipe: run by pcocc.images.build on the build host, after
# debootstrap, with ROOTFS, RECIPE_DIR, COMMON_DIR, IMAGE_HOSTNAME (and KERNEL_DIR,
# KERNEL_VERSION) in the environment.
set -eu
. "$COMMON_DIR/lib.sh"
R=$ROOTFS
unit=$R/etc/systemd/system

base_config "$R" "$IMAGE_HOSTNAME"

# cloud-init: the NoCloud seed only; minbase has no locales (cc_locale would fail the
# boot's status); ssh_authorized_keys go to root too; network config for networkd
install -D -m 644 "$RECIPE_DIR/cloud.cfg" "$R/etc/cloud/cloud.cfg.d/90_pcocc.cfg"

# networking: systemd-networkd, DHCP on any NIC unless cloud-init writes a config;
# wait-online must not hold the boot (cloud-init waits for it) without a NIC or DHCP
chroot "$R" systemctl enable systemd-networkd.service > /dev/null 2>&1
install -D -m 644 "$RECIPE_DIR/dhcp.network" "$R/etc/systemd/network/99-pcocc-dhcp.network"
install -D -m 644 "$RECIPE_DIR/wait-online.conf" "$unit/systemd-networkd-wait-online.service.d/pcocc.conf"

# ssh: host keys are made per VM (by cloud-init, or here if it has not run yet)
rm -f "$R"/etc/ssh/ssh_host_*
install -D -m 644 "$RECIPE_DIR/ssh-keygen.conf" "$unit/ssh.service.d/pcocc-keygen.conf"

# a root shell on the serial console (pcocc console), like the tiny image
install -D -m 644 "$RECIPE_DIR/autologin.conf" "$unit/serial-getty@ttyS0.service.d/pcocc-autologin.conf"

# "PCOCC-READY <hostname>" on the serial console once cloud-init has finished
install -m 644 "$RECIPE_DIR/pcocc-ready.service" "$unit/pcocc-ready.service"
chroot "$R" systemctl enable pcocc-ready.service > /dev/null 2>&1

# nothing that downloads or scrubs on its own in a short-lived VM
chroot "$R" systemctl mask apt-daily.timer apt-daily-upgrade.timer e2scrub_all.timer e2scrub_reap.service fstrim.timer > /dev/null 2>&1 || true

trim_rootfs "$R"
