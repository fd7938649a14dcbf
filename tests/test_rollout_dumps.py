"""Rollout dumps (train/rollout_dump.py): every generated sample of a dumped step, kept or dropped, round-trips into
`Sample`s whose ids and log-probs are exactly what the trainer trained on (recorded independently at
train_on_batch by tests/dist_scripts/train_recording.py)."""
import json
from pathlib import Path

from dapo_megatron.models.tiny import make_tiny_hf_model
from dapo_megatron.train.rollout_dump import (EVAL_DIR, ROLLOUTS_DIR, RolloutDumper, dump_name, read_dump,
                                              step_records, to_record, to_sample)
from dapo_megatron.types import Sample

REPO = Path(__file__).resolve().parents[1]
RECORDING = REPO / "tests" / "dist_scripts" / "train_recording.py"
TRAINED = ("prompt_ids", "response_ids", "rollout_logprobs", "old_logprobs", "loss_mask", "advantage")


def _sample(gid, i, correct):
    return Sample(prompt_ids=[1, 2], response_ids=[3, 4, 5], rollout_logprobs=[-0.5, -0.25, -0.125], group_id=gid,
                  index=i, correct=correct, reward=1.0 if correct else -1.0, score=float(bool(correct)),
                  metadata={"row": 7, "old_logprobs": [-0.5, -0.2, -0.1], "advantage": 0.5})


def test_records_mark_kept_and_dropped_groups_and_round_trip(tmp_path):
    kept = [_sample(0, 0, True), _sample(0, 1, False)]
    dropped = [_sample(1, 0, True), _sample(1, 1, True)]
    aborted = [_sample(2, 0, None), _sample(2, 1, None)]
    aborted[1].finish_reason = "abort"
    kept[1].metadata["turns"] = [{"source": "model", "start": 0, "end": 2, "weight_version": 4},
                                 {"source": "tool", "start": 2, "end": 3, "tool": "calculator", "status": "ok"}]
    records = step_records(3, kept, [kept, dropped, aborted], "accuracy")
    assert [(r["group_id"], r["kept"], r["drop_reason"]) for r in records] == [
        (0, True, None), (0, True, None), (1, False, "all_correct"), (1, False, "all_correct"),
        (2, False, "aborted"), (2, False, "aborted")]
    dumper = RolloutDumper(tmp_path, every=1)
    dumper.submit(ROLLOUTS_DIR, 3, records)
    dumper.close()
    back = [to_sample(r) for r in read_dump(tmp_path / ROLLOUTS_DIR / dump_name(3))]
    assert back[0] == Sample(**{**kept[0].__dict__, "loss_mask": [1, 1, 1], "metadata": kept[0].metadata})
    assert back[1].metadata["turns"] == kept[1].metadata["turns"] and records[0]["turns"] is None
    assert not list((tmp_path / ROLLOUTS_DIR).glob("*.tmp"))


def test_a_failed_write_warns_once_and_training_goes_on(tmp_path, capfd):
    (tmp_path / ROLLOUTS_DIR).write_text("a file where the folder should be")
    dumper = RolloutDumper(tmp_path, every=1)
    for step in (1, 2):
        dumper.submit(ROLLOUTS_DIR, step, [to_record(_sample(0, 0, True), step, True)])
    dumper.flush()
    dumper.close()
    assert capfd.readouterr().err.count("rollout dump") == 1


def test_dumps_equal_what_the_trainer_trained_on(tmp_path, torchrun):
    hf = make_tiny_hf_model(tmp_path / "hf", "qwen2.5", seed=1)
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"question": f"{a}+{b}=", "answer": str(a + b)}) + "\n"
                            for a in range(5) for b in range(5)))
    run = tmp_path / "run"
    trained = tmp_path / "trained.json"
    torchrun(RECORDING, 1, trained, f"model.path={hf}", f"data.path={data}", "data.template={question}",
             "data.apply_chat_template=false", f"trainer.run_dir={run}", "trainer.num_steps=3",
             "trainer.tensorboard=false", "trainer.dump_rollouts=2", "rollout.rollout_batch_size=2",
             "rollout.n_samples_per_prompt=4", "rollout.max_response_length=6", "rollout.deterministic=true",
             "dynamic_sampling.max_num_gen_batches=4", "dynamic_sampling.on_exhausted=pad", "reward.num_workers=1",
             "reward.type=python:tests.helpers.toy_reward.even_length", "actor.global_batch_size=8",
             "actor.micro_batch_size=4", "actor.recompute_old_logprobs=true", f"eval.path={data}",
             "eval.max_prompts=2", "eval.n_samples=2", "trainer.eval_interval=2", timeout=600)
    batches = json.loads(trained.read_text())
    assert len(batches) == 3
    assert sorted(p.name for p in (run / ROLLOUTS_DIR).iterdir()) == [dump_name(2)]  # every 2nd step only
    records = read_dump(run / ROLLOUTS_DIR / dump_name(2))
    kept = [r for r in records if r["kept"]]
    assert [to_sample(r).response_ids for r in kept] == [s["response_ids"] for s in batches[1]]
    for rec, seen in zip(kept, batches[1]):
        s = to_sample(rec)
        got = {"prompt_ids": s.prompt_ids, "response_ids": s.response_ids, "rollout_logprobs": s.rollout_logprobs,
               "old_logprobs": s.metadata["old_logprobs"], "loss_mask": s.loss_mask,
               "advantage": s.metadata["advantage"]}
        want = {k: seen[k] for k in TRAINED}
        want["loss_mask"] = want["loss_mask"] or [1] * len(seen["response_ids"])
        assert got == want  # exact: JSON keeps every float64 bit
        assert rec["step"] == 2 and rec["prompt_index"] is not None and rec["response_text"] is not None
    assert all(r["drop_reason"] in ("all_correct", "all_wrong", "all_equal", "surplus", "aborted")
               for r in records if not r["kept"])
    evals = read_dump(run / EVAL_DIR / dump_name(2))
    assert len(evals) == 4 and all(len(r["response_ids"]) == len(r["rollout_logprobs"]) for r in evals)
