"""Typed configuration objects, built once by the loader."""

from dataclasses import dataclass, field


@dataclass(frozen=True)
class BatchConfig:
    type: str  # "local" or "slurm"
    settings: dict
    file: str = ""

    @property
    def store(self):
        return self.settings["store"]


@dataclass(frozen=True)
class Network:
    name: str
    type: str  # canonical type name
    settings: dict
    file: str = ""
    line: int = 0


@dataclass(frozen=True)
class ResourceSet:
    name: str
    networks: tuple
    default: bool = False
    file: str = ""
    line: int = 0


@dataclass(frozen=True)
class Repo:
    name: str
    path: str  # expanded
    scope: str  # "user" or "system"
    file: str = ""
    line: int = 0


@dataclass
class Config:
    system_dir: str
    user_dir: str
    batch: BatchConfig
    networks: dict = field(default_factory=dict)  # name -> Network
    resources: dict = field(default_factory=dict)  # name -> ResourceSet
    templates: object = None  # pcocc.templates.TemplateSet
    repos: list = field(default_factory=list)  # [Repo], highest priority first
    files: list = field(default_factory=list)  # the files actually read
    warnings: list = field(default_factory=list)  # "file:line: what" of what was accepted with a warning
