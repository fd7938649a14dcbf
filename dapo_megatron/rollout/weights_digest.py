"""Bit-for-bit weight checks over HTTP (rollout.check_weight_sync, and the DAPO_CHECK_SYNC=1 test hook): the
trainer's tensors against what an engine serves at /debug/weights_digest (rollout/server.py). Imports nothing of the
package at module level."""


def tensor_digest(t) -> str:
    """sha256 of a tensor's dtype, shape and bytes: equal digests mean equal tensors, bit for bit."""
    import hashlib

    import torch

    t = t.detach().cpu()
    head = f"{t.dtype}{tuple(t.shape)}".encode()
    return hashlib.sha256(head + t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()).hexdigest()


def weights_digest(model) -> dict:
    """Every HF-named tensor of an engine's model -> [digest, storage id], and the storage ids of its parameters
    (an engine parameter no sent tensor covers is a mismatch). Served as /debug/weights_digest."""
    from .hf_update import _hf_targets

    def key(t):
        return t.untyped_storage().data_ptr()

    return {"tensors": {n: [tensor_digest(t), key(t)] for n, t in _hf_targets(model).items()},
            "parameters": sorted({key(p) for p in model.parameters()})}


def compare_digests(sent: dict, served: dict) -> int:
    """Mismatches between the trainer's {name: digest} and one engine's `weights_digest`."""
    return len(differing(sent, served))


def differing(sent: dict, served: dict) -> list:
    """The names that differ between the trainer's {name: digest} and one engine's `weights_digest`, in the order
    sent; an engine parameter that no sent tensor covers is named by its storage id."""
    tensors, covered, bad = served["tensors"], set(), []
    for name, digest in sent.items():
        got = tensors.get(name)
        if got is None or got[0] != digest:
            bad.append(name)
        else:
            covered.add(got[1])
    return bad + [f"<an engine parameter no sent tensor covers (storage {p})>" for p in served["parameters"]
                  if p not in covered]
