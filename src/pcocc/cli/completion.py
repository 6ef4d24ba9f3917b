"""Shell completion for bash and zsh, through click's own machinery (click.shell_completion).

The shell runs `pcocc` with `_PCOCC_COMPLETE=bash_complete` (or zsh_complete) and the words
typed so far; cli.core.run hands that to complete() before anything else. click resolves the
command and the parameter being completed; this module attaches, to the parameters of the
commands on the typed path, completers chosen by the parameters' names, options and metavars
(the command modules stay as they are):

    DEFINITION (alloc, batch)       template names, 'tpl:' then a count, after a comma the next one
    template show|snapshot NAME     template names (written and per-image ones)
    -j/--jobid/--jobs, [JOBID]...   job ids of your clusters (with their names as help in zsh)
    -J/--jobname, ps -n/--name      job names of your clusters
    -w/--vms, -x/--exclude, VM(S)   vm0..vmN-1 of the selected cluster (-j, -J, $PCOCC_JOB_ID, or
                                    your only one); node sets also 'all'
    ssh/nc VM, scp/cp vmN:          VM names ([user@]vmN, vmN: for copies), else local files
    image IMAGE, -R/--repo          image names (repo:name), repository names
    help NAME                       commands and help topics

Completion never fails loudly: a broken templates.yaml, an unreachable store or any error
completes nothing, logs and warnings are silenced, and every lookup of the configuration or
the store is bounded in time (LOOKUP_SECONDS for them all, or $PCOCC_COMPLETE_SECONDS: a hung
etcd completes nothing).

`pcocc completion bash|zsh` prints the script (scripts/setup installs both into .venv/share);
`_PCOCC_COMPLETE=bash_source pcocc` prints the same, as click documents. The bash script sends
the line up to the cursor (COMP_LINE), not bash's words, because bash splits words at ':' and
'=' (COMP_WORDBREAKS): 'tiny:2' stays one word here, and the candidates are cut back to the
part bash replaces. click's own protocol (COMP_WORDS, COMP_CWORD) is read when COMP_LINE is
absent (zsh, tests).
"""

import contextlib
import io
import logging
import os
import re
import threading
import time
import warnings

import click
from click.shell_completion import BashComplete, CompletionItem, ZshComplete, split_arg_string

COMPLETE_VAR = "_PCOCC_COMPLETE"
PROG = "pcocc"
LOOKUP_SECONDS = 3.0  # at most this long for all the config and store lookups of one completion
_DEFAULT_BREAKS = "\"'><=;|&(:"  # bash's default COMP_WORDBREAKS

# ssh(1)/scp(1) options that take a value: the word after one is not a destination
_SSH_VALUE = set("BbcDEeFIiJLlmOopQRSWw")
_SCP_VALUE = set("cDFiJloPSX")
# salloc/sbatch short options that take no value (after any other unknown -X, a value is typed)
_SLURM_FLAGS = set("HhIkOQsvVW")


# -- the data behind the candidates: config, templates, clusters, read once per completion

def _seconds(env):
    """LOOKUP_SECONDS, or $PCOCC_COMPLETE_SECONDS (a slow store's site, the tests)."""
    try:
        return max(0.0, float(env.environ.get("PCOCC_COMPLETE_SECONDS") or LOOKUP_SECONDS))
    except ValueError:
        return LOOKUP_SECONDS


def _bounded(fn, default, seconds):
    """fn() in a daemon thread, at most that long; default when it fails or takes longer."""
    box = []

    def target():
        with contextlib.suppress(BaseException):
            box.append(fn())

    t = threading.Thread(target=target, daemon=True, name="pcocc-completion")
    t.start()
    t.join(max(0.0, seconds))
    return box[0] if box else default


class Lookups:
    """What completion reads about the user's world, each thing once and bounded in time.
    It is the root context's obj while completing: the attached completers find it there. All
    its lookups together end within LOOKUP_SECONDS of the first (a hung store completes nothing)."""

    def __init__(self, env):
        self.env = env
        self._cache = {}
        self._deadline = None

    def _once(self, key, fn, default):
        if key not in self._cache:
            if self._deadline is None:
                self._deadline = time.monotonic() + _seconds(self.env)
            self._cache[key] = _bounded(fn, default, self._deadline - time.monotonic())
        return self._cache[key]

    def config(self):
        def load():
            from pcocc.config.loader import load_config

            return load_config(self.env, strict=False)

        return self._once("config", load, None)

    def templates(self):
        """[(name, description)] of the templates, written and per-image; [] when the files are broken."""
        def read():
            tset = self.config().templates
            out = []
            for name in tset.names(images=True):
                desc = None
                with contextlib.suppress(Exception):
                    desc = tset.resolve(name)["description"] or None
                out.append((name, desc))
            return out

        return self._once("templates", read, []) if self.config() is not None else []

    def clusters(self):
        """{jobid: info} of the user's cluster records in the store (read only: no reclaim)."""
        def read():
            from pcocc import state
            from pcocc.store import open_store

            config = self.config()
            if config.batch.store == "sqlite" and not os.path.exists(config.batch.settings["store-path"]):
                return {}  # no store yet: no cluster (and none created by a Tab)
            store = open_store(config, self.env)
            try:
                prefix = state.clusters_prefix(self.env.user)
                items = store.range(prefix)
            finally:
                store.close()
            out = {}
            for key, value in items.items():
                jobid, _, rest = key[len(prefix):].partition("/")
                if rest == "info" and jobid.isdigit() and isinstance(value, dict):
                    out[int(jobid)] = value
            return dict(sorted(out.items()))

        return self._once("clusters", read, {}) if self.config() is not None else {}

    def images(self):
        """[repo:name] of every image, and the repository names."""
        def read():
            from pcocc.images.store import ImageStore

            config = self.config()
            names = sorted({f"{rev.repo.name}:{rev.name}" for rev in ImageStore(config.repos, self.env.user).list(problems=[])})
            return names, [r.name for r in config.repos]

        return self._once("images", read, ([], [])) if self.config() is not None else ([], [])

    def selected_vms(self, ctx):
        """vm0..vmN-1 of the cluster the command would act on, or []."""
        clusters = self.clusters()
        jobid, jobname = None, None
        c = ctx
        while c is not None:
            jobid = jobid if jobid is not None else c.params.get("jobid")
            jobname = jobname or c.params.get("jobname")
            c = c.parent
        if isinstance(jobid, (list, tuple)):
            jobid = jobid[-1] if jobid else None
        if jobid is None and jobname:
            ids = [j for j, info in clusters.items() if info.get("name") == jobname]
            jobid = ids[0] if len(ids) == 1 else None
        if jobid is None:
            env_id = self.env.environ.get("PCOCC_JOB_ID") or ""
            slurm_id = self.env.environ.get("SLURM_JOB_ID") or ""
            if env_id.isdigit():
                jobid = int(env_id)
            elif slurm_id.isdigit() and int(slurm_id) in clusters:
                jobid = int(slurm_id)
            elif len(clusters) == 1:
                jobid = next(iter(clusters))
        info = clusters.get(jobid) if isinstance(jobid, int) else None
        if not info:
            return []
        from pcocc.cluster import vm_count

        return [f"vm{r}" for r in range(vm_count(info))]


def _lookups(ctx):
    obj = ctx.find_root().obj
    return obj if isinstance(obj, Lookups) else None


# -- completers: (lookups, ctx, param, incomplete) -> [CompletionItem]

def _split_last(incomplete, sep=","):
    head, s, last = incomplete.rpartition(sep)
    return head + s, last


def _definition(lk, ctx, param, incomplete):
    typed = ctx.params.get(param.name) or ()
    if typed and re.fullmatch(r"-[A-Za-z]", typed[-1]) and typed[-1][1] not in _SLURM_FLAGS:
        return []  # the value of a batch system option (-p PARTITION, -t TIME, -c 2 ...)
    head, last = _split_last(incomplete)
    if ":" in last:
        return []  # a count: the user's to type
    return [CompletionItem(f"{head}{name}:", type="nospace", help=desc)
            for name, desc in lk.templates() if name.startswith(last)]


def _template(lk, ctx, param, incomplete):
    return [CompletionItem(name, help=desc) for name, desc in lk.templates() if name.startswith(incomplete)]


def _jobids(lk, ctx, param, incomplete):
    head, last = _split_last(incomplete)
    given = set(head.split(",")) | {str(v) for v in _flat(ctx.params.get(param.name))}
    return [CompletionItem(f"{head}{j}", help=f"{info.get('name', '')} {info.get('definition', '')}".strip() or None)
            for j, info in lk.clusters().items() if str(j).startswith(last) and str(j) not in given]


def _flat(value):
    out = []
    for v in value if isinstance(value, (list, tuple)) else [] if value is None else [value]:
        out.extend(_flat(v) if isinstance(v, (list, tuple)) else [v])
    return out


def _jobnames(lk, ctx, param, incomplete):
    names = sorted({str(info.get("name")) for info in lk.clusters().values() if info.get("name")})
    return [CompletionItem(n) for n in names if n.startswith(incomplete)]


def _vm(lk, ctx, param, incomplete):
    return [CompletionItem(vm) for vm in lk.selected_vms(ctx) if vm.startswith(incomplete)]


def _vmset(lk, ctx, param, incomplete):
    head, last = _split_last(incomplete)
    vms = lk.selected_vms(ctx)
    names = vms + (["all"] if vms and not head else [])
    return [CompletionItem(head + vm) for vm in names if vm.startswith(last)]


def _after_value_option(typed, letters):
    """Whether the last typed word is an option of the tool that takes the next word as its value."""
    return bool(typed) and re.fullmatch(r"-[A-Za-z]+", typed[-1]) is not None and typed[-1][-1] in letters


def _ssh(lk, ctx, param, incomplete, letters=_SSH_VALUE):
    typed = ctx.params.get(param.name) or ()
    if _after_value_option(typed, letters):
        return [CompletionItem(incomplete, type="file")] if typed[-1][-1] in "iFE" else []
    if any(not w.startswith("-") for w in typed):
        return []  # the destination is given: the rest is the remote command
    user, at, host = incomplete.rpartition("@")
    return [CompletionItem(f"{user}{at}{vm}") for vm in lk.selected_vms(ctx) if vm.startswith(host)]


def _nc(lk, ctx, param, incomplete):
    return _ssh(lk, ctx, param, incomplete, letters=set("IiOpPqsTVwXx"))


def _copy(lk, ctx, param, incomplete, letters=frozenset()):
    typed = ctx.params.get(param.name) or ()
    if _after_value_option(typed, letters):
        return [CompletionItem(incomplete, type="file")]
    if ":" in incomplete:
        return []  # a path in a VM
    user, at, host = incomplete.rpartition("@")
    vms = [CompletionItem(f"{user}{at}{vm}:", type="nospace") for vm in lk.selected_vms(ctx) if vm.startswith(host)]
    return vms or [CompletionItem(incomplete, type="file")]


def _scp(lk, ctx, param, incomplete):
    return _copy(lk, ctx, param, incomplete, letters=_SCP_VALUE)


def _images(lk, ctx, param, incomplete):
    return [CompletionItem(n) for n in lk.images()[0] if n.startswith(incomplete)]


def _repos(lk, ctx, param, incomplete):
    return [CompletionItem(n) for n in lk.images()[1] if n.startswith(incomplete)]


def _help_names(lk, ctx, param, incomplete):
    """Commands and help topics (the configuration files' short names among them: help templates);
    after a command group, its subcommands. (Read from the command tree and pcocc.help, not from
    cli.core or cli.helptopics, which would make an import circle with core's hook.)"""
    from importlib import resources

    root = ctx.find_root().command
    typed = list(ctx.params.get(param.name) or ())
    cmd = root
    for word in typed:
        cmd = cmd.get_command(ctx, word) if isinstance(cmd, click.Group) else None
    if not isinstance(cmd, click.Group) or getattr(cmd, "hidden", False):
        return []
    names = [n for n in cmd.list_commands(ctx) if n.startswith(incomplete) and not getattr(cmd.get_command(ctx, n), "hidden", True)]
    if not typed:
        names += sorted(p.name[:-4] for p in resources.files("pcocc.help").iterdir() if p.name.endswith(".txt"))
    return [CompletionItem(n) for n in dict.fromkeys(names) if n.startswith(incomplete)]


def _completer_for(path, param):
    """The completer of a parameter of the command at path (a tuple of names), or None."""
    if isinstance(param, click.Option):
        if param.is_flag or param.count:
            return None
        opts = set(param.opts) | set(param.secondary_opts)
        if opts & {"-j", "--jobid", "--jobs"}:
            return _jobids
        if opts & {"-J", "--jobname"} or (path == ("ps",) and param.name == "names_"):
            return _jobnames
        if opts & {"-w", "--vms", "-x", "--exclude"}:
            return _vmset
        if opts & {"-R", "--repo"}:
            return _repos
        return None
    if not isinstance(param, click.Argument):
        return None
    metavar = param.metavar or ""
    if "DEFINITION" in metavar:
        return _definition
    by_name = {"vm": _vm, "vms": _vmset, "job_args": _jobids, "ssh_args": _ssh, "scp_args": _scp, "nc_args": _nc,
               "target": _vm}  # pcocc shell [LOGIN@]vmN
    if param.name in by_name:
        return by_name[param.name]
    if path == ("cp",) and param.name == "paths":
        return _copy
    if path[:1] == ("template",) and param.name == "name":
        return _template
    if path[:1] == ("image",) and (param.name == "image_uri" or (param.name == "source" and path[1:] in (("export",), ("copy",)))):
        return _images
    if path == ("image", "repo", "gc") and param.name == "name":
        return _repos
    if path == ("help",):
        return _help_names
    return None


def _wrap(completer):
    def shell_complete(ctx, param, incomplete):
        lk = _lookups(ctx)
        if lk is None:  # not while completing: the type's own (never happens in a run)
            return param.type.shell_complete(ctx, param, incomplete)
        return completer(lk, ctx, param, incomplete)

    shell_complete.pcocc_completer = completer
    return shell_complete


def attach(cli, args):
    """Attach the completers to the parameters of the commands on the typed path (the root, then
    each subcommand named in args), leaving a completer someone else set on a parameter alone.
    Returns False when a word where a subcommand belongs names none (nothing to complete then).
    """
    cmd, path = cli, ()
    commands = [(cmd, path)]
    for arg in args:
        if not isinstance(cmd, click.Group):
            break
        try:
            sub = cmd.get_command(click.Context(cmd, resilient_parsing=True), arg)
        except Exception:  # noqa: BLE001 - a module that fails to import: nothing to complete there
            return False
        if sub is None and not arg.startswith("-"):
            return False  # pcocc nosuch <Tab> (the groups' own options are all flags)
        if sub is not None:
            cmd, path = sub, path + (arg,)
            commands.append((cmd, path))
    for cmd, path in commands:
        for param in cmd.params:
            current = param._custom_shell_complete
            if current is not None and not hasattr(current, "pcocc_completer"):
                continue
            completer = _completer_for(path, param)
            param._custom_shell_complete = _wrap(completer) if completer else None
    return True


# -- the shells: click's classes, with the line (bash) and env (tests) given by the caller

_BASH_SOURCE = """\
# pcocc completion for bash (`pcocc completion bash`; click's shell completion)
%(complete_func)s() {
    local IFS=$'\\n'
    local response completion type value
    response=$(env COMP_LINE="${COMP_LINE:0:COMP_POINT}" COMP_WORDBREAKS="$COMP_WORDBREAKS" \\
%(complete_var)s=bash_complete "$1" 2>/dev/null)
    COMPREPLY=()
    for completion in $response; do
        IFS=',' read -r type value <<< "$completion"
        case $type in
            dir) COMPREPLY=(); compopt -o dirnames 2>/dev/null ;;
            file) COMPREPLY=(); compopt -o default 2>/dev/null ;;
            nospace) compopt -o nospace 2>/dev/null; COMPREPLY+=("$value") ;;
            plain) COMPREPLY+=("$value") ;;
        esac
    done
    return 0
}

complete -o nosort -F %(complete_func)s %(prog_name)s
"""

_ZSH_SOURCE = """\
#compdef %(prog_name)s
# pcocc completion for zsh (`pcocc completion zsh`; click's shell completion)

%(complete_func)s() {
    local -a completions completions_with_descriptions nospace nospace_with_descriptions response
    (( ! $+commands[%(prog_name)s] )) && return 1

    response=("${(@f)$(env COMP_WORDS="${words[*]}" COMP_CWORD=$((CURRENT-1)) \\
%(complete_var)s=zsh_complete %(prog_name)s 2>/dev/null)}")

    for type key descr in ${response}; do
        if [[ "$type" == "plain" ]]; then
            if [[ "$descr" == "_" ]]; then
                completions+=("$key")
            else
                completions_with_descriptions+=("$key":"$descr")
            fi
        elif [[ "$type" == "nospace" ]]; then
            if [[ "$descr" == "_" ]]; then
                nospace+=("$key")
            else
                nospace_with_descriptions+=("$key":"$descr")
            fi
        elif [[ "$type" == "dir" ]]; then
            _path_files -/
        elif [[ "$type" == "file" ]]; then
            _path_files -f
        fi
    done

    if [ -n "$completions_with_descriptions" ]; then
        _describe -V unsorted completions_with_descriptions -U
    fi
    if [ -n "$completions" ]; then
        compadd -U -V unsorted -a completions
    fi
    if [ -n "$nospace_with_descriptions" ]; then
        _describe -V unsorted nospace_with_descriptions -U -S ''
    fi
    if [ -n "$nospace" ]; then
        compadd -U -S '' -V unsorted -a nospace
    fi
}

if [[ $zsh_eval_context[-1] == loadautofunc ]]; then
    %(complete_func)s "$@"
else
    compdef %(complete_func)s %(prog_name)s
fi
"""


class _Pcocc:
    """What pcocc's bash and zsh completions add to click's: the environment object (not
    os.environ), the completers attached on the typed path, and the line-based protocol."""

    def __init__(self, cli, env):
        super().__init__(cli, {}, PROG, COMPLETE_VAR)
        self.env = env
        self.lookups = Lookups(env)
        self.ctx_args = {"obj": self.lookups}

    def words(self):
        environ = self.env.environ
        if "COMP_LINE" in environ:
            return _line_words(environ["COMP_LINE"])
        cwords = split_arg_string(environ.get("COMP_WORDS", ""))
        cword = int(environ.get("COMP_CWORD") or len(cwords))
        return cwords[1:cword], (cwords[cword] if cword < len(cwords) else "")

    def get_completion_args(self):
        return self.words()

    def get_completions(self, args, incomplete):
        if not attach(self.cli, args):
            return []
        return super().get_completions(args, incomplete)


def _line_words(line):
    """(args, incomplete) from the line up to the cursor: the words after the command name
    (assignments before it are skipped), the last one being completed unless a blank ends the line."""
    words = split_arg_string(line)
    while words and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", words[0]):
        words.pop(0)
    incomplete = ""
    if words and line and not (line[-1] in " \t" and not line.endswith("\\ ")):
        incomplete = words.pop()
    return words[1:], incomplete


class PcoccBash(_Pcocc, BashComplete):
    source_template = _BASH_SOURCE

    def source(self):
        return self.source_template % self.source_vars()  # no check of the running bash's version

    def complete(self):
        args, incomplete = self.get_completion_args()
        items = self.get_completions(args, incomplete)
        if "COMP_LINE" in self.env.environ:
            items = [_for_readline(item, incomplete, self.env.environ.get("COMP_WORDBREAKS", _DEFAULT_BREAKS))
                     for item in items]
        return "\n".join(self.format_completion(item) for item in items)


def _for_readline(item, incomplete, breaks):
    """The candidate as bash replaces it: bash completes the text after the last word-break
    character (':' '=' ...), so the candidate loses what comes before it in the typed word."""
    if item.type not in ("plain", "nospace"):
        return item
    cut = max((incomplete.rfind(c) for c in breaks if c not in " \t\n"), default=-1) + 1
    if cut <= 0:
        return item
    word = incomplete
    if incomplete.startswith("-") and "=" in incomplete:  # click completes the value of --opt=value
        word = incomplete.partition("=")[2]
    full = incomplete[: len(incomplete) - len(word)] + item.value
    return CompletionItem(full[cut:], type=item.type, help=item.help)


class PcoccZsh(_Pcocc, ZshComplete):
    source_template = _ZSH_SOURCE


SHELLS = {"bash": PcoccBash, "zsh": PcoccZsh}


def script(shell, cli):
    """The completion script of a shell (bash, zsh) for the command group cli."""
    from pcocc.env import Environment

    return SHELLS[shell](cli, Environment(environ={})).source()


def complete(cli, env):
    """Answer the shell (env.environ[_PCOCC_COMPLETE] is SHELL_complete or SHELL_source) on
    env.stdout; returns the exit status. Nothing but candidates is ever printed: any error,
    log or warning while completing is swallowed (no candidates)."""
    shell, _, instruction = env.environ.get(COMPLETE_VAR, "").partition("_")
    cls = SHELLS.get(shell)
    if cls is None or instruction not in ("source", "complete"):
        return 1
    if instruction == "source":
        env.stdout.write(cls(cli, env).source())
        return 0
    out = ""
    previous = logging.root.manager.disable
    logging.disable(logging.CRITICAL)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            out = cls(cli, env).complete()
    except BaseException:  # noqa: BLE001 - a Tab must never show a traceback
        out = ""
    finally:
        logging.disable(previous)
    env.stdout.write(out + "\n")
    return 0


@click.command("completion")
@click.argument("shell", type=click.Choice(sorted(SHELLS)))
def command(shell):
    """Print the completion script of SHELL (bash or zsh).

    scripts/setup installs both: bash's in .venv/share/bash-completion/completions/pcocc
    (found by bash-completion through PATH, or source it from ~/.bashrc), zsh's as
    .venv/share/zsh/site-functions/_pcocc (add that directory to fpath before compinit).
    By hand: `source <(pcocc completion bash)` in ~/.bashrc, or `pcocc completion zsh >
    DIR/_pcocc` for a DIR in fpath. The same script is printed by `_PCOCC_COMPLETE=bash_source
    pcocc` (click's way).
    """
    click.echo(script(shell, click.get_current_context().find_root().command), nl=False)
