"""Compatibility with real cloud-init: the debian image (systemd, cloud-init from Debian)
configured by pcocc's NoCloud seed, on the local backend. Slow under TCG (a minute or two)."""

import subprocess

import pytest

from local_site import LocalSite

pytestmark = pytest.mark.integration


def test_real_cloud_init_applies_the_seed(tmp_path, debian_image):
    site = LocalSite(tmp_path, debian_image, name="debian")
    try:
        (site.home / ".ssh").mkdir()
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(site.home / ".ssh/id_ed25519")], check=True)
        site.write("ud.yaml", "#cloud-config\nlocale: false\nruncmd:\n  - echo ran > /root/runcmd-marker\n"
                   "write_files:\n  - path: /etc/pcocc-compat\n    content: from user-data\n")
        site.write(".pcocc/templates.yaml", f"debian:\n  image: user:debian\n  user-data: {site.home}/ud.yaml\n")
        r = site.pcocc("batch", "-c", "2", "-m", "256", "--wait", "debian:1", timeout=900)
        assert r.returncode == 0, r.stderr
        r = site.pcocc("exec", "cloud-init status --wait >/dev/null; cloud-init status; hostname; cat /root/runcmd-marker /etc/pcocc-compat",
                       timeout=600)
        assert r.returncode == 0, r.stdout + r.stderr
        assert "status: done" in r.stdout
        assert "\nvm0\n" in r.stdout and "ran\n" in r.stdout and "from user-data" in r.stdout
        key = (site.home / ".ssh/id_ed25519.pub").read_text().split()[1]
        r = site.pcocc("exec", "cat /root/.ssh/authorized_keys")
        assert key in r.stdout, r.stdout  # meta-data public-keys, as NoCloud defines them
    finally:
        site.cleanup()
