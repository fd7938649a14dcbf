"""The converter's file-to-file copies (models/file_copy.py): copy_file_range and its fallback give the same bytes
at any offsets, and a torch_dist save of tensors over mapped files copies their bytes from the file and loads back
equal (with a tensor from memory beside them written as it is)."""
import os

import torch

from dapo_megatron.models import file_copy
from dapo_megatron.models.file_copy import CopyStream, FileSpan, MappedFiles, copy_range, copying_file_system


def _random_file(path, nbytes):
    data = os.urandom(nbytes)
    path.write_bytes(data)
    return data


def test_copy_range_kernel_and_fallback_give_the_same_bytes(tmp_path, monkeypatch):
    data = _random_file(tmp_path / "src", 3 * 2**20 + 77)
    for kernel in (True, False):
        monkeypatch.setattr(file_copy, "_kernel_copy", kernel)
        monkeypatch.setattr(file_copy, "_BOUNCE", 2**20)  # several bounce rounds
        dst = tmp_path / f"dst_{kernel}"
        src_fd, dst_fd = os.open(tmp_path / "src", os.O_RDONLY), os.open(dst, os.O_RDWR | os.O_CREAT)
        try:
            os.pwrite(dst_fd, b"head", 0)
            copy_range(src_fd, 13, dst_fd, 4, len(data) - 13)
            assert os.lseek(dst_fd, 0, os.SEEK_CUR) == 0  # no file position moved
            span = FileSpan(torch.uint8, (20,), [(src_fd, 0, 10), (src_fd, 100, 10)])
            assert span.read().numpy().tobytes() == data[:10] + data[100:110]
        finally:
            os.close(src_fd)
            os.close(dst_fd)
        assert dst.read_bytes() == b"head" + data[13:]


def test_dist_save_of_mapped_tensors_copies_from_the_file_and_loads_back(tmp_path):
    import torch.distributed.checkpoint as dcp

    nbytes = 3 * 2**20  # above the small-write threshold: copied, not gathered
    _random_file(tmp_path / "weights.bin", 4096 + 2 * nbytes)
    sources = MappedFiles()
    try:
        mapped = [sources.tensor(tmp_path / "weights.bin", 4096 + i * nbytes, torch.bfloat16, (nbytes // 2048, 1024))
                  for i in range(2)]
        in_memory = torch.randn(1536, 1024).to(torch.bfloat16)
        small = torch.arange(10, dtype=torch.float32)
        state = {"a": mapped[0], "b": mapped[1], "c": in_memory, "d": small}
        expected = {k: v.clone() for k, v in state.items()}
        writer = dcp.FileSystemWriter(str(tmp_path / "ckpt"), thread_count=1, per_thread_copy_ahead=0,
                                      sync_files=False)
        streams = []
        fs = copying_file_system(sources)
        create = fs.create_stream

        def recording(path, mode):  # keep each stream to read its counter
            ctx = create(path, mode)
            stream = ctx.__enter__()
            streams.append(stream)
            return _Exit(ctx, stream)

        fs.create_stream = recording
        writer.fs = fs
        dcp.save(state, storage_writer=writer, no_dist=True)
    finally:
        sources.close()
    copied = sum(s.copied for s in streams if isinstance(s, CopyStream))
    assert copied == 2 * nbytes  # the mapped tensors, and only they, were copied from the file
    loaded = {k: torch.zeros_like(v) for k, v in expected.items()}
    dcp.load(loaded, storage_reader=dcp.FileSystemReader(str(tmp_path / "ckpt")), no_dist=True)
    for k, v in expected.items():
        assert torch.equal(loaded[k].view(torch.uint8), v.view(torch.uint8)), k  # bytes: random bits hold NaNs


class _Exit:
    def __init__(self, ctx, stream):
        self.ctx, self.stream = ctx, stream

    def __enter__(self):
        return self.stream

    def __exit__(self, *exc):
        return self.ctx.__exit__(*exc)
