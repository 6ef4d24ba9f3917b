"""Where cluster state lives in the store (one place for the key layout).

/pcocc/users/<user>/next-jobid                 local backend job counter
/pcocc/users/<user>/clusters/<jobid>/info      definition, owner, supervisor, state
/pcocc/users/<user>/clusters/<jobid>/ca        the cluster CA (cert and key)
/pcocc/users/<user>/clusters/<jobid>/client    the owner's client credential
/pcocc/users/<user>/clusters/<jobid>/vms/<n>   one VM: state, host, control address
/pcocc/hosts/<host>/reservations/<jobid>       cores and memory a job holds on a host
"""


def user_prefix(user):
    return f"/pcocc/users/{user}/"


def cluster_prefix(user, jobid):
    return f"/pcocc/users/{user}/clusters/{jobid}/"


def clusters_prefix(user):
    return f"/pcocc/users/{user}/clusters/"


def vm_key(user, jobid, rank):
    return f"{cluster_prefix(user, jobid)}vms/{rank}"


def reservations_prefix(host):
    return f"/pcocc/hosts/{host}/reservations/"
