"""A rollout backend added from this file alone, with no edit to config, placement or the loop: an in-process fake
fleet implementing rollout/protocol.py's `RolloutFleet` serves DAPO steps (generation, reward, advantages, the actor's
update, a disk weight sync) and the weight versions go round.

Run as a script (one rank, forked like torchrun's), this file registers `rollout.backend=fake_fleet` and runs
`dapo-megatron train`; the fleet writes what it saw to the file named by the first argument.
"""
import contextlib
import json
import math
import sys
from pathlib import Path

import pytest

from dapo_megatron.rollout.backends import BACKENDS, RolloutBackend, register
from dapo_megatron.rollout.protocol import GenerationParams, RolloutFleet

RECORD = {"path": None}


class FakeFleet:
    """Answers each response with 1 to max_tokens tokens of the toy vocabulary (lengths vary inside a group, so the
    even-length verifier gives both outcomes); loads "weights" by recording the version it was told."""
    worker_urls = ["inprocess://fake-fleet"]

    def __init__(self, version):
        self.version = version  # the backend's WeightVersion: what it serves until the next update
        self.seen = {"params": [], "sample_versions": [], "loaded": [], "closed": False}

    async def generate_group(self, samples: list, params: GenerationParams) -> list:
        assert isinstance(params, GenerationParams), "the trainer speaks GenerationParams, not an engine's names"
        self.seen["params"].append([params.max_tokens, params.seed, params.temperature])
        for i, s in enumerate(samples):
            n = 1 + (abs(s.group_id) * 7 + i) % params.max_tokens
            s.response_ids = [10 + (abs(s.group_id) + i + t) % 20 for t in range(n)]
            s.rollout_logprobs = [-math.log(20.0)] * n
            s.response_text = "x" * n
            s.finish_reason = "length" if n == params.max_tokens else "stop"
            s.weight_version = self.version.value
            self.seen["sample_versions"].append(s.weight_version)
        return samples

    async def abort_all(self):
        pass

    async def pause(self):
        pass

    async def resume(self):
        pass

    def weight_update_session(self):
        return contextlib.nullcontext()

    async def update_weights_from_disk(self, model_path: str, *, weight_version=None, timeout_s=None) -> list:
        assert (Path(model_path) / "config.json").is_file() and list(Path(model_path).glob("*.safetensors"))
        self.seen["loaded"].append(int(weight_version))
        return [{"success": True}]

    async def update_weights_from_tensor(self, payload: dict) -> list:
        raise NotImplementedError("fake_fleet takes disk weight sync only")

    init_weights_update_group = update_weights_from_distributed = destroy_weights_update_group = \
        update_weights_from_tensor

    async def wait_healthy(self, timeout_s: float = 300.0) -> list:
        return [{}]

    async def weights_digest(self) -> list:
        return [{}]

    async def close(self):
        self.seen["closed"] = True
        Path(RECORD["path"]).write_text(json.dumps(self.seen))


@register("fake_fleet")
class FakeFleetBackend(RolloutBackend):
    """One in-process fake engine on rank 0; weights arrive from disk."""
    default_weight_sync = "disk"
    weight_sync_modes = ("disk",)
    in_process_on_one_node = True

    @classmethod
    def plan_engines(cls, r, kind, engine_nodes, gpus_per_node):
        return [(engine_nodes[0], [0], 0)]

    def _start(self):
        return FakeFleet(self.version)


def test_the_fake_fleet_implements_the_protocol_and_is_registered():
    assert isinstance(FakeFleet(None), RolloutFleet) and BACKENDS["fake_fleet"] is FakeFleetBackend
    from dapo_megatron.config import ConfigError, RolloutConfig

    RolloutConfig(backend="fake_fleet")
    with pytest.raises(ConfigError, match="rollout.weight_sync=tensor with rollout.backend=fake_fleet needs .*; "
                                          "use disk$"):
        RolloutConfig(backend="fake_fleet", weight_sync="tensor")


def test_a_backend_module_is_found_by_its_name_alone(tmp_path, monkeypatch):
    """rollout/backend_<name>.py registers itself when the registry loads: a new engine is one module."""
    from dapo_megatron.rollout.backends import import_backend_modules

    pkg = tmp_path / "fleetpkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "backend_tiny.py").write_text("from dapo_megatron.rollout.backends import RolloutBackend, register\n\n\n"
                                         "@register('tiny_fleet')\nclass Tiny(RolloutBackend):\n    pass\n")
    (pkg / "helpers.py").write_text("raise AssertionError('only backend_*.py modules are imported')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        assert import_backend_modules(pkg, "fleetpkg") == ["backend_tiny"]
        assert BACKENDS["tiny_fleet"].name == "tiny_fleet"
    finally:
        BACKENDS.pop("tiny_fleet", None)


@pytest.mark.dist
def test_a_backend_registered_from_this_file_serves_dapo_steps(tmp_path, torchrun):
    from dapo_megatron.models.tiny import make_tiny_hf_model

    hf = make_tiny_hf_model(tmp_path / "hf", "qwen2.5", seed=1)
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"question": f"{a}+{b}=", "answer": str(a + b)}) + "\n"
                            for a in range(4) for b in range(4)))
    run, record = tmp_path / "run", tmp_path / "fleet.json"
    torchrun(Path(__file__), 1, record, f"model.path={hf}", f"data.path={data}", "data.template={question}",
             "data.apply_chat_template=false", f"trainer.run_dir={run}", "trainer.num_steps=2",
             "trainer.tensorboard=false", "rollout.backend=fake_fleet", "rollout.rollout_batch_size=2",
             "rollout.n_samples_per_prompt=4", "rollout.max_response_length=6", "dynamic_sampling.enable=false",
             "reward.num_workers=0", "reward.type=python:tests.helpers.toy_reward.even_length",
             "actor.global_batch_size=8", "actor.micro_batch_size=4", timeout=600)
    seen = json.loads(record.read_text())
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and all(r["actor/grad_norm"] > 0 for r in rows)
    assert seen["closed"] and seen["loaded"] == [1, 2]  # a disk sync after each step, with its version
    assert seen["sample_versions"] == [0] * 8 + [1] * 8  # step 2 sampled with the weights of step 1
    assert {p[0] for p in seen["params"]} == {6} and all(p[1] is not None for p in seen["params"])


if __name__ == "__main__":
    RECORD["path"] = sys.argv[1]
    from dapo_megatron.cli import main

    main(["train", *sys.argv[2:]])
