"""Run several conversions in one process (one megatron import for all of them), through the command-line entry
points. argv: jobs.json, a list of {"cmd": "hf-to-megatron" | "megatron-to-hf", "args": [...]}. Prints one JSON
line per job: {"rc": exit code, "err": stderr text}."""
import contextlib
import io
import json
import sys
from pathlib import Path

from dapo_megatron.models.convert import main_hf_to_megatron, main_megatron_to_hf

MAINS = {"hf-to-megatron": main_hf_to_megatron, "megatron-to-hf": main_megatron_to_hf}

if __name__ == "__main__":
    for job in json.loads(Path(sys.argv[1]).read_text()):
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            rc = MAINS[job["cmd"]](job["args"])
        print(json.dumps({"rc": rc, "err": err.getvalue()}), flush=True)
