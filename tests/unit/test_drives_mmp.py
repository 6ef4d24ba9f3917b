"""Multi-mount protection of persistent drives (lifecycle.drives): pcocc-templates.yaml(5) mmp."""

import pytest

from pcocc.errors import PcoccError
from pcocc.lifecycle import drives
from pcocc.store.sqlite import SqliteStore


@pytest.fixture
def store(tmp_path):
    s = SqliteStore(str(tmp_path / "state.db"))
    yield s
    s.close()


def alive(*jobs):
    return lambda jobid: jobid in jobs


def test_yes_allows_one_attachment_even_within_a_cluster(store, tmp_path):
    disk = str(tmp_path / "d.raw")
    assert drives.take(store, "u", 1, 0, [(disk, True)], alive(1)) == [disk]
    with pytest.raises(PcoccError, match="already attached to vm0 of this cluster"):
        drives.take(store, "u", 1, 1, [(disk, "yes")], alive(1))
    with pytest.raises(PcoccError, match="already attached to cluster 1"):
        drives.take(store, "u", 2, 0, [(disk, True)], alive(1, 2))


def test_cluster_shares_between_the_vms_of_one_cluster_only(store, tmp_path):
    disk = str(tmp_path / "d.raw")
    drives.take(store, "u", 1, 0, [(disk, "cluster")], alive(1))
    drives.take(store, "u", 1, 1, [(disk, "cluster")], alive(1))
    with pytest.raises(PcoccError, match="cluster 1"):
        drives.take(store, "u", 2, 0, [(disk, "cluster")], alive(1, 2))
    drives.release(store, "u", 1, 0, [disk])
    assert store.get(drives.lock_key("u", disk))["ranks"] == [1]  # still held by vm1
    drives.release(store, "u", 1, 1, [disk])
    assert store.get(drives.lock_key("u", disk)) is None  # the last holder removes it
    drives.take(store, "u", 2, 0, [(disk, "cluster")], alive(2))


def test_a_dead_clusters_lock_is_taken_over_and_no_drive_is_unprotected(store, tmp_path):
    disk = str(tmp_path / "d.raw")
    drives.take(store, "u", 1, 0, [(disk, True)], alive(1))
    # cluster 1 died without giving it back (SIGKILL): its owner is gone
    assert drives.take(store, "u", 2, 0, [(disk, True)], alive(2)) == [disk]
    assert store.get(drives.lock_key("u", disk))["jobid"] == 2
    drives.release(store, "u", 1, 0, [disk])  # the late release of the dead one leaves it alone
    assert store.get(drives.lock_key("u", disk))["jobid"] == 2
    drives.take(store, "u", 3, 0, [(disk, False)], alive(2, 3))  # mmp: no takes nothing


def test_a_refused_drive_gives_back_those_taken_before_it_and_links_are_one_drive(store, tmp_path):
    first, second = str(tmp_path / "a.raw"), str(tmp_path / "b.raw")
    (tmp_path / "b.raw").write_bytes(b"")
    (tmp_path / "link.raw").symlink_to(tmp_path / "b.raw")
    drives.take(store, "u", 1, 0, [(second, True)], alive(1))
    with pytest.raises(PcoccError, match="b.raw is already attached to cluster 1"):
        drives.take(store, "u", 2, 0, [(first, True), (str(tmp_path / "link.raw"), True)], alive(1, 2))
    assert store.get(drives.lock_key("u", first)) is None
