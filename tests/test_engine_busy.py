"""Engine busy fraction (rollout/engine_load.py): slot accounting by hand, then on a held embedded engine with a
clock the test moves (by numbers, never by timing)."""
import pytest

from dapo_megatron.models.tiny import make_tiny_hf_model
from dapo_megatron.rollout.client import RolloutClient
from dapo_megatron.rollout.engine import Engine
from dapo_megatron.rollout.engine_load import EngineLoadMeter, SlotMeter, busy_fractions
from waiting import held, result


class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def test_slot_meter_integrates_resident_rows_by_hand():
    clock = Clock()
    m = SlotMeter(4, clock)
    a = m.stats()
    m.mark(3)  # t=0: 3 rows admitted
    clock.t = 2.0
    m.mark(1, decoded=3)  # 3 rows for 2 s, one decode step of 3 rows; 1 row stays
    clock.t = 10.0
    b = m.stats()  # + 1 row for 8 s
    assert (b["slot_seconds"], b["slot_steps"], b["decode_steps"], b["clock_s"]) == (14.0, 3, 1, 10.0)
    # used 14 slot-seconds of 4 x 10; the one decode step used 3 of 4 slots
    assert busy_fractions([a], [b]) == {"rollout/engine_busy_fraction": 14 / 40,
                                        "rollout/engine_decode_occupancy": 3 / 4}
    # two engines: sums of numerators and of denominators (an idle 8-slot engine over the same 10 s)
    idle = SlotMeter(8, Clock())
    i0, i1 = idle.stats(), {**idle.stats(), "clock_s": 10.0}
    assert busy_fractions([a, i0], [b, i1]) == {"rollout/engine_busy_fraction": 14 / 120,
                                                "rollout/engine_decode_occupancy": 3 / 4}
    assert busy_fractions([b], [b]) == {"rollout/engine_busy_fraction": 0.0, "rollout/engine_decode_occupancy": 0.0}


class Recorder(SlotMeter):
    def __init__(self, *a):
        super().__init__(*a)
        self.calls = []

    def mark(self, rows, decoded=0):
        self.calls.append((rows, decoded))
        super().mark(rows, decoded)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return make_tiny_hf_model(tmp_path_factory.mktemp("busy") / "m", family="qwen2.5", seed=0)


def test_held_engine_busy_fraction_by_numbers(model):
    e = Engine(model, max_batch_size=4, seed=0)
    clock = Clock()
    e.slots = meter = Recorder(4, clock)  # before any request: the scheduler has not touched it yet
    load = EngineLoadMeter(RolloutClient(engine=e))  # through /get_server_info, as the training loop reads it
    try:
        assert load.sample() == {}  # the first reading is the baseline
        e.hold(steps=1)  # one step: admit + prefill (1 token) and one decode (1 token)
        a = e.submit([5, 6], {"max_new_tokens": 100, "ignore_eos": True, "n": 2})
        held(e)
        assert meter.calls[-2:] == [(2, 0), (2, 2)]  # step start: 2 rows admitted; end: a decode of 2, 2 stay
        clock.t = 10.0  # held with 2 of 4 slots resident for 10 s
        assert load.sample() == {"rollout/engine_busy_fraction": 0.5, "rollout/engine_decode_occupancy": 0.5}
        b = e.submit([7], {"max_new_tokens": 2, "ignore_eos": True, "n": 2})
        e.hold(steps=1)  # b admitted next to a: 4 rows, one decode of 4, then b is done (2 tokens)
        held(e)
        assert len(result(b, "the short request")[0]["output_ids"]) == 2
        assert meter.calls[-2:] == [(4, 0), (2, 4)]
        clock.t = 20.0
        assert load.sample() == {"rollout/engine_busy_fraction": 0.5, "rollout/engine_decode_occupancy": 1.0}
        e.abort_request(abort_all=True)  # served while held: a leaves the batch
        result(a, "the aborted request")
        held(e)  # the scheduler's step that answered the abort is over (its closing mark is taken)
        assert meter.calls[-1] == (0, 0)
        clock.t = 30.0  # nothing resident: an idle engine between rollouts
        assert load.sample() == {"rollout/engine_busy_fraction": 0.0, "rollout/engine_decode_occupancy": 0.0}
        stats = e.load_stats()
        assert (stats["slot_seconds"], stats["slot_steps"], stats["decode_steps"]) == (40.0, 6, 2)
    finally:
        e.release()
        e.shutdown()


def test_meter_stops_asking_engines_without_counters():
    class SGLangLike:  # real SGLang's /get_server_info has no engine_load (see engine_load.py)
        calls = 0

        async def get_server_info(self):
            SGLangLike.calls += 1
            return [{"internal_states": [{"effective_max_running_requests_per_dp": 64}]}]

    meter = EngineLoadMeter(SGLangLike())
    assert meter.sample() == {} and meter.sample() == {} and SGLangLike.calls == 1
    assert EngineLoadMeter(object()).sample() == {}  # a fleet without get_server_info (RolloutFleet lacks it)
