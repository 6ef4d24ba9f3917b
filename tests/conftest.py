"""Fixtures shared by every test."""

import signal
import threading
import warnings

import pytest

from cli_helpers import Cli


@pytest.fixture
def cli(tmp_path):
    return Cli(tmp_path)


def pytest_configure(config):
    """A shell without job control starts a background command (`scripts/test &`, a script's
    `cmd &`) with SIGINT ignored, and every process it starts inherits that (signal(7)); a
    shell cannot undo it (bash(1): signals ignored on entry). The Ctrl-C tests would then test
    nothing, or fail: here the tests, and what they start, get SIGINT as a terminal's job does.
    (This was why pcocc never saw its SIGINT in two under-load runs started so, 2026-11-30.)"""
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


def pytest_collection_finish(session):
    """Tests that share host state run in one xdist group: fail early if the grouping is lost."""
    if not getattr(session.config.option, "loadgroup", False):  # set on xdist workers with --dist loadgroup
        return
    grouped = [item for item in session.items if item.get_closest_marker("xdist_group")]
    if grouped and "@" not in grouped[0].nodeid:
        raise pytest.UsageError("pytest-xdist did not group the tests marked xdist_group (a pytest it does not support?): "
                                "tests sharing host state would run at once")


@pytest.fixture(autouse=True)
def _sigint_left_as_found(request):
    """After each test, SIGINT is neither ignored nor blocked in this worker: a process it starts
    inherits both (signal(7)), and the Ctrl-C tests twice saw pcocc miss its SIGINT under load
    (test-under-load, 2026-11-30: started in the background, see pytest_configure). One that
    is is put back, and the test that left it named."""
    yield
    if threading.current_thread() is not threading.main_thread():
        return
    ignored = signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    blocked = signal.SIGINT in signal.pthread_sigmask(signal.SIG_BLOCK, [])
    if ignored or blocked:
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
        warnings.warn(f"{request.node.nodeid} left SIGINT {'ignored' if ignored else 'blocked'} in the test process: put back")
