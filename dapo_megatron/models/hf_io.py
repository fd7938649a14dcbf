"""Hugging Face checkpoint folders on disk: a validating safetensors reader and a streaming sharded writer.

Both stream: the reader reads one tensor with `preadv` into a fresh buffer (no mmap, so resident memory is what the
caller holds), the writer writes each tensor to its shard file as it arrives. A safetensors file starts with its JSON
header, which is only known once the shard is full, so the writer reserves `HEADER_RESERVE` bytes at the start of
each shard and fills the header in (space-padded, as the format allows) when the shard closes. The output folder is
built under a temporary sibling and renamed into place only when complete (`staging_dir`).
"""
import contextlib
import ctypes
import json
import os
import shutil
import struct
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional

import torch

from .file_copy import FileSpan

DEFAULT_MAX_SHARD_BYTES = 5 * 10**9  # Hugging Face's default max_shard_size="5GB"
HEADER_RESERVE = 64 * 1024  # room for ~500 tensor entries per shard; a shard closes early when it is full
_MAX_HEADER = 100 * 1000 * 1000  # the safetensors library refuses larger headers
INDEX_NAME = "model.safetensors.index.json"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf", ".index.json")

DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


class CheckpointError(ValueError):
    """A refused input or output; the message names the file or tensor and what to do."""


# ---------------------------------------------------------------- reading


class HFCheckpointReader:
    """Tensors of a (sharded) safetensors HF folder, validated up front: every shard exists, every header parses,
    no file is shorter than its header says (truncated download), and the index agrees with the headers."""

    def __init__(self, hf_dir):
        self.hf_dir = Path(hf_dir)
        self._entries: dict[str, tuple[Path, str, tuple[int, ...], int, int]] = {}
        self._fds: dict[Path, int] = {}
        for file in self._shard_files():
            self._read_header(file)

    def _shard_files(self) -> list[Path]:
        index = self.hf_dir / INDEX_NAME
        if index.is_file():
            try:
                self._weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as e:
                raise CheckpointError(f"{index} is not a valid safetensors index ({e})") from e
            files = sorted(set(self._weight_map.values()))
            for f in files:
                if not (self.hf_dir / f).is_file():
                    raise CheckpointError(f"{index} lists shard {f}, which is missing from {self.hf_dir}")
            return [self.hf_dir / f for f in files]
        single = self.hf_dir / "model.safetensors"
        if single.is_file():
            self._weight_map = None
            return [single]
        raise CheckpointError(f"no model.safetensors or {INDEX_NAME} in {self.hf_dir}: pass a Hugging Face "
                              "folder with safetensors weights (convert .bin weights with save_pretrained first)")

    def _read_header(self, file: Path) -> None:
        size = file.stat().st_size
        with open(file, "rb") as f:
            head = f.read(8)
            n = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
            if n < 2 or n > _MAX_HEADER or 8 + n > size:
                raise CheckpointError(f"{file} is truncated or not a safetensors file ({size} bytes)")
            try:
                header = json.loads(f.read(n))
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise CheckpointError(f"{file} has a corrupt safetensors header ({e})") from e
        header.pop("__metadata__", None)
        data_start, end = 8 + n, 0
        for name, info in header.items():
            if info.get("dtype") not in DTYPES:
                raise CheckpointError(f"tensor {name!r} in {file} has unsupported dtype {info.get('dtype')!r}")
            begin, stop = info["data_offsets"]
            self._entries[name] = (file, info["dtype"], tuple(info["shape"]), data_start + begin, stop - begin)
            end = max(end, stop)
        if data_start + end > size:
            raise CheckpointError(f"{file} is truncated: its header needs {data_start + end} bytes, the file has "
                                  f"{size}; re-download it")
        if self._weight_map is not None:
            for name in header:
                if self._weight_map.get(name, file.name) != file.name:
                    raise CheckpointError(f"tensor {name!r} is in {file.name} but {INDEX_NAME} says "
                                          f"{self._weight_map[name]}")
            listed = {k for k, v in self._weight_map.items() if v == file.name}
            if listed - header.keys():
                raise CheckpointError(f"{INDEX_NAME} lists {sorted(listed - header.keys())[0]!r} in {file.name}, "
                                      "which does not contain it")

    @property
    def names(self) -> list[str]:
        return list(self._entries)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._entry(name)[2]

    def dtype(self, name: str) -> torch.dtype:
        return DTYPES[self._entry(name)[1]]

    def nbytes(self, name: str) -> int:
        return self._entry(name)[4]

    def file_of(self, name: str) -> str:
        return self._entry(name)[0].name

    def _entry(self, name):
        if name not in self._entries:
            raise CheckpointError(f"tensor {name!r} is missing from the checkpoint in {self.hf_dir}")
        return self._entries[name]

    def get(self, name: str) -> torch.Tensor:
        _, dtype, shape, _, nbytes = self._entry(name)
        buf = torch.empty(nbytes, dtype=torch.uint8)
        self.read_rows_into(name, 0, shape[0] if shape else 1, buf)
        return buf.view(DTYPES[dtype]).reshape(shape)

    def row_location(self, name: str, start: int, stop: int) -> tuple[Path, int, int]:
        """(file, byte offset, byte count) of rows [start, stop) of tensor `name` (dim 0)."""
        file, _, shape, offset, nbytes = self._entry(name)
        row = nbytes // max(shape[0], 1) if shape else nbytes
        if not (0 <= start <= stop <= (shape[0] if shape else 1)):
            raise ValueError(f"row_location({name!r}, {start}, {stop}): bad range for shape {shape}")
        return file, offset + start * row, (stop - start) * row

    def read_rows_into(self, name: str, start: int, stop: int, out: torch.Tensor) -> None:
        """Read rows [start, stop) of tensor `name` (dim 0; a 0-d tensor has one row) into contiguous `out`, which
        must hold exactly those bytes (any dtype view): no intermediate buffer."""
        file, dtype, shape, offset, nbytes = self._entry(name)
        row = nbytes // max(shape[0], 1) if shape else nbytes
        if not (0 <= start <= stop <= (shape[0] if shape else 1)) or not out.is_contiguous() or \
                out.numel() * out.element_size() != (stop - start) * row:
            raise ValueError(f"read_rows_into({name!r}, {start}, {stop}): bad range or output {tuple(out.shape)}")
        if file not in self._fds:
            self._fds[file] = os.open(file, os.O_RDONLY)
        _pread_into(self._fds[file], out, offset + start * row, f"{name!r} in {file}")

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def __enter__(self):
        return self

    def __exit__(self, *_):
        self.close()


def _byte_view(t: torch.Tensor) -> memoryview:
    """The bytes of a contiguous CPU tensor, without copying. ctypes rather than `.numpy()`: sharing with numpy
    would make the storage non-resizable, and its owner may free it early (conversion) or offload it (training)."""
    nbytes = t.numel() * t.element_size()
    if not nbytes:
        return memoryview(b"")
    return memoryview((ctypes.c_char * nbytes).from_address(t.data_ptr())).cast("B")


def _pread_into(fd: int, buf: torch.Tensor, offset: int, what: str) -> None:
    view, done = _byte_view(buf), 0
    while done < len(view):
        n = os.preadv(fd, [view[done:done + (1 << 30)]], offset + done)
        if n == 0:
            raise CheckpointError(f"unexpected end of file while reading tensor {what}")
        done += n


# ---------------------------------------------------------------- writing


class ShardedSafetensorsWriter:
    """Writes named tensors into `model-XXXXX-of-YYYYY.safetensors` shards of at most `max_shard_bytes` each.

    Memory: one tensor at a time (plus its dtype cast). A `file_copy.FileSpan` given in place of a tensor (bytes of
    another file) is copied file to file, not through memory. `close()` finalises the shards and returns the
    weight map.
    """

    def __init__(self, out_dir, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, dtype: Optional[torch.dtype] = None,
                 on_tensor: Optional[Callable[[int], None]] = None):
        self.out_dir = Path(out_dir)
        self.max_shard_bytes = max_shard_bytes
        self.dtype = dtype
        self.on_tensor = on_tensor
        self._shards: list[tuple[Path, dict]] = []  # (file, header) of every shard; the last one is open
        self._names: set[str] = set()
        self._file = None
        self._data_bytes = self._header_len = 0
        self.dtypes: set[torch.dtype] = set()
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if name in self._names:
            raise CheckpointError(f"tensor {name!r} was written twice")
        self._names.add(name)
        if isinstance(tensor, FileSpan) and self.dtype is not None and tensor.dtype.is_floating_point \
                and tensor.dtype != self.dtype:
            tensor = tensor.read()  # a cast: through memory
        if isinstance(tensor, FileSpan):
            t = tensor
        else:
            t = tensor.detach()
            if self.dtype is not None and t.is_floating_point():
                t = t.to(self.dtype)
            t = t.cpu().contiguous()
        if t.dtype not in DTYPE_NAMES:
            raise CheckpointError(f"tensor {name!r} has dtype {t.dtype}, which safetensors cannot store")
        nbytes = t.nbytes
        entry = {"dtype": DTYPE_NAMES[t.dtype], "shape": list(t.shape),
                 "data_offsets": [self._data_bytes, self._data_bytes + nbytes]}
        # An upper bound of what the entry adds to the header (its offsets only shrink in a new shard).
        entry_len = len(json.dumps({name: entry}, separators=(",", ":")))
        if self._file is None or (self._data_bytes and self._data_bytes + nbytes > self.max_shard_bytes) \
                or self._header_len + entry_len > HEADER_RESERVE:
            self._open_shard()
            entry["data_offsets"] = [0, nbytes]
        if isinstance(t, FileSpan):  # copied file to file, in the kernel
            self._file.flush()
            at = self._file.tell()
            t.copy_to(self._file.fileno(), at)
            self._file.seek(at + nbytes)
        else:
            self._file.write(_byte_view(t))
        self._shards[-1][1][name] = entry
        self._header_len += entry_len
        self._data_bytes += nbytes
        self.total_bytes += nbytes
        self.dtypes.add(t.dtype)
        if self.on_tensor:
            self.on_tensor(nbytes)

    def _open_shard(self) -> None:
        self._close_shard()
        path = self.out_dir / f"model-{len(self._shards) + 1:05d}.safetensors.partial"
        self._file = open(path, "wb")
        self._file.write(b" " * (8 + HEADER_RESERVE))
        self._shards.append((path, {}))
        self._data_bytes = 0
        self._header_len = len(_header_bytes({}))

    def _close_shard(self) -> None:
        if self._file is None:
            return
        header = _header_bytes(self._shards[-1][1])
        self._file.seek(0)
        self._file.write(struct.pack("<Q", HEADER_RESERVE) + header.ljust(HEADER_RESERVE, b" "))
        self._file.close()
        self._file = None

    def close(self) -> dict[str, str]:
        """Finalise every shard, rename them `-of-N`, and return {tensor name: shard file name}."""
        if not self._shards:
            raise CheckpointError("no tensors were written")
        self._close_shard()
        weight_map = {}
        for i, (path, header) in enumerate(self._shards, 1):
            final = f"model-{i:05d}-of-{len(self._shards):05d}.safetensors"
            path.rename(self.out_dir / final)
            weight_map.update({name: final for name in header})
        return weight_map


def _header_bytes(entries: dict) -> bytes:
    return json.dumps({"__metadata__": {"format": "pt"}, **entries}, separators=(",", ":")).encode()


def copy_hf_metadata_files(src_dir, dst_dir) -> list[str]:
    """Copy config.json, generation_config.json, tokenizer and other non-weight files of an HF folder."""
    src_dir, dst_dir = Path(src_dir), Path(dst_dir)
    if not (src_dir / "config.json").is_file():
        raise CheckpointError(f"no config.json in {src_dir}: pass the Hugging Face folder the model came from")
    copied = []
    for f in sorted(src_dir.iterdir()):
        if f.is_file() and not f.name.startswith(".") and not f.name.endswith(WEIGHT_SUFFIXES):
            shutil.copy2(f, dst_dir / f.name)
            copied.append(f.name)
    return copied


def set_config_dtype(config_file, dtype: torch.dtype) -> None:
    """Record the weights' dtype in config.json (`dtype` in transformers 5, `torch_dtype` before)."""
    cfg = json.loads(Path(config_file).read_text())
    name = str(dtype).removeprefix("torch.")
    keys = [k for k in ("dtype", "torch_dtype") if k in cfg] or ["torch_dtype"]
    cfg.update({k: name for k in keys})
    Path(config_file).write_text(json.dumps(cfg, indent=2) + "\n")


def write_hf_checkpoint(named_tensors: Iterable[tuple[str, torch.Tensor]], out_dir, *, hf_config_dir=None,
                        max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, dtype: Optional[torch.dtype] = None,
                        overwrite: bool = False, on_tensor: Optional[Callable[[int], None]] = None) -> Path:
    """Write an HF folder: sharded safetensors + `model.safetensors.index.json` (+ config/tokenizer files copied
    from `hf_config_dir`, with config.json's dtype set to the weights' dtype). Atomic: built in a temporary
    sibling folder and renamed to `out_dir` once complete; nothing is left behind on error."""
    with staging_dir(out_dir, overwrite) as tmp:
        writer = ShardedSafetensorsWriter(tmp, max_shard_bytes, dtype, on_tensor)
        for name, tensor in named_tensors:
            writer.add(name, tensor)
        weight_map = writer.close()
        index = {"metadata": {"total_size": writer.total_bytes}, "weight_map": weight_map}
        (tmp / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
        if hf_config_dir is not None:
            copy_hf_metadata_files(hf_config_dir, tmp)
            if len(writer.dtypes) == 1:
                set_config_dtype(tmp / "config.json", next(iter(writer.dtypes)))
    return Path(out_dir)


# ---------------------------------------------------------------- output folders and progress


def check_output_dir(out_dir, overwrite: bool, source=None) -> None:
    """Refuse a non-empty `out_dir` unless `overwrite`, and an `out_dir` that is or holds the `source` folder."""
    out_dir = Path(out_dir)
    if source is not None:
        src, dst = Path(source).resolve(), out_dir.resolve()
        if src == dst or dst in src.parents:
            raise CheckpointError(f"the output folder {out_dir} would replace the input {source}; choose another")
    if out_dir.exists() and not out_dir.is_dir():
        raise CheckpointError(f"{out_dir} exists and is not a folder")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite:
        raise CheckpointError(f"{out_dir} is not empty; pass --overwrite to replace it or choose another folder")


@contextlib.contextmanager
def staging_dir(out_dir, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside `out_dir`; on success it replaces `out_dir`, on error it is deleted."""
    out_dir = Path(out_dir).absolute()
    check_output_dir(out_dir, overwrite)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)  # mkdtemp makes it private; the result should look like any other folder
    try:
        yield tmp
        old = None
        if out_dir.exists():
            old = out_dir.with_name(tmp.name.replace(".tmp-", ".old-"))
            out_dir.rename(old)
        tmp.rename(out_dir)
        if old is not None:
            shutil.rmtree(old)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


class Progress:
    """Prints `label: done/total tensors, GB, GB/s` at most every `interval` seconds and once at the end."""

    def __init__(self, label: str, total_tensors: int, total_bytes: int, log: Callable[[str], None] = print,
                 interval: float = 2.0):
        self.label, self.total_tensors, self.total_bytes = label, total_tensors, total_bytes
        self.log, self.interval = log, interval
        self.tensors = self.bytes = 0
        self.start = self._last = time.perf_counter()

    def __call__(self, nbytes: int) -> None:
        self.tensors += 1
        self.bytes += nbytes
        now = time.perf_counter()
        if now - self._last >= self.interval:
            self._last = now
            self.log(self.line())

    def line(self) -> str:
        secs = max(time.perf_counter() - self.start, 1e-9)
        return (f"{self.label}: {self.tensors}/{self.total_tensors} tensors, {self.bytes / 1e9:.2f}/"
                f"{self.total_bytes / 1e9:.2f} GB, {self.bytes / 1e9 / secs:.2f} GB/s, {secs:.1f} s")

    def done(self) -> None:
        self.log(self.line())
