"""Batches for the reference loop: the batch conventions, a model call that finds the logits, and a seeded sampler.

A dataset item (and, after collation, a batch) is one of:

- a dict: ``"labels"`` (int64 ``[*]``, optional) and ``"sample_weight"`` (float ``[*]``, optional) are taken out;
  the model input is ``"input"`` when present (``model(batch["input"])``), else the remaining keys as keyword
  arguments (``model(**batch)``, the Hugging Face style);
- a tuple/list ``(input, labels)`` or ``(input,)``;
- a tensor (the input, no labels).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset, default_collate

ForwardFn = Callable[[nn.Module, Any], Tensor]


@dataclass
class Batch:
    """One micro-batch, split into what the model reads and what the loss reads."""

    inputs: Any
    labels: Tensor | None = None
    sample_weight: Tensor | None = None


def split_batch(batch: Any) -> Batch:
    """Split a collated batch (see the module docstring) into inputs, labels and sample weights."""
    if isinstance(batch, Mapping):
        rest = dict(batch)
        labels = rest.pop("labels", None)
        sample_weight = rest.pop("sample_weight", None)
        inputs = rest.pop("input") if "input" in rest else rest
        return Batch(inputs, labels, sample_weight)
    if isinstance(batch, (tuple, list)):
        if len(batch) == 1:
            return Batch(batch[0])
        if len(batch) == 2:
            return Batch(batch[0], batch[1])
        raise ValueError(f"a tuple batch must be (input,) or (input, labels), got {len(batch)} elements")
    return Batch(batch)


def to_device(x: Any, device: torch.device) -> Any:
    """Move every tensor in a nested dict/list/tuple to ``device``."""
    if isinstance(x, Tensor):
        return x.to(device, non_blocking=True)
    if isinstance(x, Mapping):
        return {k: to_device(v, device) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(to_device(v, device) for v in x)
    return x


def logits_of(output: Any) -> Tensor:
    """The logits in a model's output: a tensor, ``.logits`` (Hugging Face ModelOutput), ``["logits"]`` or ``[0]``."""
    if isinstance(output, Tensor):
        return output
    if hasattr(output, "logits"):
        return output.logits
    if isinstance(output, Mapping) and "logits" in output:
        return output["logits"]
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], Tensor):
        return output[0]
    raise TypeError(f"cannot find logits in a model output of type {type(output).__name__}; pass forward=")


def default_forward(model: nn.Module, inputs: Any) -> Tensor:
    """``model(**inputs)`` for a dict of inputs, else ``model(inputs)``; returns the logits ``[*, V]``."""
    out = model(**inputs) if isinstance(inputs, Mapping) else model(inputs)
    return logits_of(out)


def shift_for_causal_lm(logits: Tensor, labels: Tensor | None) -> tuple[Tensor, Tensor | None]:
    """Next-token alignment: logits ``[B, T, V]`` -> ``[B, T-1, V]`` (positions 0..T-2), labels ``[B, T]`` ->
    ``[B, T-1]`` (tokens 1..T-1): position t predicts token t+1."""
    return logits[..., :-1, :], (None if labels is None else labels[..., 1:])


def collate(dataset: Dataset, indices: Sequence[int], collate_fn: Callable[[list], Any] | None) -> Any:
    """Fetch ``dataset[i]`` for each index (through ``__getitems__`` when the dataset has it) and collate."""
    idx = [int(i) for i in indices]
    getitems = getattr(dataset, "__getitems__", None)
    samples = getitems(idx) if getitems is not None else [dataset[i] for i in idx]
    return (collate_fn or default_collate)(samples)


class ArrayDataset(Dataset):
    """A dataset over tensors that share their first dimension N; item ``i`` is ``{name: tensor[i]}``.

    ``ArrayDataset(input=x, labels=y)`` gives the ``{"input", "labels"}`` items the loop reads.
    """

    def __init__(self, **tensors: Tensor) -> None:
        if not tensors:
            raise ValueError("ArrayDataset needs at least one tensor")
        sizes = {k: len(v) for k, v in tensors.items()}
        if len(set(sizes.values())) != 1:
            raise ValueError(f"ArrayDataset tensors must share their first dimension, got {sizes}")
        self.tensors = tensors
        self._n = next(iter(sizes.values()))

    def __len__(self) -> int:
        return self._n

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        return {k: v[i] for k, v in self.tensors.items()}

    def __getitems__(self, idx: list[int]) -> list[dict[str, Tensor]]:
        # one gather per tensor instead of one index per item; default_collate stacks the rows back
        index = torch.as_tensor(idx, dtype=torch.long)
        rows = {k: v[index] for k, v in self.tensors.items()}
        return [{k: v[j] for k, v in rows.items()} for j in range(len(idx))]


def epoch_permutation(n: int, seed: int, epoch: int, shuffle: bool) -> Tensor:
    """The order of the dataset's N items in ``epoch``: a function of (seed, epoch) only, so a resumed run
    (or another process) recomputes it without saving it."""
    if not shuffle:
        return torch.arange(n)
    g = torch.Generator().manual_seed(int(seed) * 1_000_003 + int(epoch))
    return torch.randperm(n, generator=g)
