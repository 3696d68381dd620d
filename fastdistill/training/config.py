"""``fastdistill train --config file.yaml``: every option, with its documentation, and strict loading.

A config is YAML (read with ``yaml.safe_load``) mirroring :class:`TrainConfig`: top-level options plus the sections
``data``, ``student``, ``teachers`` (a list), ``kd``, ``optim`` and ``train``. Every option has a default and a
``doc`` (``fastdistill train --print-config`` prints them all as a commented YAML file). Loading is strict: an
unknown key, a value of the wrong type or out of range raises :class:`ConfigError` with one line naming the option
(``kd.temperature must be ...``), which the CLI prints without a traceback. ``key=value`` overrides on the command
line (:func:`apply_overrides`) are loaded the same way; :func:`config_yaml` writes the resolved config, every option
with its value (a config ``--config`` reads again).

Models and data come from factories named ``"package.module:callable"`` and called with ``kwargs``; a config can
import any code on the Python path, like a Python script, so only run configs you trust. :func:`check_run` checks
everything it can before any factory is called (devices, files, the checkpoint to resume, the factories' keyword
arguments against their signatures), so a config that is wrong anywhere runs no code. This module only parses and
checks: :func:`fastdistill.training.launcher.run` trains from a config (``config.run`` still names it).
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import importlib
import inspect
import math
import numbers
import os
import types
import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
import yaml

from .. import functional
from ..ops import divergences, reference
from ..ops.dispatch import BACKENDS_NAMES
from . import checkpoint as ckpt

if TYPE_CHECKING:
    from .cache import TeacherLogitCache


class ConfigError(ValueError):
    """A bad config: the message is one line and names the option."""


# the data order seeds a torch.Generator (which takes up to 2**64 - 1) with seed * 1_000_003 + epoch (data.py)
SEED_MAX = 2**44 - 1


def opt(default: Any, doc: str, *, low: float | None = None, high: float | None = None) -> Any:
    """A dataclass field with its documentation and an optional [low, high] range."""
    kw: dict[str, Any] = {"metadata": {"doc": doc, "low": low, "high": high}}
    if dataclasses.is_dataclass(default) and isinstance(default, type):  # a section: a fresh default each time
        kw["default_factory"] = default
    elif isinstance(default, (list, dict)):
        kw["default_factory"] = (lambda d=default: type(d)(d))  # fmt: skip
    else:
        kw["default"] = default
    return field(**kw)


@dataclass
class ModelConfig:
    """A model built by a factory (the student, or one teacher)."""

    factory: str = opt("", "Import path 'package.module:callable' of a function or class returning the nn.Module.")
    kwargs: dict = opt({}, "Keyword arguments passed to the factory.")
    checkpoint: str | None = opt(None, "Optional safetensors file of the model's weights, loaded after building it "
                                       "(strict: every key must match).")  # fmt: skip


@dataclass
class DataConfig:
    """Where the data comes from."""

    factory: str = opt("", "Import path 'package.module:callable' returning {'train': Dataset, 'eval': Dataset or "
                           "None}: map-style datasets whose items are dicts ('input' or model kwargs, optional "
                           "'labels', 'sample_weight'), (input, labels) tuples or tensors.")  # fmt: skip
    kwargs: dict = opt({}, "Keyword arguments passed to the data factory.")


@dataclass
class KDConfig:
    """The options of fastdistill.kd_loss (SPEC §1); the loop always uses reduction='mean' with num_items."""

    divergence: Literal[divergences.NAMES] = opt(  # type: ignore[valid-type]
        "kl", "Divergence D(P, Q) between the teachers' target P and the student Q.")
    temperature: float = opt(1.0, "T in [1e-19, 1e19] (T^2 and 1/T finite in float32): divides the student's and "
                                  "the teachers' logits.")
    scale_by_temperature_sq: bool = opt(True, "Multiply the divergence by T^2 (Hinton et al.).")
    ensemble: Literal[reference.ENSEMBLES] = opt(  # type: ignore[valid-type]
        "prob_mean", "How K > 1 teachers form the target: mixture of distributions, softmax of mean logits, or the "
                     "mean of per-teacher divergences.")  # fmt: skip
    teacher_weights: list[float] | None = opt(None, "K non-negative weights of the teachers (null: uniform).")
    beta: float = opt(0.5, "jsd: weight of the teacher in the mixture, in (0, 1).")
    skew: float = opt(0.1, "skew_kl / skew_reverse_kl: mixing weight, in [0, 1).")
    ce_weight: float = opt(0.0, "Weight in [0, 1] of the hard-label cross-entropy (needs labels).")
    ignore_index: int = opt(-100, "Label value of items that carry no loss (padding).")
    backend: Literal[BACKENDS_NAMES] = opt("auto", "kd_loss backend.")  # type: ignore[valid-type]


@dataclass
class CodistillConfig:
    """Co-training by co-distillation (fastdistill.CodistillLoss, Anil et al. 2018): the student and its one teacher
    both train, each from the labels and from the other; kd's divergence, temperature, scale_by_temperature_sq,
    beta, skew, ignore_index and backend apply."""

    enabled: bool = opt(False, "Co-train the student and its one teacher with CodistillLoss instead of kd_loss (the "
                               "teacher trains: train.train_teachers is implied).")  # fmt: skip
    weight_ab: float = opt(1.0, "Weight of the student -> teacher term (in the teacher's loss).", low=0.0)
    weight_ba: float = opt(1.0, "Weight of the teacher -> student term (in the student's loss).", low=0.0)
    hard_weight: float | None = opt(None, "Weight of each model's hard-label cross-entropy (null: 1 with labels, 0 "
                                          "without).", low=0.0)  # fmt: skip
    burn_in_steps: int = opt(0, "The first optimizer steps train each model on its labels alone.", low=0)


@dataclass
class OptimConfig:
    """Optimizer and learning-rate schedule."""

    optimizer: Literal["adamw", "adam", "sgd"] = opt("adamw", "torch.optim.AdamW, Adam or SGD.")
    lr: float = opt(1e-3, "Peak learning rate.", low=0.0)
    weight_decay: float = opt(0.0, "Weight decay.", low=0.0)
    momentum: float = opt(0.0, "SGD momentum.", low=0.0, high=1.0)
    betas: list[float] = opt([0.9, 0.999], "Adam/AdamW betas.")
    scheduler: Literal["constant", "linear", "cosine"] = opt(
        "constant", "Learning rate after warm-up: constant, linear decay to 0, or cosine decay to 0.")
    warmup_steps: int = opt(0, "Linear warm-up from 0 over this many optimizer steps.", low=0)
    max_grad_norm: float | None = opt(None, "Clip the gradients' global norm to this, > 0 (null: no clipping).",
                                      low=0.0)


@dataclass
class LoopConfig:
    """The reference loop (fastdistill.training.DistillationLoop)."""

    batch_size: int = opt(32, "Items per micro-batch per process.", low=1)
    grad_accum_steps: int = opt(1, "Micro-batches per optimizer step.", low=1)
    max_steps: int | None = opt(None, "Stop after this many optimizer steps (give this or epochs).", low=1)
    epochs: float | None = opt(None, "Stop after this many passes over the training data (> 0).", low=0.0)
    shift_labels: bool | None = opt(None, "Causal LM: logits at position t predict the label at t+1 (null: on for "
                                          "transformers causal LMs, off for its other models; a student of another "
                                          "class with per-position labels must say).")  # fmt: skip
    train_teachers: bool = opt(False, "The teachers train too, from kd_loss's gradient to their logits only (it pulls "
                               "them toward the student; no loss of their own): for co-distillation use codistill.")
    shuffle: bool = opt(True, "Shuffle the data each epoch (from seed and epoch).")
    drop_last: bool = opt(False, "Drop an epoch's last, smaller, micro-batch.")
    amp: Literal["auto", "bf16", "off"] = opt("auto", "bf16 autocast: auto (on CUDA when supported), bf16, off.")
    device: str | None = opt(None, "cpu, cuda, cuda:1, ... (null: this process's GPU if any, else cpu).")
    log_every: int = opt(10, "Log the mean training loss every this many steps.", low=1)
    eval_every: int | None = opt(None, "Evaluate on the eval dataset every this many steps (and at the end).", low=1)
    checkpoint_every: int | None = opt(None, "Checkpoint every this many steps (and at the end).", low=1)
    keep_checkpoints: int | None = opt(None, "Keep only the newest this many checkpoints.", low=1)
    resume: str | None = opt(None, "A checkpoint directory, or 'latest' (the newest under output_dir; start fresh "
                                   "if none) to continue a run exactly.")  # fmt: skip
    tensorboard: bool = opt(False, "Also write TensorBoard events (needs the tensorboard package).")
    progress: bool = opt(True, "Show a tqdm progress bar.")
    fused_linear: bool = opt(False, "Hugging Face causal LMs: the loss from hidden states and output heads, chunk by "
                                    "chunk (fastdistill.fused_linear_kd_loss): the [B, T, V] logits never whole.")


@dataclass
class TrainConfig:
    """Everything ``fastdistill train`` reads."""

    seed: int = opt(0, "Seeds the data order and the global RNGs (seed + rank); in [0, 2^44 - 1].", low=0,
                    high=SEED_MAX)
    output_dir: str = opt("runs/fastdistill", "Metrics (metrics.jsonl, metrics.csv), TensorBoard and checkpoints.")
    data: DataConfig = opt(DataConfig, "The datasets.")
    student: ModelConfig = opt(ModelConfig, "The student model.")
    teachers: list[ModelConfig] = opt([], "The K teachers (empty with teacher_cache, or for plain cross-entropy).")
    teacher_cache: str | None = opt(None, "A teacher-logit cache file (fastdistill.training.write_teacher_cache) "
                                          "to read instead of running teachers; row i = dataset item i.")  # fmt: skip
    kd: KDConfig = opt(KDConfig, "The distillation loss.")
    codistill: CodistillConfig = opt(CodistillConfig, "Co-distillation of the student and one teacher (instead of "
                                                      "kd's loss; kd's divergence options apply).")  # fmt: skip
    optim: OptimConfig = opt(OptimConfig, "Optimizer and schedule.")
    train: LoopConfig = opt(LoopConfig, "The training loop.")



# ---------------------------------------------------------------------------------------------------------------
# loading


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _type_name(tp: Any) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Literal:
        return "one of " + ", ".join(map(repr, args))
    if origin in (typing.Union, types.UnionType):
        return " or ".join("null" if a is type(None) else _type_name(a) for a in args)
    if origin is list:
        return {float: "a list of numbers", int: "a list of integers"}.get(args[0], "a list") if args else "a list"
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    return {int: "an integer", float: "a number", bool: "true/false", str: "a string", dict: "a mapping"}.get(
        tp, str(tp))


def _convert(value: Any, tp: Any, name: str) -> Any:
    """Check ``value`` against the annotation ``tp``; return it converted (int -> float, mappings -> dataclasses)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for a in args:
            if a is type(None):
                continue
            try:
                return _convert(value, a, name)
            except ConfigError:
                pass
        raise ConfigError(f"{name} must be {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        if isinstance(value, bool) and ("off" if value is False else "on") in args:
            # YAML 1.1 (PyYAML) reads a bare off / on (no / yes, false / true) as a bool: the choice meant
            value = "off" if value is False else "on"
        if value not in args:
            raise ConfigError(f"{name} must be {_type_name(tp)}, got {value!r}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{name} must be {_type_name(tp)}, got {value!r}")
        return [_convert(v, args[0], f"{name}[{i}]") for i, v in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, name)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{name} must be true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise ConfigError(f"{name} must be an integer, got {value!r}")
        return int(value)
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(float(value)):
            raise ConfigError(f"{name} must be a finite number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{name} must be a string, got {value!r}")
        return value
    if tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{name} must be a mapping, got {value!r}")
        return value
    raise TypeError(f"unsupported annotation {tp} for {name}")


def _build(cls: type, raw: Any, prefix: str) -> Any:
    where = prefix or "the config"
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{where} must be a mapping of options, got {raw!r}")
    hints = _hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    values = {}
    for key, value in raw.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        if key not in fields:
            close = difflib.get_close_matches(str(key), list(fields), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else f"; options: {', '.join(fields)}"
            raise ConfigError(f"unknown option {name!r} in {where}{hint}")
        v = _convert(value, hints[key], name)
        meta = fields[key].metadata
        low, high = meta.get("low"), meta.get("high")
        if isinstance(v, (int, float)) and not isinstance(v, bool) and not (
                (low is None or v >= low) and (high is None or v <= high)):  # fmt: skip
            bound = f">= {low}" if high is None else f"<= {high}" if low is None else f"in [{low}, {high}]"
            raise ConfigError(f"{name} must be {bound}, got {value!r}")
        values[key] = v
    return cls(**values)


def parse_config(raw: Any) -> TrainConfig:
    """Build and check a :class:`TrainConfig` from a parsed YAML mapping; raises :class:`ConfigError`."""
    cfg = _build(TrainConfig, raw, "")
    try:
        functional.check_hyperparameters(reduction="mean", **{
            k: getattr(cfg.kd, k) for k in ("divergence", "temperature", "ensemble", "beta", "skew", "ce_weight",
                                            "backend", "ignore_index", "scale_by_temperature_sq")})  # fmt: skip
    except (ValueError, TypeError) as e:
        raise ConfigError(f"kd.{e}") from None
    if cfg.train.device is not None:
        try:
            torch.device(cfg.train.device)
        except RuntimeError:
            raise ConfigError(f"train.device must be a torch device (cpu, cuda, cuda:1, ...), got "
                              f"{cfg.train.device!r}") from None  # fmt: skip
    if cfg.train.max_steps is None and cfg.train.epochs is None:
        raise ConfigError("train.max_steps or train.epochs must be set (how long to train)")
    # > 0, not >= 0: 0 epochs trains nothing, a 0 clipping norm freezes the model
    if cfg.train.epochs is not None and not cfg.train.epochs > 0:
        raise ConfigError(f"train.epochs must be > 0, got {cfg.train.epochs!r}")
    if cfg.optim.max_grad_norm is not None and not cfg.optim.max_grad_norm > 0:
        raise ConfigError(f"optim.max_grad_norm must be > 0 (or null: no clipping), got {cfg.optim.max_grad_norm!r}")
    if not cfg.data.factory:
        raise ConfigError("data.factory must be set ('package.module:callable' returning the datasets)")
    if not cfg.student.factory:
        raise ConfigError("student.factory must be set ('package.module:callable' returning the student)")
    if cfg.teacher_cache is not None and cfg.teachers:
        raise ConfigError("teachers and teacher_cache exclude each other: give one")
    if cfg.teacher_cache is not None and cfg.train.train_teachers:
        raise ConfigError("train.train_teachers trains live teachers; a teacher_cache holds only their logits")
    for i, t in enumerate(cfg.teachers):
        if not t.factory:
            raise ConfigError(f"teachers[{i}].factory must be set")
    if cfg.codistill.enabled:
        _check_codistill(cfg)
    if cfg.kd.teacher_weights is not None:
        k = len(cfg.teachers) if cfg.teachers else None
        if k is not None and len(cfg.kd.teacher_weights) != k:
            raise ConfigError(f"kd.teacher_weights has {len(cfg.kd.teacher_weights)} weights for {k} teachers")
        if any(w < 0 for w in cfg.kd.teacher_weights) or sum(cfg.kd.teacher_weights) <= 0:
            raise ConfigError("kd.teacher_weights must be >= 0 with a positive sum")
    if len(cfg.optim.betas) != 2 or not all(0 <= b < 1 for b in cfg.optim.betas):
        raise ConfigError(f"optim.betas must be two numbers in [0, 1), got {cfg.optim.betas!r}")
    return cfg


def _check_codistill(cfg: TrainConfig) -> None:
    """codistill.enabled: one live teacher, trained by the loop's own optimizer; kd's options that have no meaning
    for two models learning from each other left at their defaults (a ConfigError naming the one set)."""
    if len(cfg.teachers) != 1:
        raise ConfigError(f"codistill.enabled co-trains the student with exactly one teacher; got {len(cfg.teachers)} "
                          "teachers" + (" (a teacher_cache holds no model to train)" if cfg.teacher_cache else ""))
    if cfg.train.fused_linear:
        raise ConfigError("codistill.enabled: train.fused_linear computes kd_loss only; not with co-distillation")
    defaults = KDConfig()
    for name, why in (("ce_weight", "each model's cross-entropy weight is codistill.hard_weight"),
                      ("ensemble", "one teacher: no ensemble"), ("teacher_weights", "one teacher: no weights")):
        if getattr(cfg.kd, name) != getattr(defaults, name):
            raise ConfigError(f"kd.{name} does not apply with codistill.enabled ({why}); leave it at "
                              f"{getattr(defaults, name)!r}")  # fmt: skip


def kd_options(cfg: TrainConfig) -> dict[str, Any]:
    """The keywords of fastdistill.KDLoss for ``cfg`` (every option of its kd section)."""
    return {f.name: getattr(cfg.kd, f.name) for f in dataclasses.fields(cfg.kd)}


def codistill_options(cfg: TrainConfig) -> dict[str, Any]:
    """The keywords of fastdistill.CodistillLoss for ``cfg`` (codistill's weights, kd's divergence options)."""
    kd, co = cfg.kd, cfg.codistill
    return dict(temperature=kd.temperature, weight_ab=co.weight_ab, weight_ba=co.weight_ba,
                hard_weight=co.hard_weight, divergence=kd.divergence,
                scale_by_temperature_sq=kd.scale_by_temperature_sq, beta=kd.beta, skew=kd.skew,
                ignore_index=kd.ignore_index, backend=kd.backend, burn_in_steps=co.burn_in_steps)  # fmt: skip


def apply_overrides(raw: Any, overrides: Sequence[str]) -> Any:
    """``raw`` (a parsed config) with each ``key=value`` of ``overrides`` set, as ``tune run`` and Hydra take them:
    the key is a dotted path (``kd.temperature``, ``student.kwargs.n_layer``, ``teachers.0.factory``), the value is
    read as YAML (``4``, ``null``, ``[1, 2]``, ``cosine``). Missing sections are created; an unknown key is reported
    by :func:`parse_config` as in a file. A malformed override is a :class:`ConfigError`."""
    raw = {} if raw is None else _unshared(raw)
    for item in overrides:
        key, sep, text = item.partition("=")
        parts = key.split(".")
        if not sep or not all(parts):
            raise ConfigError(f"override {item!r} must look like section.option=value (e.g. kd.temperature=4)")
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise ConfigError(f"override {item!r}: the value is not valid YAML ({getattr(e, 'problem', e)})") from None
        node = raw
        for depth, part in enumerate(parts):
            if isinstance(node, list) and part.isdigit() and int(part) < len(node):
                part = int(part)
            elif not isinstance(node, dict):
                what = f"a list of {len(node)}" if isinstance(node, list) else repr(node)
                where = ".".join(parts[:depth]) or "the config"
                raise ConfigError(f"override {item!r}: {where} is {what}, which has no {part!r}")
            if depth == len(parts) - 1:
                node[part] = value
            else:
                if isinstance(node, dict) and node.get(part) is None:  # missing, or a section left empty (`kd:`)
                    node[part] = {}
                node = node[part]
    return raw


def _unshared(node: Any) -> Any:
    """A copy of a parsed YAML tree in which no dict or list is shared: an alias (``*name``) is the same Python
    object as its anchor, so an override into one (``teachers.0.kwargs.seed=7``) would change the other too.
    (``copy.deepcopy`` keeps shared objects shared.)"""
    if isinstance(node, dict):
        return {k: _unshared(v) for k, v in node.items()}
    if isinstance(node, list):
        return [_unshared(v) for v in node]
    return node


def load_config(path: str | os.PathLike, overrides: Sequence[str] = ()) -> TrainConfig:
    """Read and check a YAML config file, with ``key=value`` ``overrides`` (:func:`apply_overrides`) applied; every
    problem is a one-line :class:`ConfigError`."""
    try:
        with open(path, encoding="utf-8") as f:
            raw = yaml.safe_load(f)
    except OSError as e:
        raise ConfigError(f"cannot read config {str(path)!r}: {e.strerror}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"config {str(path)!r} is not UTF-8 text (byte {e.start}: {e.reason})") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"config {str(path)!r} is not valid YAML{at}: {problem}") from None
    return parse_config(apply_overrides(raw, overrides))


def config_yaml(cfg: TrainConfig) -> str:
    """``cfg`` as YAML, every option with its value (what :func:`load_config` reads back to the same config)."""
    header = "# the resolved config of a fastdistill train run (fastdistill train --config this-file reruns it)\n"
    return header + yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False)


def resolve(spec: str, name: str) -> Any:
    """The object named by ``'package.module:attr'``; a :class:`ConfigError` naming the option otherwise."""
    module, sep, attr = spec.partition(":")
    if not sep or not module or not attr:
        raise ConfigError(f"{name} must look like 'package.module:callable', got {spec!r}")
    if module.startswith("."):
        raise ConfigError(f"{name}: {module!r} is a relative module name; give the absolute one "
                          "('package.module:callable')")  # fmt: skip
    try:
        obj = importlib.import_module(module)
    except ImportError as e:
        raise ConfigError(f"{name}: cannot import module {module!r} ({e})") from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ConfigError(f"{name}: module {module!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ConfigError(f"{name}: {spec!r} is not callable")
    return obj


# ---------------------------------------------------------------------------------------------------------------
# documentation


def option_docs(cls: type = TrainConfig, prefix: str = "") -> list[tuple[str, str, Any, str]]:
    """(name, type, default, doc) of every option, sections flattened with dots (``kd.temperature``)."""
    out = []
    hints = _hints(cls)
    for f in dataclasses.fields(cls):
        name = f"{prefix}{f.name}"
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            out.append((name, "section", None, f.metadata["doc"]))
            out += option_docs(tp, name + ".")
        elif typing.get_origin(tp) is list and dataclasses.is_dataclass(typing.get_args(tp)[0]):
            out.append((name, "list of sections", [], f.metadata["doc"]))
            out += option_docs(typing.get_args(tp)[0], name + "[].")
        else:
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            out.append((name, _type_name(tp), default, f.metadata["doc"]))
    return out


def default_yaml() -> str:
    """A YAML file with every option at its default, each preceded by its documentation."""
    lines = ["# fastdistill train --config: every option with its default (generated by --print-config)."]
    for name, tp, default, doc in option_docs():
        depth = name.count(".")
        key = name.rsplit(".", 1)[-1]
        pad = "  " * depth
        if key.endswith("[]"):
            continue
        if "[]." in name:  # options of list items (teachers): documented as comments only
            lines.append(f"{pad}#   {key}: {doc}")
            continue
        lines.append(f"{pad}# {doc} ({tp})")
        if tp == "section":
            lines.append(f"{pad}{key}:")
        elif tp == "list of sections":
            lines.append(f"{pad}{key}: []  # each item:")
        else:
            value = yaml.safe_dump(default, default_flow_style=True).strip().removesuffix("...").strip()
            lines.append(f"{pad}{key}: {value}")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------------------------
# checking a run (before any factory runs; launcher.run runs it)


@dataclass
class RunPlan:
    """What :func:`check_run` resolved: factories with their kwargs bound (not called yet), the device, the open
    teacher cache and what to resume from (a checkpoint directory, "latest" when there is none yet, or None)."""

    data: Callable[[], Any]
    student: Callable[[], Any]
    teachers: list[Callable[[], Any]]
    device: torch.device
    cache: TeacherLogitCache | None
    resume: str | None


def check_run(cfg: TrainConfig) -> RunPlan:
    """Check everything about ``cfg`` that can be checked before a factory runs, raising :class:`ConfigError`:
    output_dir, the device, AMP and kd backend there, the teacher cache, the model checkpoint files, the checkpoint
    to resume from, and every factory's kwargs against its signature. A config runs code; a config wrong anywhere
    must run none of it."""
    _check_output_dir(cfg.output_dir)
    device = _device(cfg.train)
    _check_backend(cfg, device, _amp_dtype(cfg.train.amp, device))
    cache = _open_cache(cfg)
    for name, m in (("student", cfg.student), *((f"teachers[{i}]", t) for i, t in enumerate(cfg.teachers))):
        if m.checkpoint is not None:
            as_config_error(f"{name}.checkpoint", ckpt.check_safetensors, m.checkpoint)
    return RunPlan(
        data=_factory(cfg.data, "data"), student=_factory(cfg.student, "student"),
        teachers=[_factory(t, f"teachers[{i}]") for i, t in enumerate(cfg.teachers)],
        device=device, cache=cache, resume=_resume(cfg),
    )  # fmt: skip


def as_config_error(name: str, fn: Callable[..., Any], *args: Any) -> Any:
    """``fn(*args)``; its ValueError or OSError (a file that is missing, unreadable, damaged or does not fit; a
    setting this machine cannot run) as a one-line ConfigError naming the option."""
    try:
        return fn(*args)
    except (ValueError, OSError) as e:
        raise ConfigError(f"{name}: {e}") from e


def _factory(section: DataConfig | ModelConfig, name: str) -> Callable[[], Any]:
    """``section.factory`` with ``section.kwargs`` bound, checked against its signature without calling it."""
    fn = resolve(section.factory, f"{name}.factory")
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):  # some builtins have none: the call will tell
        signature = None
    try:
        if signature is not None:
            signature.bind(**section.kwargs)
        return functools.partial(fn, **section.kwargs)
    except TypeError as e:  # an unknown or missing keyword, or a key that is not a string
        raise ConfigError(f"{name}.kwargs do not fit {section.factory}{signature or ''}: {e}") from e


def _device(t: LoopConfig) -> torch.device:
    """train.device (parse_config checked its spelling), or the default one, checked to exist on this machine."""
    from .data import checked_device
    from .loop import default_device

    if t.device is None:
        return default_device()
    try:
        return checked_device(t.device, "train.device")
    except ValueError as e:
        raise ConfigError(str(e)) from None


def _amp_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    from .loop import amp_dtype

    return as_config_error("train.amp", amp_dtype, amp, device)


def _check_backend(cfg: TrainConfig, device: torch.device, dtype: torch.dtype | None) -> None:
    """An explicit kd.backend must run the run's op (kd_loss, or codistill_loss with codistill.enabled) on
    ``device``: asked of the dispatcher on a one-row probe (nothing runs)."""
    kd = cfg.kd
    if kd.backend == "auto":
        return
    from ..ops import dispatch

    probe = torch.zeros(1, 2, device=device, dtype=dtype or torch.float32)
    if cfg.codistill.enabled:  # no labels: hard weights 0
        options = {k: v for k, v in codistill_options(cfg).items() if k != "burn_in_steps"}
        inp = functional.codistill_inputs(probe, probe, labels=None, sample_weight=None, reduction="mean",
                                          num_items=None, **{**options, "hard_weight": 0.0})  # fmt: skip
    else:
        options = {**kd_options(cfg), "teacher_weights": None, "ce_weight": 0.0}  # one teacher, no labels
        inp = functional.kd_inputs(probe, probe, labels=None, sample_weight=None, reduction="mean", num_items=None,
                                    **options)  # fmt: skip
    reasons = dispatch.BACKENDS[kd.backend].not_supported_reasons(inp)
    if reasons:
        op = "codistill_loss" if cfg.codistill.enabled else "kd_loss"
        raise ConfigError(f"kd.backend {kd.backend!r} cannot run {op} on {device}: {'; '.join(reasons)} (use 'auto')")


def _check_output_dir(path: str) -> None:
    """output_dir must be a directory, or creatable as one, and writable."""
    p = Path(path).absolute()
    existing = next(q for q in (p, *p.parents) if q.exists())
    if not existing.is_dir():
        where = "is a file" if existing == p else f"cannot be created: {existing} is a file"
        raise ConfigError(f"output_dir {path!r} {where}; expected a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"output_dir {path!r}: {existing} is not writable")


def _open_cache(cfg: TrainConfig) -> TeacherLogitCache | None:
    """The teacher cache, opened (a memory map: its header is checked, no rows read)."""
    from .cache import TeacherLogitCache

    if cfg.teacher_cache is None:
        return None
    if not os.path.isfile(cfg.teacher_cache):
        raise ConfigError(f"teacher_cache: no file {cfg.teacher_cache!r}")
    cache = as_config_error("teacher_cache", TeacherLogitCache, cfg.teacher_cache)
    weights = cfg.kd.teacher_weights
    if weights is not None and len(weights) != cache.num_teachers:
        raise ConfigError(f"kd.teacher_weights has {len(weights)} weights for the {cache.num_teachers} teachers of "
                          f"teacher_cache {cfg.teacher_cache!r}")  # fmt: skip
    return cache


def _resume(cfg: TrainConfig) -> str | None:
    """The checkpoint directory train.resume names, checked (intact, and written with this config's batch size,
    accumulation, seed, ... and process count); "latest" when output_dir has no checkpoint yet; None."""
    import torch.distributed as dist

    t = cfg.train
    if t.resume is None:
        return None
    if t.resume == "latest":
        directory = as_config_error("train.resume", ckpt.find_latest, Path(cfg.output_dir) / "checkpoints")
        if directory is None:
            return "latest"
    else:
        directory = Path(t.resume)
        ckpt.recover(directory)  # a re-save killed between its renames left it as <directory>.old
        if not (directory / "state.json").is_file():
            raise ConfigError(f"train.resume: {t.resume!r} is not a checkpoint directory (no state.json); give one "
                              "written by checkpoint_every, or 'latest'")  # fmt: skip
        problem = ckpt.find_problem(directory)
        if problem is not None:
            raise ConfigError(f"train.resume: {problem}")
    state = as_config_error("train.resume", ckpt.read_run_state, directory)
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    settings = {"world_size": world, "batch_size": t.batch_size, "grad_accum_steps": t.grad_accum_steps,
                "seed": cfg.seed, "shuffle": t.shuffle, "drop_last": t.drop_last}  # fmt: skip
    as_config_error("train.resume", ckpt.check_compatible, state, settings, directory)
    return str(directory)


def __getattr__(name: str) -> Any:
    """``config.run``: kept for callers of earlier versions; running lives in :mod:`.launcher`, imported on use
    (it imports this module)."""
    if name == "run":
        from .launcher import run

        return run
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
