"""Fresh processes for the tests without paying the imports each time: `dapo-megatron ...` calls and torchrun-style
rank groups, forked from one warm server process.

A test must see what a user sees: the exit code and output of processes of their own. But every new process pays
~10 s of CPU for its imports (megatron-core 6 s, torch 2.5 s, transformers 1.5 s) before our code runs, and a
4-rank launch pays it four times. So one server process imports all of that once, and each call is a fork of it:

- `run_cli(args)`: one child runs `dapo_megatron.cli.main(args)`, as `python -m dapo_megatron.cli ARGS` would.
- `run_ranks(script, nproc, args)`: a leader child forks `nproc` ranks with the environment torchrun gives them
  (RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT, ...) and runs the script as
  `__main__` in each; when one rank fails, the others are killed, as torchrun does.

Each call has its own environment, working folder and output files, and its own session: whatever it leaves behind
(verifier pools, engines, torchrun ranks) is killed with its process group when it ends. Every wait is bounded: the
call's processes get SIGALRM after `timeout` seconds, and the client gives up 60 s after that.

Where CUDA is present, or with DAPO_TEST_REAL_TORCHRUN=1, tests/conftest.py uses the real torchrun instead.
"""
import atexit
import json
import os
import select
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


# ----------------------------------------------------------------------------------------------- server side
def _redirect(job) -> None:
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    for fd, path in ((1, job["out"]), (2, job["err"])):
        if fd == 2 and path == job["out"]:
            os.dup2(1, 2)  # one log for both streams
            continue
        f = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)  # ranks append side by side
        os.dup2(f, fd)
        os.close(f)


def _exit_code(call) -> int:
    """Run `call()` the way the interpreter runs a program: its exit status, a traceback for an uncaught error."""
    import traceback

    try:
        call()
        return 0
    except SystemExit as e:
        if e.code is None or isinstance(e.code, int):
            return e.code or 0
        print(e.code, file=sys.stderr)
        return 1
    except BaseException:
        traceback.print_exc()
        return 1
    finally:
        sys.stdout.flush()
        sys.stderr.flush()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank(job, rank: int, port: int) -> None:
    import runpy

    n = job["nproc"]
    os.environ.update({"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(n), "LOCAL_WORLD_SIZE": str(n),
                       "GROUP_RANK": "0", "GROUP_WORLD_SIZE": "1", "ROLE_RANK": str(rank), "ROLE_WORLD_SIZE": str(n),
                       "ROLE_NAME": "default", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
                       "TORCHELASTIC_RESTART_COUNT": "0", "TORCHELASTIC_MAX_RESTARTS": "0",
                       "TORCHELASTIC_RUN_ID": f"forked-{os.getppid()}"})
    import signal

    signal.alarm(int(job["timeout"]))  # a fork does not inherit the leader's alarm
    script = job["script"]
    sys.argv = [script, *job["args"]]
    sys.path.insert(0, os.path.dirname(os.path.abspath(script)))  # as `python script.py` sets it
    os._exit(_exit_code(lambda: runpy.run_path(script, run_name="__main__")))


def _leader(job) -> int:
    """The rank group: fork every rank, wait; the first failure kills the rest and is the group's exit code."""
    import signal

    port = _free_port()
    pids = []
    for rank in range(job["nproc"]):
        pid = os.fork()
        if pid == 0:
            _rank(job, rank, port)
        pids.append(pid)
    code = 0
    while pids:
        pid, status = os.wait()
        pids.remove(pid)
        rc = os.waitstatus_to_exitcode(status)
        if rc != 0 and code == 0:
            code = rc if rc > 0 else 1
            for other in pids:
                try:
                    os.kill(other, signal.SIGKILL)
                except ProcessLookupError:
                    pass
    return code


def _serve() -> None:
    import signal

    # what the tests' processes import, once: megatron-core, torch, transformers, our package
    import dapo_megatron.cli as cli
    import dapo_megatron.config  # noqa: F401
    import dapo_megatron.models.convert  # noqa: F401
    import dapo_megatron.placement  # noqa: F401
    import dapo_megatron.preflight  # noqa: F401
    import dapo_megatron.train.loop  # noqa: F401
    import torch.distributed.run  # noqa: F401

    for line in sys.stdin:
        job = json.loads(line)
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                os.setsid()  # its own session and process group: what it leaves behind is killed with it
                _redirect(job)
                os.environ.clear()
                os.environ.update(job["env"])
                os.chdir(job["cwd"])
                signal.alarm(int(job["timeout"]))
                if job["kind"] == "cli":
                    sys.argv = ["dapo-megatron", *job["args"]]
                    code = _exit_code(lambda: cli.main(job["args"]))
                else:
                    code = _leader(job)
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        try:
            os.killpg(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        print(json.dumps({"rc": os.waitstatus_to_exitcode(status)}), flush=True)


# ----------------------------------------------------------------------------------------------- client side
class _Client:
    def __init__(self):
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
        self.proc = subprocess.Popen([sys.executable, __file__], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True, env=env, cwd=REPO)
        self.tmp = tempfile.mkdtemp(prefix="forked_")
        self.n = 0
        atexit.register(self.close)

    def run(self, job: dict, timeout: float, log=None):
        self.n += 1
        out, err = Path(self.tmp, f"{self.n}.out"), Path(self.tmp, f"{self.n}.err")
        if log is not None:  # stdout and stderr interleaved in one file, as `cmd > log 2>&1`
            out = err = Path(log)
        for f in (out, err):
            f.write_text("")
        job = {**job, "timeout": timeout, "out": str(out), "err": str(err)}
        self.proc.stdin.write(json.dumps(job) + "\n")
        self.proc.stdin.flush()
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout + 60)
        what = " ".join([job.get("script", "dapo-megatron"), *job["args"]])[:200]
        if not ready:
            raise TimeoutError(f"{what}: no exit status after {timeout + 60} s")
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the test fork server died (rc={self.proc.poll()}) running {what}")
        rc = json.loads(line)["rc"]
        text = out.read_text(errors="replace")
        return rc, text, "" if log is not None else err.read_text(errors="replace")

    def close(self):
        if self.proc.poll() is None:
            self.proc.stdin.close()
            self.proc.wait(timeout=30)


_client = None


def _call(job, env, timeout, log=None):
    global _client
    if _client is None or _client.proc.poll() is not None:
        _client = _Client()
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), **(env or {})}
    return _client.run({**job, "env": full_env}, timeout, log)


def run_cli(args, env=None, cwd=REPO, timeout=300, log=None):
    """(exit code, stdout, stderr) of `dapo-megatron ARGS` run as its own (forked) process; with `log`, both
    streams go to that file and come back as stdout. A SIGKILLed call returns -9, as subprocess does."""
    return _call({"kind": "cli", "args": [str(a) for a in args], "cwd": str(cwd)}, env, timeout, log)


def run_ranks(script, nproc: int, args=(), env=None, cwd=REPO, timeout=300):
    """(exit code, stdout, stderr) of `torchrun --standalone --nproc_per_node=NPROC SCRIPT ARGS`, ranks forked."""
    return _call({"kind": "ranks", "script": str(script), "nproc": int(nproc), "args": [str(a) for a in args],
                  "cwd": str(cwd)}, env, timeout)


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    _serve()
