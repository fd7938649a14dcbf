"""Hugging Face safetensors <-> Megatron dist_checkpointing (torch_dist) conversion, streaming, one process.

Checkpoint layout (defined in models/ckpt_layout.py, with the manifest that seals a folder):
    DIR/latest                 name of the newest complete iteration folder, e.g. `iter_0000000`
    DIR/iter_{N:07d}/model/    dist_checkpointing of `GPTModel.sharded_state_dict()` (loads at any PP, and any
                               TP with the same padded vocabulary)
    DIR/hf_config/             config.json, generation_config.json, tokenizer files
Other entries of an iteration folder (`optim/`, `trainer_state.json`) are the trainer's and are ignored here.

dist checkpoints reshard on load, so both directions run in a single process on the TP=1/PP=1 layout of a model
built on the meta device: its `sharded_state_dict()` gives megatron's own keys, offsets and factories (the SwiGLU
split) while holding no memory. Weight bytes are copied file to file in the kernel where they are a row range of
both sides (`file_copy`: everything but the fused QKV, the vocabulary padding and dtype casts, at TP=1 layouts):
HF -> Megatron, a save planner materialises each chunk only when the writer asks for it (`resolve_data`), as a
tensor over the mapped HF file whose bytes the output stream copies from that file; Megatron -> HF, each HF tensor
is copied from the byte ranges of the torch_dist chunks that hold its rows. The rest is read into one reused buffer
(HF -> Megatron: straight into place; Megatron -> HF: one torch_dist load per batch of parameters, `dist_reader`).
"""
import argparse
import contextlib
import dataclasses
import math
import re
import sys
import warnings
from pathlib import Path
from typing import Callable, Iterator, Optional

import torch

from .hf_config import (
    ModelArch,
    UnsupportedModelError,
    arch_from_hf,
    check_parallel_sizes,
    load_hf_config,
    padded_vocab_size,
)
from .hf_io import (
    DEFAULT_MAX_SHARD_BYTES,
    CheckpointError,
    HFCheckpointReader,
    Progress,
    check_output_dir,
    copy_hf_metadata_files,
    staging_dir,
    write_hf_checkpoint,
)
from .chunk_io import chunk_filler, chunk_mapper, file_spans
from .dist_reader import ChunkFiles, direct_reader, load_in_place
from .file_copy import MappedFiles, copying_file_system
from .moe import unknown_layout_hint as moe_layout_hint
from .weights import expected_hf_shapes, hf_names_for, to_hf

from . import ckpt_layout  # the checkpoint folder layout, shared with the trainer

LATEST_FILE = ckpt_layout.LATEST
HF_CONFIG_DIR = ckpt_layout.HF_CONFIG_DIR
MODEL_DIR = ckpt_layout.MODEL_DIR
_IGNORED_HF_TENSORS = re.compile(r"\.rotary_emb\.inv_freq$")  # buffers some old Llama checkpoints carry
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


iteration_dir_name = ckpt_layout.iter_name


# ---------------------------------------------------------------- checks on the inputs


def check_hf_tensors(reader: HFCheckpointReader, arch: ModelArch) -> None:
    """Refuse missing, extra or mis-shaped tensors, naming the first offender."""
    expected = expected_hf_shapes(arch)
    present = {n for n in reader.names if not _IGNORED_HF_TENSORS.search(n)}
    hint = moe_layout_hint(sorted(present - expected.keys()))  # before "missing": name the layout, not a tensor
    if hint:
        raise CheckpointError(f"{reader.hf_dir}: {hint}")
    missing = sorted(expected.keys() - present)
    if missing:
        raise CheckpointError(f"tensor {missing[0]!r} is missing from {reader.hf_dir}{_more(missing)}; "
                              "the weights do not match config.json")
    extra = sorted(present - expected.keys())
    if extra == ["lm_head.weight"] and arch.tie_word_embeddings:
        if torch.equal(reader.get("lm_head.weight"), reader.get("model.embed_tokens.weight")):
            extra = []  # a tied model saved with its (identical) output layer spelled out
    if extra:
        raise CheckpointError(f"unexpected tensor {extra[0]!r} in {reader.file_of(extra[0])}{_more(extra)}: it has "
                              f"no place in a {arch.family} model with num_hidden_layers={arch.num_layers}, "
                              f"tie_word_embeddings={arch.tie_word_embeddings}; is config.json the right one?")
    for name, shape in expected.items():
        if reader.shape(name) != shape:
            raise CheckpointError(f"shape mismatch for {name!r} in {reader.file_of(name)}: checkpoint "
                                  f"{reader.shape(name)} vs {shape} from config.json")


def _more(names: list) -> str:
    return f" (and {len(names) - 1} more)" if len(names) > 1 else ""


def resolve_checkpoint(load_dir, iteration: Optional[int] = None) -> Path:
    """The `iter_x/model` folder of a checkpoint root (the newest per `latest`, or `iteration`)."""
    from megatron.core.dist_checkpointing import check_is_distributed_checkpoint

    root = Path(load_dir)
    if not root.is_dir():
        raise CheckpointError(f"checkpoint folder {root} does not exist")
    if iteration is None:
        latest = root / LATEST_FILE
        if not latest.is_file():
            raise CheckpointError(f"{root} is not a checkpoint: it has no `{LATEST_FILE}` file (pass --iteration N "
                                  "to pick an iteration folder)")
        name = ckpt_layout.read_latest(root)
        if name is None:
            raise CheckpointError(f"{latest} does not name an iter_* folder; pass --iteration N")
    else:
        name = iteration_dir_name(iteration)
    if (root / name / ckpt_layout.MANIFEST).is_file():  # folders from before manifests: metadata.json check only
        try:
            ckpt_layout.read_manifest(root / name)
        except ckpt_layout.CheckpointDamaged as e:
            raise CheckpointError(f"{root}: {e}; pass --iteration N to export another one") from None
    model_dir = root / name / MODEL_DIR
    if not check_is_distributed_checkpoint(model_dir):
        raise CheckpointError(f"{model_dir} is not a complete dist checkpoint (no metadata.json): the save was "
                              "interrupted or the iteration does not exist")
    return model_dir


# ---------------------------------------------------------------- megatron side


@contextlib.contextmanager
def single_process_megatron():
    """torch.distributed + parallel_state for a world of one process (set up here unless already up)."""
    import torch.distributed as dist

    from .. import parallel

    world = dist.get_world_size() if dist.is_initialized() else parallel.world_size_from_env()
    if world != 1:
        raise CheckpointError(f"checkpoint conversion runs in one process, not {world}: run it without torchrun "
                              "(the dist checkpoint reshards to any TP/PP on load)")
    owned = not dist.is_initialized()
    parallel.initialize(parallel.ParallelConfig())
    try:
        yield
    finally:
        if owned:
            parallel.destroy()


def meta_model(arch: ModelArch, dtype_of: Callable[[str], torch.dtype], padded_vocab: int):
    """The whole model (TP=PP=1) on the meta device, each parameter `name` with dtype `dtype_of(name)`.

    `padded_vocab`: rows of the embedding / output layer, the padded size of the TP the checkpoint is made for.
    """
    from .builder import build_gpt_model

    with torch.device("meta"):  # no init: nothing is held (a MoE layer's experts took seconds to "initialise")
        model = build_gpt_model(arch, on_gpu=False, padded_vocab=padded_vocab,
                                config_overrides={"perform_initialization": False})
    for name, p in model.named_parameters():
        p.data = torch.empty(p.shape, dtype=dtype_of(name), device="meta")
    return model


def _sharded_tensors(sharded_sd: dict) -> Iterator[tuple[str, object]]:
    """(parameter name, ShardedTensor) of every tensor megatron writes, with factories (SwiGLU split) built."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

    for path, entry in sharded_sd.items():
        if isinstance(entry, ShardedTensorFactory):
            for st in nested_values(entry.build()):
                yield path, st
        elif isinstance(entry, ShardedTensor):
            yield path, entry


@contextlib.contextmanager
def _without_torch_function_modes():
    """Lift the torch function modes (on CPU, parallel/cpu_compat's CUDA -> CPU rewriting) for a section that
    creates no device tensors: the mode is a Python call per torch call, ~1 s for a MoE layer's save."""
    from torch.overrides import _get_current_function_mode_stack, _pop_mode_temporarily

    with contextlib.ExitStack() as stack:
        for _ in _get_current_function_mode_stack():
            stack.enter_context(_pop_mode_temporarily())
        yield


def chunk_sources(sharded_sd: dict) -> dict[tuple[str, tuple[int, ...]], tuple[str, tuple[slice, ...]]]:
    """(checkpoint key, global offset) of each chunk -> (parameter name, its slice of the full TP=1 parameter)."""
    out = {}
    for path, st in _sharded_tensors(sharded_sd):
        p = st.prepend_axis_num  # leading axes megatron adds (the layer index of stacked layers)
        slices = tuple(slice(o, o + s) for o, s in zip(st.global_offset[p:], st.local_shape))
        out[(st.key, tuple(st.global_offset))] = (path, slices)
    return out


class _Arena:
    """One buffer reused for every tensor of a conversion: fresh memory costs a page fault per 4 KiB on first touch
    (about as much as copying it), reused memory does not. Tensors handed out are views of it, valid until the next
    `tensor()` / `views()` call overwrites them."""

    def __init__(self, nbytes: int):
        self.nbytes = nbytes
        self._buf: Optional[torch.Tensor] = None

    def _memory(self, need: int) -> torch.Tensor:
        # grown on demand: a conversion whose large tensors are copied file to file never allocates their size
        if self._buf is None or self._buf.numel() < need:
            self._buf = None
            self._buf = torch.empty(max(need, 1), dtype=torch.uint8)
        return self._buf

    def tensor(self, shape, dtype: torch.dtype) -> torch.Tensor:
        """A tensor at the start of the buffer whose storage is exactly its bytes (torch's checkpoint writer clones
        a tensor that is a view of a larger storage)."""
        import ctypes

        numel = math.prod(shape)
        nbytes = numel * dtype.itemsize
        if nbytes > self.nbytes:
            raise AssertionError(f"chunk of {nbytes} bytes > conversion buffer of {self.nbytes}")
        if nbytes == 0:
            return torch.empty(shape, dtype=dtype)
        raw = (ctypes.c_char * nbytes).from_address(self._memory(nbytes).data_ptr())
        return torch.frombuffer(raw, dtype=dtype, count=numel).view(shape)

    def views(self, specs: list[tuple[tuple, torch.dtype]]) -> list[torch.Tensor]:
        """Tensors of the given (shape, dtype), side by side in the buffer (64-byte aligned)."""
        out, at = [], 0
        mem = self._memory(sum(_aligned(math.prod(shape) * dtype.itemsize) for shape, dtype in specs))
        for shape, dtype in specs:
            nbytes = math.prod(shape) * dtype.itemsize
            if at + nbytes > self.nbytes:
                raise AssertionError(f"batch of {at + nbytes} bytes > conversion buffer of {self.nbytes}")
            out.append(mem[at:at + nbytes].view(dtype).view(shape))
            at += _aligned(nbytes)
        return out


def _aligned(nbytes: int) -> int:
    return -(-nbytes // 64) * 64


def _lazy_save_strategy(materialize: Callable[[str, tuple, torch.Size], torch.Tensor], sources: MappedFiles):
    """torch_dist save strategy whose tensors are produced on demand, one chunk at a time, by `materialize`; the
    bytes of tensors over `sources` (mapped input files) are copied file to file (`file_copy`)."""
    import torch.distributed.checkpoint as dcp
    from megatron.core.dist_checkpointing.strategies.torch import (
        MCoreSavePlanner,
        TorchDistSaveShardedStrategy,
        _replace_state_dict_keys_with_sharded_keys,
        mcore_to_pyt_state_dict,
    )
    from torch.distributed.checkpoint.planner import WriteItemType

    class LazyPlanner(MCoreSavePlanner):
        def resolve_data(self, write_item):
            if write_item.type == WriteItemType.BYTE_IO:
                return super().resolve_data(write_item)
            return materialize(write_item.index.fqn, tuple(write_item.index.offset),
                               write_item.tensor_data.chunk.sizes)

    class LazySaveStrategy(TorchDistSaveShardedStrategy):
        def save(self, sharded_state_dict, checkpoint_dir):
            flat, _, _ = _replace_state_dict_keys_with_sharded_keys(sharded_state_dict, self.keep_only_main_replica)
            # One thread and no copy-ahead: the torch writer then resolves each item just before writing it, in
            # plan order, which `materialize` relies on to reuse one buffer for every chunk. Megatron's own async
            # writer resolves every item before writing any. No fsync (as safetensors' save_file and HF's
            # save_pretrained): the output is rebuilt from the untouched input if a crash loses it, and it is
            # renamed into place and sealed by its manifest only once complete. No CRC32 per record either
            # (torch.load does not check it; the manifest records every file's size).
            writer = dcp.FileSystemWriter(str(checkpoint_dir), thread_count=1, per_thread_copy_ahead=0,
                                          sync_files=False)
            writer.fs = copying_file_system(sources)
            crc = torch.serialization.get_crc32_options()
            torch.serialization.set_crc32_options(False)
            try:
                # no_dist: one process plans alone (no all_gather_object of its ~800-chunk plan to itself)
                dcp.save(mcore_to_pyt_state_dict(flat, False), storage_writer=writer, no_dist=True,
                         planner=LazyPlanner(dedup_replicated_tensors=False, flatten_state_dict=False))
            finally:
                torch.serialization.set_crc32_options(crc)

    return LazySaveStrategy("torch_dist", 1)


def save_lazy_dist_checkpoint(model, fill_chunk: Callable[[str, tuple, torch.Tensor], None], model_dir: Path,
                              log: Callable[[str], None] = print,
                              map_chunk: Optional[Callable[[str, tuple], Optional[torch.Tensor]]] = None,
                              sources: Optional[MappedFiles] = None) -> None:
    """Write the dist checkpoint of meta `model`; `fill_chunk(name, slices, out)` writes the part `slices` of
    parameter `name` (TP=1) into `out`, on demand, one chunk at a time. `map_chunk(name, slices)`, where given,
    returns that part as a tensor over a mapped file of `sources` (copied file to file), or None (then `fill_chunk`).

    Memory: one buffer the size of the largest chunk `fill_chunk` fills, reused for every chunk.
    """
    from megatron.core import dist_checkpointing

    sharded_sd = model.sharded_state_dict()
    chunks_of = chunk_sources(sharded_sd)
    chunks = [st for _, st in _sharded_tensors(sharded_sd)]
    total = sum(st.data.numel() * st.data.element_size() for st in chunks)
    arena = _Arena(max((math.prod(st.local_shape) * st.data.element_size() for st in chunks), default=0))
    dtypes = {path: st.data.dtype for path, st in _sharded_tensors(sharded_sd)}
    progress = Progress("hf->megatron", len(chunks_of), total, log)

    def materialize(key, offset, sizes):
        path, slices = chunks_of[(key, offset)]
        out = map_chunk(path, slices) if map_chunk else None
        if out is None:
            out = arena.tensor(tuple(s.stop - s.start for s in slices), dtypes[path])
            fill_chunk(path, slices, out)
        progress(out.nbytes)
        return out.reshape(sizes)

    model_dir.mkdir(parents=True)
    own = sources is None
    sources = MappedFiles() if own else sources
    try:
        # No access-integrity check: it gathers every shard's metadata from all ranks to check they tile each
        # tensor, and here one process holds every shard of the TP=1 model (0.7 s for a 128-expert layer).
        with _without_torch_function_modes():
            dist_checkpointing.save(sharded_sd, str(model_dir),
                                    sharded_strategy=_lazy_save_strategy(materialize, sources),
                                    validate_access_integrity=False)
    finally:
        if own:
            sources.close()
    progress.done()


def iter_checkpoint_hf_tensors(model_dir, arch: ModelArch,
                               log: Optional[Callable[[str], None]] = None) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF name, tensor or `FileSpan`) of a dist checkpoint (needs `single_process_megatron`).

    An HF tensor that is rows of stored chunks comes as a `FileSpan` (their byte ranges in the open checkpoint
    files, for `ShardedSafetensorsWriter` to copy file to file). The other parameters are read in batches, one
    torch_dist load each (`dist_reader`: whole chunks preadv'd into place), into one reused buffer the size of the
    largest of them; their tensors are views of that buffer. Either is valid until the iterator moves on, so write
    or copy it before asking for more. Memory: that buffer, plus one chunk where torch's own reader handles it.
    `log` gets progress lines.
    """
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

    model_dir = Path(model_dir)
    stored = dist_checkpointing.load_tensors_metadata(str(model_dir))
    embedding = stored.get("embedding.word_embeddings.weight")
    if embedding is None:
        raise CheckpointError(f"tensor 'embedding.word_embeddings.weight' is missing from {model_dir}")
    # the padded vocabulary the checkpoint was saved with; to_hf strips the padding rows
    model = meta_model(arch, lambda _: torch.float32, padded_vocab=embedding.global_shape[0])
    sharded_sd = model.sharded_state_dict()
    _check_stored_tensors(sharded_sd, stored, model_dir)
    entries = [(k, v) for k, v in sharded_sd.items() if isinstance(v, (ShardedTensor, ShardedTensorFactory))]
    keys = {st.key for _, st in _sharded_tensors(sharded_sd)}
    total = sum(math.prod(stored[k].global_shape) * stored[k].dtype.itemsize for k in keys)
    progress = Progress("megatron->hf", len(entries), total, log or (lambda _: None))
    specs = [(tuple(entry.data.shape), stored[entry.key].dtype) for _, entry in entries]
    sizes = [_aligned(math.prod(shape) * dtype.itemsize) for shape, dtype in specs]
    reader = direct_reader(model_dir)  # one reader: the metadata is read once for all batches
    files = ChunkFiles(reader)
    try:
        hf_shapes = expected_hf_shapes(arch)
        rest = []
        for j, (path, entry) in enumerate(entries):
            spans = file_spans(path, [st for _, st in _sharded_tensors({path: entry})], arch, files, hf_shapes)
            if spans is None:
                rest.append(j)
                continue
            yield from spans  # the consumer copies their bytes before asking for more
            progress(math.prod(entry.data.shape) * specs[j][1].itemsize)
        yield from _load_in_batches(rest, entries, specs, sizes, reader, arch, progress)
    finally:
        files.close()
    progress.done()


def _load_in_batches(rest, entries, specs, sizes, reader, arch, progress):
    """The HF tensors of entries `rest`, loaded in batches (one torch_dist load each) into one reused buffer."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensorFactory

    arena = _Arena(max((sizes[j] for j in rest), default=0))
    batches, used = [[]], 0
    for j in rest:
        if used + sizes[j] > arena.nbytes:
            batches.append([])
            used = 0
        batches[-1].append(j)
        used += sizes[j]
    for batch in batches:
        fulls = arena.views([specs[j] for j in batch])
        request = {}
        for j, full in zip(batch, fulls):
            entry = entries[j][1]
            if isinstance(entry, ShardedTensorFactory):  # SwiGLU: its chunks are views of `full`
                chunks = nested_values(dataclasses.replace(entry, data=full).build())
            else:
                chunks = [dataclasses.replace(entry, data=full, dtype=full.dtype)]
            request.update({f"{j}.{c}": _as_partial_read(st) for c, st in enumerate(chunks)})
        if request:
            load_in_place(request, reader)
        for j, full in zip(batch, fulls):
            progress(full.numel() * full.element_size())
            yield from to_hf(entries[j][0], [full], arch).items()


def _as_partial_read(st):
    """The same chunk with its prepended (layer) axes made real axes of size 1.

    A chunk with prepended axes goes through torch's ShardedTensor, which wants every chunk of the grid held by
    some rank; one process reading one layer holds one chunk. Without prepended axes megatron uses its
    checkpointable tensor, which reads any subset.
    """
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    p = st.prepend_axis_num
    shape = (1,) * p + tuple(st.local_shape)
    offsets = [(a, st.global_offset[a] // shape[a], st.global_shape[a] // shape[a])
               for a in range(len(shape)) if shape[a] != st.global_shape[a]]
    return ShardedTensor.from_rank_offsets(st.key, st.data.view(shape), *offsets, replica_id=0)


def _check_stored_tensors(sharded_sd: dict, stored: dict, model_dir: Path) -> None:
    expected = {st.key: tuple(st.global_shape) for _, st in _sharded_tensors(sharded_sd)}
    missing = sorted(expected.keys() - stored.keys())
    if missing:
        raise CheckpointError(f"tensor {missing[0]!r} is missing from {model_dir}{_more(missing)}; was it saved "
                              "from the model that hf_config describes?")
    extra = sorted(k for k in stored.keys() - expected.keys() if not k.startswith("optimizer."))
    if extra:
        raise CheckpointError(f"unexpected tensor {extra[0]!r} in {model_dir}{_more(extra)}; the checkpoint "
                              "holds a different architecture than its hf_config describes")
    for key, shape in expected.items():
        if tuple(stored[key].global_shape) != shape:
            raise CheckpointError(f"shape mismatch for {key!r} in {model_dir}: checkpoint "
                                  f"{tuple(stored[key].global_shape)} vs {shape} from the HF config")


# ---------------------------------------------------------------- the two directions


def hf_to_megatron(hf_dir, save_dir, *, tensor_model_parallel_size: int = 1, pipeline_model_parallel_size: int = 1,
                   dtype: Optional[torch.dtype] = None, overwrite: bool = False,
                   make_vocab_size_divisible_by: int = 128, log: Callable[[str], None] = print) -> Path:
    """Convert an HF safetensors folder to a Megatron checkpoint root (`iter_0000000`, `latest`, `hf_config/`).

    The vocabulary is padded as the trainer pads it at `tensor_model_parallel_size` (Megatron-LM's
    make_vocab_size_divisible_by); the checkpoint loads at any PP and at every TP with that padded size.
    """
    hf_dir, save_dir = Path(hf_dir), Path(save_dir)
    check_output_dir(save_dir, overwrite, source=hf_dir)
    arch = arch_from_hf(load_hf_config(hf_dir))
    check_parallel_sizes(arch, tensor_model_parallel_size, pipeline_model_parallel_size)
    padded = padded_vocab_size(arch.vocab_size, make_vocab_size_divisible_by, tensor_model_parallel_size)
    with HFCheckpointReader(hf_dir) as reader:
        check_hf_tensors(reader, arch)

        def dtype_of(name: str) -> torch.dtype:
            return dtype or reader.dtype(hf_names_for(name, arch)[0])

        with staging_dir(save_dir, overwrite) as tmp, single_process_megatron():
            iter_name = iteration_dir_name(0)
            sources = MappedFiles()
            try:
                save_lazy_dist_checkpoint(meta_model(arch, dtype_of, padded),
                                          chunk_filler(reader, arch, dtype_of, padded), tmp / iter_name / MODEL_DIR,
                                          log, map_chunk=chunk_mapper(reader, arch, dtype_of, sources),
                                          sources=sources)
            finally:
                sources.close()
            (tmp / HF_CONFIG_DIR).mkdir()
            copy_hf_metadata_files(hf_dir, tmp / HF_CONFIG_DIR)
            ckpt_layout.write_manifest(tmp / iter_name, ckpt_layout.KIND_MODEL, 0,
                                       arch=ckpt_layout.arch_summary(tmp / HF_CONFIG_DIR),  # last: seals the folder
                                       vocab=ckpt_layout.vocab_record(padded, tensor_model_parallel_size,
                                                                      make_vocab_size_divisible_by))
            ckpt_layout.write_latest(tmp, iter_name)
    log(f"wrote {save_dir} ({arch.family}, {arch.num_layers} layers, vocabulary {arch.vocab_size} padded to "
        f"{padded}); it loads at any PP and at TP={tensor_model_parallel_size}")
    return save_dir


def megatron_to_hf(load_dir, save_dir, *, iteration: Optional[int] = None, hf_config_dir=None,
                   dtype: Optional[torch.dtype] = None, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
                   overwrite: bool = False, log: Callable[[str], None] = print) -> Path:
    """Convert a Megatron checkpoint root (any iteration, saved at any TP/PP) to an HF safetensors folder."""
    load_dir, save_dir = Path(load_dir), Path(save_dir)
    check_output_dir(save_dir, overwrite, source=load_dir)
    hf_config_dir = Path(hf_config_dir) if hf_config_dir else load_dir / HF_CONFIG_DIR
    if not (hf_config_dir / "config.json").is_file():
        raise CheckpointError(f"no config.json in {hf_config_dir}: pass --hf-config with the model's HF folder")
    arch = arch_from_hf(load_hf_config(hf_config_dir))
    model_dir = resolve_checkpoint(load_dir, iteration)
    with single_process_megatron():
        write_hf_checkpoint(iter_checkpoint_hf_tensors(model_dir, arch, log), save_dir, hf_config_dir=hf_config_dir,
                            max_shard_bytes=max_shard_bytes, dtype=dtype, overwrite=overwrite)
    log(f"wrote {save_dir} from {model_dir}")
    return save_dir


# ---------------------------------------------------------------- command lines


def parse_size(text: str) -> int:
    """`5GB` (10^9), `2GiB` (2^30), `500MB`, or a plain number of bytes."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B)?\s*", text, re.IGNORECASE)
    if not m:
        raise argparse.ArgumentTypeError(f"bad size {text!r}; use e.g. 5GB, 500MB, 2GiB")
    unit = (m.group(2) or "B").upper()
    scale = 1 if unit == "B" else (1024 if "I" in unit else 1000) ** ("KMGT".index(unit[0]) + 1)
    return int(float(m.group(1)) * scale)


def _dtype_arg(parser):
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                        help="cast floating-point weights (default: keep the stored dtype)")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --save-dir")


def hf_to_megatron_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="convert hf-to-megatron", description=hf_to_megatron.__doc__.split("\n")[0])
    p.add_argument("--hf-dir", required=True, help="Hugging Face folder (config.json, safetensors, tokenizer)")
    p.add_argument("--save-dir", required=True, help="Megatron checkpoint root to create")
    p.add_argument("--tensor-model-parallel-size", type=int, default=1,
                   help="the trainer's TP: checked against the model, and sets the vocabulary padding")
    p.add_argument("--pipeline-model-parallel-size", type=int, default=1,
                   help="checked against the model; the checkpoint itself loads at any PP")
    p.add_argument("--make-vocab-size-divisible-by", type=int, default=128,
                   help="pad the vocabulary to a multiple of this x TP, as the trainer does (model.make_vocab_size_"
                        "divisible_by)")
    _dtype_arg(p)
    return p


def megatron_to_hf_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="convert megatron-to-hf", description=megatron_to_hf.__doc__.split("\n")[0])
    p.add_argument("--load-dir", required=True, help="Megatron checkpoint root (with `latest` and iter_* folders)")
    p.add_argument("--iteration", type=int, default=None, help="iteration to export (default: the `latest` one)")
    p.add_argument("--save-dir", required=True, help="Hugging Face folder to create")
    p.add_argument("--hf-config", default=None,
                   help="HF folder with config.json and tokenizer (default: LOAD_DIR/hf_config)")
    p.add_argument("--max-shard-size", type=parse_size, default=DEFAULT_MAX_SHARD_BYTES,
                   help="largest safetensors shard, e.g. 5GB (default), 2GiB")
    _dtype_arg(p)
    return p


def _run(fn) -> int:
    try:
        with warnings.catch_warnings():
            # megatron-core's import-time notes (no TE / Apex) and torch.distributed.checkpoint deprecations
            warnings.filterwarnings("ignore", module=r"(megatron|torch\.distributed)")
            fn()
    except (CheckpointError, UnsupportedModelError, FileNotFoundError) as e:
        from ..errors import describe  # the CLI's one-line style: `dapo-megatron convert: <kind> error: ...`

        print(f"dapo-megatron convert: {describe(e)}", file=sys.stderr)
        return 2
    return 0


def main_hf_to_megatron(argv=None) -> int:
    a = hf_to_megatron_parser().parse_args(argv)
    return _run(lambda: hf_to_megatron(
        a.hf_dir, a.save_dir, tensor_model_parallel_size=a.tensor_model_parallel_size,
        pipeline_model_parallel_size=a.pipeline_model_parallel_size, dtype=DTYPES.get(a.dtype),
        overwrite=a.overwrite, make_vocab_size_divisible_by=a.make_vocab_size_divisible_by))


def main_megatron_to_hf(argv=None) -> int:
    a = megatron_to_hf_parser().parse_args(argv)
    return _run(lambda: megatron_to_hf(
        a.load_dir, a.save_dir, iteration=a.iteration, hf_config_dir=a.hf_config, dtype=DTYPES.get(a.dtype),
        max_shard_bytes=a.max_shard_size, overwrite=a.overwrite))
