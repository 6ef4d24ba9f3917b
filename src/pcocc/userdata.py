"""cloud-init user-data files: what pcocc accepts, read without ever blocking.

Accepted, and given to the guest byte for byte (never decoded and re-encoded):

- an empty file;
- text: UTF-8 without NUL bytes (cloud-config, a shell script, #include,
  a MIME multipart message: cloud-init decodes user-data as UTF-8, and reads
  MIME multipart as a text email message);
- gzip whose content is such text (cloud-init's "Gzip Compressed Content":
  it uncompresses it, then reads the result as above).

Refused, with one line (UserDataError, exit status 2):

- anything that is not a regular file (a FIFO, a device, a socket, a
  directory): the file is opened with O_NONBLOCK and checked with fstat
  before any read, so a FIFO never blocks;
- a file over MAX_BYTES, or gzip that uncompresses to more than
  MAX_UNCOMPRESSED (a gzip bomb);
- other binary content, and gzip that is corrupt or holds binary.

Size limit, and where it comes from: cloud-init's documentation on user-data
formats (doc/rtd/topics/format.rst, "Gzip Compressed Content") says
"user-data is limited to ~16384 bytes" (EC2's limit); OpenStack Nova limits
it to 65535 bytes (docs.openstack.org/nova, "Provide user data to
instances"); Google Cloud to 256 KiB. The NoCloud seed that pcocc writes (an
ISO image) has no limit of its own. pcocc takes up to MAX_BYTES = 1 MiB, four
times the largest of these, so that any user-data that works on those clouds
works here, while a file given by mistake (a disk image, a log) is refused
before it is copied into every VM's seed.
"""

import os
import stat
import zlib

from pcocc.errors import UsageError
from pcocc.names import shown

MAX_BYTES = 1 << 20  # bytes of a user-data file (see the module docstring)
MAX_UNCOMPRESSED = 16 << 20  # bytes of a gzip user-data once uncompressed
GZIP_MAGIC = b"\x1f\x8b"


class UserDataError(UsageError):
    """A user-data file pcocc refuses (exit status 2: bad input of the command)."""


def _is_text(data):
    if b"\0" in data:
        return False
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def _gunzip(data):
    """The content of gzip data (bounded by MAX_UNCOMPRESSED), or None when it is not valid gzip."""
    d = zlib.decompressobj(16 + zlib.MAX_WBITS)
    try:
        out = d.decompress(data, MAX_UNCOMPRESSED + 1)
    except zlib.error:
        return None
    if len(out) > MAX_UNCOMPRESSED:
        raise ValueError("too large")
    if not d.eof:
        return None
    return out


def check_bytes(data, where):
    """data when cloud-init accepts it (empty, UTF-8 text, gzip of such text); else UserDataError naming where."""
    if len(data) > MAX_BYTES:
        raise UserDataError(f"user-data {where}: larger than {MAX_BYTES} bytes (see 'pcocc batch --help')")
    if not data or _is_text(data):
        return data
    if data.startswith(GZIP_MAGIC):
        try:
            inner = _gunzip(data)
        except ValueError:
            raise UserDataError(f"user-data {where}: uncompresses to more than {MAX_UNCOMPRESSED} bytes") from None
        if inner is None:
            raise UserDataError(f"user-data {where}: corrupt gzip data")
        if inner and not _is_text(inner):
            raise UserDataError(f"user-data {where}: gzip of binary data, not of text (cloud-config, script or MIME multipart)")
        return data
    raise UserDataError(f"user-data {where}: binary data; cloud-init takes text (cloud-config, a script, "
                        "MIME multipart) or gzip of text")


def read(path):
    """The bytes of the user-data file at path, checked (see the module docstring).

    Never blocks: O_NONBLOCK, then fstat before reading. Raises UserDataError
    (not a regular file, too large, binary) or UserDataError for an OSError
    (with its strerror).
    """
    where = shown(path, 200)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except (OSError, ValueError) as exc:
        raise UserDataError(f"cannot read user-data {where}: {getattr(exc, 'strerror', None) or exc}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            kind = ("a FIFO" if stat.S_ISFIFO(st.st_mode) else "a device" if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode)
                    else "a directory" if stat.S_ISDIR(st.st_mode) else "a socket" if stat.S_ISSOCK(st.st_mode) else "not a file")
            raise UserDataError(f"user-data {where}: {kind}, not a regular file")
        if st.st_size > MAX_BYTES:
            raise UserDataError(f"user-data {where}: larger than {MAX_BYTES} bytes (see 'pcocc batch --help')")
        chunks, size = [], 0
        while size <= MAX_BYTES:
            chunk = os.read(fd, 65536)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
        data = b"".join(chunks)
    except OSError as exc:
        raise UserDataError(f"cannot read user-data {where}: {exc.strerror}") from None
    finally:
        os.close(fd)
    return check_bytes(data, where)
