"""Shared memory between kiln-serve's intake processes and its model process: arenas of tensors.

Serve path, shared memory (numpy: no HTTP, no torch). An `Arena` is a memfd mapped by two processes:
anonymous memory with no file system behind it, so it works under a read-only root and is not
bounded by a container's 64 MB /dev/shm, and it vanishes with the last process that maps it. One
side owns each arena and allocates blocks in it; the other only reads or writes the blocks a frame
names (kiln.runtime.frames). Requests' tensors travel as `Ref`s: an offset, a dtype and a shape.

An arena's first ALIGNMENT bytes are its header, two counters the owning intake writes and the model
process reads: request bodies still arriving (kiln.runtime.bodies; the batcher waits for them) and
connections closed so far (the model process hands new connections to the intake with the fewest open).
"""

from __future__ import annotations

import bisect
import mmap
import os

import numpy as np

from kiln.runtime.tensors import ALIGNMENT

HEADER = ALIGNMENT  # bytes before the first block
Ref = tuple[int, str, list[int]]  # (offset, numpy dtype string, shape): one tensor in an arena


class Arena:
    """A shared mapping and, on its owning side, a first-fit allocator of ALIGNMENT-sized blocks.

    Allocation runs on one event loop thread per process: no locks. Low addresses are reused first,
    so a lightly loaded arena touches (and commits) only its first pages."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.size = os.fstat(fd).st_size
        self.map = mmap.mmap(fd, self.size)
        self.bytes = np.frombuffer(self.map, dtype=np.uint8)
        self.base: int = self.bytes.ctypes.data
        # One writer (the owner's event loop), any readers: an aligned 8-byte store is atomic on x86 and arm64.
        self._header = self.bytes[:16].view(np.int64)  # [arriving bodies, closed connections]
        self._free: list[tuple[int, int]] = [(HEADER, self.size - HEADER)]  # (start, length), sorted by start
        self._used: dict[int, int] = {}  # start → length

    @property
    def arriving(self) -> int:
        """Request bodies the owner is still receiving (the header's count)."""
        return int(self._header[0])

    def arrive(self, delta: int) -> None:
        self._header[0] += delta

    def connection_closed(self) -> None:
        self._header[1] += 1

    @property
    def used(self) -> int:
        return sum(self._used.values())

    def alloc(self, nbytes: int) -> int | None:
        """The offset of a new block of at least `nbytes`, or None when no free run is that long."""
        need = -(-max(nbytes, 1) // ALIGNMENT) * ALIGNMENT
        for i, (start, length) in enumerate(self._free):
            if length >= need:
                if length == need:
                    del self._free[i]
                else:
                    self._free[i] = (start + need, length - need)
                self._used[start] = need
                return start
        return None

    def free(self, start: int) -> None:
        """Return a block; free neighbours merge, so long runs come back."""
        length = self._used.pop(start, None)
        if length is None:
            return  # already freed (a release frame repeated by a retry): harmless
        i = bisect.bisect(self._free, (start, 0))
        if i < len(self._free) and self._free[i][0] == start + length:
            length += self._free.pop(i)[1]
        if i > 0 and sum(self._free[i - 1]) == start:
            self._free[i - 1] = (self._free[i - 1][0], self._free[i - 1][1] + length)
        else:
            self._free.insert(i, (start, length))

    def array(self, ref: Ref) -> np.ndarray:
        """The tensor a Ref names, where it lies (no copy). Raises ValueError when it runs past the arena."""
        offset, dtype, shape = ref
        dt = np.dtype(dtype)
        count = int(np.prod(shape)) if shape else 1
        if not 0 <= offset <= self.size - count * dt.itemsize:
            raise ValueError(f"tensor {shape} {dtype} at {offset} runs past the shared arena ({self.size} bytes)")
        return np.ndarray(shape, dt, buffer=self.map, offset=offset)

    def offset_of(self, array: np.ndarray) -> int | None:
        """Where a C-contiguous array lies in this arena, or None if it lies elsewhere."""
        start = array.ctypes.data - self.base
        if array.flags.c_contiguous and start >= 0 and start + array.nbytes <= self.size:
            return start
        return None

    def put(self, array: np.ndarray) -> Ref | None:
        """A copy of `array` in a new block (freed by its offset); None when the arena is full."""
        array = np.ascontiguousarray(array)
        start = self.alloc(array.nbytes)
        if start is None:
            return None
        target = np.ndarray(array.shape, array.dtype, buffer=self.map, offset=start)
        np.copyto(target, array)
        return start, array.dtype.str, list(array.shape)

    def close(self) -> None:
        """Forget the fd; the mapping goes when the last array viewing it does."""
        os.close(self.fd)
