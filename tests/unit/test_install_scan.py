"""Every command the project runs comes from a Debian package that the setup installs.

The scan reads (never runs) the project's Python (src/, tests/, bench/) and
shell (scripts/, .ci/, the image recipes' host-side scripts) and collects the
commands they start:
  Python  the literal argv[0] of every runner call (pcocc.runner.run/stream,
          subprocess.run/Popen/check_call/check_output, os.exec*, a harness's
          .run) and of every list assigned to an argv-like name; every
          shutil.which("name"); module-level string constants used as argv[0];
          the command after a wrapper (nsenter, unshare, runuser, env, ...).
  shell   the first word of every simple command (after ;, &&, ||, |, $(,
          if/then/do/..., assignments and redirections), outside quotes and
          here-documents.
Each command maps to its Debian 12 package through PACKAGE_OF (gathered with
`dpkg -S` on a Debian 12 machine). The test fails, naming the command, where
it is run and the package, when the package is neither in the setup's lists
(`scripts/setup --list --test`) nor part of every Debian system (BASE, Debian's
Priority: required set that debootstrap --variant=minbase installs). A command
missing from PACKAGE_OF fails too: find its package with `dpkg -S $(command -v
NAME)` and add it.

Not seen by the scan: commands built at run time (a template's qemu-bin, argv
from configuration), commands inside quoted shell strings (`sh -c '...'`,
`--wrap "..."`: they run on SLURM nodes or in guests), and what guests run.
"""

import ast
import os
import re
import shlex
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

# What the scan reads. Guest-side files of the image recipes (init scripts, udhcpc
# script, ...) run inside the VM: only customize.sh and lib.sh run on the build host.
PYTHON_DIRS = ("src", "tests", "bench")
SHELL_DIRS = ("scripts", ".ci")
HOST_SIDE_RECIPE_FILES = ("customize.sh", "lib.sh")
RECIPES = Path("src/pcocc/images/recipes")

# Names of the calls whose first argument is an argv (the last part of a dotted name).
RUNNER_CALLS = {"run", "stream", "Popen", "check_call", "check_output", "call", "getoutput", "spawn",
                "execv", "execvp", "execvpe", "execve", "spawnv", "spawnvp", "create_subprocess_exec"}
# Variables holding an argv before it is run.
ARGV_NAMES = re.compile(r"^(argv|cmd|command|args?_?v?|\w*_argv|\w*_cmd)$")
# Wrappers: the command they run comes later in their own argv.
WRAPPERS = {"nsenter", "unshare", "runuser", "env", "setsid", "timeout", "nohup", "sudo", "su", "chroot",
            "ip", "taskset", "nice", "ionice", "stdbuf", "exec", "command", "xargs", "flock", "setpriv"}

# Shell words that are not commands of a package.
SHELL_BUILTINS = set("""
    . : [ [[ ]] alias bg bind break builtin caller case cd command compgen complete continue declare
    dirs disown do done echo elif else enable esac eval exec exit export false fc fg fi for function
    getopts hash help history if in jobs kill let local logout mapfile popd printf pushd pwd read
    readarray readonly return select set shift shopt source suspend test then time times trap true
    type typeset ulimit umask unalias unset until wait while { } ! coproc
""".split())
# The project's own commands (installed into the venv by scripts/setup).
PROJECT_COMMANDS = {"pcocc", "pcocc-testcluster", "python", "python3", "pip"}

# Debian 12 packages of Priority: required (what debootstrap --variant=minbase
# installs): present on every Debian 12 system, so the setup need not list them.
# Source: `dpkg-query -W -f='${Package} ${Priority}\n' | grep required` on a minbase chroot.
BASE = {
    "base-files", "base-passwd", "bash", "bsdutils", "coreutils", "dash", "debconf", "debianutils",
    "diffutils", "dpkg", "findutils", "grep", "gzip", "hostname", "init-system-helpers", "libc-bin",
    "login", "mawk", "ncurses-bin", "perl-base", "sed", "sysvinit-utils", "tar", "util-linux",
    "mount", "apt", "passwd", "tzdata", "gpgv", "debian-archive-keyring",
}

# command -> Debian 12 package (`dpkg -S /usr/bin/NAME` on bookworm).
PACKAGE_OF = {
    # base (Priority: required)
    "sh": "dash", "bash": "bash", "cat": "coreutils", "chmod": "coreutils", "chown": "coreutils",
    "cp": "coreutils", "date": "coreutils", "dd": "coreutils", "df": "coreutils", "dirname": "coreutils",
    "basename": "coreutils", "env": "coreutils", "head": "coreutils", "id": "coreutils", "install": "coreutils",
    "ln": "coreutils", "ls": "coreutils", "mkdir": "coreutils", "mktemp": "coreutils", "mv": "coreutils",
    "nproc": "coreutils", "readlink": "coreutils", "realpath": "coreutils", "rm": "coreutils", "rmdir": "coreutils",
    "sleep": "coreutils", "sort": "coreutils", "stat": "coreutils", "sync": "coreutils", "tail": "coreutils",
    "tee": "coreutils", "touch": "coreutils", "tr": "coreutils", "truncate": "coreutils", "uname": "coreutils",
    "uniq": "coreutils", "wc": "coreutils", "whoami": "coreutils", "yes": "coreutils", "chroot": "coreutils",
    "cut": "coreutils", "du": "coreutils", "seq": "coreutils", "sha256sum": "coreutils", "timeout": "coreutils",
    "nice": "coreutils", "nohup": "coreutils", "stdbuf": "coreutils", "printf": "coreutils", "test": "coreutils",
    "true": "coreutils", "false": "coreutils", "echo": "coreutils", "kill": "procps", "od": "coreutils",
    "base64": "coreutils", "mkfifo": "coreutils", "comm": "coreutils", "expr": "coreutils", "fold": "coreutils", "md5sum": "coreutils",
    "cmp": "diffutils", "diff": "diffutils", "find": "findutils", "xargs": "findutils", "grep": "grep",
    "sed": "sed", "awk": "mawk", "gzip": "gzip", "zcat": "gzip", "gunzip": "gzip", "tar": "tar",
    "hostname": "hostname", "su": "util-linux", "runuser": "util-linux", "nsenter": "util-linux",
    "unshare": "util-linux", "setsid": "util-linux", "flock": "util-linux", "mount": "mount", "umount": "mount",
    "losetup": "mount", "taskset": "util-linux", "ionice": "util-linux", "setpriv": "util-linux",
    "mountpoint": "util-linux", "lsblk": "util-linux", "blkid": "util-linux", "fallocate": "util-linux",
    "useradd": "passwd", "userdel": "passwd", "usermod": "passwd", "groupadd": "passwd", "groupdel": "passwd",
    "chpasswd": "passwd", "getent": "libc-bin", "ldconfig": "libc-bin", "dpkg": "dpkg", "dpkg-query": "dpkg",
    "dpkg-deb": "dpkg", "start-stop-daemon": "dpkg", "apt-get": "apt", "apt-cache": "apt", "apt": "apt",
    "which": "debianutils", "run-parts": "debianutils", "tempfile": "debianutils", "pidof": "sysvinit-utils",
    "tput": "ncurses-bin", "clear": "ncurses-bin", "perl": "perl-base", "login": "login",
    # not in every system: each must be in the setup's lists
    "ps": "procps", "pkill": "procps", "pgrep": "procps", "free": "procps", "top": "procps", "watch": "procps",
    "sysctl": "procps", "pmap": "procps", "uptime": "procps",
    "ip": "iproute2", "bridge": "iproute2", "tc": "iproute2", "ss": "iproute2",
    "iptables": "iptables", "iptables-save": "iptables", "iptables-restore": "iptables", "ip6tables": "iptables",
    "ethtool": "ethtool", "tcpdump": "tcpdump", "dnsmasq": "dnsmasq-base", "socat": "socat",
    "nc": "netcat-openbsd", "tmux": "tmux", "remote-viewer": "virt-viewer", "Xvfb": "xvfb", "man": "man-db", "ssh": "openssh-client", "scp": "openssh-client", "sftp": "openssh-client", "ssh-keygen": "openssh-client",
    "ssh-keyscan": "openssh-client",
    "qemu-system-x86_64": "qemu-system-x86", "qemu-img": "qemu-utils", "qemu-io": "qemu-utils",
    "qemu-nbd": "qemu-utils",
    "debootstrap": "debootstrap", "busybox": "busybox-static", "mkfs.ext4": "e2fsprogs", "mke2fs": "e2fsprogs",
    "e2fsck": "e2fsprogs", "resize2fs": "e2fsprogs", "debugfs": "e2fsprogs", "cpio": "cpio",
    "depmod": "kmod", "modprobe": "kmod", "modinfo": "kmod", "genisoimage": "genisoimage",
    "etcd": "etcd-server", "etcdctl": "etcd-client",
    "ovsdb-tool": "openvswitch-common", "ovs-vsctl": "openvswitch-switch", "ovs-ofctl": "openvswitch-common",
    "ovs-appctl": "openvswitch-common", "ovsdb-server": "openvswitch-common", "ovs-vswitchd": "openvswitch-switch",
    "ovsdb-client": "openvswitch-common", "ovs-dpctl": "openvswitch-common",
    "slurmctld": "slurmctld", "slurmd": "slurmd", "srun": "slurm-client", "salloc": "slurm-client",
    "sbatch": "slurm-client", "squeue": "slurm-client", "scancel": "slurm-client", "scontrol": "slurm-client",
    "sinfo": "slurm-client", "sacct": "slurm-client", "munged": "munge", "munge": "munge", "unmunge": "munge",
    "mungekey": "munge", "gcc": "gcc", "cc": "gcc", "sqlite3": "sqlite3", "stress-ng": "stress-ng",
    "curl": "curl", "wget": "wget", "jq": "jq", "lsof": "lsof", "strace": "strace", "file": "file",
    "ping": "iputils-ping", "openssl": "openssl", "xxd": "xxd", "bc": "bc", "pstree": "psmisc",
    "fuser": "psmisc", "killall": "psmisc", "python3": "python3",
}

# Commands the scan cannot see (their name is built at run time or lives outside the
# project), with where they are run.
UNSEEN = [
    ("ssh", "src/pcocc/cli/remote.py (pcocc ssh: the tool's name is an argument)"),
    ("scp", "src/pcocc/cli/remote.py (pcocc scp)"),
    ("qemu-system-x86_64", "src/pcocc/templates.py (the default qemu-bin of a template)"),
    ("stress-ng", "the load runs of issue 12 (the suite under stress-ng --cpu 2)"),
    ("sqlite3", "../shared/repro/*.sh (issue 12's reproduction scripts read the SQLite store)"),
]

SETUP = ROOT / "scripts" / "setup"


@dataclass(frozen=True)
class Use:
    """One command started by the project: the command's name and where (path:line)."""

    command: str
    where: str


# ------------------------------------------------------------------ Python


def _constants(tree):
    """{NAME: "text"} of the module-level assignments of a string constant."""
    out = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str):
            for target in node.targets:
                if isinstance(target, ast.Name):
                    out[target.id] = node.value.value
    return out


def _text(node, constants):
    """The string a node stands for (a literal, or a module constant), else None."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.Name):
        return constants.get(node.id)
    return None


def _call_name(func):
    if isinstance(func, ast.Name):
        return func.id
    if isinstance(func, ast.Attribute):
        return func.attr
    return None


def _argv_lists(node):
    """The list/tuple literals that are (or are nested in calls forming) an argv expression."""
    if isinstance(node, (ast.List, ast.Tuple)):
        yield node
    elif isinstance(node, ast.Call):  # in_netns(ns, ["iptables", ...])
        for arg in node.args:
            yield from _argv_lists(arg)
    elif isinstance(node, ast.BinOp):  # ["ip"] + [...]: argv[0] is on the left
        yield from _argv_lists(node.left)


def _commands_of_words(words):
    """The commands an argv starts: argv[0]; the command a wrapper runs (recursively);
    the commands of `sh -c SCRIPT`. words: str, or None where not a literal."""
    if not words or words[0] is None or not _COMMAND_WORD.match(words[0]):
        return []  # built at run time, or a relative path (the project's own script)
    first = _command_name(words[0])
    out = [words[0]]
    rest = words[1:]
    if first in ("sh", "bash", "dash") and "-c" in rest:
        script = rest[rest.index("-c") + 1] if rest.index("-c") + 1 < len(rest) else None
        if script:
            out += [use.command for use in shell_commands(script)]
    elif first in WRAPPERS:
        # the wrapped command: the first later word that names a known command
        # (options, user names and paths in between are skipped); `ip netns exec NS CMD`
        if first == "ip":
            rest = rest[rest.index("exec") + 1:] if "exec" in rest else []
        for k, word in enumerate(rest):
            if word and _COMMAND_WORD.match(word) and _command_name(word) in PACKAGE_OF:
                out += _commands_of_words(rest[k:])
                break
    return out


def python_commands(source, path="<string>"):
    """[Use] of the commands a Python source starts (see the module docstring)."""
    tree = ast.parse(source, filename=str(path))
    constants = _constants(tree)
    found = []

    def add(words, node):
        for word in words:
            found.append(Use(word, f"{path}:{node.lineno}"))

    def argv(elts):
        return _commands_of_words([_text(e, constants) for e in elts])

    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            name = _call_name(node.func)
            if name == "which" and node.args:
                text = _text(node.args[0], constants)
                if text:
                    add([text], node)
            elif name in RUNNER_CALLS and node.args:
                if name == "call" and not isinstance(node.args[0], (ast.List, ast.Tuple)):
                    continue  # an RPC (client.call("exec", ...)), not a process
                # the argv is the first argument (run, Popen), or a later one (spawn(state, name, argv))
                for arg in node.args:
                    for lst in _argv_lists(arg):
                        add(argv(lst.elts), node)
                if name.startswith(("execv", "spawnv")) or name == "create_subprocess_exec":
                    text = _text(node.args[0], constants)  # os.execvp("cmd", argv)
                    if text:
                        add([text], node)
        elif isinstance(node, ast.Assign) and isinstance(node.value, (ast.List, ast.Tuple)):
            if any(isinstance(t, ast.Name) and ARGV_NAMES.match(t.id) for t in node.targets):
                add(argv(node.value.elts), node)
    return found


# ------------------------------------------------------------------- shell

_SEPARATORS = {";", "&&", "||", "|", "&", "(", ")", ";;", "|&", "{", "}", "!", "`"}
_KEYWORDS_BEFORE_COMMAND = {"if", "then", "do", "else", "elif", "while", "until", "time", "!", "exec", "command",
                            "nohup", "sudo", "builtin"}
_ASSIGNMENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\[[^]]*\])?\+?=")
_HEREDOC = re.compile(r"<<-?\s*(['\"]?)([A-Za-z_][A-Za-z0-9_]*)\1")
_FUNCTION = re.compile(r"^\s*(?:function\s+)?([A-Za-z_][A-Za-z0-9_-]*)\s*\(\s*\)")
_ARRAY_OPEN = re.compile(r"^\s*(?:local\s+|declare\s+-a\s+)?[A-Za-z_][A-Za-z0-9_]*\+?=\([^)]*$")
_ARITHMETIC = re.compile(r"\$?\(\((?:[^()]|\([^()]*\))*\)\)")
_COMMAND_WORD = re.compile(r"^(/[\w./+-]+/)?[A-Za-z0-9][\w.+-]*$")


def _unclosed_quote(text):
    try:
        _tokens(text, strict=True)
        return False
    except ValueError:
        return True


def _logical_lines(text):
    """(line number, text) of a script's commands: continuations, multi-line quotes and
    array assignments joined; here-document bodies dropped."""
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        start, line = i + 1, lines[i]
        i += 1
        while i < len(lines) and (line.endswith("\\") or _unclosed_quote(line)
                                  or (_ARRAY_OPEN.match(line) and ")" not in line.split("=(", 1)[1])):
            line = (line[:-1] if line.endswith("\\") else line) + "\n" + lines[i]
            i += 1
        yield start, line
        for m in _HEREDOC.finditer(line):
            while i < len(lines) and lines[i].strip() != m.group(2):
                i += 1
            i += 1


def _matching(text, i):
    """The index of the ")" that closes a "$(" whose body starts at i (quotes and parentheses inside)."""
    depth, quote = 1, None
    while i < len(text):
        c = text[i]
        if c == "\\" and quote != "'":
            i += 2
            continue
        if quote:
            if c == quote:
                quote = None
        elif c in "'\"":
            quote = c
        elif c == "(":
            depth += 1
        elif c == ")":
            depth -= 1
            if depth == 0:
                return i
        i += 1
    return i


def _substitutions(text):
    """(text with each $( ... ) replaced by $S, [the body of each, nested ones too]).

    Bodies are found also inside double quotes, where a tokenizer cannot see them.
    """
    out, kept, i, single, double = [], [], 0, False, False
    while i < len(text):
        c = text[i]
        if c == "\\" and not single:
            kept.append(text[i:i + 2])
            i += 2
            continue
        if c == "'" and not double:
            single = not single
        elif c == '"' and not single:
            double = not double
        elif not single and text.startswith("$(", i) and not text.startswith("$((", i):
            end = _matching(text, i + 2)
            body = text[i + 2:end]
            out += [body, *_substitutions(body)[1]]
            kept.append("$S")
            i = end + 1
            continue
        kept.append(c)
        i += 1
    return "".join(kept), out


def _tokens(text, strict=False):
    lexer = shlex.shlex(text, posix=True, punctuation_chars=";&|()<>")
    lexer.whitespace_split = True
    lexer.commenters = "#"
    try:
        return list(lexer)
    except ValueError:  # an unclosed quote
        if strict:
            raise
        return []


def _first_words(tokens):
    """The command word of each simple command in a token list (case patterns skipped)."""
    # a ")" with no "(" before it ends a case pattern: what precedes it is no command
    pattern_end, depth, last_sep = set(), 0, -1
    for k, tok in enumerate(tokens):
        if tok == "(":
            depth += 1
        elif tok == ")":
            if depth:
                depth -= 1
            else:
                pattern_end.update(range(last_sep + 1, k))
        elif tok == ";;":
            last_sep = k
    expect, skip_target, in_array = True, False, False
    for k, tok in enumerate(tokens):
        if skip_target:
            skip_target = False
            continue
        if in_array:  # NAME=( words ): no command
            in_array = tok != ")"
            continue
        if _ASSIGNMENT.match(tok) and tok.endswith("=") and tokens[k + 1:k + 2] == ["("]:
            in_array = True
            skip_target = True  # the "("
            continue
        if tok in _SEPARATORS or (tok and set(tok) <= set(";&|()")):
            expect = True
            continue
        if re.fullmatch(r"\d*(<|>|>>|<<<|&>|<&|>&|>\|)", tok):
            skip_target = True
            continue
        if set(tok) <= set("<>&") or (tok.isdigit() and tokens[k + 1:k + 2] and tokens[k + 1][0] in "<>"):
            continue  # a redirection, or its file descriptor (2>/dev/null)
        if not expect or k in pattern_end or tok in _KEYWORDS_BEFORE_COMMAND or _ASSIGNMENT.match(tok):
            continue
        expect = False
        yield tok


def shell_functions(text):
    """The names of the functions a shell script defines."""
    return {m.group(1) for line in text.splitlines() if (m := _FUNCTION.match(line))}


def shell_commands(text, path="<string>", functions=()):
    """[Use] of the commands a shell script starts (see the module docstring).

    functions: names defined elsewhere (a sourced library), not commands.
    """
    functions = set(functions) | shell_functions(text)
    found = []
    for number, line in _logical_lines(text):
        m = _FUNCTION.match(line)
        if m:
            line = line[m.end():]
        line, bodies = _substitutions(_ARITHMETIC.sub("0", line))
        for piece in [line, *bodies]:
            for word in _first_words(_tokens(piece)):
                if word in functions or word in SHELL_BUILTINS or not _COMMAND_WORD.match(word):
                    continue  # a function, a builtin, a variable, a quoted string, a relative path
                found.append(Use(word, f"{path}:{number}"))
    return found


# ------------------------------------------------------------------- files


def _is_shell(path):
    if path.suffix == ".sh":
        return True
    try:
        with open(path, "rb") as f:
            head = f.readline()
    except OSError:
        return False
    return head.startswith(b"#!") and (b"sh" in head.split(b"/")[-1] or b"bash" in head)


def scan_file(path, root=ROOT, functions=()):
    """[Use] of one file, Python or shell (others: none); functions: shell functions of sourced files."""
    rel = path.relative_to(root) if path.is_absolute() and path.is_relative_to(root) else path
    if path.suffix == ".py":
        return python_commands(path.read_text(), rel)
    if _is_shell(path):
        return shell_commands(path.read_text(errors="replace"), rel, functions)
    return []


def project_files(root=ROOT):
    """The files the scan reads, sorted."""
    files = []
    for d in PYTHON_DIRS:
        files += [p for p in (root / d).rglob("*.py") if "__pycache__" not in p.parts]
    for d in SHELL_DIRS:
        files += [p for p in (root / d).rglob("*") if p.is_file() and _is_shell(p)]
    recipes = root / RECIPES
    files = [p for p in files if not p.is_relative_to(recipes)]
    files += [p for p in recipes.rglob("*") if p.name in HOST_SIDE_RECIPE_FILES]
    return sorted(set(files))


def scan_tree(root=ROOT, extra_dirs=()):
    """[Use] of every command the project (and the shell scripts of extra_dirs) starts."""
    files = project_files(root)
    for d in extra_dirs:
        files += sorted(p for p in Path(d).rglob("*") if p.is_file() and (p.suffix == ".py" or _is_shell(p)))
    # scripts source each other's functions (the recipes' lib.sh): a function is no command
    functions = set()
    for path in files:
        if path.suffix != ".py":
            functions |= shell_functions(path.read_text(errors="replace"))
    found = []
    for path in files:
        found += scan_file(path, root, functions)
    return found


def _command_name(word):
    return os.path.basename(word)


def problems(uses, installed):
    """One line per command whose package is unknown or not installed by the setup.

    installed: the package names the setup installs; BASE counts as installed.
    """
    out = []
    seen = set()
    for use in uses:
        name = _command_name(use.command)
        if name in PROJECT_COMMANDS or name in SHELL_BUILTINS or (name, use.where) in seen:
            continue
        seen.add((name, use.where))
        package = PACKAGE_OF.get(name)
        if package is None:
            out.append(f"{use.where}: runs '{name}', which is not in PACKAGE_OF of {Path(__file__).name} "
                       f"(find its package with: dpkg -S $(command -v {name}))")
        elif package not in installed and package not in BASE:
            out.append(f"{use.where}: runs '{name}' (Debian package {package}), which scripts/setup does not install")
    return out


def setup_packages(test=True):
    """The Debian packages scripts/setup installs (with --test: also those of the tests)."""
    argv = ["bash", str(SETUP), "--list"] + (["--test"] if test else [])
    out = subprocess.run(argv, capture_output=True, text=True, check=True).stdout
    return set(out.split())


# ------------------------------------------------------------------- tests


def test_every_command_comes_from_a_package_the_setup_installs():
    extra = [d for d in os.environ.get("PCOCC_SCAN_EXTRA", "").split(os.pathsep) if d]
    uses = scan_tree(ROOT, extra) + [Use(command, where) for command, where in UNSEEN]
    assert len({u.command for u in uses}) > 30, "the scan found almost nothing: is it broken?"
    found = problems(uses, setup_packages(test=True))
    assert not found, "\n".join(found)


def test_the_harness_and_image_builder_lists_are_in_the_setup():
    from pcocc.images import build
    from pcocc.testcluster import pkgs

    test_set, demo_set = setup_packages(test=True), setup_packages(test=False)
    assert set(pkgs.PACKAGES + pkgs.OVS_PACKAGES) <= test_set
    assert set(build.HOST_PACKAGES) <= demo_set  # the demo builds the tiny image
    assert demo_set <= test_set


def test_the_demo_install_stays_light():
    demo = setup_packages(test=False)
    assert not demo & {"slurmctld", "slurmd", "munge", "gcc", "libslurm-dev", "openvswitch-switch", "stress-ng"}


SNIPPET_PY = '''
import shutil, subprocess
from pcocc.runner import run
QEMU = "qemu-system-x86_64"
def f(ns):
    run(["ovsdb-tool", "create", "x"])
    subprocess.Popen([QEMU, "-m", "64"])
    run(in_netns(ns, ["iptables", "-w", "-L"]))
    run(["nsenter", "--net=/run/netns/x", "unshare", "--uts", "slurmd", "-D"])
    argv = ["frobnicate", "--all"]
    proc.spawn(state, "munged", ["/usr/sbin/munged", "--foreground"], "out")
    run(["nsenter", "--net=x", "sh", "-c", 'hostname "$0" && exec slurmctld -D', "n1"])
    shutil.which("sqlite3")
    client.call("exec", argv=["not-on-the-host"])   # an RPC: not a host command
    data = ["ip", "link"]                            # data, not an argv
'''

SNIPPET_SH = '''#!/bin/sh
set -eu
greet() { echo hi; }
X=$(sqlite3 db 'select 1') && greet
if ! command -v ovs-vsctl >/dev/null; then stress-ng --cpu 2 & fi
echo "$(gcc --version)" | head -1  # a comment: rm nothing
cat > f <<'EOF'
notacommand here
EOF
FOO=1 "$PCOCC" ps; ./local-script; sudo -n true
sh -c 'quoted-inside --not-seen'
'''


def test_scanner_finds_commands_in_python():
    found = {u.command for u in python_commands(SNIPPET_PY, "snippet.py")}
    assert {"ovsdb-tool", "qemu-system-x86_64", "iptables", "nsenter", "unshare", "slurmd", "frobnicate", "sqlite3",
            "/usr/sbin/munged", "hostname", "slurmctld"} <= found
    assert "not-on-the-host" not in found and "ip" not in found


def test_scanner_finds_commands_in_shell():
    found = [u.command for u in shell_commands(SNIPPET_SH, "snippet.sh")]
    assert {"sqlite3", "stress-ng", "gcc", "head", "cat", "sh"} <= set(found)
    assert not set(found) & {"greet", "notacommand", "quoted-inside", "rm", "X", "FOO", "./local-script", "$PCOCC"}


def test_scan_fails_naming_the_command_and_package():
    uses = python_commands(SNIPPET_PY, "snippet.py") + shell_commands(SNIPPET_SH, "snippet.sh")
    lines = problems(uses, installed={"qemu-system-x86"})
    text = "\n".join(lines)
    assert "snippet.py:6: runs 'ovsdb-tool' (Debian package openvswitch-common), which scripts/setup does not install" in text
    assert "runs 'stress-ng' (Debian package stress-ng)" in text
    assert "runs 'frobnicate', which is not in PACKAGE_OF" in text
    assert "qemu-system-x86_64" not in text  # installed
    assert "'nsenter'" not in text and "'cat'" not in text  # every Debian system has util-linux, coreutils
    assert problems(uses, installed=set(PACKAGE_OF.values()) | {"frobnicate"}) == [
        line for line in lines if "frobnicate" in line
    ]
