"""The one way pcocc runs an external command: logged, stderr captured, errors named."""

import logging
import shlex
import subprocess

from pcocc.errors import CommandError

log = logging.getLogger("pcocc.run")


def run(argv, *, check=True, input=None, timeout=None, env=None, cwd=None, capture=True):
    """Run argv and return the CompletedProcess (text mode).

    Raises CommandError when the command is missing or, with check, exits non-zero.
    """
    argv = [str(a) for a in argv]
    log.debug("run: %s", shlex.join(argv))
    try:
        proc = subprocess.run(
            argv,
            input=input,
            timeout=timeout,
            env=env,
            cwd=cwd,
            text=True,
            stdout=subprocess.PIPE if capture else None,
            stderr=subprocess.PIPE if capture else None,
        )
    except FileNotFoundError:
        raise CommandError(argv, 127, f"{argv[0]}: command not found") from None
    except subprocess.TimeoutExpired:
        raise CommandError(argv, -1, f"timed out after {timeout} s") from None
    if check and proc.returncode != 0:
        raise CommandError(argv, proc.returncode, proc.stderr or "")
    return proc


def stream(argv, on_chunk, *, env=None):
    """Run argv, passing its stdout to on_chunk(text) as it comes; stderr is captured.

    For long commands whose progress is read from their output (qemu-img -p).
    """
    argv = [str(a) for a in argv]
    log.debug("run: %s", shlex.join(argv))
    try:
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True, bufsize=1)
    except FileNotFoundError:
        raise CommandError(argv, 127, f"{argv[0]}: command not found") from None
    import threading

    err = []
    reader = threading.Thread(target=lambda: err.append(proc.stderr.read()), daemon=True)
    reader.start()
    try:
        while chunk := proc.stdout.read(64):
            on_chunk(chunk)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        reader.join()
    if proc.returncode != 0:
        raise CommandError(argv, proc.returncode, "".join(err))
