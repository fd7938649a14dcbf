"""launch/slurm/dapo.sbatch's node split, without a cluster: `srun` and `scontrol` are stand-ins on PATH that record
their arguments; the plan (`dapo-megatron plan --print engine-nodes`) is real. The 32B recipe on 4 x 8 runs the
trainer step on the first two nodes and `dapo-megatron engines` on the last two, both with the same per-job API
key (never printed), and the engines step is stopped with SIGTERM after the trainer exits (before a requeue).
The real-SLURM run of the colocated toy is tests/test_slurm.py."""
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SBATCH = REPO / "launch" / "slurm" / "dapo.sbatch"

FAKE_SRUN = r"""#!/usr/bin/env bash
if [[ " $* " == *" engines "* ]]; then
  trap 'echo "engines step got TERM" >> "$FAKE_LOG"; exit 0' TERM
  echo "srun $*" >> "$FAKE_LOG"
  echo "${DAPO_ROLLOUT_API_KEY:-none}" >> "$FAKE_LOG.keys"
  touch "$FAKE_LOG.engines_up"
  for _ in $(seq 600); do sleep 0.1; done  # bounded: the sbatch stops it long before
  exit 3
fi
if [ -n "${FAKE_WAIT_ENGINES:-}" ]; then  # the trainer step runs while the engines step is up, as on a cluster
  for _ in $(seq 600); do [ -e "$FAKE_LOG.engines_up" ] && break; sleep 0.1; done
fi
echo "srun $*" >> "$FAKE_LOG"
echo "${DAPO_ROLLOUT_API_KEY:-none}" >> "$FAKE_LOG.keys"
exit "${FAKE_TRAINER_RC:-0}"
"""
FAKE_SCONTROL = r"""#!/usr/bin/env bash
echo "scontrol $*" >> "$FAKE_LOG"
if [ "$1 $2" = "show hostnames" ]; then printf 'gpu10\ngpu11\ngpu12\ngpu13\n'; fi
"""


def _run(tmp_path, config, nodes, trainer_rc=0, env_extra=None):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for name, text in (("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL), ("scancel", "#!/usr/bin/env bash\n")):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    log = tmp_path / "calls.log"
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "PYTHON": sys.executable, "PYTHONPATH": str(REPO),
           "FAKE_LOG": str(log), "FAKE_TRAINER_RC": str(trainer_rc), "SLURM_JOB_ID": "123", "SLURM_JOB_NAME": "dapo",
           "SLURM_JOB_NODELIST": "gpu[10-13]" if nodes == 4 else "gpu10", "SLURM_JOB_NUM_NODES": str(nodes),
           "SLURM_NTASKS_PER_NODE": "8", "SLURM_GPUS_ON_NODE": "8", **(env_extra or {})}
    env.pop("DAPO_ROLLOUT_API_KEY", None)
    out = subprocess.run(["bash", str(SBATCH), str(REPO / config)], cwd=tmp_path, env=env, capture_output=True,
                         text=True, timeout=180)
    calls = log.read_text().splitlines() if log.is_file() else []
    keys = (tmp_path / "calls.log.keys").read_text().split() if (tmp_path / "calls.log.keys").is_file() else []
    return out, calls, keys


def test_engine_only_nodes_get_their_own_step_with_the_trainers_key(tmp_path):
    out, calls, keys = _run(tmp_path, "examples/dapo_qwen2.5_32b/config.yaml", 4, trainer_rc=75,
                            env_extra={"FAKE_WAIT_ENGINES": "1"})
    assert out.returncode == 0, out.stdout + out.stderr
    sruns = [c for c in calls if c.startswith("srun ")]
    assert len(sruns) == 2
    engines, trainer = sruns
    assert "--nodes=2 --ntasks=2 --ntasks-per-node=1 --nodelist=gpu12,gpu13 --gpus-per-node=8" in engines
    assert "-m dapo_megatron.cli engines --config" in engines and "--nodes 4 --gpus-per-node 8" in engines
    assert "--nodes=2 --ntasks=16 --ntasks-per-node=8 --nodelist=gpu10,gpu11" in trainer
    assert "-m dapo_megatron.cli train" in trainer
    assert len(keys) == 2 and keys[0] == keys[1] and len(keys[0]) == 64  # one per-job key, both steps
    assert keys[0] not in out.stdout + out.stderr + "".join(p.read_text() for p in (tmp_path / "logs").glob("*"))
    # after the trainer's exit (75: preempted): the engines step is stopped, then the job requeued
    assert calls.index("engines step got TERM") < calls.index("scontrol requeue 123")
    assert "engine-only nodes: gpu12 gpu13; trainer nodes: gpu10 gpu11" in out.stdout
    assert "engines step stopped" in out.stdout and "requeueing 123" in out.stdout


def test_colocated_plan_keeps_one_step_on_every_node(tmp_path):
    out, calls, keys = _run(tmp_path, "examples/toy/config.yaml", 1, env_extra={"SLURM_NTASKS_PER_NODE": "1"})
    assert out.returncode == 0, out.stdout + out.stderr
    sruns = [c for c in calls if c.startswith("srun ")]
    assert len(sruns) == 1 and sruns[0].startswith("srun --kill-on-bad-exit=1 ")  # no node split
    assert "engines step" not in out.stdout and len(keys) == 1 and keys[0] != "none"


def test_an_impossible_plan_stops_the_job_before_any_step(tmp_path):
    out, calls, _ = _run(tmp_path, "examples/dapo_qwen2.5_32b/config.yaml", 1)  # 32B needs 4 nodes
    assert out.returncode != 0 and not [c for c in calls if c.startswith("srun ")]
    assert "placement error: rollout.rollout_nodes=2 leaves no node for the trainer" in out.stderr
