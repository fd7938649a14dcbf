"""One line for a user error, shared by every command (the CLI and the converters). Imports nothing of the package,
so the lowest layers can print in the CLI's style."""
import errno


def describe(e: BaseException) -> str:
    """One line for a user error: what failed and, where the message does not say it, the fix."""
    if isinstance(e, OSError) and e.errno == errno.ENOSPC:
        where = f" writing {e.filename}" if e.filename else ""
        return (f"disk error: disk full{where}: free space or write elsewhere (trainer.run_dir / trainer.save), then "
                "resume")
    if isinstance(e, OSError) and not isinstance(e, ConnectionError) and e.filename:
        return f"file error: {e.strerror or e}: {e.filename}"
    if isinstance(e, ConnectionError) or type(e).__module__.startswith("aiohttp"):
        return f"rollout server error: server unreachable ({e}); check rollout.urls and that the server is up"
    if type(e).__name__.startswith("Rollout"):
        text = " ".join(str(e).split())
        return (f"rollout server error: {text[:300]}{' ...' if len(text) > 300 else ''}; check rollout.urls and that "
                "the server is up")
    kind = {"ConfigError": "config error", "DataError": "data error", "CheckpointError": "checkpoint error",
            "CheckpointDamaged": "checkpoint error", "UnsupportedModelError": "model error",
            "PlacementError": "placement error", "MemoryPlanError": "memory error", "UsageError": "usage error"}
    label = kind.get(type(e).__name__, "file error" if isinstance(e, OSError) else "error")
    return f"{label}: {' '.join(str(e).split())}"
