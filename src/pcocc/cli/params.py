"""click parameter types for user-given values: the checks of pcocc.names where the user types.

A bad value is a click usage error (exit status 2, one line, then "Try ... --help").
"""

import click

from pcocc import names
from pcocc.errors import UsageError


class _Checked(click.ParamType):
    def check(self, value):
        raise NotImplementedError

    def convert(self, value, param, ctx):
        if value is None or (not isinstance(value, str) and self.passthrough(value)):
            return value
        try:
            return self.check(value)
        except UsageError as exc:
            self.fail(exc.message, param, ctx)

    def passthrough(self, value):
        return False


class JobId(_Checked):
    """A job id: ASCII digits, at most names.MAX_JOB_ID."""

    name = "jobid"

    def passthrough(self, value):
        return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= names.MAX_JOB_ID

    def check(self, value):
        return names.parse_job_id(value)


class Count(_Checked):
    """A count: ASCII digits within [minimum, maximum]."""

    name = "count"

    def __init__(self, what, minimum=1, maximum=None):
        self.what, self.minimum, self.maximum = what, minimum, maximum

    def passthrough(self, value):  # a default given as an int
        return isinstance(value, int) and not isinstance(value, bool)

    def check(self, value):
        return names.parse_count(value, self.what, self.minimum, self.maximum)


class JobName(_Checked):
    name = "name"

    def check(self, value):
        return names.check_job_name(value)


class UserName(_Checked):
    name = "user"

    def check(self, value):
        return names.check_user_name(value)


JOB_ID = JobId()
JOB_NAME = JobName()
USER_NAME = UserName()
MAX_CPUS_PER_VM = 1024  # cores of one VM on the local backend: a bound above any host's core count
MAX_MEM_PER_CORE = 1 << 20  # MiB per core: 1 TiB


class Path(click.Path):
    """click.Path that refuses a NUL byte (os.stat raises ValueError on one) as a usage error."""

    def convert(self, value, param, ctx):
        if isinstance(value, str) and "\0" in value:
            self.fail(f"{names.shown(value)}: a path cannot hold a NUL byte", param, ctx)
        return super().convert(value, param, ctx)


class Time(click.ParamType):
    """A point in time as sacct(1)'s -S/-E take it, as epoch seconds (float), in local time:
    YYYY-MM-DD[THH:MM[:SS]], HH:MM[:SS] (today), MM/DD[/YY], now, now-N[s|m|h|d|w] (default unit:
    seconds, as sacct), or a bare epoch number of at least 9 digits."""

    name = "time"
    _REL = {"": 1, "s": 1, "sec": 1, "seconds": 1, "m": 60, "min": 60, "minutes": 60, "h": 3600, "hours": 3600,
            "d": 86400, "days": 86400, "w": 604800, "weeks": 604800}

    def convert(self, value, param, ctx):
        import datetime
        import re
        import time as _time

        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        text = str(value).strip()
        m = re.fullmatch(r"now(?:([-+])(\d{1,9})([a-z]*))?", text, re.ASCII | re.IGNORECASE)
        if m:
            now = _time.time()
            if not m.group(1):
                return now
            unit = self._REL.get(m.group(3).lower())
            if unit is None:
                self.fail(f"{names.shown(text)}: unknown unit (s, m, h, d, w)", param, ctx)
            delta = int(m.group(2)) * unit
            return now - delta if m.group(1) == "-" else now + delta
        if re.fullmatch(r"\d{9,12}", text, re.ASCII):
            return float(text)
        today = datetime.date.today()
        for fmt, fix in (("%Y-%m-%dT%H:%M:%S", None), ("%Y-%m-%dT%H:%M", None), ("%Y-%m-%d", None),
                         ("%H:%M:%S", "today"), ("%H:%M", "today"), ("%m/%d/%y", None), ("%m/%d", "year")):
            try:
                parsed = datetime.datetime.strptime(text, fmt)
            except ValueError:
                continue
            if fix == "today":
                parsed = parsed.replace(year=today.year, month=today.month, day=today.day)
            elif fix == "year":
                parsed = parsed.replace(year=today.year)
            return parsed.timestamp()
        self.fail(f"{names.shown(text)}: not a time (YYYY-MM-DD[THH:MM[:SS]], HH:MM[:SS], MM/DD[/YY], now-N[smhdw])", param, ctx)


TIME = Time()


class JobIds(click.ParamType):
    """One or more job ids, comma-separated (sacct -j 5,6; scancel 5 6): a list of ints."""

    name = "jobid[,jobid...]"

    def convert(self, value, param, ctx):
        if isinstance(value, list):
            return value
        out = []
        for part in str(value).split(","):
            try:
                out.append(names.parse_job_id(part))
            except UsageError as exc:
                self.fail(exc.message, param, ctx)
        return out


JOB_IDS = JobIds()


class PassthroughCommand(click.Command):
    """A command whose unknown options go, intact, to the batch system (salloc/sbatch).

    click's ignore_unknown_options tears attached short options apart (pallets/click#602):
    `-pbatch` became -p (unknown), then -b (ours) taking "atch". Here the command line is
    sorted before click sees it: pcocc's own options (with their values) first, then "--",
    then everything else in its order (the batch system's options, their values, the
    DEFINITION). A token is ours when it is one of our long options (--opt or --opt=value)
    or a short option whose first letter is one of ours (-b FILE, -bFILE); every other
    letter, attached value and long option reaches the batch system as typed. After a "--"
    typed by the user, nothing is ours.
    """

    def parse_args(self, ctx, args):
        return super().parse_args(ctx, self.sort_args(ctx, list(args)))

    def sort_args(self, ctx, args):
        takes_value = {}
        for param in self.get_params(ctx):
            if isinstance(param, click.Option):
                for name in [*param.opts, *param.secondary_opts]:
                    takes_value[name] = not (param.is_flag or param.count)
        own, rest = [], []
        i = 0
        while i < len(args):
            arg = args[i]
            if arg == "--":
                rest.extend(args[i + 1:])
                break
            if arg.startswith("--"):
                name = arg.split("=", 1)[0]
                if name in takes_value:
                    own.append(arg)
                    if takes_value[name] and "=" not in arg and i + 1 < len(args):
                        own.append(args[i + 1])
                        i += 1
                else:
                    rest.append(arg)
            elif arg.startswith("-") and len(arg) > 1 and arg[:2] in takes_value:
                own.append(arg)
                if takes_value[arg[:2]] and len(arg) == 2 and i + 1 < len(args):
                    own.append(args[i + 1])
                    i += 1
            else:
                rest.append(arg)
            i += 1
        return own + (["--", *rest] if rest else [])
