"""Copy tensor bytes file to file inside the kernel (`copy_file_range`), for the converter.

A conversion moves every weight byte from one checkpoint file to another. Read into a buffer and written back, each
byte is copied twice (page cache -> process -> page cache) and the writes cost more than the copies; measured here,
1 GB took 1.6-2.5 s by `preadv` + `write` and 0.45 s by `copy_file_range`, which copies page cache to page cache
(or clones blocks, on file systems that can). Where the kernel refuses it (another file system, an old kernel), the
copy falls back to `preadv` + `pwrite` through a small bounce buffer.

- `FileSpan`: a tensor that is byte ranges of open files, for the safetensors writer (`hf_io`) to copy in.
- `MappedFiles` + `CopyingFileSystem`: torch_dist saves whose payloads are copied from the source files. A chunk
  that is rows of an HF tensor is handed to torch's checkpoint writer as a tensor over a private mmap of the HF
  file, never touched in memory; the output stream recognises the write of those mapped bytes and copies them from
  the file instead. Small writes (zip headers, pickles) are gathered into one buffer. Anything not recognised is
  written as it is, so the bytes written never depend on the recognition, only the speed does.
"""
import contextlib
import dataclasses
import errno
import math
import mmap
import os
from pathlib import Path
from typing import Optional

import torch

_BOUNCE = 16 << 20  # fallback copy buffer
_SMALL = 1 << 20  # writes below this are gathered into one buffer
_NO_KERNEL_COPY = {errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL, errno.EBADF, errno.EPERM}
_kernel_copy = True  # cleared after the first refusal: one probe per process


def copy_range(src_fd: int, src_offset: int, dst_fd: int, dst_offset: int, nbytes: int) -> None:
    """Copy `nbytes` from `src_fd` at `src_offset` to `dst_fd` at `dst_offset` (no file position moves)."""
    global _kernel_copy
    done = 0
    while done < nbytes and _kernel_copy:
        try:
            n = os.copy_file_range(src_fd, dst_fd, nbytes - done, src_offset + done, dst_offset + done)
        except OSError as e:
            if e.errno not in _NO_KERNEL_COPY:
                raise
            _kernel_copy = False
            break
        if n == 0:
            raise OSError(errno.EIO, f"unexpected end of file copying {nbytes} bytes at {src_offset}")
        done += n
    if done < nbytes:
        buf = memoryview(bytearray(min(_BOUNCE, nbytes - done)))
        while done < nbytes:
            n = os.preadv(src_fd, [buf[:min(len(buf), nbytes - done)]], src_offset + done)
            if n == 0:
                raise OSError(errno.EIO, f"unexpected end of file copying {nbytes} bytes at {src_offset}")
            _pwrite_all(dst_fd, buf[:n], dst_offset + done)
            done += n


def _pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    while len(data):
        n = os.pwrite(fd, data, offset)
        data, offset = data[n:], offset + n


@dataclasses.dataclass
class FileSpan:
    """A tensor of `dtype` and `shape` whose bytes are `ranges` (fd, offset, nbytes) of open files, in order."""

    dtype: torch.dtype
    shape: tuple
    ranges: list

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize

    def read(self) -> torch.Tensor:
        """The tensor in fresh memory (for a dtype cast)."""
        out = torch.empty(self.nbytes, dtype=torch.uint8)
        at = 0
        for fd, offset, n in self.ranges:
            view = memoryview(out[at:at + n].numpy())
            got = 0
            while got < n:
                k = os.preadv(fd, [view[got:]], offset + got)
                if k == 0:
                    raise OSError(errno.EIO, "unexpected end of file")
                got += k
            at += n
        return out.view(self.dtype).reshape(self.shape)

    def copy_to(self, dst_fd: int, dst_offset: int) -> None:
        for fd, offset, n in self.ranges:
            copy_range(fd, offset, dst_fd, dst_offset, n)
            dst_offset += n


class MappedFiles:
    """Private read-only-in-practice mmaps of source files: tensors over their bytes, and the way back from an
    address in them to (fd, file offset)."""

    def __init__(self):
        self._maps: dict[Path, tuple[int, mmap.mmap, int, int]] = {}  # path -> (fd, map, base address, length)

    def tensor(self, path: Path, offset: int, dtype: torch.dtype, shape: tuple) -> torch.Tensor:
        """`shape` x `dtype` at byte `offset` of `path`, a tensor whose storage is exactly those bytes (untouched:
        no page is faulted in unless something reads it)."""
        if path not in self._maps:
            fd = os.open(path, os.O_RDONLY)
            size = os.fstat(fd).st_size
            m = mmap.mmap(fd, size, access=mmap.ACCESS_COPY)  # writable view (torch wants one), never written
            self._maps[path] = (fd, m, torch.frombuffer(m, dtype=torch.uint8, count=1).data_ptr(), size)
        numel = math.prod(shape)
        if numel == 0:
            return torch.empty(shape, dtype=dtype)
        return torch.frombuffer(self._maps[path][1], dtype=dtype, count=numel, offset=offset).view(shape)

    def locate(self, address: int, nbytes: int) -> Optional[tuple[int, int]]:
        for fd, _, base, size in self._maps.values():
            if base <= address and address + nbytes <= base + size:
                return fd, address - base
        return None

    def close(self) -> None:
        for fd, m, _, _ in self._maps.values():
            with contextlib.suppress(BufferError):  # a tensor still refers to it: the map goes with that tensor
                m.close()
            os.close(fd)
        self._maps.clear()


def _address(data) -> int:
    import numpy as np

    return np.frombuffer(data, dtype=np.uint8).ctypes.data


class CopyStream:
    """A write-only binary file for torch's checkpoint writer: writes of bytes that lie in `sources` are copied from
    their file (`copy_range`); small writes are gathered and written together."""

    def __init__(self, path, sources: MappedFiles):
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
        self.sources = sources
        self.pos = 0  # bytes accepted
        self._flushed = 0  # bytes on disk
        self._buf = bytearray()
        self.copied = 0  # bytes copied from source files (for tests)

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        n = len(view)
        if n < _SMALL:
            self._buf += view
        else:
            self.flush()
            src = self.sources.locate(_address(view), n)
            if src is not None:
                copy_range(src[0], src[1], self.fd, self._flushed, n)
                self.copied += n
            else:
                _pwrite_all(self.fd, view, self._flushed)
            self._flushed += n
        self.pos += n
        return n

    def tell(self) -> int:
        return self.pos

    def flush(self) -> None:
        if self._buf:
            _pwrite_all(self.fd, memoryview(self._buf), self._flushed)
            self._flushed += len(self._buf)
            self._buf = bytearray()

    def fileno(self) -> int:
        self.flush()
        return self.fd

    def close(self) -> None:
        if self.fd >= 0:
            self.flush()
            os.close(self.fd)
            self.fd = -1


def copying_file_system(sources: MappedFiles):
    """A torch.distributed.checkpoint FileSystem whose output files are `CopyStream`s over `sources`."""
    from torch.distributed.checkpoint.filesystem import FileSystem

    class CopyingFileSystem(FileSystem):
        @contextlib.contextmanager
        def create_stream(self, path, mode):
            if mode != "wb":
                with super().create_stream(path, mode) as stream:
                    yield stream
                return
            stream = CopyStream(path, sources)
            try:
                yield stream
            finally:
                stream.close()

    return CopyingFileSystem()
