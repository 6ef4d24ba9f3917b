"""Fixtures shared by every test."""

import pytest

from cli_helpers import Cli


@pytest.fixture
def cli(tmp_path):
    return Cli(tmp_path)


def pytest_collection_finish(session):
    """Tests that share host state run in one xdist group: fail early if the grouping is lost."""
    if not getattr(session.config.option, "loadgroup", False):  # set on xdist workers with --dist loadgroup
        return
    grouped = [item for item in session.items if item.get_closest_marker("xdist_group")]
    if grouped and "@" not in grouped[0].nodeid:
        raise pytest.UsageError("pytest-xdist did not group the tests marked xdist_group (a pytest it does not support?): "
                                "tests sharing host state would run at once")
