"""Batch backends: how a virtual cluster gets its hosts, cores and memory.

Each backend registers under the `type` of batch.yaml; an unknown type is a
config error caught by the loader.
"""

from pcocc.errors import NotAvailableError

_BACKENDS = {"local": ("pcocc.batch.local", "LocalBackend"), "slurm": ("pcocc.batch.slurm", "SlurmBackend")}


def get_backend(ctx):
    kind = ctx.config.batch.type
    if kind not in _BACKENDS:
        raise NotAvailableError(f"the '{kind}' batch backend is not available yet (use type: local in batch.yaml)")
    import importlib

    module, cls = _BACKENDS[kind]
    return getattr(importlib.import_module(module), cls)(ctx)
