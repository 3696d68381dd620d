"""``fastdistill demo``: ensemble distillation on scikit-learn's bundled handwritten digits, on the CPU, offline.

The digits are split once into a small **labelled** split (the teachers' only training data; also the no-KD
student's), a larger **transfer** split whose labels the students never see, and a held-out **test** split. K = 4
teachers that differ in architecture, width and view of the image train on the labelled split; their logits on the
transfer split are written once to a teacher-logit cache, which every student reads. Students of one small size
(an MLP 64-16-10) learn with no KD, from the **union of teachers** (each teacher's label or distribution a separate
target) or by **ensemble-then-distill** (one target from the ensemble), every loss through
:func:`fastdistill.kd_loss` (:data:`STUDENTS`) and all training through :class:`~fastdistill.training.DistillationLoop`.
The run prints one table (test accuracy, mean ± std over the seeds, and each student's paired difference to
``no KD``) and saves the learning curves as a PNG. Seeds are fixed: the split uses seed 0; seed s sets the
teachers' and students' initialisation and data order.

The splits, each student's target and loss, why two union-vs-ensemble pairs are not shown (each has one gradient),
and a measured run: ``docs/training.md``, "The demo".
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

import fastdistill

from ..training.cache import write_teacher_cache
from ..training.data import ArrayDataset
from ..training.loop import DistillationLoop
from ._common import paired_ci, single_thread

TEMPERATURE = 2.0
# torch's CPU kernels (ATen's vectorised ops, MKL's GEMMs, oneDNN) choose AVX2 or AVX-512 code when they first run,
# and the two round differently: 400 steps later a few of the 600 test images flip and a student's row moves by 0.1
# point. The documented table is printed with these set (`make demo` and the table's test set them), so that every
# x86-64 machine, AVX-512 or not, prints it digit for digit. They must be in the environment before torch starts.
REPRODUCIBLE_ENV = {"ATEN_CPU_CAPABILITY": "avx2", "MKL_ENABLE_INSTRUCTIONS": "AVX2", "ONEDNN_MAX_CPU_ISA": "AVX2"}


# ---------------------------------------------------------------------------------------------------------------
# data


@dataclass
class DigitsSplits:
    """Images ``x`` [N, 64] in [0, 1], labels ``y`` int64 [N] and row ``index`` into ``load_digits()`` per split."""

    x: dict[str, Tensor]
    y: dict[str, Tensor]
    index: dict[str, list[int]]

    def sizes(self) -> dict[str, int]:
        return {k: len(v) for k, v in self.y.items()}


def load_digits_splits(n_labelled: int = 100, n_test: int = 600, seed: int = 0) -> DigitsSplits:
    """scikit-learn's bundled digits split (stratified, fixed ``seed``) into labelled / transfer / test."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32) / 16.0
    y = torch.tensor(data.target, dtype=torch.long)
    idx = list(range(len(y)))
    rest, test = train_test_split(idx, test_size=n_test, stratify=y, random_state=seed)
    labelled, transfer = train_test_split(rest, train_size=n_labelled, stratify=y[rest], random_state=seed)
    splits = {"labelled": labelled, "transfer": transfer, "test": test}
    return DigitsSplits({k: x[v] for k, v in splits.items()}, {k: y[v] for k, v in splits.items()}, splits)


# ---------------------------------------------------------------------------------------------------------------
# models: four teachers that see the digits differently, one small student


class MLP(nn.Module):
    """``[B, 64] -> [B, 10]`` through hidden layers ``widths``; an optional ``view`` first transforms the image."""

    def __init__(self, widths: Sequence[int], act: type[nn.Module] = nn.ReLU, view: str = "pixels",
                 dropout: float = 0.0) -> None:  # fmt: skip
        super().__init__()
        self.view = view
        d_in = {"pixels": 64, "pooled": 32}[view]
        layers: list[nn.Module] = []
        for w in widths:
            layers += [nn.Linear(d_in, w), act(), nn.Dropout(dropout)]
            d_in = w
        self.body = nn.Sequential(*layers, nn.Linear(d_in, 10))

    def forward(self, x: Tensor) -> Tensor:
        if self.view == "pooled":
            # a coarser view: 4x4 average-pooled image (16) + row and column means of the full image (8 + 8)
            img = x.view(-1, 1, 8, 8)
            pooled = nn.functional.avg_pool2d(img, 2).flatten(1)
            x = torch.cat([pooled, img.mean(3).flatten(1), img.mean(2).flatten(1)], dim=1)
        return self.body(x)


class SmallCNN(nn.Module):
    """``[B, 64] -> [B, 10]``: the image as 8x8, two 3x3 convolutions, max-pool, a linear head."""

    def __init__(self, channels: int = 16) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(1, channels, 3, padding=1), nn.ReLU(),
            nn.Conv2d(channels, 2 * channels, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(2 * channels * 16, 10),
        )  # fmt: skip

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x.view(-1, 1, 8, 8))


TEACHERS: dict[str, Callable[[], nn.Module]] = {
    "MLP 256 (pixels)": lambda: MLP([256], dropout=0.2),
    "MLP 64x64 tanh (pixels)": lambda: MLP([64, 64], act=nn.Tanh),
    "CNN 16-32 (image)": lambda: SmallCNN(16),
    "MLP 128 (pooled view)": lambda: MLP([128], view="pooled"),
}


def make_student() -> nn.Module:
    """The student, of one small size for every variant: MLP 64-16-10."""
    return MLP([16])


# ---------------------------------------------------------------------------------------------------------------
# factories for `fastdistill train --config examples/digits.yaml`


def digits_datasets(n_labelled: int = 100, labels_on_transfer: bool = False) -> dict[str, ArrayDataset]:
    """{"train": the transfer split (inputs only, unless ``labels_on_transfer``), "eval": the test split}."""
    data = load_digits_splits(n_labelled)
    train = {"input": data.x["transfer"]}
    if labels_on_transfer:
        train["labels"] = data.y["transfer"]
    return {"train": ArrayDataset(**train), "eval": ArrayDataset(input=data.x["test"], labels=data.y["test"])}


def trained_teacher(name: str, seed: int = 0, epochs: int = 100, n_labelled: int = 100) -> nn.Module:
    """Teacher ``name`` (a key of :data:`TEACHERS`) trained on the labelled split, as the demo does."""
    if name not in TEACHERS:
        raise ValueError(f"name must be one of {', '.join(map(repr, TEACHERS))}, got {name!r}")
    torch.manual_seed(seed)
    with single_thread():
        return _train_teacher(TEACHERS[name](), load_digits_splits(n_labelled), DemoSettings(teacher_epochs=epochs),
                              seed)  # fmt: skip


# ---------------------------------------------------------------------------------------------------------------
# the students' losses, all through fastdistill.kd_loss. The loop calls loss(student [B, V], teachers [K, B, V]
# from the cache, labels, num_items=...).


def _union_hard(s: Tensor, t: Tensor, labels: Tensor | None, *, num_items=None) -> Tensor:
    # each teacher's predicted label is its own target: K rows per input, cross-entropy (ce_weight=1) on each
    k = t.shape[0]
    return fastdistill.kd_loss(s.expand(k, *s.shape), t, labels=t.argmax(-1), ce_weight=1.0)


def _ensemble_hard(s: Tensor, t: Tensor, labels: Tensor | None, *, num_items=None) -> Tensor:
    # the ensemble's own prediction (argmax of the mixture of the teachers' distributions) as the one target
    target = fastdistill.ensemble_soft_targets(list(t.unbind(0))).argmax(-1)
    return fastdistill.kd_loss(s, t, labels=target, ce_weight=1.0)


def _soft(divergence: str, ensemble: str) -> Callable[..., Tensor]:
    def loss(s: Tensor, t: Tensor, labels: Tensor | None, *, num_items=None) -> Tensor:
        return fastdistill.kd_loss(s, t, divergence=divergence, ensemble=ensemble, temperature=TEMPERATURE)

    return loss


# name -> loss (None: no KD, cross-entropy on the labelled split)
STUDENTS: dict[str, Callable[..., Tensor] | None] = {
    "no KD (labelled split only)": None,
    "union: hard labels": _union_hard,
    "union: soft, loss_mean rKL": _soft("reverse_kl", "loss_mean"),
    "ensemble: prob_mean rKL": _soft("reverse_kl", "prob_mean"),
    "ensemble: logit_mean KL": _soft("kl", "logit_mean"),
    "union = ensemble: prob_mean KL (Hinton)": _soft("kl", "prob_mean"),
    "ensemble: hard label": _ensemble_hard,
}


# ---------------------------------------------------------------------------------------------------------------
# the run


@dataclass
class DemoSettings:
    """Sizes of the run. ``smoke()`` is the seconds-long version the tests use."""

    seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
    teacher_epochs: int = 100
    student_steps: int = 400
    batch_size: int = 64
    eval_every: int = 20
    n_labelled: int = 100
    n_test: int = 600

    @classmethod
    def smoke(cls) -> DemoSettings:
        return cls(seeds=(0,), teacher_epochs=3, student_steps=6, eval_every=3)


@dataclass
class DemoResult:
    """Test accuracies per row name (one per seed), learning curves per student (steps, accuracy per seed)."""

    settings: DemoSettings
    sizes: dict[str, int]
    accuracy: dict[str, list[float]] = field(default_factory=dict)
    curves: dict[str, tuple[list[int], list[list[float]]]] = field(default_factory=dict)
    wall_s: float = 0.0
    table: str = ""
    png: Path | None = None


def _accuracy(logits: Tensor, y: Tensor) -> float:
    return float((logits.argmax(-1) == y).float().mean())


def _train_teacher(model: nn.Module, data: DigitsSplits, settings: DemoSettings, seed: int) -> nn.Module:
    # distributed=False: as a factory of `fastdistill train` under torchrun, each process trains the one-process
    # teacher (same seed, same data), not a data-parallel one (a global batch of 32 x world, fewer steps)
    loop = DistillationLoop(model, [], optimizer=lambda p: torch.optim.AdamW(p, lr=3e-3, weight_decay=1e-3),
                            batch_size=32, seed=seed, progress=False, log_every=10**9, distributed=False)  # fmt: skip
    loop.fit(ArrayDataset(input=data.x["labelled"], labels=data.y["labelled"]), epochs=settings.teacher_epochs)
    return model.eval()


def _train_student(name: str, loss, cache, data: DigitsSplits, settings: DemoSettings, seed: int):
    torch.manual_seed(seed)
    student = make_student()
    x_test, y_test = data.x["test"], data.y["test"]
    steps, accs = [], []

    def eval_fn(loop: DistillationLoop) -> dict[str, float]:
        with torch.no_grad():
            acc = _accuracy(loop.student.eval()(x_test), y_test)
        loop.student.train()
        steps.append(loop.step)
        accs.append(acc)
        return {"accuracy": acc}

    if loss is None:  # no teachers, no cache: the loop's hard-label cross-entropy on the labelled split
        ds, kw = ArrayDataset(input=data.x["labelled"], labels=data.y["labelled"]), {}
    else:  # the students never see the transfer split's labels
        ds, kw = ArrayDataset(input=data.x["transfer"]), {"teacher_cache": cache, "loss": loss}
    loop = DistillationLoop(student, optimizer=lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=1e-4),
                            batch_size=settings.batch_size, seed=seed, progress=False, log_every=10**9,
                            **kw)  # fmt: skip
    loop.fit(ds, max_steps=settings.student_steps, eval_fn=eval_fn, eval_every=settings.eval_every)
    return accs[-1], steps, accs


def run_demo(settings: DemoSettings | None = None, out_dir: str | Path = "demo_out",
             log: Callable[[str], None] = print) -> DemoResult:  # fmt: skip
    """Train the teachers and every student variant for each seed; print the table; save the PNG in ``out_dir``."""
    settings = settings or DemoSettings()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with single_thread():
        return _run_demo(settings, out_dir, log)


def _run_demo(settings: DemoSettings, out_dir: Path, log) -> DemoResult:
    t0 = time.perf_counter()
    data = load_digits_splits(settings.n_labelled, settings.n_test)
    result = DemoResult(settings, data.sizes())
    acc = result.accuracy
    for seed in settings.seeds:
        teachers = []
        for k, (name, make) in enumerate(TEACHERS.items()):
            torch.manual_seed(1000 * seed + k)
            teachers.append(_train_teacher(make(), data, settings, seed=1000 * seed + k))
            with torch.no_grad():
                acc.setdefault(f"teacher: {name}", []).append(_accuracy(teachers[-1](data.x["test"]), data.y["test"]))
        with torch.no_grad():
            test_logits = [t(data.x["test"]) for t in teachers]
        ens = fastdistill.ensemble_soft_targets(test_logits)
        acc.setdefault("ensemble of the 4 (prob_mean)", []).append(_accuracy(ens, data.y["test"]))
        # the teachers' logits on the transfer split, computed once, read by every student from the memory map
        cache = write_teacher_cache(out_dir / f"teacher_logits_seed{seed}.safetensors", teachers,
                                    ArrayDataset(input=data.x["transfer"]))  # fmt: skip
        for name, loss in STUDENTS.items():
            final, steps, accs = _train_student(name, loss, cache, data, settings, seed)
            acc.setdefault(f"student: {name}", []).append(final)
            result.curves.setdefault(name, (steps, []))[1].append(accs)
        log(f"seed {seed} done ({time.perf_counter() - t0:.1f} s)")
    result.wall_s = time.perf_counter() - t0
    result.table = format_table(result)
    log(result.table)
    result.png = save_curves(result, out_dir / "learning_curves.png")
    log(f"learning curves: {result.png}")
    return result


def _mean_std(v: Sequence[float]) -> str:
    std = statistics.stdev(v) if len(v) > 1 else 0.0
    return f"{100 * statistics.fmean(v):5.1f} ± {100 * std:3.1f}"


def format_table(result: DemoResult) -> str:
    """The demo's table: test accuracy (%) mean ± std over seeds; for students, the per-seed (paired) difference to
    no KD with its 95% confidence interval: an interval that contains 0 means the difference is within noise. The
    intervals are several comparisons at once: a line under the table gives their count (and how many would exclude
    0 by chance), and ``*`` marks those that still exclude 0 at the Bonferroni level 1 - 0.05/count."""
    s, sizes = result.settings, result.sizes
    n = len(s.seeds)
    base = result.accuracy.get("student: " + next(iter(STUDENTS)))
    cis = {name: paired_ci(v, base) for name, v in result.accuracy.items()
           if name.startswith("student: ") and base is not None and v is not base}  # fmt: skip
    cis = {name: ci for name, ci in cis.items() if ci is not None}
    strict = {}
    if cis:
        try:  # the corrected quantile is scipy's (the demo's scikit-learn brings it)
            level = 1 - 0.05 / len(cis)
            strict = {name: paired_ci(result.accuracy[name], base, level=level) for name in cis}
        except ImportError:
            pass
    width = max(40, *(len(name) for name in result.accuracy))
    lines = [
        f"fastdistill demo: digits (scikit-learn), splits labelled {sizes['labelled']} / transfer "
        f"{sizes['transfer']} (labels unused) / test {sizes['test']}; K = {len(TEACHERS)} teachers; "
        f"student MLP 64-16-10, {s.student_steps} steps; T = {TEMPERATURE}; {n} seed{'s' * (n > 1)}",
        "",
        f"| {'model':<{width}} | {'test acc. % (mean ± std)':>24} | {'vs no KD, paired [95% CI]':>28} |",
        f"|{'-' * (width + 2)}|{'-' * 25}:|{'-' * 29}:|",
    ]
    for name, v in result.accuracy.items():
        diff = ""
        ci = cis.get(name)
        if ci is not None:
            star = "*" if name in strict and (strict[name][1] > 0 or strict[name][2] < 0) else " "
            diff = f"{100 * ci[0]:+5.1f} [{100 * ci[1]:+5.1f}, {100 * ci[2]:+5.1f}]{star}"
        lines.append(f"| {name:<{width}} | {_mean_std(v):>24} | {diff:>28} |")
    if cis:
        m = len(cis)
        lines += ["", f"{m} paired 95% intervals over {n} seeds each: about {0.05 * m:.1f} would exclude 0 by chance"
                  + (f"; * marks those that still exclude 0 at the Bonferroni level (1 - 0.05/{m})" if strict
                     else "")]  # fmt: skip
    lines += ["", f"wall time {result.wall_s:.1f} s (1 thread)"]
    return "\n".join(lines)


def save_curves(result: DemoResult, path: Path) -> Path:
    """Test accuracy of each student during training (mean over seeds; band: min..max over seeds) with the
    ensemble's and the mean teacher's test accuracy as horizontal lines; right: the second half, zoomed in."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ens = statistics.fmean(result.accuracy["ensemble of the 4 (prob_mean)"]) * 100
    teach = statistics.fmean(v for k, vs in result.accuracy.items() if k.startswith("teacher") for v in vs) * 100
    fig, axes = plt.subplots(1, 2, figsize=(12, 5))
    zoom_low = math.inf
    for name, (steps, runs) in result.curves.items():
        t = torch.tensor(runs) * 100
        mean = t.mean(0)
        for ax in axes:
            line = ax.plot(steps, mean, label=name)[0]
            ax.fill_between(steps, t.min(0).values, t.max(0).values, color=line.get_color(), alpha=0.12)
        zoom_low = min(zoom_low, float(mean[len(steps) // 2 :].min()))
    for ax in axes:
        ax.axhline(ens, color="k", ls="--", lw=1, label="ensemble of the teachers")
        ax.axhline(teach, color="gray", ls=":", lw=1, label="mean teacher")
        ax.set_xlabel("optimizer step")
        ax.grid(alpha=0.3)
    steps = next(iter(result.curves.values()))[0]
    axes[0].set_ylabel("test accuracy (%)")
    axes[0].set_title(f"Students (MLP 64-16-10) on digits, {len(result.settings.seeds)} seeds")
    if steps[len(steps) // 2] < steps[-1]:
        axes[1].set_xlim(steps[len(steps) // 2], steps[-1])
    axes[1].set_ylim(math.floor(min(zoom_low, teach) - 1), math.ceil(ens + 1.5))
    axes[1].set_title("second half, zoomed")
    axes[0].legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv: Sequence[str] | None = None) -> int:
    """``fastdistill demo [--smoke] [--seeds N] [--out DIR]``."""
    p = argparse.ArgumentParser(prog="fastdistill demo", description=__doc__.split("\n")[0])
    p.add_argument("--out", default="demo_out", help="folder for the PNG and the teacher-logit caches")
    p.add_argument("--seeds", type=int, default=None, help="number of seeds (default 5; 1 with --smoke)")
    p.add_argument("--smoke", action="store_true", help="a few seconds: 1 seed, a few steps (for tests)")
    args = p.parse_args(argv)
    extra = {"sklearn": "scikit-learn", "matplotlib": "matplotlib"}  # module: distribution
    missing = [dist for module, dist in extra.items() if importlib.util.find_spec(module) is None]
    if missing:  # the [demo] extra: one line, not an ImportError's traceback halfway through the run
        print(f'fastdistill demo: error: {" and ".join(missing)} not installed: pip install "fastdistill[demo]"',
              file=sys.stderr)  # fmt: skip
        return 2
    settings = DemoSettings.smoke() if args.smoke else DemoSettings()
    if args.seeds is not None:
        if args.seeds < 1:
            p.error("--seeds must be >= 1")
        settings.seeds = tuple(range(args.seeds))
    if Path(args.out).exists() and not Path(args.out).is_dir():
        p.error(f"--out {args.out!r} is a file, not a folder")
    capability = torch.backends.cpu.get_cpu_capability()
    if capability != "AVX2":  # (ATEN_CPU_CAPABILITY=avx2 makes it so)
        note = " ".join(f"{k}={v}" for k, v in REPRODUCIBLE_ENV.items())
        print(f"fastdistill demo: torch's CPU kernels run as {capability}; the documented table is printed with "
              f"{note} (`make demo` sets them), and may differ from this run's by 0.1 point", file=sys.stderr)
    run_demo(settings, args.out)
    return 0
