"""Fixtures shared by the integration tests."""

import os
import time
from pathlib import Path

import pytest


def image_cache_dir():
    """Where the test images are cached: $PCOCC_TEST_CACHE or ~/.cache/pcocc/test-images."""
    return Path(os.environ.get("PCOCC_TEST_CACHE") or Path.home() / ".cache" / "pcocc" / "test-images")


@pytest.fixture(scope="session")
def tiny_image():
    """The BuiltImage of the tiny recipe, built once per machine (about 40 s) and cached."""
    from pcocc.images.build import build_image

    started = time.monotonic()
    image = build_image("tiny", None, image_cache_dir(), log=lambda line: print(line, flush=True))
    print(f"tiny image {'from the cache' if image.cached else 'built'} in {time.monotonic() - started:.1f} s: {image.disk}")
    return image
