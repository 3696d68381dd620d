"""Batches for the reference loop: the batch conventions, a model call that finds the logits, and a seeded sampler.

A dataset item (and, after collation, a batch) is one of:

- a dict: ``"labels"`` (int64 ``[*]``, optional) and ``"sample_weight"`` (float ``[*]``, optional) are taken out;
  the model input is ``"input"`` when present (``model(batch["input"])``; any other key beside it is a ValueError,
  not dropped), else the remaining keys as keyword arguments (``model(**batch)``, the Hugging Face style);
- a tuple/list ``(input, labels)`` or ``(input,)``;
- a tensor (the input, no labels).

What :meth:`~fastdistill.training.DistillationLoop.fit` trains on is a map-style dataset of such items (the loop
batches them in a seeded order), a ``torch.utils.data.DataLoader`` or any other iterable of such batches
(:func:`batch_iterable`, :func:`epoch_batches`).
"""

from __future__ import annotations

import itertools
import os
import random
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, IterableDataset, default_collate

from ..fused_linear import TeacherHead

ForwardFn = Callable[[nn.Module, Any], Tensor]


@dataclass
class Batch:
    """One micro-batch, split into what the model reads and what the loss reads. ``min_vocab``: the smallest V
    whose [0, V) holds every label other than the ignore index, with the sample weights finite and >= 0, as
    :func:`host_checked` found them on the host; None where that is not known (the losses then check on the
    device)."""

    inputs: Any
    labels: Tensor | None = None
    sample_weight: Tensor | None = None
    min_vocab: int | None = None
    labels_from_mask: bool = False  # labels that only mask: mask_labels of the attention mask


def model_list(models: Iterable[nn.Module], name: str = "teachers") -> list[nn.Module]:
    """``models`` (a list, a tuple, an ``nn.ModuleList`` or any iterable, read once) as a list of modules; a lone
    module is a TypeError naming ``name`` (iterated, an ``nn.Sequential`` teacher would become its layers)."""
    if isinstance(models, nn.Module) and not isinstance(models, nn.ModuleList):
        raise TypeError(f"{name} takes a list of models: {name}=[model], got a {type(models).__name__}")
    if isinstance(models, str | bytes) or not isinstance(models, Iterable):
        raise TypeError(f"{name} takes a list of models, got {type(models).__name__}")
    models = list(models)
    for i, m in enumerate(models):
        if not isinstance(m, nn.Module):
            raise TypeError(f"{name}[{i}] must be a model (torch.nn.Module), got {type(m).__name__}")
    return models


def checked_device(device: torch.device | str | int, name: str = "device") -> torch.device:
    """``device`` as a torch.device that exists on this machine, or a ValueError naming ``name`` (torch's own
    errors come later, from deep inside: "Torch not compiled with CUDA enabled")."""
    try:
        d = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"{name} {device!r} is not a device ({e})") from None
    if d.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count < (d.index or 0) + 1:
            raise ValueError(f"{name} is {str(device)!r} but this machine has {count} CUDA device(s)")
    elif d.type != "cpu":
        try:
            torch.empty(0, device=d)
        except (RuntimeError, AssertionError) as e:
            raise ValueError(f"{name} {str(device)!r} is not available here ({str(e).splitlines()[0][:200]})"
                             ) from None  # fmt: skip
    return d


def env_int(name: str, low: int, high: int | None = None, *, unset: str = "{} is not set",
            error: type[Exception] = ValueError) -> int:  # fmt: skip
    """torchrun's integer variable ``name``, in [low, high]: ``error`` naming it when it is unset (``unset``,
    formatted with the name), not an integer or out of range, rather than a traceback (or a hang) in the rendezvous."""
    raw = os.environ.get(name)
    if raw is None:
        raise error("torchrun environment: " + unset.format(name))
    try:
        value = int(raw)
    except ValueError:
        raise error(f"torchrun environment: {name} must be an integer, got {raw!r}") from None
    if value < low or (high is not None and value > high):
        raise error(f"torchrun environment: {name} must be in [{low}, {high if high is not None else 'inf'}], "
                    f"got {value}")  # fmt: skip
    return value


def torchrun_world(error: type[Exception] = ValueError) -> int:
    """``WORLD_SIZE`` of torchrun's environment (1 outside it); when it is > 1, ``RANK`` (in [0, WORLD_SIZE): a rank
    beyond it waits for peers forever), ``MASTER_ADDR`` and ``MASTER_PORT`` are checked too (:func:`env_int`)."""
    world = env_int("WORLD_SIZE", 1, error=error) if "WORLD_SIZE" in os.environ else 1
    if world > 1:
        unset = f"WORLD_SIZE={world} but {{}} is not set; launch with torchrun (or unset WORLD_SIZE for one process)"
        env_int("RANK", 0, world - 1, unset=unset, error=error)
        if not os.environ.get("MASTER_ADDR"):
            raise error("torchrun environment: " + unset.format("MASTER_ADDR"))
        env_int("MASTER_PORT", 1, 65535, unset=unset, error=error)
    return world


def mask_labels(mask: Tensor, ignore_index: int) -> Tensor:
    """Labels that only mask, from an attention mask ``[B, T]``: ``ignore_index`` where it is 0, another value
    elsewhere; for a loss that reads labels for nothing but which positions count (no hard-label term), so that
    padding carries no loss and is not counted in the normalisation."""
    return torch.where(mask.bool(), int(ignore_index == 0), ignore_index)


def host_checked(batch: Batch, ignore_index: int) -> int | None:
    """``Batch.min_vocab`` of a batch whose labels and sample weights are still on the CPU (before the copy to the
    device, where reading them back would be a sync): the largest label other than ``ignore_index`` plus one (0
    for none); None if either is on another device, a label other than ``ignore_index`` is negative, or a sample
    weight is not finite (in float32) and >= 0 (the loss's own check then names it)."""
    labels, weights = batch.labels, batch.sample_weight
    if any(isinstance(x, Tensor) and x.device.type != "cpu" for x in (labels, weights)):
        return None
    # finite in float32, the narrowest dtype the losses accumulate in (a float64 1e39 would be inf there)
    if weights is not None and not (isinstance(weights, Tensor) and weights.is_floating_point() and
                                    bool((torch.isfinite(weights.float()) & (weights >= 0)).all())):  # fmt: skip
        return None
    if labels is None:
        return 0
    if not isinstance(labels, Tensor) or labels.dtype != torch.int64:
        return None
    kept = labels[labels != ignore_index]
    if kept.numel() == 0:
        return 0
    if int(kept.min()) < 0:
        return None
    return int(kept.max()) + 1


def split_batch(batch: Any) -> Batch:
    """Split a collated batch (see the module docstring) into inputs, labels and sample weights."""
    if isinstance(batch, Mapping):
        rest = dict(batch)
        labels = rest.pop("labels", None)
        sample_weight = rest.pop("sample_weight", None)
        if "input" in rest and len(rest) > 1:  # e.g. an attention_mask beside "input" would never reach the model
            extra = sorted(str(k) for k in rest if k != "input")
            raise ValueError(f"a dict batch with 'input' gives the model batch['input'] alone, so its other keys "
                             f"{extra} would be dropped: give every model argument as a key, without 'input' "
                             "(the model, or forward=, then gets them all: model(**batch))")  # fmt: skip
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
    if isinstance(x, tuple) and hasattr(x, "_fields"):  # a NamedTuple (default_collate keeps them) takes fields
        return type(x)(*(to_device(v, device) for v in x))
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


def call_model(model: nn.Module, inputs: Any) -> Any:
    """``model(**inputs)`` for a dict of inputs, else ``model(inputs)``; the output as the model returns it."""
    return model(**inputs) if isinstance(inputs, Mapping) else model(inputs)


def default_forward(model: nn.Module, inputs: Any) -> Tensor:
    """:func:`call_model`, then the logits ``[*, V]`` of its output (:func:`logits_of`)."""
    return logits_of(call_model(model, inputs))


def detect_causal_lm(model: nn.Module) -> bool | None:
    """Whether ``model``'s logits at position t predict token t+1, as far as its class tells.

    True for decoder-only LMs: the class is one of ``transformers``' causal-LM classes, or its name ends in
    ``ForCausalLM``, and its config is not encoder-decoder. None where the class does not say: anything not a
    ``transformers`` model (a plain ``nn.Module``), and a decoder-only ``transformers`` model outside the causal-LM
    classes that generates text (a vision- or audio-language ``...ForConditionalGeneration``, an image-text-to-text
    class: most are next-token LMs, some are not, e.g. block diffusion). False for any other ``transformers`` model
    (a classifier, a masked LM, a seq2seq model: labels line up with the logits). DDP / accelerate wrappers
    (``.module``) and PEFT wrappers (a LoRA ``PeftModel``: ``get_base_model()``) are looked through.
    ``transformers`` is never imported here: a model of its classes means it is imported already.
    """
    model = unwrap_model(model)
    name = type(model).__name__
    config = getattr(model, "config", None)
    text = config.get_text_config() if hasattr(config, "get_text_config") else None
    is_encoder_decoder = any(getattr(c, "is_encoder_decoder", False) for c in (config, text))
    if name.endswith("ForCausalLM"):
        return not is_encoder_decoder
    transformers = sys.modules.get("transformers")
    if transformers is None or not isinstance(model, transformers.PreTrainedModel):
        return None
    from transformers.models.auto import modeling_auto

    if is_encoder_decoder:
        return False
    if name in modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values():
        return True
    generates = getattr(modeling_auto, "MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES", {}).values()
    return None if name.endswith("ForConditionalGeneration") or name in generates else False


def unwrap_model(model: nn.Module) -> nn.Module:
    """The model inside DDP / accelerate (``.module``) and PEFT (``get_base_model()``) wrappers, nested or not."""
    for _ in range(8):  # a few levels (DDP around a PeftModel); never loops on a model that returns itself
        get_base = getattr(model, "get_base_model", None)
        inner = get_base() if callable(get_base) else getattr(model, "module", None)
        if not isinstance(inner, nn.Module) or inner is model:
            return model
        model = inner
    return model


def is_causal_lm(model: nn.Module) -> bool:
    """:func:`detect_causal_lm` as a yes/no: True only for a causal LM recognised by its class."""
    return detect_causal_lm(model) is True


def shift_for_causal_lm(logits: Tensor, labels: Tensor | None) -> tuple[Tensor, Tensor | None]:
    """Next-token alignment: logits ``[B, T, V]`` -> ``[B, T-1, V]`` (positions 0..T-2), labels ``[B, T]`` ->
    ``[B, T-1]`` (tokens 1..T-1): position t predicts token t+1."""
    return logits[..., :-1, :], (None if labels is None else labels[..., 1:])


def pad_last_position(x: Tensor, fill: float) -> Tensor:
    """Shifted labels (or per-position sample weights) ``[..., T-1]`` (tokens 1..T-1) -> ``[..., T]``, aligned with
    whole logits ``[..., T, V]``: the last position ``fill`` (``ignore_index``, or weight 0). A loss that skips those
    positions then computes what :func:`shift_for_causal_lm` does, without the ``[..., :-1, :]`` slice of the
    logits, which a row loss must copy whole ([N, V] rows cannot view it)."""
    return torch.cat([x, x.new_full((*x.shape[:-1], 1), fill)], -1)


def shift_positions(x: Tensor | TeacherHead) -> Tensor | TeacherHead:
    """The causal-LM alignment of a model output: positions 0..T-2 of logits ``[..., T, V]`` (as
    :func:`shift_for_causal_lm`) or of a :class:`~fastdistill.TeacherHead`'s hidden states (``fused_linear``)."""
    return x.shifted() if isinstance(x, TeacherHead) else shift_for_causal_lm(x, None)[0]


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
        for k, v in tensors.items():
            if isinstance(v, Tensor) and v.dim() == 0:
                raise ValueError(f"ArrayDataset {k} is a 0-d tensor; each tensor needs a first dimension N (items)")
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


def epoch_seed(seed: int, epoch: int) -> int:
    """The seed of ``epoch``'s data order, in [0, 2**64) as ``torch.Generator.manual_seed`` takes it: ``seed *
    1_000_003 + epoch`` (below 2**64 for the seeds a config accepts, see ``config.SEED_MAX``), modulo 2**64, which
    is how a generator reads a negative seed already; a larger seed of the loop's wraps instead of failing."""
    return (int(seed) * 1_000_003 + int(epoch)) % 2**64


def epoch_permutation(n: int, seed: int, epoch: int, shuffle: bool) -> Tensor:
    """The order of the dataset's N items in ``epoch``: a function of (seed, epoch) only, so a resumed run
    (or another process) recomputes it without saving it."""
    if not shuffle:
        return torch.arange(n)
    return torch.randperm(n, generator=torch.Generator().manual_seed(epoch_seed(seed, epoch)))


def batch_iterable(data: Any) -> Iterable | None:
    """None if ``data`` is a map-style dataset of items (``len`` and ``[i]``, batched by the loop), else ``data``
    itself as an iterable of batches: a ``torch.utils.data.DataLoader`` (its own sampler, batch size and
    collate_fn) or any other iterable (a list of batches, a generator). An ``IterableDataset`` outside a
    DataLoader yields items, not batches, and anything else is not data: both a :class:`TypeError`."""
    if isinstance(data, DataLoader):
        return data
    if isinstance(data, Mapping):  # len and [key]: not items 0..N-1 (a KeyError(0) at the first batch)
        raise TypeError(f"a {type(data).__name__} of tensors is one batch, not a dataset: give "
                        f"ArrayDataset(**batch): items {{name: tensor[i]}}, batched by the loop")  # fmt: skip
    if isinstance(data, IterableDataset):
        raise TypeError(f"{type(data).__name__} is an IterableDataset: it yields items, not batches; wrap it in a "
                        "torch.utils.data.DataLoader(dataset, batch_size=...)")  # fmt: skip
    if hasattr(data, "__len__") and hasattr(data, "__getitem__"):
        return None
    if isinstance(data, Iterable):
        return data
    raise TypeError(f"expected a map-style dataset (len and [i]), a DataLoader or an iterable of batches, got "
                    f"{type(data).__name__}")  # fmt: skip


def epoch_batches(batches: Iterable, seed: int, epoch: int, skip: int = 0) -> Iterator:
    """The batches of ``batches`` (a DataLoader or another iterable of batches) in ``epoch``, after the first
    ``skip`` (those a resumed run has trained on already).

    ``set_epoch(epoch)`` is called first on the iterable, its ``sampler``, ``batch_sampler`` (and the sampler that
    one wraps, e.g. a ``BatchSampler(DistributedSampler(...))``) and ``dataset`` where they have one (the convention
    of ``DistributedSampler`` and of streaming datasets). The iterator is started and
    batch 0 is drawn with torch's CPU RNG seeded from (seed, epoch) and restored after: a ``DataLoader(shuffle=True)``
    draws its order (and its workers' seeds) there, so an epoch's order is a function of (seed, epoch) and a resumed
    run draws it again. Batches 1, 2, ... are drawn with the training RNG, so what a dataset draws from torch's RNG
    when it loads them (random augmentation in ``__getitem__`` without workers) follows the training RNG too. A
    resumed run draws the ``skip`` batches it trained on (batch 0 included) in the seeded RNG, as the run that never
    stopped drew batch 0, and batch ``skip`` onwards with the training RNG the checkpoint restored, as that run did;
    python's and numpy's RNGs are restored after those ``skip`` batches. Persistent workers (started by an earlier
    epoch) get the same order as fresh ones; what they draw themselves continues their own streams across epochs,
    which a resumed run (new workers) cannot reproduce.
    """
    parts = (batches, *(getattr(batches, a, None) for a in ("sampler", "batch_sampler", "dataset")),
             getattr(getattr(batches, "batch_sampler", None), "sampler", None))  # fmt: skip
    for part in {id(p): p for p in parts if hasattr(p, "set_epoch")}.values():
        part.set_epoch(epoch)
    host_rngs = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(epoch_seed(seed, epoch))  # not torch.manual_seed: it seeds CUDA too
        if _reuses_workers(batches):
            # a DataLoader's first iter() draws its workers' base seed, then its sampler draws the order; a later
            # iter() of persistent workers draws only the order: the base seed's draw, made here, gives the order
            # the same draw either way (a resumed run's first iter() vs the run that never stopped, in epoch > 0)
            torch.empty((), dtype=torch.int64).random_()
        it = iter(batches)
        # batch 0 always: a DataLoader without workers draws its order when it is first asked for a batch. Not
        # batch `skip` (> 0): the run that never stopped loaded it with the training RNG, not this one
        head = list(itertools.islice(it, max(skip, 1)))
    if skip:
        # what the batches trained on drew from python's and numpy's RNGs (augmentation in __getitem__ without
        # workers) is in the states the checkpoint restored: drawn again here, it would shift every later draw
        random.setstate(host_rngs[0])
        np.random.set_state(host_rngs[1])
    yield from head[skip:]
    # not `yield from it`: closing this generator (fit() does, when it ends) would close the caller's own iterator
    for batch in it:
        yield batch


def _reuses_workers(batches: Iterable) -> bool:
    """Whether ``iter(batches)`` resets a DataLoader's persistent workers (started by an earlier ``iter``) instead of
    starting them, drawing their base seed from torch's RNG (a loader's own ``generator`` draws it otherwise)."""
    return (isinstance(batches, DataLoader) and batches.persistent_workers and batches.num_workers > 0
            and batches.generator is None and getattr(batches, "_iterator", None) is not None)  # fmt: skip
