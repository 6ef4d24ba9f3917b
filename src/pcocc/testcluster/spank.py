"""Build the pcocc SPANK plugin (plugins/slurm/spank_pcocc.c) against Debian's libslurm-dev."""

import os
from pathlib import Path

from pcocc.errors import NotFoundError
from pcocc.runner import run

SOURCE_ENV = "PCOCC_SPANK_SOURCE"
HEADER = Path("/usr/include/slurm/spank.h")


def source():
    """The plugin's C source: $PCOCC_SPANK_SOURCE, or plugins/slurm/ of this checkout."""
    path = Path(os.environ.get(SOURCE_ENV) or Path(__file__).resolve().parents[3] / "plugins" / "slurm" / "spank_pcocc.c")
    if not path.is_file():
        raise NotFoundError(f"SPANK plugin source not found: {path}", hint=f"set {SOURCE_ENV} to plugins/slurm/spank_pcocc.c")
    return path


def build(out_dir):
    """Compile the plugin into out_dir/spank_pcocc.so (world-readable: srun loads it too)."""
    if not HEADER.exists():
        raise NotFoundError(f"{HEADER} is missing", hint="apt-get install libslurm-dev")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    out = out_dir / "spank_pcocc.so"
    tmp = out_dir / ".spank_pcocc.so.tmp"
    run(["gcc", "-shared", "-fPIC", "-O2", "-Wall", "-o", tmp, source()], timeout=120)
    tmp.chmod(0o755)
    os.replace(tmp, out)  # atomic: a running srun never sees a half-written file
    return out
