from pcocc.cli.pending import pending_command

save = pending_command("save", "Save the disk of a VM as a new image revision", "save and checkpoint support")
ckpt = pending_command("ckpt", "Checkpoint a virtual cluster to a directory", "save and checkpoint support")
