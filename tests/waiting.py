"""Waiting in tests: for a condition, with a deadline and a message that says what never came."""

import time


def wait_for(predicate, timeout=120, what="condition", interval=0.2):
    """The first true value of predicate(), polled until timeout seconds; else AssertionError."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out waiting for {what}")
