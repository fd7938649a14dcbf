import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

# Tiny tensors: one thread is faster than two fighting over a busy 2-core machine.
torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def _real_torchrun() -> bool:
    return torch.cuda.is_available() or os.environ.get("DAPO_TEST_REAL_TORCHRUN", "") not in ("", "0")


def run_torchrun(script, nproc, *args, timeout=300, env=None):
    """Run `script` on `nproc` local ranks (gloo on CPU) as torchrun --standalone would; fail the test with its
    output. On CPU the ranks are forked from a warm process (tests/helpers/forked.py: the same environment, without
    ~10 s of imports per rank); with CUDA, or DAPO_TEST_REAL_TORCHRUN=1, the real torchrun starts them."""
    if not _real_torchrun():
        from tests.helpers.forked import run_ranks

        rc, out, err = run_ranks(script, nproc, args, env=env, timeout=timeout)
        if rc != 0:
            pytest.fail(f"ranks of {script} failed (rc={rc}):\n{out[-4000:]}\n{err[-8000:]}")
        return out
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           str(script), *map(str, args)]
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), **(env or {})}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=full_env, cwd=REPO)
    if proc.returncode != 0:
        pytest.fail(f"torchrun {script} failed (rc={proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}")
    return proc.stdout


@pytest.fixture
def torchrun():
    return run_torchrun


@pytest.fixture
def shared_data():
    if not SHARED_DATA.is_dir():
        pytest.skip(f"{SHARED_DATA} not found (expected ../shared/data beside the repo)")
    return SHARED_DATA
