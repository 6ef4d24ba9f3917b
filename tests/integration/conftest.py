"""Fixtures shared by the integration tests."""

import time

import pytest

from local_site import image_cache_dir
from slurm_fixture import slurm_user, testcluster  # noqa: F401 - one session-wide cluster for every module


@pytest.fixture(scope="session")
def tiny_image():
    """The BuiltImage of the tiny recipe, built once per machine (about 40 s) and cached."""
    from pcocc.images.build import build_image

    started = time.monotonic()
    image = build_image("tiny", None, image_cache_dir(), log=lambda line: print(line, flush=True))
    print(f"tiny image {'from the cache' if image.cached else 'built'} in {time.monotonic() - started:.1f} s: {image.disk}")
    return image


@pytest.fixture
def site(tmp_path, tiny_image):
    from local_site import LocalSite

    s = LocalSite(tmp_path, tiny_image)
    yield s
    s.cleanup()


@pytest.fixture(scope="session")
def debian_image():
    """The BuiltImage of the debian recipe (systemd, real cloud-init): about 2 minutes to build, then cached."""
    from pcocc.images.build import build_image

    return build_image("debian", None, image_cache_dir(), log=lambda line: print(line, flush=True))
