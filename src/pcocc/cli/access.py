from pcocc.cli.pending import pending_command

_AGENT = "the VM control endpoint"
_NET = "private virtual networks"
ssh = pending_command("ssh", "Connect to a VM with ssh", _NET)
scp = pending_command("scp", "Copy files to and from VMs with scp", _NET)
nc = pending_command("nc", "Connect to a TCP port of a VM", _NET)
exec_ = pending_command("exec", "Run a command in VMs through their agent", _AGENT)
console = pending_command("console", "Connect to the serial console of a VM", _AGENT)
display = pending_command("display", "Show the remote display of a VM", _AGENT)
reset = pending_command("reset", "Reset VMs", _AGENT)
monitor_cmd = pending_command("monitor-cmd", "Send a command to the qemu monitor of VMs", _AGENT)
dump = pending_command("dump", "Dump the memory of a VM to a file", _AGENT)
