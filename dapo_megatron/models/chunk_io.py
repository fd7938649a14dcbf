"""Where each converted tensor's bytes come from, both directions, for the converter (`convert.py`).

HF -> Megatron: `chunk_mapper` gives a chunk as a tensor over the mapped HF file where it is rows of one HF tensor
(copied file to file by `file_copy`), `chunk_filler` fills any other chunk into a buffer. Megatron -> HF:
`file_spans` gives an HF tensor as the byte ranges of the torch_dist chunks holding its rows.
"""
import math
from typing import Callable, Optional

import torch

from .dist_reader import ChunkFiles
from .file_copy import FileSpan, MappedFiles
from .hf_config import ModelArch
from .hf_io import HFCheckpointReader
from .weights import canonical_name, hf_names_for, row_concat_sources, to_megatron


def chunk_filler(reader: HFCheckpointReader, arch: ModelArch, dtype_of: Callable[[str], torch.dtype],
                 padded_vocab: int) -> Callable[[str, tuple, torch.Tensor], None]:
    """`fill_chunk` for `save_lazy_dist_checkpoint` from an HF folder.

    A parameter that is its HF tensors' rows one after another (all but the fused QKV) is read from the files
    straight into the chunk, its vocabulary padding zero-filled; any other (QKV, or a dtype cast) is built whole
    by `to_megatron` (kept while its chunks are asked for) and its part copied in.
    """
    cache: dict[str, torch.Tensor] = {}

    def fill(path: str, slices: tuple, out: torch.Tensor) -> None:
        rows = row_concat_sources(path, arch)
        whole_rows = rows is not None and all(s.start == 0 and s.stop == d
                                              for s, d in zip(slices[1:], reader.shape(rows[0])[1:]))
        if whole_rows:
            start, stop, at = slices[0].start, slices[0].stop, 0
            for n in rows:
                n_rows = reader.shape(n)[0]
                lo, hi = max(start - at, 0), min(stop - at, n_rows)
                if lo < hi:
                    dst = out[at + lo - start:at + hi - start]
                    if reader.dtype(n) == out.dtype:
                        reader.read_rows_into(n, lo, hi, dst)
                    else:  # --dtype: read, then cast into place
                        tmp = torch.empty(dst.shape, dtype=reader.dtype(n))
                        reader.read_rows_into(n, lo, hi, tmp)
                        dst.copy_(tmp)
                at += n_rows
            if stop > at:  # past the HF rows: the vocabulary padding
                out[max(at, start) - start:].zero_()
            return
        if path not in cache:
            cache.clear()  # the chunks of one parameter are written one after another
            hf = tuple(reader.get(n) for n in hf_names_for(path, arch))
            cache[path] = to_megatron(path, hf, arch, padded_vocab=padded_vocab).to(dtype_of(path))
        out.copy_(cache[path][slices])
        if out.numel() == cache[path].numel():
            cache.clear()

    return fill


def chunk_mapper(reader: HFCheckpointReader, arch: ModelArch, dtype_of: Callable[[str], torch.dtype],
                 sources: MappedFiles) -> Callable[[str, tuple], Optional[torch.Tensor]]:
    """`map_chunk` for `save_lazy_dist_checkpoint`: a chunk that is whole rows of one HF tensor of its dtype, as a
    tensor over the mapped HF file (its bytes are then copied file to file); None for any other chunk."""

    def map_chunk(path: str, slices: tuple) -> Optional[torch.Tensor]:
        rows = row_concat_sources(path, arch)
        if rows is None:
            return None
        start, stop, at = slices[0].start, slices[0].stop, 0
        for n in rows:
            shape = reader.shape(n)
            if at <= start and stop <= at + shape[0]:
                if reader.dtype(n) != dtype_of(path) or \
                        any(s.start != 0 or s.stop != d for s, d in zip(slices[1:], shape[1:])):
                    return None
                file, offset, _ = reader.row_location(n, start - at, stop - at)
                return sources.tensor(file, offset, reader.dtype(n), (stop - start, *shape[1:]))
            at += shape[0]
        return None  # spans two HF tensors, or the vocabulary padding

    return map_chunk


def file_spans(path: str, sharded_tensors: list, arch: ModelArch, files: ChunkFiles,
                hf_shapes: dict) -> Optional[list[tuple[str, FileSpan]]]:
    """(HF name, FileSpan) of each HF tensor of parameter `path` (its megatron `sharded_tensors`, TP=1) that is
    rows of the parameter (all but the fused QKV; the vocabulary padding is left out), where those rows lie whole
    in stored chunks; None otherwise."""
    names = row_concat_sources(path, arch)
    if names is None:
        return None
    if canonical_name(path) == "output_layer.weight" and arch.tie_word_embeddings:
        return []  # tied: the embedding carries it (as to_hf)
    pieces = []
    for st in sharded_tensors:
        p = st.prepend_axis_num
        pieces.append((st, slice(st.global_offset[p], st.global_offset[p] + st.local_shape[0])))
    out, at = [], 0
    for name in names:
        shape = hf_shapes[name]
        ranges = row_ranges(pieces, at, at + shape[0], tuple(shape[1:]), files)
        if ranges is None:
            return None
        dtype, ranges = ranges
        out.append((name, FileSpan(dtype, tuple(shape), ranges)))
        at += shape[0]
    return out


def row_ranges(pieces, start: int, stop: int, trailing: tuple, files: ChunkFiles):
    """(dtype, [(fd, offset, nbytes)]) of rows [start, stop) of a parameter made of `pieces` (ShardedTensor, its
    rows of the parameter), each stored in chunks of whole rows; None if they are stored any other way."""
    found, dtypes = [], set()
    for st, rows in pieces:
        p = st.prepend_axis_num
        if tuple(st.local_shape[1:]) != trailing or tuple(st.global_shape[p + 1:]) != trailing:
            return None
        lo, hi = max(start, rows.start), min(stop, rows.stop)
        if lo >= hi:
            continue
        chunks = files.chunks(st.key)
        if chunks is None:
            return None
        prefix = tuple(st.global_offset[:p])
        for offsets, sizes, fd, byte0, dtype in chunks:
            if offsets[:p] != prefix:
                continue  # another layer / expert (a chunk over several is not matched, and falls back)
            if any(z != 1 for z in sizes[:p]) or any(offsets[p + 1:]) or tuple(sizes[p + 1:]) != trailing:
                return None
            r0, r1 = max(lo, offsets[p]), min(hi, offsets[p] + sizes[p])
            if r0 < r1:
                row = math.prod(trailing) * dtype.itemsize
                found.append((r0, r1, fd, byte0 + (r0 - offsets[p]) * row, row))
                dtypes.add(dtype)
    found.sort(key=lambda f: f[0])
    at = start
    for r0, r1, *_ in found:
        if r0 != at:
            return None
        at = r1
    if at != stop or len(dtypes) != 1:
        return None
    return dtypes.pop(), [(fd, off, (r1 - r0) * row) for r0, r1, fd, off, row in found]
