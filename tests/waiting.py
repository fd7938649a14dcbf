"""Bounded waits for tests: every wait names what it waited for and fails after `timeout_s`, never hangs."""
import asyncio
import time


def wait_until(predicate, what: str, timeout_s: float = 60.0, interval_s: float = 0.01):
    """Poll `predicate()` until true; AssertionError naming `what` after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:.0f}s waiting for {what}")
        time.sleep(interval_s)


async def async_wait_until(predicate, what: str, timeout_s: float = 60.0, interval_s: float = 0.02):
    """`wait_until` for an async predicate, inside an event loop."""
    deadline = time.monotonic() + timeout_s
    while not await predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:.0f}s waiting for {what}")
        await asyncio.sleep(interval_s)


def held(engine, timeout_s: float = 60.0):
    """Wait until the steps that `engine.hold(steps)` allowed are spent (requests in flight stay where they are)."""
    if not engine.wait_held(timeout_s):
        raise AssertionError(f"timed out after {timeout_s:.0f}s waiting for the engine to spend the steps its hold "
                             "allowed")


def result(future, what: str, timeout_s: float = 60.0):
    """`future.result()` with a bound; AssertionError naming `what` if it takes longer."""
    import concurrent.futures

    try:
        return future.result(timeout=timeout_s)
    except concurrent.futures.TimeoutError:
        raise AssertionError(f"timed out after {timeout_s:.0f}s waiting for {what}") from None
