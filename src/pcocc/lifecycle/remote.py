"""Reaching a VM's reverse-NATed port (ssh by default) from anywhere: where it is, and
the ssh configuration that names the VMs.

Node setup publishes, in each node record, the node's address and the host port
mapped to each of its VMs (networks/gateway.py); nothing else is needed.
"""

import os

from pcocc.errors import NotFoundError, PcoccError


def port_map(info, vms):
    """{rank: (address, host port, vm port)} of the VMs whose port is reverse-NATed.

    The values come from store records a user may be able to write (their own prefix): only an
    IP address and port numbers pass, since they end up in an ssh_config (a newline there would
    add any ssh option, a ProxyCommand included) and on command lines."""
    import ipaddress

    def port(value):
        return value if isinstance(value, int) and not isinstance(value, bool) and 0 < value < 65536 else None

    out = {}
    for vm in vms:
        record = info.get("nodes", {}).get(vm.get("host") or "", {})
        for objects in (record.get("objects") or {}).values():
            mapped = (objects.get("vms") or {}).get(str(vm["rank"]), {}) if isinstance(objects, dict) else {}
            if not isinstance(mapped, dict) or not mapped.get("host_port") or vm["rank"] in out:
                continue
            try:
                address = str(ipaddress.ip_address(objects.get("address")))
            except ValueError:
                continue
            if port(mapped["host_port"]) and (objects.get("vm_port") is None or port(objects.get("vm_port"))):
                out[vm["rank"]] = (address, mapped["host_port"], objects.get("vm_port"))
    return out


def endpoint(info, vms, rank, port=None):
    """(address, host port) where the VM's reverse-NATed port is reached; a clear error when none."""
    name = f"vm{rank}"
    if rank >= len(vms):
        raise NotFoundError(f"cluster {info['jobid']} has no {name} (it has {len(vms)} VMs)")
    if vms[rank].get("state") != "running":
        raise PcoccError(f"{name} is not running (state: {vms[rank].get('state')})")
    found = port_map(info, vms).get(rank)
    if found is None:
        raise PcoccError(f"{name} has no reverse-NATed port: its networks need an L3 ethernet network with 'reverse-nat'")
    address, host_port, vm_port = found
    if port is not None and vm_port is not None and port != vm_port:
        raise PcoccError(f"port {port} of {name} is not reverse-NATed (only its port {vm_port} is)")
    return address, host_port


def check_vm_port(info, vms, port):
    """PcoccError unless `port` is the port the cluster's network reverse-NATs (the only one
    `ssh -p`/`scp -P` may name: the ssh_config already points at its host port)."""
    ports = {vm_port for _, _, vm_port in port_map(info, vms).values() if vm_port is not None}
    if ports and port not in ports:
        raise PcoccError(f"port {port} of the VMs is not reverse-NATed (only port {', '.join(map(str, sorted(ports)))} is): "
                         "see reverse-nat in networks.yaml")


def cluster_tag(info):
    """The cluster's name for its host keys: job id and creation time (job ids can come back)."""
    created = info.get("created")
    return f"{info['jobid']}-{int(created * 1000)}" if created else str(info["jobid"])


def ssh_config(info, vms, known_hosts, identities=()):
    """An ssh_config naming every reachable VM of the cluster (vmN) and then the user's own settings.

    identities: the private keys whose public halves the VMs were given (ssh also tries its defaults).
    """
    lines = []
    for rank, (address, host_port, _) in sorted(port_map(info, vms).items()):
        lines += [f"Host vm{rank}", f"  HostName {address}", f"  Port {host_port}",
                  # a new cluster has new host keys: remember them per cluster, accept the first one
                  f"  HostKeyAlias pcocc-{cluster_tag(info)}-vm{rank}", f"  UserKnownHostsFile {known_hosts}",
                  "  StrictHostKeyChecking accept-new", "  LogLevel ERROR",
                  *(f"  IdentityFile {path}" for path in identities), ""]
    if not lines:
        raise PcoccError(f"no VM of cluster {info['jobid']} has a reverse-NATed ssh port "
                         "(its networks need an L3 ethernet network with 'reverse-nat')")
    return "\n".join(lines) + "Host *\n  Include ~/.ssh/config\n"


def write_ssh_config(env, info, vms):
    """The file `ssh -F` reads, in the user's private run dir."""
    from pcocc.fsutil import private_dir
    from pcocc.hypervisor.seed import user_key_files

    identities = [p[: -len(".pub")] for p in user_key_files(env.home, [os.path.join(env.user_conf_dir, "ssh")])
                  if os.path.isfile(p[: -len(".pub")])]
    d = private_dir(os.path.join(env.run_dir, "ssh"))
    path = os.path.join(d, f"config-{info['jobid']}")
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(ssh_config(info, vms, os.path.join(d, f"known_hosts-{cluster_tag(info)}"), identities))
    os.replace(tmp, path)
    return path
