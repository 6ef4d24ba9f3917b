"""Fixtures shared by every test."""

import pytest

from cli_helpers import Cli


@pytest.fixture
def cli(tmp_path):
    return Cli(tmp_path)
