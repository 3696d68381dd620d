"""Checkpoint files without pickle: tensors in safetensors, everything else in JSON.

A nested state (an optimizer's or scheduler's ``state_dict()``, RNG states) is split by :func:`encode` into a
JSON-able tree and a flat ``{key: Tensor}`` dict; :func:`decode` puts it back together exactly, including tuples
and the non-string (int) keys of ``optimizer.state_dict()["state"]``, which plain JSON would turn into strings.

Every read names its file when it fails (a :class:`ValueError`, never a bare ``JSONDecodeError`` or
``SafetensorError``); :func:`find_problem` checks a checkpoint directory without loading its tensors, and
:func:`find_latest` picks the newest intact one. :class:`Checkpointer` saves, checks and restores a whole training
run's checkpoint from these pieces (the loop's ``save_checkpoint`` / ``load_checkpoint``).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import uuid
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import safetensors.torch
import torch
from safetensors import SafetensorError
from torch import Tensor, nn

from .._warnings import warn

# state.json: the position in the data, and the settings that define a step and the data order (a resumed run must
# use the same ones, or it would take other steps than the run that never stopped)
POSITION_KEYS = ("step", "epoch", "batch_in_epoch")
RUN_KEYS = ("world_size", "batch_size", "grad_accum_steps", "seed", "shuffle", "drop_last")
# compared too where the checkpoint and the run both have them (None: not known; absent from older checkpoints)
OPTIONAL_RUN_KEYS = ("data_size",)

_TENSOR, _TUPLE, _ITEMS, _NDARRAY = "__tensor__", "__tuple__", "__items__", "__ndarray__"


def encode(obj: Any, tensors: dict[str, Tensor], path: str = "") -> Any:
    """JSON-able form of ``obj``; every tensor is moved into ``tensors`` (CPU, contiguous) under a unique key."""
    if isinstance(obj, Tensor):
        key = path or f"t{len(tensors)}"
        if key in tensors:
            key = f"{key}#{len(tensors)}"
        # clone: safetensors refuses tensors that share storage (views of one buffer)
        tensors[key] = obj.detach().cpu().contiguous().clone()
        return {_TENSOR: key}
    if isinstance(obj, np.ndarray):
        return {_NDARRAY: obj.tolist(), "dtype": str(obj.dtype)}
    if isinstance(obj, np.generic):
        return obj.item()
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, tuple):
        return {_TUPLE: [encode(v, tensors, f"{path}.{i}") for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [encode(v, tensors, f"{path}.{i}") for i, v in enumerate(obj)]
    if isinstance(obj, dict):
        if all(isinstance(k, str) and not k.startswith("__") for k in obj):
            return {k: encode(v, tensors, f"{path}.{k}") for k, v in obj.items()}
        return {_ITEMS: [[encode(k, tensors, f"{path}.key{i}"), encode(v, tensors, f"{path}.{k}")]
                         for i, (k, v) in enumerate(obj.items())]}  # fmt: skip
    raise TypeError(f"cannot checkpoint {path or 'value'} of type {type(obj).__name__} (tensors, numbers, str, "
                    "None, lists, tuples and dicts only)")  # fmt: skip


def decode(obj: Any, tensors: dict[str, Tensor]) -> Any:
    """Inverse of :func:`encode`."""
    if isinstance(obj, list):
        return [decode(v, tensors) for v in obj]
    if isinstance(obj, dict):
        if _TENSOR in obj:
            return tensors[obj[_TENSOR]]
        if _NDARRAY in obj:
            return np.asarray(obj[_NDARRAY], dtype=obj["dtype"])
        if _TUPLE in obj:
            return tuple(decode(v, tensors) for v in obj[_TUPLE])
        if _ITEMS in obj:
            return {_hashable(decode(k, tensors)): decode(v, tensors) for k, v in obj[_ITEMS]}
        return {k: decode(v, tensors) for k, v in obj.items()}
    return obj


def _hashable(k: Any) -> Any:
    return tuple(_hashable(v) for v in k) if isinstance(k, (list, tuple)) else k


def save_state(state: Any, directory: str | os.PathLike, name: str) -> None:
    """Write ``state`` as ``<name>.json`` (structure, scalars) + ``<name>.safetensors`` (tensors)."""
    directory = Path(directory)
    tensors: dict[str, Tensor] = {}
    tree = encode(state, tensors)
    safetensors.torch.save_file(tensors, str(directory / f"{name}.safetensors"))
    (directory / f"{name}.json").write_text(json.dumps(tree))


def load_state(directory: str | os.PathLike, name: str) -> Any:
    """Read what :func:`save_state` wrote; a :class:`ValueError` naming the file if it is missing or corrupted."""
    directory = Path(directory)
    tensors = _read(directory / f"{name}.safetensors", safetensors.torch.load_file)
    return decode(read_json(directory / f"{name}.json"), tensors)


def _read(path: Path, reader: Callable[[str], Any]) -> Any:
    """``reader(str(path))``, its failures turned into a one-line ValueError that names the file."""
    kind = "JSON" if path.suffix == ".json" else "safetensors"
    try:
        return reader(str(path))
    except FileNotFoundError:
        raise ValueError(f"file {path} is missing") from None
    except (OSError, UnicodeDecodeError, ValueError, SafetensorError) as e:  # JSONDecodeError is a ValueError
        raise ValueError(f"{path} is not a readable {kind} file ({type(e).__name__}: {e})") from e


def read_json(path: str | os.PathLike) -> Any:
    """The JSON in ``path``; a :class:`ValueError` naming the file if it is missing or not JSON."""
    return _read(Path(path), lambda p: json.loads(Path(p).read_text()))


def check_safetensors(path: str | os.PathLike) -> None:
    """Check that ``path`` is a complete safetensors file (its header parses and covers the file) without reading
    the tensors; a :class:`ValueError` naming the file otherwise."""

    def header(p: str) -> None:
        with safetensors.safe_open(p, "pt"):
            pass

    _read(Path(path), header)


def check_model(module: nn.Module, path: str | os.PathLike, name: str | None = None) -> None:
    """A one-line :class:`ValueError` naming the file and the module (``name``, e.g. "student", and its class) unless
    the safetensors file at ``path`` fits ``module``: the same keys (counts and the first few missing / unexpected)
    and the same shapes (the first key that differs, with both shapes). Only the file's header is read."""
    path = Path(path)

    def shapes(p: str) -> dict[str, list[int]]:
        with safetensors.safe_open(p, "pt") as f:
            return {k: list(f.get_slice(k).get_shape()) for k in f.keys()}

    saved = _read(path, shapes)
    state = module.state_dict()
    # save_model writes one name of each group of tensors that share memory (tied weights): it stands for all
    stored = {_memory(state[k]) for k in saved if k in state}
    missing = [k for k, t in state.items() if k not in saved and _memory(t) not in stored]
    unexpected = [k for k in saved if k not in state]
    resized = [k for k in state if k in saved and saved[k] != list(state[k].shape)]  # in the module's order
    problems = [f"{len(missing)} missing keys {_few(missing)}"] if missing else []
    problems += [f"{len(unexpected)} unexpected keys {_few(unexpected)}"] if unexpected else []
    if resized:
        k = resized[0]
        more = f" (and {len(resized) - 1} more keys)" if len(resized) > 1 else ""
        problems.append(f"size mismatch for {k}: {saved[k]} in the file, {list(state[k].shape)} in the model{more}")
    if problems:
        what = f"{name} ({type(module).__name__})" if name else type(module).__name__
        raise ValueError(f"{path} does not fit the {what}: {'; '.join(problems)}")


def _memory(t: Tensor) -> tuple[int, int, tuple[int, ...]]:
    return t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape)


def load_model(module: nn.Module, path: str | os.PathLike, device: str = "cpu", name: str | None = None) -> None:
    """``safetensors.torch.load_model`` after :func:`check_model`: every failure (a file missing, not safetensors,
    or of keys / shapes that do not fit the module) is a one-line :class:`ValueError` naming the file, and a file
    that does not fit changes nothing in ``module``."""
    check_model(module, path, name)
    _read(Path(path), lambda p: safetensors.torch.load_model(module, p, device=device))


def _few(keys: list[str], n: int = 3) -> str:
    return "[" + ", ".join(keys[:n]) + (", ..." if len(keys) > n else "") + "]"


def read_run_state(directory: str | os.PathLike) -> dict[str, Any]:
    """``state.json`` of a checkpoint, checked to hold the position and the run settings."""
    path = Path(directory) / "state.json"
    state = read_json(path)
    absent = [k for k in (*POSITION_KEYS, *RUN_KEYS) if not isinstance(state, dict) or k not in state]
    if absent:
        raise ValueError(f"{path} is incomplete: no {', '.join(absent)}")
    return state


def check_compatible(state: Mapping[str, Any], settings: Mapping[str, Any], directory: str | os.PathLike) -> None:
    """A :class:`ValueError` unless every one of :data:`RUN_KEYS` in ``settings`` equals the checkpoint's, and each
    of :data:`OPTIONAL_RUN_KEYS` that both know."""
    for key in (*RUN_KEYS, *OPTIONAL_RUN_KEYS):
        known = key in RUN_KEYS or (state.get(key) is not None and settings.get(key) is not None)
        if known and key in settings and state[key] != settings[key]:
            raise ValueError(f"checkpoint {directory} was written with {key}={state[key]!r}, this run has "
                             f"{settings[key]!r}: a step and the data order would differ")  # fmt: skip


def written_files(state: Mapping[str, Any]) -> list[str] | None:
    """The files a checkpoint was written with (``state.json``'s ``"files"``, besides itself); None for a
    checkpoint of an older version, which does not list them."""
    files = state.get("files")
    return files if isinstance(files, list) and all(isinstance(f, str) for f in files) else None


def find_problem(directory: str | os.PathLike, files: Iterable[str] | None = None) -> str | None:
    """Why ``directory`` is not an intact checkpoint (None if it is): ``state.json`` and every file it lists
    (:func:`written_files`) must be present and parse; for a checkpoint that lists none, each of ``files``
    (default: every ``*.json`` and ``*.safetensors`` in it). Tensors are not read; a truncated safetensors file
    shows in its header. (Intact is not fitting: a checkpoint of a run with a scheduler is intact without one; the
    run's own check, :meth:`Checkpointer.check`, names what differs.)"""
    directory = Path(directory)
    if not directory.is_dir():
        return f"{directory} is not a directory"
    try:
        own = written_files(read_run_state(directory))
        if own is not None:
            files = own
        elif files is None:
            files = sorted(p.name for p in directory.iterdir() if p.suffix in (".json", ".safetensors"))
        for name in files:
            if name.endswith(".safetensors"):
                check_safetensors(directory / name)
            else:
                read_json(directory / name)
    except ValueError as e:
        return str(e)
    return None


def recover(directory: str | os.PathLike, files: Iterable[str] | None = None) -> bool:
    """Put back the previous version of checkpoint ``directory`` when a re-save was killed between its two renames
    (``directory`` missing, ``<directory>.old`` whole, see :meth:`Checkpointer.save`): rename the ``.old`` to the
    final name. Returns whether ``directory`` exists now. Safe when several processes do it at once."""
    directory = Path(directory)
    previous = directory.with_name(directory.name + ".old")
    try:
        if not directory.exists() and previous.is_dir() and find_problem(previous, files) is None:
            previous.rename(directory)
    except OSError:  # another process renamed it first (the source is gone mid-check, or the target exists)
        pass
    return directory.exists()


def _step_of(directory: Path) -> int | None:
    """N of a ``step-N`` directory name (None for another name)."""
    _, _, number = directory.name.partition("step-")
    return int(number) if directory.name.startswith("step-") and number.isdigit() else None


def find_latest(checkpoints: str | os.PathLike, files: Iterable[str] | None = None) -> Path | None:
    """The newest intact ``step-*`` checkpoint under ``checkpoints`` (None if there is none); damaged ones are
    skipped with a warning naming them. A ``step-N`` whose re-save was killed between its renames is put back from
    ``step-N.old`` first (:func:`recover`). Raises :class:`ValueError` if there are checkpoints but none is intact:
    starting over from scratch would silently drop the run's progress."""
    files = None if files is None else list(files)
    for previous in Path(checkpoints).glob("step-*[0-9].old"):
        recover(previous.with_name(previous.name[: -len(".old")]), files)
    found = sorted(Path(checkpoints).glob("step-*[0-9]"))
    problems = []
    for directory in reversed(found):
        problem = find_problem(directory, files)
        if problem is None:
            return directory
        warn(f"skipping damaged checkpoint {directory}: {problem}")
        problems.append(problem)
    if found:
        raise ValueError(f"no intact checkpoint under {checkpoints}: {'; '.join(problems)}")
    return None


def rng_state() -> dict[str, Any]:
    """Every RNG a training step may draw from: Python's, numpy's global one, torch CPU and CUDA."""
    import random

    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` returned."""
    import random

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _barrier() -> None:
    """Wait for every process of the default process group (nothing to wait for outside torchrun)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def _agreed(value: str) -> str:
    """Rank 0's ``value`` on every process of the default process group (``value`` itself outside torchrun)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]
    return value


@contextlib.contextmanager
def _locked(directory: Path):
    """Hold an exclusive ``flock`` on ``directory`` itself (no lock file to leave behind) where the platform has
    one: two runs that save into one directory then rename their checkpoints one at a time."""
    try:
        import fcntl

        fd = os.open(directory, os.O_RDONLY)
    except (ImportError, OSError):  # (Windows) the renames alone: each is atomic, one that collides fails
        yield
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # (releases the lock)


def _tmp_step(directory: Path) -> int | None:
    """N of a ``step-N.<...>.tmp`` directory left by a save (None for another name)."""
    if not directory.name.endswith(".tmp"):
        return None
    return _step_of(directory.with_name(directory.name.split(".", 1)[0]))


class Checkpointer:
    """Save, check and restore a training run's checkpoints (what :class:`~fastdistill.training.DistillationLoop`
    delegates to). A checkpoint directory holds ``<name>.safetensors`` for each of ``modules``; the optimizer's and
    scheduler's state (:func:`save_state`: safetensors + JSON); one RNG state per process (``rng-rank<r>``); and
    ``state.json``, what ``run_state()`` returns: the position in the data (:data:`POSITION_KEYS`), the settings that
    fix a step and the data order (:data:`RUN_KEYS`) and whatever else the run restores (its last training loss).

    Args:
        output_dir: the run's folder; checkpoints go to ``output_dir/checkpoints/step-XXXXXXXX`` by default (None:
            only explicit directories).
        modules: the modules to save, by file name (``{"student": ..., "teacher0": ..., "feature_term0": ...}``).
        states: returns the objects with ``state_dict`` / ``load_state_dict`` to save by name (the optimizer; the
            scheduler, which a loop may build only when training starts); a None value is left out.
        pending: returns the names of states not built yet that a checkpoint to resume from must hold (a
            scheduler built when training starts): :meth:`check` expects their files.
        run_state: returns what ``state.json`` holds now.
        restore: is given ``state.json`` after the rest of a checkpoint is loaded, to set the position.
        rank: this process's rank: every process writes its RNG state, rank 0 everything else.
        world_size: the number of processes: a checkpoint to resume from must hold every one's RNG state, so that
            every process judges it alike (one whose own file is missing would resume elsewhere, or fail alone).
        device: where the models' tensors are loaded.
    """

    def __init__(
        self,
        output_dir: str | os.PathLike | None,
        modules: Mapping[str, nn.Module],
        states: Callable[[], Mapping[str, Any]],
        run_state: Callable[[], dict[str, Any]],
        restore: Callable[[dict[str, Any]], None],
        *,
        pending: Callable[[], Iterable[str]] = tuple,
        rank: int = 0,
        world_size: int = 1,
        device: torch.device | str = "cpu",
    ) -> None:
        self.output_dir = Path(output_dir) if output_dir is not None else None
        self.modules = dict(modules)
        self._states = states
        self._pending = pending
        self._run_state = run_state
        self._restore = restore
        self.rank, self.world_size = rank, world_size
        self.device = device

    def states(self) -> dict[str, Any]:
        """The optimizer, scheduler, ... to save now, by name."""
        return {name: s for name, s in self._states().items() if s is not None}

    def files(self) -> list[str]:
        """The files of a checkpoint the processes read (besides ``state.json``), each rank's RNG state included:
        every process judges a checkpoint by all of them, so all reach the same verdict."""
        states = [*self.states(), *(f"rng-rank{r}" for r in range(self.world_size))]
        return [f"{name}.safetensors" for name in self.modules] + [
            f"{name}.{ext}" for name in states for ext in ("json", "safetensors")]  # fmt: skip

    def find(self, resume_from: str | os.PathLike) -> Path | None:
        """The checkpoint directory ``resume_from`` names, checked intact (ValueError otherwise); for "latest" the
        newest intact one under ``output_dir/checkpoints`` (damaged ones are skipped with a warning), None if there
        is none. Intact means every process's files: all processes reach the same answer."""
        if not str(resume_from).strip():  # Path("") is ".": the message would name the working directory
            raise ValueError(f"resume_from={str(resume_from)!r} is empty: give a checkpoint directory, 'latest', or "
                             "None (a fresh run)")  # fmt: skip
        files = self.files()
        if str(resume_from) != "latest":
            path = Path(resume_from)
            recover(path, files)
            if not (path / "state.json").exists():
                raise FileNotFoundError(f"resume_from={str(path)!r} is not a checkpoint (no state.json)")
            problem = find_problem(path, files)
            if problem is not None:
                raise ValueError(f"resume_from={str(path)!r} is damaged: {problem}")
            return path
        if self.output_dir is None:
            raise ValueError("resume_from='latest' looks under output_dir/checkpoints; output_dir is None")
        return find_latest(self.output_dir / "checkpoints", files)

    def save(self, directory: str | os.PathLike | None = None, keep: int | None = None) -> Path:
        """Write a checkpoint to ``directory`` (default ``output_dir/checkpoints/step-XXXXXXXX``) and return it;
        ``keep`` > 0 then deletes all but the newest ``keep`` ``step-*`` checkpoints beside it (:meth:`_prune`).
        Every process must call it (they meet at barriers). It is written to a directory of this save's own beside
        it, ``<directory>.<pid>-<random>.tmp`` (rank 0 picks the name, every process of the group writes there),
        and renamed: a kill at any point leaves the old or the new checkpoint, whole, under the final name, or
        (killed between the two renames of a re-save) the old one as ``<directory>.old``, which
        :func:`find_latest` and :meth:`find` put back; a killed save's ``.tmp`` directory is never read (``keep``
        deletes those of earlier steps). Two runs saving to one directory at once (an ``output_dir`` belongs to
        one run) never mix their files: each writes its own temporary directory and the renames happen one run at
        a time (a lock on the checkpoints' directory), so the directory is one run's whole checkpoint."""
        state = self._run_state()
        if directory is None:
            if self.output_dir is None:
                raise ValueError("save_checkpoint() without a directory needs output_dir")
            directory = self.output_dir / "checkpoints" / f"step-{state['step']:08d}"
        final = Path(directory)
        # ends in ".tmp", not a digit: find_latest's step-*[0-9] never takes it for a checkpoint
        tmp = final.with_name(_agreed(f"{final.name}.{os.getpid()}-{uuid.uuid4().hex[:12]}.tmp"))
        if self.rank == 0:
            tmp.mkdir(parents=True)  # a new name: never another save's directory, never one to clear first
        _barrier()
        save_state(rng_state(), tmp, f"rng-rank{self.rank}")
        if self.rank == 0:
            for name, module in self.modules.items():
                safetensors.torch.save_model(module, str(tmp / f"{name}.safetensors"))
            for name, stateful in self.states().items():
                save_state(stateful.state_dict(), tmp, name)
            # with the list of its files: intact is judged by what it was written with (find_problem), so a
            # checkpoint of another configuration (a scheduler, a trained teacher more or less) is named as such
            (tmp / "state.json").write_text(json.dumps({**state, "files": self.files()}, indent=1))
        _barrier()
        if self.rank == 0:  # renames only
            previous = final.with_name(final.name + ".old")
            with _locked(final.parent):
                try:
                    if final.exists():
                        shutil.rmtree(previous, ignore_errors=True)
                        final.rename(previous)
                    tmp.rename(final)
                except OSError as e:  # without the lock (no flock): another run renamed in between
                    shutil.rmtree(tmp, ignore_errors=True)
                    raise RuntimeError(f"could not move checkpoint {tmp.name} into place as {final} ({e}): is another "
                                       "run saving checkpoints to the same directory? An output_dir belongs to one "
                                       "run") from e  # fmt: skip
                shutil.rmtree(previous, ignore_errors=True)
                if keep is not None and keep > 0:
                    self._prune(final, state["step"], keep)
        _barrier()
        return final

    @staticmethod
    def _prune(final: Path, step: int, keep: int) -> None:
        """Delete the ``step-*`` checkpoints beside ``final`` (just written, at ``step``) but the newest ``keep``
        with a step <= ``step``; ``final`` is always kept. Those of a later step are from a run abandoned for this
        one (resumed from an older checkpoint): they are deleted, or a stale one would outlive this run's."""
        steps = {d: _step_of(d) for d in final.parent.glob("step-*[0-9]") if d != final}
        steps = {d: n for d, n in steps.items() if n is not None}
        older = sorted((d for d, n in steps.items() if n <= step), key=lambda d: (steps[d], d.name))
        doomed = [d for d, n in steps.items() if n > step] + older[: max(len(older) - (keep - 1), 0)]
        for d in doomed:
            shutil.rmtree(d, ignore_errors=True)
            shutil.rmtree(d.with_name(d.name + ".old"), ignore_errors=True)
        for d in final.parent.glob("step-*.tmp"):  # what killed saves of earlier steps left
            n = _tmp_step(d)
            if n is not None and n < step:
                shutil.rmtree(d, ignore_errors=True)

    def check(self, directory: str | os.PathLike) -> dict[str, Any]:
        """A one-line :class:`ValueError` naming the file unless ``directory`` is a checkpoint this run can continue
        from: its :data:`RUN_KEYS` equal ``run_state()``'s, every file is intact, and each model file fits its
        module (keys and shapes, from the headers). Reads no tensor; returns ``state.json``."""
        directory = Path(directory)
        state = read_run_state(directory)
        check_compatible(state, self._run_state(), directory)
        problem = find_problem(directory, self.files())
        if problem is not None:
            raise ValueError(problem)
        written = written_files(state)
        expected = {*self.files(), *(f"{name}.{ext}" for name in self._pending() for ext in ("json", "safetensors"))}
        if written is not None and set(written) != expected:
            missing, extra = sorted(expected - set(written)), sorted(set(written) - expected)
            differs = "; ".join([*([f"it has no {_few(missing)}"] if missing else []),
                                 *([f"this run has no {_few(extra)}"] if extra else [])])  # fmt: skip
            raise ValueError(f"checkpoint {directory} is of a run set up otherwise ({differs}: a scheduler, optimizer, "
                             "trained teacher or feature term more or less): an output_dir belongs to one run")
        for name, module in self.modules.items():
            check_model(module, directory / f"{name}.safetensors", name)
        return state

    def load(self, directory: str | os.PathLike) -> None:
        """Restore a checkpoint into the existing modules, optimizer, scheduler, RNGs and (``restore``) position,
        after :meth:`check`: a checkpoint that does not fit fails without half-restoring anything."""
        directory = Path(directory)
        state = self.check(directory)
        for name, module in self.modules.items():
            load_model(module, directory / f"{name}.safetensors", device=str(self.device), name=name)
        for name, stateful in self.states().items():
            stateful.load_state_dict(load_state(directory, name))
        set_rng_state(load_state(directory, f"rng-rank{self.rank}"))
        self._restore(state)
