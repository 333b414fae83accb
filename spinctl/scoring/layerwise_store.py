"""Hidden states at decoder-layer boundaries for --stream: host memory (pinned for CUDA) or raw files under --spill-dir."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from spinctl.errors import OutputError, SpinctlError

SPILL_PREFIX = "spinctl-spill-"
# Without --spill-dir the boundary activations live in host memory, pinned (page-locked) on
# CUDA: past half of it the machine starts swapping or the pinned allocation fails mid-pass.
HOST_FRACTION = 0.5


def host_memory_bytes() -> int:
    """Physical memory, or the cgroup (container) limit when that is lower."""
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()  # "max" when unlimited
    except OSError:
        return total
    return min(total, int(limit)) if limit.isdigit() else total


def activation_bytes(shapes, hidden: int, itemsize: int, slots: int, pinned: bool) -> int:
    """Host bytes of `slots` layer boundaries, each one [B, T, hidden] tensor per batch of
    (B, T) in `shapes`. The pinned (CUDA host) allocator rounds each block up to a power of two."""
    per = [b * t * hidden * itemsize for b, t in shapes]
    if pinned:
        per = [1 << (n - 1).bit_length() if n > 1 else n for n in per]
    return slots * sum(per)


def check_spill_dir(path: Path) -> None:
    """--spill-dir must be an existing directory this process can create files in."""
    if not path.is_dir():
        raise OutputError(
            f"--spill-dir {path}: {'not a directory' if path.exists() else 'no such directory'}; "
            f"create it or choose another"
        )
    if not os.access(path, os.W_OK | os.X_OK):
        raise OutputError(f"--spill-dir {path}: not writable; choose a directory you can write to")


class Boundaries:
    """Tensors [B, T, D] keyed by (slot, batch): slot l is the input of decoder layer l (or,
    in the backward sweep, the gradient with respect to it). Spilled, each slot is one raw file
    read and written with pread/pwrite: the page cache holds it, not this process (no mmap,
    so it never counts in the RSS)."""

    def __init__(self, device, spill_dir: Path | None = None, side=None):
        """side: a CUDA stream for the device-to-host copies of `put` (prefetch.copy_stream), so
        that they stay off the compute stream; None puts them on the current stream."""
        self.device = device
        self.pin = device.type == "cuda"
        self.side = side
        self.mem: dict[int, dict[int, object]] = {}
        self.files: dict[
            int, tuple[int, dict[int, tuple[int, tuple, object]]]
        ] = {}  # slot -> (fd, batch -> (offset, shape, dtype))
        self.bytes = self.peak_bytes = 0
        self.dir = None
        if spill_dir is not None:
            check_spill_dir(spill_dir)
            try:
                self.dir = Path(tempfile.mkdtemp(prefix=SPILL_PREFIX, dir=spill_dir))
            except OSError as e:
                raise OutputError(f"--spill-dir {spill_dir}: cannot create files there ({e.strerror})") from None

    @property
    def get_copies(self) -> bool:
        """Whether `get` reads or copies (a spill file, a host-to-device copy); on CPU in host
        memory it hands out the stored tensor itself."""
        return self.dir is not None or self.device.type != "cpu"

    def __enter__(self) -> Boundaries:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def put(self, slot: int, batch: int, t) -> None:
        """Store t [B, T, D] (on the device); replaces what (slot, batch) held."""
        import torch

        t = t.detach()
        nbytes = t.numel() * t.element_size()
        if self.dir is None:
            old = self.mem.setdefault(slot, {}).get(batch)
            if t.device.type != "cpu":
                host = self._host_empty(t.shape, t.dtype)
                if self.side is None:
                    host.copy_(t, non_blocking=True)  # stream-ordered: get() copies it back on the same stream
                else:
                    self.side.wait_stream(torch.cuda.current_stream(self.device))  # t is computed
                    with torch.cuda.stream(self.side):
                        host.copy_(t, non_blocking=True)
                    t.record_stream(self.side)  # its memory is not reused before the copy ends
                t = host
            self.mem[slot][batch] = t
            self._count(nbytes - (old.numel() * old.element_size() if old is not None else 0))
            return
        fd, where = self._file(slot)
        old = where.get(batch)
        if old is not None and old[1] == tuple(t.shape) and old[2] == t.dtype:
            offset = old[0]  # a gradient overwrites the hidden state it replaces, in place
        else:
            offset = os.fstat(fd).st_size
            self._count(nbytes)
        data = t.to("cpu").contiguous().view(torch.uint8).reshape(-1).numpy()
        view, done = memoryview(data), 0
        try:
            while done < nbytes:
                done += os.pwrite(fd, view[done:], offset + done)
        except OSError as e:
            raise OutputError(
                f"--spill-dir {self.dir.parent}: cannot write activations ({e.strerror}); "
                f"free {nbytes >> 20} MiB or more there, or choose another directory"
            ) from None
        where[batch] = (offset, tuple(t.shape), t.dtype)

    def get(self, slot: int, batch: int):
        """The tensor stored at (slot, batch), on the device (on CPU: the stored tensor itself; do not modify it)."""
        import torch

        if self.dir is None:
            if self.side is not None:  # after put's copy (prefetch.py's worker reads on the side stream itself)
                stream = torch.cuda.current_stream(self.device)
                if stream != self.side:
                    stream.wait_stream(self.side)
            return self.mem[slot][batch].to(self.device, non_blocking=True)
        fd, where = self.files[slot]
        offset, shape, dtype = where[batch]
        n = torch.Size(shape).numel() * dtype.itemsize
        buf = self._host_empty((n,), torch.uint8)
        view, done = memoryview(buf.numpy()), 0
        while done < n:
            got = os.preadv(fd, [view[done:]], offset + done)
            if got == 0:
                raise OutputError(f"{self.dir}: a spill file was truncated while in use")
            done += got
        return buf.view(dtype).reshape(shape).to(self.device, non_blocking=True)

    def drop(self, slot: int) -> None:
        """Forget a slot: its memory or its file goes."""
        if slot in self.mem:
            self._count(-sum(t.numel() * t.element_size() for t in self.mem.pop(slot).values()))
        if slot in self.files:
            fd, _ = self.files.pop(slot)
            self._count(-os.fstat(fd).st_size)
            os.close(fd)
            os.unlink(self.dir / f"slot-{slot}.bin")

    def close(self) -> None:
        """Free everything; spill files and their directory are removed."""
        self.mem.clear()
        for fd, _ in self.files.values():
            os.close(fd)
        self.files.clear()
        if self.dir is not None:
            shutil.rmtree(self.dir, ignore_errors=True)
            self.dir = None

    def _host_empty(self, shape, dtype):
        """A host buffer (pinned for CUDA); running out is one line that says what to do."""
        import torch

        try:
            return torch.empty(shape, dtype=dtype, pin_memory=self.pin)
        except (RuntimeError, MemoryError) as e:  # cudaHostAlloc or the CPU allocator
            need = torch.Size(shape).numel() * dtype.itemsize
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise SpinctlError(
                f"--stream: host memory ran out holding {self.bytes / 2**30:.1f} GiB of layer activations "
                f"(another {need >> 20} MiB{' pinned' if self.pin else ''}: {first}); add --spill-dir DIR "
                f"to keep them in files on a disk with room"
            ) from None

    def _file(self, slot: int):
        if slot not in self.files:
            path = self.dir / f"slot-{slot}.bin"
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
            except OSError as e:
                raise OutputError(f"{path}: cannot create a spill file ({e.strerror})") from None
            self.files[slot] = (fd, {})
        return self.files[slot]

    def _count(self, delta: int) -> None:
        self.bytes += delta
        self.peak_bytes = max(self.peak_bytes, self.bytes)
