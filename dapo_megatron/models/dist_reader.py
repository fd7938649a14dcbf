"""Read megatron's torch_dist checkpoints into preallocated tensors with one `preadv` per chunk (the converter's
Megatron -> HF direction).

torch's FileSystemReader `torch.load`s every stored chunk into fresh memory and then copies it into the target: two
passes over the bytes, and fresh memory costs a page fault per 4 KiB. In the torch_save format each chunk is a
small zip whose tensor bytes are one uncompressed record, so a chunk that is a plain contiguous tensor, wanted
whole by a contiguous target of its dtype, is read straight into the target. Anything else (a part of a chunk, a
strided target, another layout) goes through torch's own path unchanged.
"""
import io
import math
import os
import pickle
import sys
import zipfile
from typing import Optional

import torch

_LOCAL_HEADER = b"PK\x03\x04"


class _TensorMeta(pickle.Unpickler):
    """Unpickles a torch.save `data.pkl` of one tensor into (storage id, storage offset, size, stride)."""

    def find_class(self, module, name):
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return lambda storage, offset, size, stride, *_: (storage, offset, tuple(size), tuple(stride))
        if (module, name) == ("collections", "OrderedDict"):
            return dict
        if module == "torch" and name.endswith("Storage"):
            from torch.storage import _get_dtype_from_pickle_storage_type

            return _get_dtype_from_pickle_storage_type(name)  # as torch.load maps it (no legacy class touched)
        raise pickle.UnpicklingError(f"{module}.{name} is not a plain tensor")

    def persistent_load(self, pid):
        return pid  # ('storage', dtype, record key, location, numel)


def _contiguous_strides(size: tuple) -> tuple:
    out, acc = [], 1
    for n in reversed(size):
        out.append(acc)
        acc *= n
    return tuple(reversed(out))


class _Window(io.RawIOBase):
    """Bytes [start, start+length) of an open binary file, as a seekable read-only file (for zipfile)."""

    def __init__(self, f, start: int, length: int):
        super().__init__()
        self.f, self.start, self.length, self.pos = f, start, length, 0

    def readable(self):
        return True

    def seekable(self):
        return True

    def seek(self, pos, whence=io.SEEK_SET):
        self.pos = {io.SEEK_SET: 0, io.SEEK_CUR: self.pos, io.SEEK_END: self.length}[whence] + pos
        return self.pos

    def tell(self):
        return self.pos

    def readinto(self, b):
        n = max(min(len(b), self.length - self.pos), 0)
        self.f.seek(self.start + self.pos)
        got = self.f.readinto(memoryview(b)[:n])
        self.pos += got
        return got


def _record_start(f, offset: int, record: zipfile.ZipInfo) -> Optional[int]:
    """File offset of an uncompressed zip record's bytes (its local header read, not trusted from the directory)."""
    f.seek(offset + record.header_offset)
    header = f.read(30)
    if header[:4] != _LOCAL_HEADER or record.compress_type != zipfile.ZIP_STORED:
        return None
    names = int.from_bytes(header[26:28], "little") + int.from_bytes(header[28:30], "little")
    return offset + record.header_offset + 30 + names


def _read_record(f, offset: int, record: zipfile.ZipInfo) -> bytes:
    # zipfile's own read checks the CRC32, which the converter's saves leave out (torch.load does not check it)
    start = _record_start(f, offset, record)
    if start is None:
        raise ValueError(f"record {record.filename} is not stored uncompressed")
    f.seek(start)
    return f.read(record.file_size)


def raw_tensor_span(f, offset: int, length: int) -> Optional[tuple[int, torch.dtype, tuple]]:
    """(file offset of the bytes, dtype, shape) of a plain contiguous tensor `torch.save`d at [offset, offset+length)
    of the open binary file `f`; None for anything else."""
    try:
        z = zipfile.ZipFile(io.BufferedReader(_Window(f, offset, length)))
        infos = {i.filename.split("/", 1)[-1]: i for i in z.infolist()}
        pickled = _read_record(f, offset, infos["data.pkl"])
        storage, storage_offset, size, stride = _TensorMeta(io.BytesIO(pickled)).load()
        byteorder = _read_record(f, offset, infos["byteorder"]).decode() if "byteorder" in infos else "little"
        kind, dtype, key, _, numel = storage
        record = infos[f"data/{key}"]
    except Exception:  # noqa: BLE001 - any other layout: torch's own reader handles it
        return None
    if kind != "storage" or storage_offset != 0 or numel != math.prod(size) or byteorder != sys.byteorder \
            or stride != _contiguous_strides(size) or record.file_size != numel * dtype.itemsize:
        return None
    start = _record_start(f, offset, record)
    return None if start is None else (start, dtype, size)


def direct_reader(checkpoint_dir):
    """A FileSystemReader (metadata cached across loads) that reads whole plain chunks straight into their
    targets."""
    from megatron.core.dist_checkpointing.strategies.cached_metadata_filesystem_reader import (
        CachedMetadataFileSystemReader,
    )
    from torch.distributed.checkpoint.planner import LoadItemType
    from torch.futures import Future

    from .hf_io import _pread_into

    class DirectReader(CachedMetadataFileSystemReader):
        def read_data(self, plan, planner):
            rest = []
            files: dict[str, tuple[object, int]] = {}
            try:
                for req in plan.items:
                    if req.type != LoadItemType.TENSOR or not self._read_direct(req, planner, files):
                        rest.append(req)
            finally:
                for f, fd in files.values():
                    f.close()
                    os.close(fd)
            if rest:
                import dataclasses

                return super().read_data(dataclasses.replace(plan, items=rest), planner)
            fut: Future = Future()
            fut.set_result(None)
            return fut

        def _read_direct(self, req, planner, files) -> bool:
            info = self.storage_data[req.storage_index]
            if info.transform_descriptors or any(req.storage_offsets):
                return False
            target = planner.resolve_tensor(req).detach()
            if not target.is_contiguous() or tuple(target.shape) != tuple(req.lengths):
                return False
            if info.relative_path not in files:
                path = os.path.join(str(self.path), info.relative_path)
                files[info.relative_path] = (open(path, "rb"), os.open(path, os.O_RDONLY))
            f, fd = files[info.relative_path]
            span = raw_tensor_span(f, info.offset, info.length)
            if span is None or span[1] != target.dtype or span[2] != tuple(target.shape):
                return False
            _pread_into(fd, target, span[0], f"{req.storage_index.fqn} in {info.relative_path}")
            planner.commit_tensor(req, target)
            return True

    return DirectReader(checkpoint_dir)


def load_in_place(request: dict, reader) -> None:
    """Fill the data of every megatron ShardedTensor in `request` (a flat dict) from the checkpoint `reader` reads."""
    import torch.distributed.checkpoint as dcp
    from megatron.core.dist_checkpointing.strategies.torch import (
        MCoreLoadPlanner,
        _replace_state_dict_keys_with_sharded_keys,
        mcore_to_pyt_state_dict,
    )

    flat, _, _ = _replace_state_dict_keys_with_sharded_keys(request)
    dcp.load(mcore_to_pyt_state_dict(flat, True), storage_reader=reader, planner=MCoreLoadPlanner())


class ChunkFiles:
    """Where the bytes of each stored chunk of a torch_dist checkpoint lie: (fd, file offset of its plain
    contiguous tensor bytes), read from the checkpoint's metadata and each chunk's zip headers (no tensor data)."""

    def __init__(self, reader):
        from torch.distributed.checkpoint.metadata import MetadataIndex, TensorStorageMetadata

        self._index = MetadataIndex
        self.metadata = reader.read_metadata()
        self.root = str(reader.path)
        self._files: dict[str, tuple[object, int]] = {}
        self._tensor_md = TensorStorageMetadata
        self._cache: dict[str, Optional[list]] = {}

    def chunks(self, key: str) -> Optional[list[tuple[tuple, tuple, int, int, torch.dtype]]]:
        """(offsets, sizes, fd, byte offset, dtype) of every stored chunk of `key`; None if any is not a plain
        contiguous tensor in an untransformed record."""
        if key not in self._cache:
            self._cache[key] = self._chunks(key)
        return self._cache[key]

    def _chunks(self, key: str):
        md = self.metadata.state_dict_metadata.get(key)
        if not isinstance(md, self._tensor_md):
            return None
        out = []
        for chunk in md.chunks:
            info = self.metadata.storage_data.get(self._index(key, chunk.offsets))
            if info is None or info.transform_descriptors:
                return None
            if info.relative_path not in self._files:
                path = os.path.join(self.root, info.relative_path)
                self._files[info.relative_path] = (open(path, "rb"), os.open(path, os.O_RDONLY))
            f, fd = self._files[info.relative_path]
            span = raw_tensor_span(f, info.offset, info.length)
            if span is None or span[1] != md.properties.dtype or math.prod(span[2]) != math.prod(chunk.sizes):
                return None
            out.append((tuple(chunk.offsets), tuple(chunk.sizes), fd, span[0], span[1]))
        return out

    def close(self) -> None:
        for f, fd in self._files.values():
            f.close()
            os.close(fd)
        self._files.clear()
