"""Progress on stderr: a one-line bar shown only on a terminal (image import, export), and a
cluster's start (pcocc.phases.start_line: a live line on a terminal, log lines elsewhere)."""

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


def start_progress(app, prefix, fetch=None, until="running", interval=0.5):
    """pcocc.phases.start_line() on the CLI's stderr: a live line on a terminal, else log
    lines (app.info); nothing with -q. A context manager yielding the progress callback."""
    if app.verbosity < 0:
        return contextlib.nullcontext(lambda running=None, total=None, vms=None: None)
    from pcocc.phases import start_line

    return start_line(app.env.stderr, prefix, app.info, tty=app.env.stderr_is_tty(), fetch=fetch, until=until,
                      interval=interval)
