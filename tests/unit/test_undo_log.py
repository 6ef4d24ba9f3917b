"""The undo log on disk: JSON lines appended and fsync'd one record at a time (no rewrite of
what is there: a node with thousands of objects pays one short write per object), a torn last
line ignored and cut off by the next record, and an older pcocc's single-document logs read,
then migrated by the first change."""

import json
import os

import pytest

from pcocc.errors import PcoccError
from pcocc.networks import undo
from pcocc.networks.undo import UndoError, UndoLog


def _old_format(tmp_path, job, entries):
    """A log as an older pcocc wrote it: one document, json.dump(indent=1)."""
    with open(tmp_path / f"undo-{job}.json", "w") as f:
        json.dump({"job": job, "entries": entries}, f, indent=1)


def test_each_record_is_one_appended_line(tmp_path, monkeypatch):
    log = UndoLog(str(tmp_path))
    log.record(7, "tap", name="t0")
    path = tmp_path / "undo-7.json"
    first, inode = path.read_bytes(), path.stat().st_ino

    def no_read(*args):
        raise AssertionError("a record must not read the log")

    monkeypatch.setattr(UndoLog, "entries", no_read)
    monkeypatch.setattr(undo, "_parse", no_read)
    for i in range(1, 4):
        log.record(7, "tap", name=f"t{i}")
    monkeypatch.undo()
    data = path.read_bytes()
    assert data.startswith(first) and path.stat().st_ino == inode  # appended, never rewritten
    assert [json.loads(line) for line in data.decode().splitlines()] == [{"kind": "tap", "args": {"name": f"t{i}"}} for i in range(4)]
    assert log.entries(7) == [{"kind": "tap", "args": {"name": f"t{i}"}} for i in range(4)]
    assert os.stat(path).st_mode & 0o777 == 0o600


def test_a_torn_last_line_is_ignored_then_cut_off(tmp_path):
    log = UndoLog(str(tmp_path))
    log.record(7, "tap", name="t0")
    log.record(7, "tap", name="t1")
    path = tmp_path / "undo-7.json"
    whole = path.read_bytes()
    with open(path, "ab") as f:  # a crash in the middle of the third append
        f.write(b'{"kind":"tap","args":{"na')
    assert log.entries(7) == [{"kind": "tap", "args": {"name": "t0"}}, {"kind": "tap", "args": {"name": "t1"}}]
    log.record(7, "tap", name="t2")  # the torn line goes, the new record is whole
    assert path.read_bytes() == whole + b'{"kind":"tap","args":{"name":"t2"}}\n'
    done = []
    log.replay(7, {"tap": lambda name: done.append(name)})
    assert done == ["t2", "t1", "t0"] and not path.exists()


def test_a_line_that_is_not_a_record_is_skipped(tmp_path):
    (tmp_path / "undo-3.json").write_bytes(b'{"kind":"a","args":{}}\nnot json\n[1]\n{"kind":"b","args":{"x":1}}\n')
    assert UndoLog(str(tmp_path)).entries(3) == [{"kind": "a", "args": {}}, {"kind": "b", "args": {"x": 1}}]


def test_an_older_pcoccs_log_is_read_and_migrated_by_the_first_record(tmp_path):
    entries = [{"kind": "ovs-bridge", "args": {"bridge": "pb7"}}, {"kind": "tap", "args": {"name": "t0"}}]
    _old_format(tmp_path, 7, entries)
    log = UndoLog(str(tmp_path))
    assert log.jobs() == [7] and log.entries(7) == entries
    log.record(7, "tap", name="t1")
    lines = (tmp_path / "undo-7.json").read_text().splitlines()
    assert [json.loads(line) for line in lines] == [*entries, {"kind": "tap", "args": {"name": "t1"}}]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["undo-7.json"]  # no temporary file left


def test_an_older_pcoccs_log_is_replayed(tmp_path):
    _old_format(tmp_path, 8, [{"kind": "a", "args": {"n": 1}}, {"kind": "a", "args": {"n": 2}}, {"kind": "a", "args": {"n": 3}}])
    log, done = UndoLog(str(tmp_path)), []

    def undo_a(n):
        if n == 2:
            raise PcoccError("busy")
        done.append(n)

    with pytest.raises(UndoError, match="1 object"):
        log.replay(8, {"a": undo_a})
    assert done == [3, 1]
    assert (tmp_path / "undo-8.json").read_text() == '{"kind":"a","args":{"n":2}}\n'  # what is left, as JSON lines
    log.replay(8, {"a": lambda n: done.append(n)})
    assert done == [3, 1, 2] and log.jobs() == []


def test_an_older_pcoccs_log_ending_with_a_newline_keeps_every_record(tmp_path):
    """An old single-document log that ends with a newline used to get the next record appended
    after it, which made the whole file unreadable, and every object it named was leaked."""
    entries = [{"kind": "a", "args": {"n": 1}}, {"kind": "a", "args": {"n": 2}}]
    _old_format(tmp_path, 7, entries)
    with open(tmp_path / "undo-7.json", "a") as f:
        f.write("\n")
    log = UndoLog(str(tmp_path))
    log.record(7, "a", n=3)
    assert log.entries(7) == entries + [{"kind": "a", "args": {"n": 3}}]
    assert not (tmp_path / "undo-7.json").read_bytes().startswith(b"{\n")  # migrated to JSON lines


def test_a_log_appended_to_an_older_pcoccs_document_is_read_whole(tmp_path):
    """What the rule above prevents, when it is already on a node: the document, then lines."""
    entries = [{"kind": "a", "args": {"n": 1}}]
    _old_format(tmp_path, 8, entries)
    with open(tmp_path / "undo-8.json", "a") as f:
        f.write('\n{"kind":"a","args":{"n":2}}\n')
    done = []
    UndoLog(str(tmp_path)).replay(8, {"a": lambda n: done.append(n)})
    assert done == [2, 1] and not (tmp_path / "undo-8.json").exists()
