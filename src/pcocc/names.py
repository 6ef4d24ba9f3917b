"""Checks of the strings users give pcocc: job names and ids, counts, user names.

Every user-given string is data: it may hold a newline, a terminal escape,
Unicode digits or a million characters. These checks run where the user types
(the CLI) and again where the value is used (the VM side), and raise
UsageError (exit status 2) with one line that shows the value escaped and
shortened (see shown()).

Rules and their sources:

- user names: POSIX.1-2017, Base Definitions 3.437 "User Name": characters of
  the portable filename character set (3.282: A-Z a-z 0-9 . _ -), the hyphen
  not first; at most 32 characters (the limit of Linux's useradd, shadow-utils).
- job names: printable characters only (str.isprintable: no control
  character, no line or paragraph separator), at most MAX_JOB_NAME.
- counts and job ids: ASCII digits only (Python's int() also takes '³', '٣',
  '+5', ' 5', '1_0'), and a documented maximum checked on the digits, before
  any conversion or expansion.
"""

import re

from pcocc.errors import UsageError

MAX_JOB_NAME = 128  # characters of a job name (SLURM's own limit is larger; ps columns are not)
MAX_USER_NAME = 32  # characters of a user name in a VM (useradd's limit)
MAX_JOB_ID = 2**32 - 1  # SLURM job ids are 32-bit unsigned integers; the local backend's are counters
MAX_SHOWN = 80  # characters of a user's value quoted in an error message

_USER = re.compile(r"[A-Za-z0-9._][A-Za-z0-9._-]*", re.ASCII)
_DIGITS = re.compile(r"[0-9]+", re.ASCII)


def shown(value, limit=MAX_SHOWN):
    """value quoted for one line of a message: control characters escaped, at most limit characters.

    str -> str, e.g. 'a\\nb' (a backslash and an n, not a line break).
    """
    text = str(value)
    cut = len(text) > limit
    text = "".join(c if c.isprintable() else repr(c)[1:-1] for c in text[:limit])
    return f"'{text}{'...' if cut else ''}'"


def one_line(text):
    """text with every non-printable character escaped: what the CLI's error boundary prints."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in str(text))


def check_user_name(name, what="user name"):
    """name when it is a valid user name (POSIX portable, no leading '-', <= 32 chars); else UsageError."""
    if not isinstance(name, str) or len(name) > MAX_USER_NAME or not _USER.fullmatch(name):
        raise UsageError(f"invalid {what} {shown(name)}: use letters, digits, '.', '_' and '-' (not first), "
                         f"at most {MAX_USER_NAME} characters")
    return name


def check_job_name(name):
    """name when it is a valid job name (printable, 1 to MAX_JOB_NAME characters); else UsageError."""
    if not isinstance(name, str) or not name or len(name) > MAX_JOB_NAME or not name.isprintable():
        raise UsageError(f"invalid job name {shown(name)}: use 1 to {MAX_JOB_NAME} printable characters (no control character)")
    return name


def parse_count(text, what, minimum=1, maximum=None):
    """The int written in text with ASCII digits only, within [minimum, maximum]; else UsageError.

    The number of digits is checked before the conversion, so a count of a
    million digits costs nothing.
    """
    text = str(text)
    if not _DIGITS.fullmatch(text):
        raise UsageError(f"invalid {what} {shown(text)}: write a number with the digits 0-9")
    limit = f" (at most {maximum})" if maximum is not None else ""
    if maximum is not None and len(text.lstrip("0")) > len(str(maximum)):
        raise UsageError(f"invalid {what} {shown(text)}: too large{limit}")
    value = int(text)
    if value < minimum:
        raise UsageError(f"invalid {what} {shown(text)}: at least {minimum}")
    if maximum is not None and value > maximum:
        raise UsageError(f"invalid {what} {shown(text)}: too large{limit}")
    return value


def parse_job_id(text, what="job id"):
    """A job id: ASCII digits, 0 to MAX_JOB_ID; UsageError otherwise."""
    return parse_count(text, what, minimum=0, maximum=MAX_JOB_ID)
