"""Test modules are imported by their basename (pytest's default import mode, rootdir-relative
sys.path): two test files of one name in tests/unit and tests/integration make the second one an
import error when the whole suite runs, and pass when each directory runs alone."""

from collections import Counter
from pathlib import Path

TESTS = Path(__file__).resolve().parent.parent


def test_every_test_module_name_is_unique():
    names = Counter(p.name for p in TESTS.rglob("test_*.py") if "__pycache__" not in p.parts)
    assert [n for n, c in names.items() if c > 1] == []
