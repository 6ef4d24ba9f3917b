"""What the core needs from its caller: environment, configuration, store, images.

Built once per command by the CLI (or by a supervisor process), and passed
down; nothing reads globals.
"""

import socket


class Context:
    def __init__(self, env, config=None):
        self.env = env
        self._config = config
        self._store = None
        self.hostname = socket.gethostname().split(".")[0]
        self._control_host = env.environ.get("PCOCC_CONTROL_HOST")

    @property
    def config(self):
        """The configuration, loaded once. Invalid template files do not stop it (a warning; the
        templates raise their ConfigError when used: config.loader.load_config(strict=False)),
        so that ps, cancel, exec, console, ssh and image work with a broken templates.yaml."""
        if self._config is None:
            from pcocc.config.loader import load_config

            self._config = load_config(self.env, strict=False)
        return self._config

    @property
    def control_host(self):
        """The address VM control endpoints listen on: loopback on one host; with a
        shared store, this node's address on the network that reaches the store."""
        if self._control_host is None:
            self._control_host = "127.0.0.1"
            settings = self.config.batch.settings
            if self.config.batch.store == "etcd" and settings["etcd-servers"]:
                from urllib.parse import urlsplit

                from pcocc.store.etcd import endpoint_urls

                url = urlsplit(endpoint_urls(settings)[0])  # a host, host:port or URL, as the store reads it
                with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                    try:
                        s.connect((url.hostname, url.port or 2379))  # no packet is sent
                        self._control_host = s.getsockname()[0]
                    except (OSError, ValueError):
                        pass
        return self._control_host

    @property
    def store(self):
        if self._store is None:
            from pcocc.store import open_store

            self._store = open_store(self.config, self.env)
        return self._store

    def close_store(self):
        """Close the store connection: required before fork, as SQLite's per-process
        state (locks, shared memory) must not be inherited by a child."""
        if self._store is not None:
            self._store.close()
            self._store = None

    def reopen_store(self):
        self.close_store()
        return self.store

    def images(self):
        from pcocc.images.store import ImageStore

        return ImageStore(self.config.repos, self.env.user)

    def backend(self):
        from pcocc.batch import get_backend

        return get_backend(self)
