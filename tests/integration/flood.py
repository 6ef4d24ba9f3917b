"""Another user's flood of a VM's control endpoint (issue 12, section 4; repro r02): hundreds of
idle TCP connections, held open without a word of TLS, for the cross-user tests of one host
(test_cross_user.py) and of the SLURM test cluster (test_slurm_cross_user.py)."""

import contextlib
import os
import signal
import subprocess

from pcocc.agent.endpoint import MAX_PENDING

HOLD = 300  # connections held: well over the endpoint's MAX_PENDING unauthenticated ones

SCRIPT = """
import socket, sys
host, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
held = []
for _ in range(n):
    try:
        s = socket.create_connection((host, port), timeout=5)
        held.append(s)
    except OSError:
        pass
print(len(held), flush=True)
sys.stdin.read()  # hold them until the test closes our stdin
"""


@contextlib.contextmanager
def flooding(user, host, port, prefix=(), n=HOLD):
    """Hold n connections to host:port as user (run under the argv prefix, e.g. a node's
    namespaces) while the with-block runs. Asserts that more than MAX_PENDING were made (else
    the flood would test nothing); stopped by its process group, whatever happens."""
    p = subprocess.Popen([*prefix, "runuser", "-u", user, "--", "python3", "-c", SCRIPT, host, str(port), str(n)],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, start_new_session=True)
    try:
        made = p.stdout.readline().strip()
        assert made.isdigit() and int(made) > MAX_PENDING, f"the flood made {made or 'no'} connections"
        yield int(made)
    finally:
        p.stdin.close()
        try:
            p.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
        p.stdout.close()
