"""The trainer's bounded wait for engines it did not start (engine-only nodes, `dapo-megatron engines`)."""
import time
import urllib.error
import urllib.request

POLL_S = 0.5


def _get(url: str, path: str, api_key, timeout_s: float = 5.0):
    """The HTTP status of GET url+path with the key (None: nothing answered)."""
    req = urllib.request.Request(url + path, headers={"Authorization": f"Bearer {api_key}"} if api_key else {})
    try:
        with urllib.request.urlopen(req, timeout=timeout_s) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code
    except OSError:
        return None


def wait_for_engines(engines_urls: list, api_key, timeout_s: float) -> None:
    """Wait (at most `timeout_s` for all) until every (engine, URL) answers /health; else one line naming the first
    one that did not."""
    from ..config import ConfigError

    deadline = time.monotonic() + timeout_s
    for engine, url in engines_urls:
        while _get(url, "/health", api_key, timeout_s=max(0.1, min(5.0, deadline - time.monotonic()))) != 200:
            if time.monotonic() >= deadline:
                raise ConfigError(f"engine {engine.index} at {url} (node {engine.node}) did not answer /health within "
                                  f"{timeout_s:g} s (rollout.engine_wait_s): start it there with `dapo-megatron "
                                  f"engines` and check the node host list ($DAPO_NODE_HOSTS or SLURM's)")
            time.sleep(min(POLL_S, max(0.0, deadline - time.monotonic())))
        if _get(url, "/get_model_info", api_key, timeout_s=30.0) in (401, 403):  # /health asks for no key
            raise ConfigError(f"engine {engine.index} at {url} refuses this run's API key: set the same "
                              f"$DAPO_ROLLOUT_API_KEY (or rollout.api_key) for the trainer and `dapo-megatron engines`")
