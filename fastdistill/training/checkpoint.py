"""Checkpoint files without pickle: tensors in safetensors, everything else in JSON.

A nested state (an optimizer's or scheduler's ``state_dict()``, RNG states) is split by :func:`encode` into a
JSON-able tree and a flat ``{key: Tensor}`` dict; :func:`decode` puts it back together exactly, including tuples
and the non-string (int) keys of ``optimizer.state_dict()["state"]``, which plain JSON would turn into strings.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import safetensors.torch
import torch
from torch import Tensor

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
    """Read what :func:`save_state` wrote."""
    directory = Path(directory)
    tensors = safetensors.torch.load_file(str(directory / f"{name}.safetensors"))
    return decode(json.loads((directory / f"{name}.json").read_text()), tensors)


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
