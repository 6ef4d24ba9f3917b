"""pcocc cp: copy files and directories to and from VMs through their guest agents, for
clusters with no network. No second protocol: a copy is a streamed exec (docs/exec.md) of a
small guest script, the data going through the exec's stdin (upload) or stdout (download)."""

import os
import shlex
import subprocess

import click

from pcocc.cli.access import Targets, _ExecRun, job_options
from pcocc.cli.core import pass_app
from pcocc.errors import NotFoundError, PcoccError, UsageError

COPY_FAILED = 1  # the copy failed in the VM (`pcocc help exit-codes`: the operation failed)
COPY_NOT_FOUND = 4  # the guest script's status when the remote source does not exist
_ERR_KEEP = 4096  # bytes of the guest's stderr kept for the error line

# Download: a header line "F SIZE" (a file, then its bytes) or "D SIZE" (a directory, then
# a tar archive of it holding its base name; SIZE is du's apparent size, for the progress bar).
_DOWNLOAD = r"""cd "${HOME:-/root}" 2>/dev/null || cd /
p=%(path)s
if [ ! -e "$p" ]; then echo "$p: No such file or directory" >&2; exit 4; fi
if [ -d "$p" ]; then
  if [ %(recursive)s != 1 ]; then echo "$p: is a directory (use -r)" >&2; exit 1; fi
  printf 'D %%s\n' "$(du -sb "$p" | cut -f1)"
  cd "$(dirname "$p")" && exec tar -cf - -- "$(basename "$p")"
fi
[ -r "$p" ] || { echo "$p: Permission denied" >&2; exit 1; }
printf 'F %%s\n' "$(wc -c < "$p")"
exec cat -- "$p"
"""

# Upload of a file: its bytes on stdin, into DEST (DEST/NAME when DEST is a directory).
_UPLOAD_FILE = r"""cd "${HOME:-/root}" 2>/dev/null || cd /
d=%(dest)s
if [ -d "$d" ]; then d="${d%%/}/"%(name)s; fi
exec cat > "$d"
"""

# Upload of a directory: a tar archive holding NAME on stdin, extracted into DEST when it is
# a directory (DEST/NAME, scp -r's rule), else to DEST itself (through a private temporary
# directory next to it, renamed).
_UPLOAD_DIR = r"""cd "${HOME:-/root}" 2>/dev/null || cd /
d=%(dest)s
if [ -d "$d" ]; then exec tar -xf - --no-same-owner -C "$d"; fi
t=$(mktemp -d "$(dirname "$d")/.pcocc-cp.XXXXXX") || exit 1
tar -xf - --no-same-owner -C "$t" && mv -- "$t"/%(name)s "$d"
s=$?
rm -rf -- "$t"
exit $s
"""


def parse_location(text):
    """('vmset', 'path') for a remote location, (None, text) for a local one.

    scp(1)'s rule: a colon before any slash makes a remote location, 'HOST:PATH'; here the
    host is a clush node set of VMs (vm0, vm[0-3], vm[0-7]!vm3) or 'all'. An empty PATH is
    the home directory of root in the VM, as scp's is the user's.
    """
    head, sep, tail = text.partition(":")
    if sep and "/" not in head and (head.startswith("vm") or head == "all"):
        return head, tail or "."
    return None, text


def _tree_size(path):
    """Bytes of the regular files under path (the progress bar's length for a directory)."""
    total = 0
    for root, _, files in os.walk(path):
        for f in files:
            try:
                total += os.lstat(os.path.join(root, f)).st_size
            except OSError:
                pass
    return total


class _Progress:
    """click's progress bar on stderr when it is a terminal; nothing otherwise."""

    def __init__(self, app, label, length):
        stderr = app.env.stderr
        self.bar = None
        try:
            tty = stderr.isatty()
        except (AttributeError, ValueError):
            tty = False
        if tty:
            self.bar = click.progressbar(length=max(int(length), 1), label=label, file=stderr, show_pos=False)
            self.bar.__enter__()

    def update(self, n):
        if self.bar is not None and n:
            self.bar.update(n)

    def close(self):
        if self.bar is not None:
            self.bar.__exit__(None, None, None)
            self.bar = None


class _CopyRun(_ExecRun):
    """A streamed exec whose stdout goes to sink(bytes) and whose stdin bytes are counted
    by the progress bar; the guest's stderr is kept (per VM) for a one-line error."""

    def __init__(self, app, targets, args, stdin_fd, sink=None, progress=None):
        super().__init__(app, targets, args, stdin_fd, gather=False)
        self.many = False  # no prefixes, no "exited with status" lines: cp says it itself
        self.sink = sink
        self.progress = progress
        self.errors = {}

    def _output(self, name, err, data):
        if err:
            self.errors[name] = (self.errors.get(name, b"") + data)[-_ERR_KEEP:]
        elif self.sink is not None:
            self.sink(data)

    def _read_stdin(self, size):
        data = super()._read_stdin(size)
        if self.progress is not None:
            self.progress.update(len(data))
        return data


class _Download:
    """Receives a download's stream (header line, then a file's bytes or a tar archive) into dest."""

    def __init__(self, app, remote, dest, label):
        self.app = app
        self.remote = remote
        self.dest = dest
        self.label = label
        self.head = b""
        self.kind = None
        self.file = None
        self.tar = None
        self.tmp = None
        self.target = None
        self.progress = None

    def __call__(self, data):
        if self.kind is None:
            self.head += data
            if b"\n" not in self.head:
                if len(self.head) > 64:
                    raise PcoccError(f"{self.label}: the VM sent a malformed header")
                return
            line, _, data = self.head.partition(b"\n")
            self._open(line)
        if data:
            try:
                (self.file or self.tar.stdin).write(data)
            except OSError as exc:
                raise PcoccError(f"writing {self.target}: {exc.strerror}") from None
            self.progress.update(len(data))

    def _open(self, line):
        try:
            kind, size = line.decode().split()
            size = int(size)
        except ValueError:
            raise PcoccError(f"{self.label}: the VM sent a malformed header") from None
        self.kind = kind
        name = os.path.basename(self.remote.rstrip("/")) or "."
        if kind == "F":
            self.target = os.path.join(self.dest, name) if os.path.isdir(self.dest) else self.dest
            try:
                self.file = open(self.target, "wb")
            except OSError as exc:
                raise PcoccError(f"{self.target}: {exc.strerror}") from None
        else:
            import tempfile

            # The guest's archive is unpacked into a private directory of ours, only its member
            # `name` (tar's member argument), and only that tree is moved to the target: an archive
            # naming other files (scp's CVE-2019-6111 kind) cannot write beside it.
            self.target = os.path.join(self.dest, name) if os.path.isdir(self.dest) else self.dest
            try:
                self.tmp = tempfile.mkdtemp(prefix=".pcocc-cp.", dir=os.path.dirname(os.path.abspath(self.target)))
            except OSError as exc:
                raise PcoccError(f"{self.dest}: {exc.strerror}") from None
            self.tar = subprocess.Popen(["tar", "-xf", "-", "--no-same-owner", "-C", self.tmp, "--", name],
                                        stdin=subprocess.PIPE, stderr=subprocess.PIPE)
        self.progress = _Progress(self.app, self.label, size)

    def finish(self, ok):
        """Closes what was opened; with ok, completes the copy (raises PcoccError on a local failure)."""
        if self.progress is not None:
            self.progress.close()
        if self.file is not None:
            self.file.close()
        if self.tar is not None:
            self.tar.stdin.close()
            err = self.tar.stderr.read().decode(errors="replace").strip()
            self.tar.stderr.close()
            code = self.tar.wait()
            if ok and code:
                ok = False
                raise PcoccError(f"extracting into {self.target}: {err.splitlines()[-1] if err else 'tar failed'}")
            if ok and self.tmp:
                name = os.path.basename(self.remote.rstrip("/"))
                try:
                    os.rename(os.path.join(self.tmp, name), self.target)
                except OSError as exc:
                    raise PcoccError(f"{self.target}: {exc.strerror}") from None
        if self.tmp:
            import shutil

            shutil.rmtree(self.tmp, ignore_errors=True)
            self.tmp = None


def _status(run, status, what):
    """cp's exit status from the exec's, with the guest's last stderr line as one error line per VM."""
    if status in (130, COPY_NOT_FOUND, 0):
        pass
    elif status == 255:
        return COPY_FAILED  # the exec already said why (pcocc: error: vmN: ...)
    for name, err in run.errors.items():
        if status:
            lines = err.decode(errors="replace").strip().splitlines()
            run._say(f"pcocc: error: {name}: {what}: {lines[-1] if lines else 'failed'}")
    if status in (0, 130, COPY_NOT_FOUND):
        return status
    return COPY_FAILED


def _download(app, targets, recursive, remote, dest):
    argv = ["/bin/sh", "-c", _DOWNLOAD % {"path": shlex.quote(remote), "recursive": "1" if recursive else "0"}]
    name = targets.vms[targets.ranks[0]]["name"]
    sink = _Download(app, remote, dest, f"{name}:{remote}")
    run = _CopyRun(app, targets, {"argv": argv, "user": None}, None, sink=sink)
    ok = False
    try:
        status = run.run()
        ok = status == 0
    finally:
        sink.finish(ok)
    if status == 0 and sink.kind is None:
        run._say(f"pcocc: error: {name}:{remote}: the VM sent nothing")
        return COPY_FAILED
    return _status(run, status, f"cp {remote}")


def _upload(app, targets, recursive, src, remote):
    name = os.path.basename(os.path.normpath(src))
    if os.path.isdir(src):
        if not recursive:
            raise UsageError(f"{src}: is a directory (use -r)")
        script, size = _UPLOAD_DIR, _tree_size(src)
        tar = subprocess.Popen(["tar", "-cf", "-", "-C", os.path.dirname(os.path.abspath(src)), "--", name],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        fd, closer = tar.stdout.fileno(), tar
    else:
        try:
            f = open(src, "rb")
        except OSError as exc:
            raise NotFoundError(f"{src}: {exc.strerror}") from None
        script, size, tar = _UPLOAD_FILE, os.fstat(f.fileno()).st_size, None
        fd, closer = f.fileno(), f
    argv = ["/bin/sh", "-c", script % {"dest": shlex.quote(remote), "name": shlex.quote(name)}]
    progress = _Progress(app, f"{src}", size)
    run = _CopyRun(app, targets, {"argv": argv, "user": None}, fd, progress=progress)
    try:
        status = run.run()
    finally:
        progress.close()
        if tar is not None:
            tar.stdout.close()
            if tar.poll() is None:
                tar.kill()  # by pid: the exec ended before it (an error in the VM)
            err = tar.stderr.read().decode(errors="replace").strip()
            tar.stderr.close()
            if tar.wait() and status == 0:
                raise PcoccError(f"archiving {src}: {err.splitlines()[-1] if err else 'tar failed'}")
        else:
            closer.close()
    return _status(run, status, f"cp to {remote}")


@click.command("cp")
@job_options
@click.option("-r", "--recursive", is_flag=True, help="Copy directories and their contents (scp -r).")
@click.argument("paths", nargs=-1, required=True, metavar="SRC... DEST")
@pass_app
def cp(app, jobid, jobname, recursive, paths):
    """Copy files and directories to and from VMs through their guest agents (no network needed).

    Locations are scp's: vmN:PATH in a VM (a relative PATH is from root's home), any
    other a local path. Upload: local SRC... to vmN:DEST, or to several VMs at once with a
    node set (vm[0-3]:DEST, all:DEST). Download: vmN:SRC... (one VM) to a local DEST. With
    several sources DEST must be a directory. Progress is shown on stderr when it is a
    terminal.

    Exit status: 0 when every copy succeeded; 1 when one failed (one line on stderr each);
    4 when a source does not exist; 130 after Ctrl-C (`pcocc help exit-codes`).
    """
    if len(paths) < 2:
        raise UsageError("give at least one source and a destination: pcocc cp [-r] SRC... DEST")
    *sources, dest = paths
    dest_set, dest_path = parse_location(dest)
    located = [parse_location(s) for s in sources]
    if dest_set is not None:
        if any(vs is not None for vs, _ in located):
            raise UsageError("copies between VMs are not supported: download, then upload")
        targets = Targets(app, jobid, jobname, dest_set)
        targets.wait_started(app)
        if len(sources) > 1:
            dest_path = dest_path.rstrip("/") + "/"  # several sources: into a directory, which must exist
        worst = 0
        for src in sources:
            status = _upload(app, targets, recursive, src, dest_path)
            worst = status if status in (130,) else max(worst, status)
            if status == 130:
                break
    else:
        sets = {vs for vs, _ in located}
        if None in sets:
            raise UsageError("one side must be a VM (vmN:PATH): use cp(1) for local copies")
        if len(sets) > 1:
            raise UsageError("download from one VM at a time")
        targets = Targets(app, jobid, jobname, sets.pop())
        if len(targets.ranks) != 1:
            raise UsageError("download from one VM at a time (vmN:PATH)")
        targets.wait_started(app)
        if len(sources) > 1 and not os.path.isdir(dest_path):
            raise UsageError(f"{dest_path}: not a directory (several sources)")
        worst = 0
        for _, remote in located:
            status = _download(app, targets, recursive, remote, dest_path)
            worst = status if status == 130 else max(worst, status)
            if status == 130:
                break
    if worst:
        raise click.exceptions.Exit(worst)
