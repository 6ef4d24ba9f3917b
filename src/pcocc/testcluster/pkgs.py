"""The Debian packages the test cluster needs: checked at `up`, installed when missing.

`scripts/setup --test` (run by `scripts/test`) installs all of them, and every other
package a test uses, before any test runs: this is the fallback of a stand-alone
`pcocc-testcluster up`, not the test suite's installer. Every name here must be in
scripts/setup's lists (tests/unit/test_install_scan.py checks it).
"""

import os
import subprocess
from pathlib import Path

from pcocc.errors import CommandError
from pcocc.runner import run

PACKAGES = [
    "slurmctld", "slurmd", "slurm-client", "munge", "libslurm-dev", "gcc", "libc6-dev",
    "etcd-server", "etcd-client", "iproute2", "util-linux", "passwd",
]
OVS_PACKAGES = ["openvswitch-switch", "ethtool"]
POLICY = Path("/usr/sbin/policy-rc.d")


def installed(pkgs):
    """The subset of pkgs (names) that is installed (one dpkg-query for all)."""
    # dpkg -s also succeeds for removed packages that left config files behind
    proc = subprocess.run(["dpkg-query", "-W", "-f=${Package} ${db:Status-Status}\n", *pkgs],
                          capture_output=True, text=True)
    return {line.split()[0].split(":")[0] for line in proc.stdout.splitlines() if line.endswith(" installed")}


def missing(ovs=True):
    """The package names of PACKAGES (and OVS_PACKAGES with ovs) that are not installed."""
    wanted = PACKAGES + (OVS_PACKAGES if ovs else [])
    have = installed(wanted)
    return [p for p in wanted if p not in have]


def ensure(ovs=True, log=print):
    """apt-get install what is missing (as root, no daemon started); returns the list installed.

    Raises CommandError when apt-get fails or a package is still missing after it.
    """
    need = missing(ovs)
    if not need:
        return []
    log(f"installing {' '.join(need)}")
    ours = not os.path.lexists(POLICY)
    if ours:  # keeps maintainer scripts from starting the daemons
        POLICY.write_text("#!/bin/sh\nexit 101\n")
        POLICY.chmod(0o755)
    try:
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        run(["apt-get", "update", "-q"], env=env, timeout=600)
        run(["apt-get", "install", "-y", "-q", "--no-install-recommends", *need], env=env, timeout=1800)
    finally:
        if ours:
            POLICY.unlink(missing_ok=True)
    still = missing(ovs)
    if still:
        raise CommandError(["apt-get", "install", *still], 0, "still not installed: " + " ".join(still) + " (scripts/setup --test installs them)")
    return need
