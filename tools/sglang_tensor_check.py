"""The pinned sglang reads what CudaIpcWeightSync sends (runs in the tools venv, tools/.venv-sglang, on CPU).

    PYTHONPATH=. tools/.venv-sglang/bin/python tools/sglang_tensor_check.py < spec.json

stdin: {"tensors": [[name, dtype, shape], ...], "bucket_mb": float, "server_commands": [argv, ...]}. The tensors
(values arange(numel) * 0.5 + index) go through `iter_buckets` + `pack_bucket` (on CPU: CUDA IPC needs a GPU, the
pickle is the same apart from the storage rebuild) + `tensor_update_request`; every `serialized_named_tensors` entry
is decoded the way sglang's HTTP side and TP worker do (`normalize_serialized_named_tensor_payload`, then
`MultiprocessingSerializer.deserialize`, whose SafeUnpickler refuses any global off its allowlist). The server
commands go through `ServerArgs` (tools/sglang_parse_check.py). stdout: one JSON line with what came out.
"""
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))


def fake_tensors(spec: list) -> list:
    return [(name, (torch.arange(torch.Size(shape).numel(), dtype=torch.float64) * 0.5 + i).to(getattr(torch, dt))
             .reshape(shape)) for i, (name, dt, shape) in enumerate(spec)]


def main():
    import sglang
    from sglang.srt.utils.common import MultiprocessingSerializer, normalize_serialized_named_tensor_payload

    from dapo_megatron.rollout.weight_sync import iter_buckets, pack_bucket, tensor_update_request
    from sglang_parse_check import parse_server

    spec = json.load(sys.stdin)
    buckets = []
    for bucket in iter_buckets(fake_tensors(spec["tensors"]), int(spec["bucket_mb"] * 2 ** 20)):
        named, _ = pack_bucket(bucket, "cpu")
        body = tensor_update_request(named, version=7)
        decoded = [MultiprocessingSerializer.deserialize(normalize_serialized_named_tensor_payload(entry))
                   for entry in body["serialized_named_tensors"]]
        buckets.append({"keys": sorted(body), "load_format": body["load_format"], "flush_cache": body["flush_cache"],
                        "weight_version": body["weight_version"], "tp_entries": len(decoded),
                        "tensors": [[n, str(t.dtype).replace("torch.", ""), list(t.shape), float(t.double().sum())]
                                    for n, t in decoded[0]]})
    parsed = [parse_server(cmd[3:]) for cmd in spec.get("server_commands", [])]
    print(json.dumps({"sglang": sglang.__version__, "buckets": buckets, "servers": parsed}, default=str))


if __name__ == "__main__":
    main()
