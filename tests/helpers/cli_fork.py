"""Run `dapo-megatron ...` as a fresh process per call, without paying the imports each time.

A CLI test must see what a user sees: the exit code, stdout and stderr of a process of its own. Starting
`python -m dapo_megatron.cli` costs seconds of imports (torch, megatron-core) before the first line of our code
runs, and the CLI tests make dozens of calls. So one server process imports the CLI once; each call is a fork of it
with its own environment, working folder and output files, and ends with the child's own exit status. Every wait is
bounded: the child is killed by SIGALRM after `timeout` seconds, and the client gives up `timeout + 60` s later.

    from tests.helpers.cli_fork import run_cli
    rc, out, err = run_cli(["train", "actor.lrr=1"], env={...})
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


def _serve() -> None:  # the server side: runs in its own process (python tests/helpers/cli_fork.py)
    import signal
    import traceback

    import dapo_megatron.cli as cli
    # the imports every command pays (torch, megatron-core, transformers), paid once here
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
        if pid == 0:  # the child: one CLI call, as `python -m dapo_megatron.cli ARGS` would run it
            code = 1
            try:
                os.setsid()  # its own session and process group: what it leaves behind is killed with it
                null = os.open(os.devnull, os.O_RDONLY)
                os.dup2(null, 0)
                os.close(null)
                for fd, path in ((1, job["out"]), (2, job["err"])):
                    if fd == 2 and path == job["out"]:
                        os.dup2(1, 2)  # one log for both streams
                        continue
                    f = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
                    os.dup2(f, fd)
                    os.close(f)
                os.environ.clear()
                os.environ.update(job["env"])
                os.chdir(job["cwd"])
                signal.alarm(int(job["timeout"]))
                sys.argv = ["dapo-megatron", *job["args"]]
                try:
                    cli.main(job["args"])
                    code = 0
                except SystemExit as e:
                    if e.code is None or isinstance(e.code, int):
                        code = e.code or 0
                    else:
                        print(e.code, file=sys.stderr)
                        code = 1
                except BaseException:  # what the interpreter does with an uncaught exception
                    traceback.print_exc()
                    code = 1
                sys.stdout.flush()
                sys.stderr.flush()
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        try:
            os.killpg(pid, signal.SIGKILL)  # whatever the call left behind (verifier pool, engines, torchrun ranks)
        except ProcessLookupError:
            pass
        print(json.dumps({"rc": os.waitstatus_to_exitcode(status)}), flush=True)


class _Client:
    def __init__(self):
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
        self.proc = subprocess.Popen([sys.executable, __file__], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True, env=env, cwd=REPO)
        self.tmp = tempfile.mkdtemp(prefix="cli_fork_")
        self.n = 0
        atexit.register(self.close)

    def run(self, args, env, cwd, timeout, log=None):
        self.n += 1
        out, err = Path(self.tmp, f"{self.n}.out"), Path(self.tmp, f"{self.n}.err")
        if log is not None:  # stdout and stderr interleaved in one file, as `cmd > log 2>&1`
            out = err = Path(log)
        job = {"args": [str(a) for a in args], "env": env, "cwd": str(cwd), "timeout": timeout,
               "out": str(out), "err": str(err)}
        self.proc.stdin.write(json.dumps(job) + "\n")
        self.proc.stdin.flush()
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout + 60)
        if not ready:
            raise TimeoutError(f"dapo-megatron {' '.join(job['args'])[:200]}: no exit status after {timeout + 60} s")
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the CLI fork server died (rc={self.proc.poll()}) running {job['args'][:3]}")
        rc = json.loads(line)["rc"]
        if log is not None:
            return rc, out.read_text(errors="replace"), ""
        return rc, out.read_text(errors="replace"), err.read_text(errors="replace")

    def close(self):
        if self.proc.poll() is None:
            self.proc.stdin.close()
            self.proc.wait(timeout=30)


_client = None


def run_cli(args, env=None, cwd=REPO, timeout=300, log=None):
    """(exit code, stdout, stderr) of `dapo-megatron ARGS` run as its own (forked) process; with `log`, both
    streams go to that file and come back as stdout. A SIGKILLed call returns -9, as subprocess does."""
    global _client
    if _client is None or _client.proc.poll() is not None:
        _client = _Client()
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), **(env or {})}
    return _client.run(args, full_env, cwd, timeout, log)


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    _serve()
