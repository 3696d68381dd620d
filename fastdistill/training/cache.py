"""Teacher-logit caching: run the teachers over a dataset once, reuse their logits for many student runs.

One cache is one safetensors file (readable by ``safetensors.torch.load_file``), written batch by batch (never
held whole in memory) and read back memory-mapped, so a student run only pages in the rows it uses:

- ``kind="full"``: ``logits`` ``[N, K, *, V]``, the K teachers' raw logits for each of the N dataset items
  (``*`` is the per-item shape, e.g. ``[T]`` for a sequence of T tokens; every item must have the same shape).
- ``kind="topk"``: per row, the k largest logits ``values`` ``[N, K, *, k]``, their vocabulary ``indices``
  ``[N, K, *, k]`` (int32) and ``tail_mass`` ``[N, K, *]`` (float64): the probability (at temperature 1) of the
  V - k entries not stored. About V / (2k) times smaller than ``full``.

``kd_loss`` consumes ``full`` caches exactly. A top-k cache is read back either as its parts
(:meth:`TeacherLogitCache.topk`) or as dense logits (:meth:`TeacherLogitCache.get`) that keep the k stored
probabilities exactly and spread the tail mass uniformly over the other V - k entries; at temperature 1 that
target differs from the teacher's only inside the tail (a loss over top-k targets without densifying is a
follow-up). Two consequences of the flat tail: at a temperature T != 1 the target is the flat tail tempered, not
the teacher's tail, and the error grows fast (V = 1000, teacher and student logits N(0, 9), k = 20: forward KL
-5% at T = 1, -36% at T = 2, -44% at T = 4; k = 100: -1%, -20%, -34%; :class:`~fastdistill.training.DistillationLoop`
warns); and padded vocabulary entries (-inf teacher logits) get a share of the tail, since which entries were
padded is not stored: cache the logits without the padding (``logits[..., :V_real]``), or a full cache.
"""

from __future__ import annotations

import json
import math
import mmap
import os
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from .. import functional
from .data import checked_device, collate, default_forward, model_list, split_batch, to_device

FORMAT = "fastdistill.teacher_cache"
VERSION = "1"
_ST_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
              torch.int32: "I32"}
_TORCH_DTYPES = {v: k for k, v in _ST_DTYPES.items()}


class TeacherLogitCache:
    """A teacher-logit cache file, memory-mapped (copy-on-write: nothing is ever written back to the file).

    Attributes: ``kind`` ("full" or "topk"), ``num_teachers`` (K), ``vocab_size`` (V), ``k`` (top-k, or None),
    ``item_shape`` (``*``), ``metadata`` (the file's string metadata), and the mapped tensors ``logits``
    (``[N, K, *, V]``, full) or ``values``, ``indices``, ``tail_mass`` (top-k).
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        header, base = _read_header(self.path)
        self.metadata: dict[str, str] = header.pop("__metadata__")
        with open(self.path, "rb") as f:
            # ACCESS_COPY: a private mapping is writable (torch.frombuffer wants that) and never touches the file
            self._mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
            st = os.fstat(f.fileno())
        # the mapped file (a writer's os.replace puts a new inode at the path; this mapping keeps the old one)
        self._identity = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
        self._tensors: dict[str, Tensor] = {}
        for name, info in header.items():
            begin, end = info["data_offsets"]
            flat = torch.frombuffer(self._mm, dtype=torch.uint8, count=end - begin, offset=base + begin)
            self._tensors[name] = flat.view(_TORCH_DTYPES[info["dtype"]]).reshape(info["shape"])
        self.kind = self.metadata["kind"]
        self.num_teachers = int(self.metadata["num_teachers"])
        self.vocab_size = int(self.metadata["vocab_size"])
        self.k = int(self.metadata["topk"]) if self.kind == "topk" else None
        first = self._tensors["logits" if self.kind == "full" else "values"]
        self.item_shape = tuple(first.shape[2:-1])

    def __getstate__(self) -> dict[str, Any]:
        """The path and the file's identity (inode, size, mtime), not the mapping: a pickled cache (a Dataset that
        holds one, sent to spawn / forkserver DataLoader workers) maps the file again where it is unpickled."""
        return {"path": str(self.path), "identity": self._identity}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["path"])
        if state.get("identity") is not None and self._identity != tuple(state["identity"]):
            raise ValueError(f"teacher cache {self.path} was replaced since this TeacherLogitCache was pickled "
                             "(another file is at its path now): reopen it")  # fmt: skip

    def __len__(self) -> int:
        return next(iter(self._tensors.values())).shape[0]

    @property
    def logits(self) -> Tensor:
        """``[N, K, *, V]`` raw logits (full caches only), memory-mapped."""
        if self.kind != "full":
            raise AttributeError("a top-k cache has no full logits: use get() (dense) or topk()")
        return self._tensors["logits"]

    @property
    def values(self) -> Tensor:
        return self._tensors["values"]

    @property
    def indices(self) -> Tensor:
        return self._tensors["indices"]

    @property
    def tail_mass(self) -> Tensor:
        return self._tensors["tail_mass"]

    def check_length(self, n: int) -> None:
        """A :class:`ValueError` unless the cache has one row per item of a dataset of ``n`` items: a shorter cache
        would fail mid-run, a longer one almost certainly belongs to another dataset."""
        if len(self) != n:
            raise ValueError(f"teacher cache {self.path} has {len(self)} rows but the dataset has {n} items (row i "
                             f"must be item i: was the cache written for another dataset?)")  # fmt: skip

    def _rows(self, index: Tensor | Sequence[int]) -> Tensor:
        """``index`` as int64 row numbers, each in [0, len): never a float truncated, a mask or a wrapped negative."""
        idx = torch.as_tensor(index)
        if idx.dim() != 1:  # one int gave [*, V] rows transposed as if they were [B, K, ...]
            raise ValueError(f"cache rows must be a 1-D sequence of row numbers [B] (one row: [i]), got shape "
                             f"{list(idx.shape)}")  # fmt: skip
        if idx.numel() == 0:
            return idx.long()
        if idx.dtype.is_floating_point or idx.dtype.is_complex or idx.dtype == torch.bool:
            raise ValueError(f"cache rows must be integer indices, got {idx.dtype} values")
        lo, hi, n = int(idx.min()), int(idx.max()), len(self)
        if lo < 0 or hi >= n:
            raise IndexError(f"cache row {lo if lo < 0 else hi} out of range: {self.path} has rows 0 to {n - 1}")
        return idx.long()

    def topk(self, index: Tensor | Sequence[int],
             device: torch.device | str | None = None) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
        """Top-k parts of rows ``index`` (B of them): values ``[K, B, *, k]``, indices int64 ``[K, B, *, k]``,
        tail_mass ``[K, B, *]`` as stored (float64; float32 in caches written before 2026-11-30)."""
        if self.kind != "topk":
            raise ValueError("topk() needs a top-k cache; this one stores full logits")
        idx = self._rows(index)

        def in_range(ind: Tensor) -> None:
            # on the host, per batch, before the copy: a stored index outside [0, V) would be a raw scatter error, on
            # CUDA a device-side assert that ends the process
            if ind.numel() and (int(ind.min()) < 0 or int(ind.max()) >= self.vocab_size):
                raise ValueError(f"teacher cache {self.path} is damaged: rows {idx.tolist()[:8]} hold vocabulary "
                                 f"indices outside [0, {self.vocab_size})")  # fmt: skip

        return (
            _gather(self.values, idx, device).transpose(0, 1).contiguous(),
            _gather(self.indices, idx, device, in_range).transpose(0, 1).to(torch.long).contiguous(),
            _gather(self.tail_mass, idx, device).transpose(0, 1).contiguous(),
        )

    def get(
        self, index: Tensor | Sequence[int], device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> Tensor:
        """Teacher logits of dataset rows ``index`` (B of them), stacked as ``[K, B, *, V]``: what ``kd_loss``
        takes as ``teacher_logits``. For a top-k cache, dense logits (see the module docstring)."""
        if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise ValueError(f"dtype must be a floating-point torch.dtype (logits), got {dtype}")  # int: truncated
        idx = self._rows(index)
        if self.kind == "full":
            rows = _gather(self.logits, idx, device).transpose(0, 1)
            # one copy: .to(dtype) of the transposed view keeps its strides, a .contiguous() after it copied again
            # (and .to() with the tensor's own dtype returns the view itself, whatever the memory_format)
            if dtype is None or dtype == rows.dtype:
                return rows.contiguous()
            return rows.to(dtype=dtype, memory_format=torch.contiguous_format)
        values, indices, tail = self.topk(idx, device)
        return topk_to_logits(values, indices, tail, self.vocab_size).to(dtype or values.dtype)


def _gather(t: Tensor, idx: Tensor, device: torch.device | str | None,
            check: Callable[[Tensor], None] | None = None) -> Tensor:  # fmt: skip
    """Rows ``idx`` of the mapped tensor ``t``, on ``device`` (``check``: called on the host rows before the copy).
    For a GPU they are gathered into page-locked memory (torch's caching host allocator) and copied without
    blocking the host: from pageable memory the copy of a batch of teacher logits (hundreds of MB for an LLM) would
    be staged by the driver, synchronously, after the gather's own copy. The host memory is reused only once the
    copy is done (the allocator records the copy's stream)."""
    device = torch.device(device) if device is not None else t.device
    if device.type != "cuda" or idx.dim() != 1:
        rows = t[idx]
    else:
        rows = torch.empty((idx.numel(), *t.shape[1:]), dtype=t.dtype, pin_memory=True)
        torch.index_select(t, 0, idx, out=rows)
    if check is not None:
        check(rows)
    return rows.to(device, non_blocking=device.type == "cuda")


def _read_header(path: Path) -> tuple[dict[str, Any], int]:
    """The checked safetensors header of a cache file and where its data starts. Every field that decides what is
    read from where is checked against the file (its size, the dtypes, shapes and offsets, the metadata), so a file
    that is not a cache, or a damaged one, is a ValueError naming it, not a MemoryError, a KeyError or wrong rows."""

    def bad(what: str) -> ValueError:
        return ValueError(f"{path} is not a valid fastdistill teacher-logit cache: {what}")

    size = path.stat().st_size
    with open(path, "rb") as f:
        if size < 8:
            raise bad(f"{size} bytes, too short for a safetensors header")
        header_len = int.from_bytes(f.read(8), "little")
        if header_len > size - 8:
            raise bad(f"its header length {header_len} exceeds the file's {size} bytes")
        try:
            header = json.loads(f.read(header_len))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise bad(f"its header is not JSON ({e})") from e
    if not isinstance(header, dict):
        raise bad("its header is not a JSON object")
    meta = header.get("__metadata__")
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ValueError(f"{path} is not a fastdistill teacher-logit cache (no format={FORMAT!r} metadata)")
    kind = meta.get("kind")
    if kind not in ("full", "topk"):
        raise bad(f"metadata kind={kind!r}, expected 'full' or 'topk'")
    for key in ("num_teachers", "vocab_size") + (("topk",) if kind == "topk" else ()):
        if not str(meta.get(key, "")).isdigit() or int(meta[key]) < 1:
            raise bad(f"metadata {key}={meta.get(key)!r}, expected a positive integer")
    names = ("logits",) if kind == "full" else ("tail_mass", "indices", "values")
    if set(header) - {"__metadata__"} != set(names):
        raise bad(f"tensors {sorted(set(header) - {'__metadata__'})}, expected {sorted(names)} for kind={kind!r}")
    base = 8 + header_len
    rows = set()
    shapes: dict[str, list[int]] = {}
    for name in names:
        info = header[name]
        dtype = _TORCH_DTYPES.get(info.get("dtype")) if isinstance(info, dict) else None
        # indices int32; the tail mass float64 (float32 before 2026-11-30); logits and values a float of <= 32 bits
        allowed = {"indices": ("I32",), "tail_mass": ("F64", "F32")}.get(name, ("F32", "F16", "BF16"))
        if dtype is None or info["dtype"] not in allowed:
            raise bad(f"tensor {name!r} has dtype {info.get('dtype') if isinstance(info, dict) else info!r}, "
                      f"expected {' or '.join(allowed)}")  # fmt: skip
        shape, offsets = info.get("shape"), info.get("data_offsets")
        if not (isinstance(shape, list) and len(shape) >= 2 and all(_is_size(d) for d in shape)):
            raise bad(f"tensor {name!r} has shape {shape!r}, expected [N, K, ...]")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_size(o) for o in offsets)):
            raise bad(f"tensor {name!r} has data_offsets {offsets!r}, expected [begin, end]")
        begin, end = offsets
        if end - begin != math.prod(shape) * dtype.itemsize or base + end > size:
            raise bad(f"tensor {name!r} ({shape} {info['dtype']}) does not fit bytes {begin} to {end} of the data "
                      f"({size - base} bytes)")  # fmt: skip
        if (base + begin) % dtype.itemsize:
            raise bad(f"tensor {name!r} starts at byte {base + begin}, not aligned to its {dtype.itemsize}-byte dtype")
        last = {"logits": meta["vocab_size"], "values": meta.get("topk"), "indices": meta.get("topk")}.get(name)
        if shape[1] != int(meta["num_teachers"]) or (last is not None and shape[-1] != int(last)):
            raise bad(f"tensor {name!r} has shape {shape}, which does not match the metadata {meta}")
        rows.add(shape[0])
        shapes[name] = shape
    if kind == "topk" and not (shapes["indices"] == shapes["values"] and shapes["tail_mass"] == shapes["values"][:-1]):
        raise bad(f"top-k tensors of shapes values {shapes['values']}, indices {shapes['indices']}, tail_mass "
                  f"{shapes['tail_mass']}: expected indices = values = [N, K, *, k] and tail_mass = [N, K, *]")
    if len(rows) != 1 or 0 in rows:
        raise bad(f"its tensors have row counts {sorted(rows)}, expected one positive count")
    return header, base


def _is_size(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def topk_to_logits(values: Tensor, indices: Tensor, tail_mass: Tensor, vocab_size: int) -> Tensor:
    """Dense logits ``[*, V]`` from top-k ``values``/``indices`` ``[*, k]`` and ``tail_mass`` ``[*]``: softmax of
    the result gives each stored entry its exact probability and each of the V - k others ``tail_mass / (V - k)``
    (``-inf``, probability 0, when the tail mass is 0). The tail's log in float64: a confident teacher's tail mass
    (below float32's smallest number, 1.4e-45, past a logit gap of ~103) gives a finite tail logit."""
    v = values.float()
    k = v.shape[-1]
    tail = tail_mass.double().clamp(0.0, 1.0)
    # log of the full partition function, from the stored part: logsumexp(values) = log Z + log(1 - tail)
    log_z = torch.logsumexp(v, dim=-1).double() - torch.log1p(-tail.clamp(max=1 - 1e-7))
    out = torch.empty(*v.shape[:-1], vocab_size, dtype=torch.float32, device=v.device)
    if vocab_size > k:
        tail_logit = (torch.log(tail / (vocab_size - k)) + log_z).float()  # -inf where tail == 0
        out.copy_(tail_logit[..., None].expand_as(out))
    return out.scatter_(-1, indices.long(), v)


@torch.no_grad()
def write_teacher_cache(
    path: str | os.PathLike,
    teachers: Sequence[nn.Module],
    dataset: Dataset,
    *,
    batch_size: int = 256,
    topk: int | None = None,
    dtype: torch.dtype = torch.float32,
    forward: Callable[[nn.Module, Any], Tensor] | None = None,
    collate_fn: Callable[[list], Any] | None = None,
    device: torch.device | str | None = None,
) -> TeacherLogitCache:
    """Run K ``teachers`` (in eval mode, under ``no_grad``) over ``dataset`` in order and write their logits to
    ``path``; returns the cache, memory-mapped. Row i of the cache is ``dataset[i]``.

    ``topk``: store the k largest logits + indices + tail mass instead of all V. ``dtype``: float32, float16 or
    bfloat16 for the stored logits. ``forward(model, inputs) -> logits [B, *, V]`` defaults to
    ``model(**inputs)`` / ``model(inputs)`` and reading ``.logits``. The file is written to a temporary file of
    its own beside ``path`` (``.<name>.<pid>.<random>.tmp``), flushed to disk and renamed over ``path`` at the end,
    so a crash never leaves a half-written cache under ``path`` (only, at worst, that temporary file, which is
    never read as a cache), and two processes writing the same ``path`` at once (two jobs sharing a cache
    directory) never write into each other's file: the last whole file wins, and each gets a cache of the file it
    wrote. Under torchrun, write it on one rank and ``dist.barrier()`` before the others open it.
    """
    teachers = model_list(teachers)
    if not teachers:
        raise ValueError("write_teacher_cache needs at least one teacher")
    functional.check_int("batch_size", batch_size, low=1)
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"dtype must be float32, float16 or bfloat16, got {dtype}")
    n = len(dataset)
    if n == 0:
        raise ValueError("write_teacher_cache: the dataset is empty")
    forward = forward or default_forward
    if device is None:  # the first teacher's: its first parameter's or buffer's device (a stateless one: the CPU)
        first = next(iter([*teachers[0].parameters(), *teachers[0].buffers()]), None)
        device = first.device if first is not None else "cpu"
    device = checked_device(device)
    modes = [t.training for t in teachers]
    for t in teachers:
        t.eval()
    path = Path(path)
    # this writer's own file ("xb": never another's truncated), in path's directory (os.replace is atomic there)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex}.tmp")
    writer = None
    try:
        for start in range(0, n, batch_size):
            batch = split_batch(to_device(collate(dataset, range(start, min(n, start + batch_size)), collate_fn),
                                          device))  # fmt: skip
            logits = torch.stack([forward(t, batch.inputs) for t in teachers], dim=1).float()  # [B, K, *, V]
            if writer is None:
                writer = _Writer(tmp, n, logits.shape[1:], topk, dtype)
            writer.write(start, logits)
        writer.close(sync=True)
        # mapped before the rename: the cache returned is the file written here, even if another process replaces
        # path right after
        cache = TeacherLogitCache(tmp)
        os.replace(tmp, path)
        cache.path = path
        _sync_directory(path.parent)
    finally:
        if writer is not None:
            writer.close()
        tmp.unlink(missing_ok=True)
        for t, mode in zip(teachers, modes):
            t.train(mode)
    return cache


def _sync_directory(directory: Path) -> None:
    """fsync ``directory`` (a rename in it then survives a power loss), where the platform allows it."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class _Writer:
    """Streams rows into a safetensors file whose header (shapes, offsets) is known from N and the row shape."""

    def __init__(self, path: Path, n: int, row_shape: torch.Size, topk: int | None, dtype: torch.dtype) -> None:
        k_teachers, *item, vocab = row_shape
        if topk is not None and not 1 <= topk <= vocab:
            raise ValueError(f"topk must be in [1, V = {vocab}], got {topk}")
        self.topk = topk
        self.dtype = dtype
        self.row_shape = tuple(row_shape)
        if topk is None:
            specs = [("logits", dtype, [n, k_teachers, *item, vocab])]
        else:
            # widest dtypes first: every tensor then starts aligned to its dtype (safetensors allows no gaps); the
            # tail mass in float64, where a confident teacher's (past a logit gap of ~103) is not float32's 0
            specs = [("tail_mass", torch.float64, [n, k_teachers, *item]),
                     ("indices", torch.int32, [n, k_teachers, *item, topk]),
                     ("values", dtype, [n, k_teachers, *item, topk])]  # fmt: skip
        header: dict[str, Any] = {"__metadata__": {
            "format": FORMAT, "version": VERSION, "kind": "full" if topk is None else "topk",
            "num_teachers": str(k_teachers), "vocab_size": str(vocab), "topk": str(topk or 0),
            "tail_mass_temperature": "1.0",
        }}  # fmt: skip
        self.offsets: dict[str, tuple[int, int]] = {}
        offset = 0
        for name, dt, shape in specs:
            nbytes = math.prod(shape) * dt.itemsize
            header[name] = {"dtype": _ST_DTYPES[dt], "shape": shape, "data_offsets": [offset, offset + nbytes]}
            self.offsets[name] = (offset, nbytes // n)  # start, bytes per dataset row
            offset += nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # safetensors pads the header to 8 bytes
        self.base = 8 + len(raw)
        self.f = open(path, "xb")
        self.f.write(len(raw).to_bytes(8, "little") + raw)
        self.f.truncate(self.base + offset)

    def _put(self, name: str, start: int, t: Tensor) -> None:
        begin, row_bytes = self.offsets[name]
        self.f.seek(self.base + begin + start * row_bytes)
        self.f.write(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())

    def write(self, start: int, logits: Tensor) -> None:
        """Rows ``start .. start + B`` from float32 logits ``[B, K, *, V]``."""
        if tuple(logits.shape[1:]) != self.row_shape:
            raise ValueError(f"every cached item must have the same teacher-logit shape [K, *, V] = "
                             f"{list(self.row_shape)}; rows from {start} have {list(logits.shape[1:])} (pad them)")
        if self.topk is None:
            self._put("logits", start, logits.to(self.dtype))
            return
        values, indices = logits.topk(self.topk, dim=-1)
        # the tail's own mass, exp(lse(tail) - lse(all)): not 1 - sum(kept), which is 0 in float32 once the tail is
        # below ~6e-8 (a confident teacher), leaving its entries at -inf and reverse KL at inf
        rest = logits.scatter(-1, indices, -torch.inf)
        tail = torch.exp((torch.logsumexp(rest, dim=-1) - torch.logsumexp(logits, dim=-1)).double())
        self._put("tail_mass", start, tail)
        self._put("indices", start, indices.to(torch.int32))
        self._put("values", start, values.to(self.dtype))

    def close(self, sync: bool = False) -> None:
        """Close the file; ``sync``: flush it to disk first (before it is renamed into place)."""
        if not self.f.closed:
            if sync:
                self.f.flush()
                os.fsync(self.f.fileno())
            self.f.close()
