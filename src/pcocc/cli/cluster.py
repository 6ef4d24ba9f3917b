from pcocc.cli.pending import pending_command

_LOCAL = "the single-host backend"
alloc = pending_command("alloc", "Run a virtual cluster, with an interactive shell in its allocation", _LOCAL)
batch = pending_command("batch", "Submit a virtual cluster as a batch job", _LOCAL)
ps = pending_command("ps", "List your running virtual clusters", _LOCAL)
cancel = pending_command("cancel", "Stop a virtual cluster", _LOCAL)
