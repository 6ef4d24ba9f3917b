"""The tests run with SIGINT at Python's default, even when pytest was started as a background
job of a shell without job control, which ignores it (tests/conftest.py:pytest_configure)."""

import signal
import subprocess
import sys
from pathlib import Path

TOP_CONFTEST = Path(__file__).resolve().parents[1] / "conftest.py"


def test_pytest_configure_gives_an_ignored_sigint_back(pytestconfig):
    # the loaded tests/conftest.py (a plain `import conftest` may find tests/integration's)
    (conftest,) = [p for p in pytestconfig.pluginmanager.get_plugins()
                   if getattr(p, "__file__", None) and Path(p.__file__).resolve() == TOP_CONFTEST]
    before = signal.signal(signal.SIGINT, signal.SIG_IGN)  # as a background job of sh -c starts us
    try:
        conftest.pytest_configure(None)
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGINT, before)


def test_this_process_and_its_children_get_sigint():
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    child = subprocess.run([sys.executable, "-c", "import signal; print(signal.getsignal(signal.SIGINT))"],
                           capture_output=True, text=True, check=True)
    assert child.stdout.strip() == "<built-in function default_int_handler>"
