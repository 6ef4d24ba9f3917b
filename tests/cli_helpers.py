"""Run the pcocc CLI in-process against a given config (helpers for tests)."""

import io
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from pcocc.cli.core import run
from pcocc.env import Environment

FIXTURES = Path(__file__).parent / "fixtures"


@dataclass
class Result:
    status: int
    stdout: str
    stderr: str

    @property
    def json(self):
        return json.loads(self.stdout)


class Cli:
    """Runs `pcocc ARGS` in-process with its own config dirs, home and streams."""

    def __init__(self, root):
        self.root = Path(root)
        self.system = self.root / "etc"
        self.user = self.root / "user"
        self.home = self.root / "home"
        for d in (self.system, self.user, self.home):
            d.mkdir(parents=True, exist_ok=True)
        self.environ = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": str(self.home),
            "USER": "tester",
            "PCOCC_SYSTEM_CONF_DIR": str(self.system),
            "PCOCC_USER_CONF_DIR": str(self.user),
        }

    def write(self, relpath, text):
        path = self.root / relpath
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        return path

    def use_fixture(self, name):
        src = FIXTURES / name
        shutil.copytree(src / "etc", self.system, dirs_exist_ok=True)
        shutil.copytree(src / "user", self.user, dirs_exist_ok=True)

    def env(self):
        return Environment(stdout=io.StringIO(), stderr=io.StringIO(), environ=dict(self.environ), user="tester", home=str(self.home))

    def __call__(self, *argv):
        env = self.env()
        status = run([str(a) for a in argv], env)
        return Result(int(status), env.stdout.getvalue(), env.stderr.getvalue())
