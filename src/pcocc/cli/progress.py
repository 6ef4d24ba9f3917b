"""Progress on stderr: a one-line bar shown only on a terminal (image import, export), and a
cluster's start (pcocc.phases.start_line: a live line on a terminal, log lines elsewhere)."""

import contextlib


@contextlib.contextmanager
def progress_bar(app, label):
    """Yield a callback progress(percent) that draws click's progress bar on stderr, or None
    when no bar should be drawn (-q, or stderr is not a terminal)."""
    if app.verbosity < 0 or not app.env.stderr_is_tty():
        yield None
        return
    import click

    with click.progressbar(length=100, label=label, file=app.env.stderr, show_pos=False) as bar:
        done = 0

        def update(percent):
            nonlocal done
            p = max(0, min(100, int(percent)))
            if p > done:
                bar.update(p - done)
                done = p

        yield update


def start_progress(app, prefix, fetch=None, until="running", interval=0.5):
    """pcocc.phases.start_line() on the CLI's stderr: a live line on a terminal, else log
    lines (app.info); nothing with -q. A context manager yielding the progress callback."""
    if app.verbosity < 0:
        return contextlib.nullcontext(lambda running=None, total=None, vms=None: None)
    from pcocc.phases import start_line

    return start_line(app.env.stderr, prefix, app.info, tty=app.env.stderr_is_tty(), fetch=fetch, until=until,
                      interval=interval)
