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
