"""A one-line progress bar on stderr, shown only when stderr is a terminal."""

import contextlib


@contextlib.contextmanager
def progress_bar(app, label):
    """Yield a callback progress(percent), or None when no bar should be drawn."""
    if app.verbosity < 0 or not app.env.stderr_is_tty():
        yield None
        return
    err = app.env.stderr
    last = [-1]

    def update(percent):
        p = int(percent)
        if p != last[0]:
            last[0] = p
            filled = p * 30 // 100
            err.write(f"\r{label} [{'#' * filled}{'.' * (30 - filled)}] {p:3d}%")
            err.flush()

    try:
        yield update
    finally:
        if last[0] >= 0:
            err.write("\n")
            err.flush()
