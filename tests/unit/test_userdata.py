"""User-data: what cloud-init accepts goes to the guest untouched; the rest is refused in one line."""

import gzip
import os
import threading

import pytest

from pcocc import userdata
from pcocc.hypervisor import seed

MIME = (b'Content-Type: multipart/mixed; boundary="==B=="\nMIME-Version: 1.0\n\n--==B==\n'
        b'Content-Type: text/cloud-config; charset="us-ascii"\n\n#cloud-config\nruncmd: [echo hi]\n--==B==--\n')
ACCEPTED = {
    "empty": b"",
    "cloud-config": b"#cloud-config\nruncmd:\n  - echo \xc3\xa9t\xc3\xa9\n",
    "script": b"#!/bin/sh\r\necho hi\r\n",
    "mime": MIME,
    "gzip": gzip.compress(b"#cloud-config\nhostname: x\n"),
    "gzip-mime": gzip.compress(MIME),
    "gzip-empty": gzip.compress(b""),
}
REFUSED = {
    "binary": b"\x9d\xff" + os.urandom(4094),
    "nul": b"#cloud-config\n\0\n",
    "latin-1": b"#cloud-config\nname: \xe9t\xe9\n",
    "gzip-binary": gzip.compress(b"\x00\x01\x02\xff" * 100),
    "gzip-corrupt": gzip.compress(b"#cloud-config\n" * 100)[:40],
    "too-big": b"#" * (userdata.MAX_BYTES + 1),
    "gzip-bomb": gzip.compress(b"a" * (userdata.MAX_UNCOMPRESSED + 1)),
}


@pytest.mark.parametrize("kind", sorted(ACCEPTED))
def test_accepted_user_data_is_passed_untouched(tmp_path, kind):
    path = tmp_path / "ud"
    path.write_bytes(ACCEPTED[kind])
    data = userdata.read(str(path))
    assert data == ACCEPTED[kind] and isinstance(data, bytes)
    meta, user = seed.render("vm0", "pcocc-x-vm0", data)
    assert user == ACCEPTED[kind]


@pytest.mark.parametrize("kind", sorted(REFUSED))
def test_refused_user_data_says_why_in_one_line(tmp_path, kind):
    path = tmp_path / "ud"
    path.write_bytes(REFUSED[kind])
    with pytest.raises(userdata.UserDataError) as err:
        userdata.read(str(path))
    assert str(path) in err.value.message and "\n" not in err.value.message
    assert "Unicode" not in err.value.message and "codec" not in err.value.message


def test_a_fifo_is_refused_without_blocking(tmp_path):
    fifo = tmp_path / "ud.fifo"
    os.mkfifo(fifo)
    result = {}

    def read():
        try:
            userdata.read(str(fifo))
        except userdata.UserDataError as exc:
            result["error"] = exc.message

    t = threading.Thread(target=read, daemon=True)
    t.start()
    t.join(30)  # a bound for a hang, not a timing assertion: a blocked open never returns
    if t.is_alive():  # unblock the reader before failing
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        pytest.fail("reading a FIFO as user-data blocked")
    assert "FIFO" in result["error"]


@pytest.mark.parametrize("path,kind", [("/dev/zero", "device"), ("/dev/null", "device"), ("/", "directory")])
def test_non_regular_files_are_refused(path, kind):
    with pytest.raises(userdata.UserDataError, match=kind):
        userdata.read(path)


def test_missing_file(tmp_path):
    with pytest.raises(userdata.UserDataError, match="No such file"):
        userdata.read(str(tmp_path / "nope"))


def test_seed_iso_holds_the_bytes(tmp_path):
    data = ACCEPTED["gzip-mime"]
    meta, user = seed.render("vm0", "pcocc-abc-vm0", data)
    iso = seed.write_iso(str(tmp_path / "seed.iso"), meta, user, str(tmp_path))
    assert (tmp_path / "seed-src" / "user-data").read_bytes() == data
    assert os.path.getsize(iso) > 0


def test_inline_and_default_user_data_are_cloud_config():
    assert seed.render("vm3", "i", None)[1].startswith(b"#cloud-config\nhostname: vm3")
    assert seed.render("vm3", "i", {"runcmd": ["x"]})[1] == b"#cloud-config\nruncmd:\n- x\n"
