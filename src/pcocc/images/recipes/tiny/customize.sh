# customize.sh of the tiny recipe: run by pcocc.images.build on the build host, after
# debootstrap, with ROOTFS, RECIPE_DIR, COMMON_DIR, IMAGE_HOSTNAME (and KERNEL_DIR,
# KERNEL_VERSION) in the environment.
set -eu
. "$COMMON_DIR/lib.sh"
R=$ROOTFS

install -D -m 755 "$RECIPE_DIR/pcocc-init" "$R/sbin/pcocc-init"
install -D -m 644 "$RECIPE_DIR/cloud-config.awk" "$R/usr/lib/pcocc/cloud-config.awk"
install -D -m 755 "$RECIPE_DIR/udhcpc.script" "$R/usr/lib/pcocc/udhcpc.script"
for cmd in shutdown poweroff reboot halt; do
    [ -e "$R/sbin/$cmd" ] || install -m 755 "$RECIPE_DIR/shutdown" "$R/sbin/$cmd"
done

# busybox applets for the commands minbase lacks (ps, ip, ping, vi, less...), in
# /usr/bin: dropbear gives "ssh vm cmd" no /usr/local/bin, and a package installed
# later simply replaces the link
chroot "$R" /bin/sh -c '
    PATH=/usr/sbin:/usr/bin
    for applet in $(busybox --list); do
        case $applet in init | linuxrc | halt | poweroff | reboot | shutdown | sh | ash | login) continue ;; esac
        command -v "$applet" > /dev/null 2>&1 || ln -s busybox "/usr/bin/$applet"
    done'

base_config "$R" "$IMAGE_HOSTNAME"
rm -f "$R"/etc/dropbear/*_host_key
install -d -m 755 "$R/var/lib/pcocc"
trim_rootfs "$R"
