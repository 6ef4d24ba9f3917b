"""The cloud-init NoCloud seed of a VM: meta-data and user-data on an ISO labelled cidata."""

import os

import yaml

from pcocc.runner import run


KEY_NAMES = ("id_ed25519", "id_ecdsa", "id_rsa")


def user_key_files(home, extra_dirs=()):
    """The user's public ssh key files (~/.ssh, then extra_dirs), to let them log into their VMs."""
    return [p for d in (os.path.join(home, ".ssh"), *extra_dirs) for p in (os.path.join(d, n + ".pub") for n in KEY_NAMES)
            if os.path.isfile(p)]


def user_ssh_keys(home, extra_dirs=()):
    """The user's public ssh keys (each once)."""
    keys = []
    for path in user_key_files(home, extra_dirs):
        try:
            with open(path) as f:
                key = f.read().strip()
        except OSError:
            continue
        if key and key not in keys:
            keys.append(key)
    return keys


def render(vm_name, instance_id, user_data=None, ssh_keys=(), domain=None):
    """(meta-data text, user-data bytes) of a VM's NoCloud seed.

    user_data: None (a cloud-config setting the hostname), a cloud-config
    mapping (a template's inline user-data), or bytes (a user-data file,
    checked by pcocc.userdata: passed on byte for byte, gzip and MIME
    multipart included); str is taken as UTF-8 text.
    """
    hostname = f"{vm_name}.{domain}" if domain else vm_name
    meta = {"instance-id": instance_id, "local-hostname": hostname}
    if ssh_keys:
        meta["public-keys"] = list(ssh_keys)
    if user_data is None:
        user = ("#cloud-config\n" + yaml.safe_dump({"hostname": vm_name}, sort_keys=False, width=1 << 20)).encode()
    elif isinstance(user_data, dict):
        user = ("#cloud-config\n" + yaml.safe_dump(user_data, sort_keys=False, width=1 << 20)).encode()
    elif isinstance(user_data, str):
        user = user_data.encode()
    else:
        user = bytes(user_data)
    return yaml.safe_dump(meta, sort_keys=False, width=1 << 20), user


def write_iso(path, meta_data, user_data, workdir):
    """Write the seed ISO (genisoimage, volume label cidata); meta_data and user_data: str or bytes."""
    src = os.path.join(workdir, "seed-src")
    os.makedirs(src, exist_ok=True)
    for name, data in (("meta-data", meta_data), ("user-data", user_data)):
        with open(os.path.join(src, name), "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
    run(["genisoimage", "-quiet", "-output", path, "-volid", "cidata", "-joliet", "-rock", src])
    return path
