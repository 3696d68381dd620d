"""Run training from a config: ``fastdistill train --config file.yaml`` after :mod:`~fastdistill.training.config`
has parsed and checked it.

:func:`run` checks the config (:func:`~fastdistill.training.config.check_run`: nothing runs before that), saves the
resolved config as ``output_dir/config.yaml``, calls the factories, builds the optimizer and LR schedule, a
:class:`~fastdistill.training.DistillationLoop`, and trains.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from . import checkpoint as ckpt
from .config import (
    ConfigError,
    ModelConfig,
    OptimConfig,
    TrainConfig,
    as_config_error,
    check_run,
    codistill_options,
    config_yaml,
    kd_options,
)
from .data import env_int, torchrun_world


def make_scheduler(cfg: OptimConfig) -> Callable[[torch.optim.Optimizer, int], torch.optim.lr_scheduler.LambdaLR]:
    """(optimizer, total_steps) -> LambdaLR: linear warm-up, then constant / linear / cosine decay to 0."""

    def factory(optimizer: torch.optim.Optimizer, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
        warm, kind = cfg.warmup_steps, cfg.scheduler

        def factor(step: int) -> float:
            if step < warm:
                return (step + 1) / warm
            if kind == "constant":
                return 1.0
            progress = min(1.0, (step - warm) / max(1, total_steps - warm))
            return 1.0 - progress if kind == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))

        return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)

    return factory


def make_optimizer(cfg: OptimConfig) -> Callable[[list[torch.nn.Parameter]], torch.optim.Optimizer]:
    """params -> the optimizer ``cfg`` names (SGD, Adam or AdamW) with its settings."""

    def factory(params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
        if cfg.optimizer == "sgd":
            return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
        cls = torch.optim.AdamW if cfg.optimizer == "adamw" else torch.optim.Adam
        return cls(params, lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay)

    return factory


def _model(make: Callable[[], Any], cfg: ModelConfig, name: str) -> torch.nn.Module:
    """Call the model's factory; load its checkpoint, whose keys and shapes must fit the model."""
    model = make()
    if not isinstance(model, torch.nn.Module):
        raise ConfigError(f"{name}.factory returned {type(model).__name__}, not a torch.nn.Module")
    if cfg.checkpoint is not None:
        as_config_error(f"{name}.checkpoint", ckpt.load_model, model, cfg.checkpoint)
    return model


def run(cfg: TrainConfig) -> dict[str, Any]:
    """Check ``cfg`` (:func:`~fastdistill.training.config.check_run`), build its data, models and
    :class:`~fastdistill.training.DistillationLoop` and train; returns
    :meth:`~fastdistill.training.DistillationLoop.fit`'s summary. Under torchrun (``WORLD_SIZE`` > 1), checks its
    environment (a ConfigError naming a missing or bad variable), makes ``cuda:LOCAL_RANK`` (or ``train.device``'s
    index) this process's current GPU, and initialises the process group with the backend of ``train.device``
    (``nccl`` on CUDA, ``gloo`` on the CPU); it destroys the group after, when it started it."""
    import torch.distributed as dist

    from .loop import init_distributed

    started_here = not (dist.is_available() and dist.is_initialized())
    try:
        if started_here and torchrun_world(ConfigError) > 1:
            # this process's device (checked), made current, and the backend that fits it: init_distributed
            as_config_error("torchrun environment", init_distributed, None, _process_device(cfg.train.device))
        return _run(cfg)
    finally:
        if started_here and dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


def _process_device(spec: str | torch.device | None) -> torch.device:
    """The device of this process under torchrun: ``train.device`` as given when it names an index (or the CPU);
    ``cuda`` without one, or null on a machine with CUDA, is ``cuda:LOCAL_RANK`` (one GPU per process, as
    :func:`~fastdistill.training.loop.default_device`), checked to exist here. ``cuda:k`` or ``LOCAL_RANK`` beyond
    the visible devices is a ConfigError (one GPU per process through ``CUDA_VISIBLE_DEVICES``: give cuda:0)."""
    device = torch.device(spec) if spec is not None else None
    if device is None and not torch.cuda.is_available():
        return torch.device("cpu")
    if device is not None and (device.type != "cuda" or device.index is not None):
        if device.type == "cuda":
            count = torch.cuda.device_count() if torch.cuda.is_available() else 0
            if device.index >= count:
                raise ConfigError(f"train.device is {spec!r} but this machine has {count} CUDA device(s)")
        return device
    local_rank = env_int("LOCAL_RANK", 0, error=ConfigError,
                         unset=f"{{}} is not set, so train.device {spec or 'null'} names no GPU of this process; "
                               "launch with torchrun, or give train.device: cuda:<index>")  # fmt: skip
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if not 0 <= local_rank < count:
        raise ConfigError(f"train.device {spec or 'null'} is cuda:LOCAL_RANK = cuda:{local_rank} under torchrun, but "
                          f"this process sees {count} CUDA device(s); with one GPU per process (CUDA_VISIBLE_DEVICES)"
                          " give train.device: cuda:0")  # fmt: skip
    return torch.device("cuda", local_rank)


def _check_labels(cfg: TrainConfig, plan: Any, train: Any) -> None:
    """A ConfigError when the run needs labels (``kd.ce_weight > 0``, or neither teachers nor a cache: plain
    cross-entropy) and the training set's first item has none: else the first batch fails, after the teachers'
    factories ran. Datasets without ``__getitem__`` (iterable ones) are left to the loop."""
    co = cfg.codistill
    if co.enabled and (co.hard_weight or 0) > 0:
        why = f"codistill.hard_weight={co.hard_weight} trains on labels"
    elif co.enabled and co.burn_in_steps > 0:
        why = f"codistill.burn_in_steps={co.burn_in_steps} trains on labels alone first"
    elif cfg.kd.ce_weight > 0:
        why = f"kd.ce_weight={cfg.kd.ce_weight} trains on labels"
    elif not cfg.teachers and plan.cache is None:
        why = "without teachers or a teacher_cache the run trains on labels"
    else:
        return
    if not (hasattr(train, "__getitem__") and hasattr(train, "__len__")) or len(train) == 0:
        return
    from .data import split_batch

    if split_batch(train[0]).labels is None:
        raise ConfigError(f"data.factory: the training set's items have no labels, and {why}")


def _run(cfg: TrainConfig) -> dict[str, Any]:
    import torch.distributed as dist

    from ..modules import CodistillLoss, KDLoss
    from .loop import DistillationLoop, seed_everything

    plan = check_run(cfg)  # before any factory runs
    if not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0:
        out = Path(cfg.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.yaml").write_text(config_yaml(cfg))
    seed_everything(cfg.seed)  # model initialisation is reproducible too
    datasets = plan.data()
    if not isinstance(datasets, dict) or "train" not in datasets:
        raise ConfigError("data.factory must return a dict with 'train' (and optionally 'eval') datasets")
    if plan.cache is not None:
        as_config_error("teacher_cache", plan.cache.check_length, len(datasets["train"]))
    _check_labels(cfg, plan, datasets["train"])  # before the teachers' factories (which may train them)
    student = _model(plan.student, cfg.student, "student")
    teachers = [_model(make, t, f"teachers[{i}]") for i, (make, t) in enumerate(zip(plan.teachers, cfg.teachers))]
    if cfg.codistill.enabled:  # the student is model a, its one teacher model b; both train
        loss = CodistillLoss(**codistill_options(cfg))
    else:
        loss = KDLoss(**kd_options(cfg))
    t = cfg.train
    if t.fused_linear:  # the models the factories built must be fusable: a one-line error naming the option
        from ..fused_linear import check_fusable

        if t.train_teachers:
            raise ConfigError("train.fused_linear: the teachers get no gradient; not with train.train_teachers")
        for name, model in [("student", student), *((f"teachers[{i}]", m) for i, m in enumerate(teachers))]:
            as_config_error("train.fused_linear", check_fusable, name, model)
    loop = as_config_error("train", lambda: DistillationLoop(  # a contradiction the checks above missed: one line
        student, teachers, loss=loss, optimizer=make_optimizer(cfg.optim), scheduler=make_scheduler(cfg.optim),
        teacher_cache=plan.cache, train_teachers=t.train_teachers or cfg.codistill.enabled,
        batch_size=t.batch_size, grad_accum_steps=t.grad_accum_steps, max_grad_norm=cfg.optim.max_grad_norm,
        shift_labels=t.shift_labels, shuffle=t.shuffle, drop_last=t.drop_last, amp=t.amp, seed=cfg.seed,
        device=plan.device, output_dir=cfg.output_dir, log_every=t.log_every, tensorboard=t.tensorboard,
        progress=t.progress, fused_linear=t.fused_linear,
    ))  # fmt: skip
    if plan.resume not in (None, "latest"):  # its models must fit the ones the factories built (keys, shapes)
        as_config_error("train.resume", loop.check_checkpoint, plan.resume)
    return loop.fit(
        datasets["train"], max_steps=t.max_steps, epochs=t.epochs, eval_data=datasets.get("eval"),
        eval_every=t.eval_every, checkpoint_every=t.checkpoint_every, keep_checkpoints=t.keep_checkpoints,
        resume_from=plan.resume,
    )  # fmt: skip
