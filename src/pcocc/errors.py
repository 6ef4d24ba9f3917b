"""The error tree of pcocc and the exit status each error maps to.

Library code raises these; only the CLI's boundary (cli/core.py) turns them
into a message and an exit status.
"""

import enum


class ExitStatus(enum.IntEnum):
    """Exit statuses of the pcocc command (documented in `pcocc help exit-codes`)."""

    OK = 0
    ERROR = 1  # generic failure of the requested operation
    USAGE = 2  # bad command line (click's convention)
    CONFIG = 3  # a configuration file is invalid
    NOT_FOUND = 4  # a named template, image, job or VM does not exist
    RESOURCES = 5  # not enough cores, memory, ids or ports
    NOT_AVAILABLE = 6  # the command exists but is not available yet
    PERMISSION = 7  # the caller may not do this
    EXTERNAL = 8  # an external command (qemu, qemu-img, ...) failed
    TIMEOUT = 9  # a wait ran out of time
    INTERRUPTED = 130  # Ctrl-C


class PcoccError(Exception):
    """Base of every error pcocc reports to a person."""

    status = ExitStatus.ERROR

    def __init__(self, message, hint=None):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def lines(self):
        """The lines of the error itself (the hint apart: it is not an error, see hint)."""
        yield self.message


class UsageError(PcoccError):
    status = ExitStatus.USAGE


class ConfigError(PcoccError):
    """One or more problems in configuration files, each with file:line."""

    status = ExitStatus.CONFIG

    def __init__(self, problems, hint=None):
        self.problems = [" ".join(str(p).split()) for p in problems]  # one line each
        super().__init__(self.problems[0] if self.problems else "invalid configuration", hint)

    def lines(self):
        yield from self.problems


class NotFoundError(PcoccError):
    status = ExitStatus.NOT_FOUND


class ResourceError(PcoccError):
    status = ExitStatus.RESOURCES


class NotAvailableError(PcoccError):
    status = ExitStatus.NOT_AVAILABLE


class PermissionDenied(PcoccError):
    status = ExitStatus.PERMISSION


class TimeoutExpired(PcoccError):
    status = ExitStatus.TIMEOUT


class CommandError(PcoccError):
    """An external command failed; the message names it and quotes its stderr."""

    status = ExitStatus.EXTERNAL

    def __init__(self, argv, returncode, stderr=""):
        self.argv = list(argv)
        self.returncode = returncode
        self.stderr = stderr
        tail = stderr.strip().splitlines()[-3:] if stderr else []
        detail = (": " + " / ".join(tail)) if tail else ""
        super().__init__(f"command failed ({returncode}): {' '.join(self.argv[:4])}{' ...' if len(self.argv) > 4 else ''}{detail}")
