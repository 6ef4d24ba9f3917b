"""pcocc ssh/scp: the VM port option (-p, -P) is taken out of the tool's arguments, whatever
the spelling, and nothing after the destination is touched (it is the remote command)."""

import pytest

from pcocc.cli.remote import _nc_split, _vm_port_option
from pcocc.errors import UsageError


@pytest.mark.parametrize("args, rest, port", [
    (["-p", "22", "vm0"], ["vm0"], 22),
    (["-p22", "vm0"], ["vm0"], 22),
    (["-vp", "22", "vm0"], ["-v", "vm0"], 22),
    (["-vp22", "vm0"], ["-v", "vm0"], 22),
    (["-o", "Port=9", "-p", "22", "vm0"], ["-o", "Port=9", "vm0"], 22),  # -o's value is not the destination
    (["-i", "key", "root@vm0", "ls", "-p", "1"], ["-i", "key", "root@vm0", "ls", "-p", "1"], None),
    (["vm0", "-p", "22"], ["vm0", "-p", "22"], None),  # after the destination: the remote command's
    (["--", "-p", "22"], ["--", "-p", "22"], None),
])
def test_ssh_p_is_the_vms_port(args, rest, port):
    assert _vm_port_option(args, "p") == (rest, port)


def test_scp_P_and_bad_ports():
    assert _vm_port_option(["-P", "22", "-r", "d", "vm0:/x"], "P") == (["-r", "d", "vm0:/x"], 22)
    for bad in ("0", "65536", "x", "２２"):
        with pytest.raises(UsageError):
            _vm_port_option(["-p", bad, "vm0"], "p")


def test_nc_options_go_to_nc_and_the_rest_is_vm_and_port():
    assert _nc_split(["-w", "5", "-v", "vm0", "22"]) == (["-w", "5", "-v"], ["vm0", "22"])
    assert _nc_split(["vm0"]) == ([], ["vm0"])


def test_records_that_would_inject_ssh_options_are_not_used():
    """Node records sit in a prefix a user may write: a newline in an address would add any
    ssh_config line (a ProxyCommand run by whoever uses the config)."""
    from pcocc.lifecycle.remote import port_map

    def info(address, host_port=40022):
        return {"jobid": 1, "nodes": {"n1": {"objects": {"net": {"address": address, "vm_port": 22,
                                                                  "vms": {"0": {"host_port": host_port}}}}}}}

    vms = [{"rank": 0, "host": "n1", "state": "running"}]
    assert port_map(info("10.0.0.1"), vms) == {0: ("10.0.0.1", 40022, 22)}
    assert port_map(info("10.0.0.1\n  ProxyCommand sh -c id"), vms) == {}
    assert port_map(info("10.0.0.1", "40022\nProxyCommand id"), vms) == {}
    assert port_map(info("10.0.0.1", 70000), vms) == {}
