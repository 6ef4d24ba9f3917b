"""Where cluster state lives in the store (one place for the key layout).

(The local backend's reservations of a host's cores and memory are not in the
store, which is per user there, but in files every user reads: batch/hostres.py.)

/pcocc/users/<user>/next-jobid                 local backend job counter
/pcocc/users/<user>/clusters/<jobid>/info      definition, owner, state; local backend: supervisor and holder (pid + start)
/pcocc/users/<user>/clusters/<jobid>/ca        the cluster CA (cert and key)
/pcocc/users/<user>/clusters/<jobid>/client    the owner's client credential
/pcocc/users/<user>/clusters/<jobid>/vms/<n>   one VM: state, host, control address
/pcocc/users/<user>/clusters/<jobid>/nodes/<host>  one node's setup: state, objects (written by root)
/pcocc/users/<user>/history/<jobid>            how an ended cluster ended (pcocc.history: sacct-like; pruned at write)
/pcocc/users/<user>/mmp/<hash of a drive path>  who holds a persistent drive (lifecycle.drives: mmp)
/pcocc/global/pools/<name>/<id>                one taken id of a cluster-wide pool (VXLAN ids, ...), root only
/pcocc/global/pool-owners/<name>/<owner>       the ids an owner holds in that pool (written with them)
/pcocc/global/pool-sweeps/<name>               when the pool was last swept of dead owners (allocator)
/pcocc/global/opensm/pkeys/<0xPKEY>/<host>     one node's members of an InfiniBand partition (for pkeyd), root only
"""


def user_prefix(user):
    return f"/pcocc/users/{user}/"


def cluster_prefix(user, jobid):
    return f"/pcocc/users/{user}/clusters/{jobid}/"


def clusters_prefix(user):
    return f"/pcocc/users/{user}/clusters/"


def vm_key(user, jobid, rank):
    return f"{cluster_prefix(user, jobid)}vms/{rank}"


def history_prefix(user):
    return f"/pcocc/users/{user}/history/"


def history_key(user, jobid):
    return f"{history_prefix(user)}{jobid}"


def ended_key(user, jobid):
    """The record of an ended cluster: its history record (kept for its waiters and for `pcocc history`)."""
    return history_key(user, jobid)


def nodes_prefix(user, jobid):
    return f"{cluster_prefix(user, jobid)}nodes/"


def node_key(user, jobid, host):
    return f"{nodes_prefix(user, jobid)}{host}"


def peers_prefix(user, jobid):
    """The job's nodes' tunnel endpoints, apart from their records (node_key: state, objects,
    timings), so that a node waiting for its peers reads a few bytes per peer, not each
    peer's whole record: O(H) bytes per node, not O(H x objects) (jobnet.wait_peers)."""
    return f"{cluster_prefix(user, jobid)}peers/"


def peer_key(user, jobid, host):
    return f"{peers_prefix(user, jobid)}{host}"


def pool_key(name):
    return f"/pcocc/global/pools/{name}"


def pkey_members_prefix():
    return "/pcocc/global/opensm/pkeys/"


def pkey_member_key(pkey, host):
    """pkey: its hex form, 0x2000."""
    return f"{pkey_members_prefix()}{pkey}/{host}"
