# Shell functions shared by the recipes' customize.sh (sourced; POSIX sh).

# trim_rootfs ROOT: drop what a VM image does not need (documentation but the
# copyright files, man pages, locales, apt lists and caches, logs) and keep dpkg
# from installing them again
trim_rootfs() {
    find "$1/usr/share/doc" -mindepth 1 ! -type d ! -name copyright -delete 2>/dev/null || true
    find "$1/usr/share/doc" -mindepth 1 -type d -empty -delete 2>/dev/null || true
    find "$1/usr/share/locale" -mindepth 1 -maxdepth 1 ! -name locale.alias -exec rm -rf {} + 2>/dev/null || true
    rm -rf "$1"/usr/share/man/* "$1"/usr/share/info/* "$1"/usr/share/lintian/* \
        "$1"/var/lib/apt/lists/* "$1"/var/cache/apt/*.bin "$1"/var/cache/apt/archives/*.deb \
        "$1"/var/cache/debconf/*-old "$1"/var/lib/dpkg/*-old "$1"/var/log/*.log "$1"/var/log/apt/*
    mkdir -p "$1/etc/dpkg/dpkg.cfg.d"
    cat > "$1/etc/dpkg/dpkg.cfg.d/01-pcocc-nodoc" <<'EOT'
# pcocc images carry no documentation, man pages or translations
path-exclude=/usr/share/doc/*
path-include=/usr/share/doc/*/copyright
path-exclude=/usr/share/man/*
path-exclude=/usr/share/info/*
path-exclude=/usr/share/locale/*
path-include=/usr/share/locale/locale.alias
path-exclude=/usr/share/lintian/*
EOT
}

# base_config ROOT HOSTNAME: the files every image resets (the build host's
# resolv.conf, identities that must differ per VM)
base_config() {
    echo "$2" > "$1/etc/hostname"
    printf '127.0.0.1\tlocalhost\n::1\t\tlocalhost ip6-localhost ip6-loopback\n' > "$1/etc/hosts"
    rm -f "$1/etc/resolv.conf"
    : > "$1/etc/resolv.conf"
    : > "$1/etc/fstab"
    [ ! -e "$1/etc/machine-id" ] || : > "$1/etc/machine-id"
    rm -f "$1/var/lib/dbus/machine-id"
    install -d -m 700 "$1/root/.ssh"
}
