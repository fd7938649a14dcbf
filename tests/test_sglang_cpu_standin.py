"""The sgl_kernel stand-in that lets PyPI sglang run on CPU (tools/sgl_kernel_standin, a test fixture): its two
functions against hand-built expectations from the GPU kernels' semantics. Needs only torch."""
import importlib.util
from pathlib import Path

import pytest
import torch

PATH = Path(__file__).resolve().parents[1] / "tools" / "sgl_kernel_standin" / "sgl_kernel.py"
spec = importlib.util.spec_from_file_location("sgl_kernel_standin", PATH)
sgl_kernel = importlib.util.module_from_spec(spec)
spec.loader.exec_module(sgl_kernel)


def test_copy_all_layer_kv_cache_copies_rows_in_every_buffer_reading_sources_first():
    k = torch.arange(12, dtype=torch.float32).reshape(6, 2)  # 6 rows of 8 bytes
    v = torch.arange(100, 118, dtype=torch.bfloat16).reshape(6, 3)  # 6 rows of 6 bytes
    ptrs = torch.tensor([k.data_ptr(), v.data_ptr()], dtype=torch.uint64)
    strides = torch.tensor([k.stride(0) * k.element_size(), v.stride(0) * v.element_size()], dtype=torch.int64)
    k0, v0 = k.clone(), v.clone()
    # row 1 <- row 0 and row 2 <- row 1: row 2 must get row 1's OLD contents (sources read before any write)
    sgl_kernel.copy_all_layer_kv_cache_cpu(ptrs, strides, torch.tensor([1, 2, 5]), torch.tensor([0, 1, 3]))
    for new, old in ((k, k0), (v, v0)):
        assert torch.equal(new[[0, 3, 4]], old[[0, 3, 4]])
        assert torch.equal(new[1], old[0]) and torch.equal(new[2], old[1]) and torch.equal(new[5], old[3])


def test_assign_req_to_token_pool_writes_each_requests_slice_of_the_new_slots():
    req_to_token = torch.full((4, 8), -1, dtype=torch.int32)
    out_cache_loc = torch.tensor([40, 41, 42, 50, 60, 61], dtype=torch.int64)
    # request in pool row 2 gets positions 1..3 <- 40,41,42; row 0 gets 5 <- 50; row 3 gets 0..1 <- 60,61
    sgl_kernel.assign_req_to_token_pool_cpu(torch.tensor([2, 0, 3]), req_to_token, torch.tensor([1, 5, 0]),
                                            torch.tensor([4, 6, 2]), out_cache_loc, 8)
    want = torch.full((4, 8), -1, dtype=torch.int32)
    want[2, 1:4] = torch.tensor([40, 41, 42])
    want[0, 5] = 50
    want[3, 0:2] = torch.tensor([60, 61])
    assert torch.equal(req_to_token, want)


def test_other_names_import_but_refuse_to_run():
    fn = sgl_kernel.verify_tree_greedy_cpu  # sglang's speculative module imports it at module level
    with pytest.raises(NotImplementedError, match="verify_tree_greedy_cpu.*stand-in"):
        fn()
    with pytest.raises(AttributeError):
        sgl_kernel.__wrapped__
