"""A real multi-node test cluster on one machine: munge, etcd, SLURM nodes in network
namespaces, Open vSwitch per node, and the pcocc SPANK plugin.

    from pcocc.testcluster import TestCluster
    with TestCluster("/tmp/tc", nodes=2) as tc:
        tc.run(["srun", "-N2", "hostname"], user=tc.add_user().pw_name)

Command line: pcocc-testcluster up|down|status|env.
"""

from pcocc.testcluster.cluster import DEFAULT_BASE, TestCluster

__all__ = ["DEFAULT_BASE", "TestCluster"]
