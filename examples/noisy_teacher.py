"""Distillation with unlabelled examples under a noisy teacher (issue 7): weighted distillation, SLaM and robust
active distillation against plain KD, on scikit-learn's bundled digits and breast-cancer data (offline, CPU).

Per seed s, each data set is split (stratified, ``random_state=s``) into a tiny **teacher-train** set (the teacher's
only data, so it makes real mistakes; its size, 20 / 50 / 100 labels, sweeps the teacher's accuracy), a small
labelled **validation** set (the methods fit their teacher-accuracy curves on it; the only student trained on it is
"labelled + validation labels"), a large unlabelled **pool** and a held-out **test** set. Students (one small MLP)
learn on the pool from the teacher's outputs; every KD loss is :func:`fastdistill.kd_loss`, SLaM is
:func:`fastdistill.methods.slam_loss`. Active distillation queries the teacher by three samplers at each budget:
uniformly at random, by **margin** (the points the student is least sure of: the baseline robust sampling is meant to
improve on) and by :class:`~fastdistill.methods.RobustActiveSampler`; for each, the share of the queried points the
teacher mislabels (what the robust sampler is meant to avoid).

    python examples/noisy_teacher.py --jobs 2 --out noisy_out   # full: 20 seeds x 2 data sets x 3 teachers, ~10 min
    python examples/noisy_teacher.py --small --out /tmp/nt      # seconds (the tests)

Prints one table (test accuracy %, mean ± std over seeds), the paired differences with 95% intervals and the number of
intervals they come from (and which also hold at the Bonferroni level over all of them), and saves
``noisy_teacher.png`` and ``noisy_teacher.json`` under ``--out``.
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

import fastdistill
from fastdistill.apps import map_seeds, paired_ci
from fastdistill.methods import (
    RobustActiveSampler,
    TeacherReliability,
    active_distillation,
    distillation_weights,
    slam_loss,
)
from fastdistill.methods.noisy_teacher import margin
from fastdistill.training import torch_threads


@dataclass
class Settings:
    seeds: tuple[int, ...] = tuple(range(20))
    datasets: tuple[str, ...] = ("digits", "breast_cancer")
    teacher_labels: tuple[int, ...] = (20, 50, 100)  # the teacher's training labels: its accuracy
    teacher_steps: int = 300
    student_steps: int = 300
    round_steps: int = 100
    budgets: tuple[int, ...] = (40, 80, 160)  # total teacher queries for active distillation
    rounds: int = 4
    batch_size: int = 64

    @classmethod
    def small(cls) -> Settings:
        return cls(seeds=(0,), teacher_labels=(20,), teacher_steps=20, student_steps=10, round_steps=5, budgets=(20,),
                   rounds=2)  # fmt: skip


# data set -> (validation, test) sizes; the pool is what the teacher-train set leaves
SPLITS = {"digits": (60, 500), "breast_cancer": (40, 170)}
SAMPLERS = ("random", "margin", "robust")


@dataclass
class Split:
    x: dict[str, Tensor]
    y: dict[str, Tensor]
    n_classes: int


def load_split(name: str, seed: int, n_teacher: int) -> Split:
    from sklearn.datasets import load_breast_cancer, load_digits
    from sklearn.model_selection import train_test_split

    data = {"digits": load_digits, "breast_cancer": load_breast_cancer}[name]()
    x = torch.tensor(data.data, dtype=torch.float32)
    # unsupervised feature scaling on all inputs (no labels used): digits to [0, 1], breast cancer standardised
    x = x / 16.0 if name == "digits" else (x - x.mean(0)) / x.std(0)
    y = torch.tensor(data.target, dtype=torch.long)
    n_val, n_test = SPLITS[name]
    idx = list(range(len(y)))
    rest, test = train_test_split(idx, test_size=n_test, stratify=y, random_state=seed)
    rest, tt = train_test_split(rest, test_size=n_teacher, stratify=y[rest], random_state=seed)
    pool, val = train_test_split(rest, test_size=n_val, stratify=y[rest], random_state=seed)
    parts = {"teacher_train": tt, "val": val, "pool": pool, "test": test}
    return Split({k: x[v] for k, v in parts.items()}, {k: y[v] for k, v in parts.items()}, int(y.max()) + 1)


def mlp(d_in: int, hidden: Sequence[int], n_out: int) -> nn.Module:
    layers: list[nn.Module] = []
    for h in hidden:
        layers += [nn.Linear(d_in, h), nn.ReLU()]
        d_in = h
    return nn.Sequential(*layers, nn.Linear(d_in, n_out))


def train(model: nn.Module, n: int, loss_fn: Callable[[nn.Module, Tensor], Tensor], steps: int, batch_size: int,
          seed: int, lr: float = 1e-2) -> nn.Module:  # fmt: skip
    """``steps`` AdamW steps on random mini-batches of rows 0..n-1; ``loss_fn(model, idx)`` gives the batch loss."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    model.train()
    for _ in range(steps):
        idx = torch.randint(n, (min(batch_size, n),), generator=gen)
        opt.zero_grad()
        loss_fn(model, idx).backward()
        opt.step()
    return model.eval()


def accuracy(model: nn.Module, x: Tensor, y: Tensor) -> float:
    with torch.no_grad():
        return float((model(x).argmax(-1) == y).float().mean())




# ---------------------------------------------------------------------------------------------------------------


STUDENT_HIDDEN = (16,)
TEACHER_HIDDEN = (128,)


def run_one(name: str, n_teacher: int, seed: int, s: Settings) -> dict[str, float]:
    """Every row of the table for one data set, teacher and seed: {row name: test accuracy (or a rate)}."""
    d = load_split(name, seed, n_teacher)
    x, y, c = d.x, d.y, d.n_classes
    d_in = x["pool"].shape[1]
    out: dict[str, float] = {}

    # the teacher: wide, but trained on a handful of labels, so it is wrong on a good share of the pool
    torch.manual_seed(seed)
    teacher = mlp(d_in, TEACHER_HIDDEN, c)
    ce = nn.functional.cross_entropy
    train(teacher, len(x["teacher_train"]), lambda m, i: ce(m(x["teacher_train"][i]), y["teacher_train"][i]),
          s.teacher_steps, s.batch_size, seed, lr=3e-3)  # fmt: skip
    out["teacher"] = accuracy(teacher, x["test"], y["test"])
    out["teacher on the pool (label accuracy)"] = accuracy(teacher, x["pool"], y["pool"])
    with torch.no_grad():
        t_pool, t_val = teacher(x["pool"]), teacher(x["val"])
    rel = TeacherReliability.fit(t_val, y["val"])

    def student() -> nn.Module:
        torch.manual_seed(10_000 + seed)  # the same initialisation for every student of a seed
        return mlp(d_in, STUDENT_HIDDEN, c)

    # labelled only: the student on the teacher's own labelled set; and, for reference, on it + the validation set
    # (whose labels the methods below spend on calibration instead)
    x_tt, y_tt = x["teacher_train"], y["teacher_train"]
    m = train(student(), len(x_tt), lambda m, i: ce(m(x_tt[i]), y_tt[i]), s.student_steps, s.batch_size, seed)
    out["student: labelled only"] = accuracy(m, x["test"], y["test"])
    x_lab = torch.cat([x["teacher_train"], x["val"]])
    y_lab = torch.cat([y["teacher_train"], y["val"]])
    m = train(student(), len(x_lab), lambda m, i: ce(m(x_lab[i]), y_lab[i]), s.student_steps, s.batch_size, seed)
    out["student: labelled + validation labels"] = accuracy(m, x["test"], y["test"])

    xp, w = x["pool"], distillation_weights(rel, t_pool)
    hard = t_pool.argmax(-1)
    alpha, k = rel.accuracy(t_pool), rel.smallest_k(t_pool)
    losses: dict[str, Callable[[nn.Module, Tensor], Tensor]] = {
        "KD hard (teacher's label)": lambda m, i: fastdistill.kd_loss(m(xp[i]), t_pool[i], labels=hard[i],
                                                                       ce_weight=1.0),
        "KD soft (T = 1)": lambda m, i: fastdistill.kd_loss(m(xp[i]), t_pool[i]),
        "weighted hard": lambda m, i: fastdistill.kd_loss(m(xp[i]), t_pool[i], labels=hard[i], ce_weight=1.0,
                                                          sample_weight=w[i]),
        "weighted soft": lambda m, i: fastdistill.kd_loss(m(xp[i]), t_pool[i], sample_weight=w[i]),
        "SLaM (unnormalised)": lambda m, i: slam_loss(m(xp[i]), t_pool[i], alpha[i], k[i]),
        "SLaM (normalised)": lambda m, i: slam_loss(m(xp[i]), t_pool[i], alpha[i], k[i], normalize=True),
    }  # fmt: skip
    for row, fn in losses.items():
        out[f"student: {row}"] = accuracy(train(student(), len(xp), fn, s.student_steps, s.batch_size, seed),
                                          x["test"], y["test"])  # fmt: skip

    # active distillation: warm start from the labelled-only student (teacher-train labels), then rounds of
    # query + soft KD on everything queried so far
    teacher_val_correct = (t_val.argmax(-1) == y["val"]).double()
    teacher_wrong = hard != y["pool"]  # (evaluation only: no sampler sees the pool's labels)
    for budget in s.budgets:
        per_round = [budget // s.rounds + (r < budget % s.rounds) for r in range(s.rounds)]
        for how in SAMPLERS:
            sampler = RobustActiveSampler(seed)
            gen = torch.Generator().manual_seed(seed)

            def select(m: nn.Module, cand: Tensor, b: int) -> Tensor:
                if how == "random":
                    return torch.randperm(len(cand), generator=gen)[:b]
                with torch.no_grad():
                    if how == "margin":  # uncertainty sampling: the b smallest student margins
                        return torch.argsort(margin(m(cand)))[:b]
                    return sampler.select(m(cand), m(x["val"]), teacher_val_correct, b)

            def fit(m: nn.Module, xq: Tensor, tq: Tensor) -> None:
                train(m, len(xq), lambda m, i: fastdistill.kd_loss(m(xq[i]), tq[i]), s.round_steps, s.batch_size,
                      seed)  # fmt: skip

            m = train(student(), len(x_tt), lambda m, i: ce(m(x_tt[i]), y_tt[i]), s.student_steps, s.batch_size,
                      seed)  # fmt: skip
            queried = active_distillation(m, xp, teacher, fit, budgets=per_round, select=select)
            out[f"active {how}, {budget} queries"] = accuracy(m, x["test"], y["test"])
            out[f"teacher mislabels among the queried: {how}, {budget}"] = float(teacher_wrong[queried].float().mean())
    return out


@dataclass
class Result:
    settings: Settings
    acc: dict[str, dict[str, list[float]]] = field(default_factory=dict)  # dataset -> row -> per seed
    wall_s: float = 0.0
    table: str = ""
    png: Path | None = None


def _ms(v: Sequence[float]) -> str:
    sd = statistics.stdev(v) if len(v) > 1 else 0.0
    return f"{100 * statistics.fmean(v):5.1f} ± {100 * sd:4.1f}"


def column(name: str, n_teacher: int) -> str:
    return f"{name}, teacher on {n_teacher} labels"


def contrasts(s: Settings) -> list[tuple[str, str]]:
    """The paired differences the table reports: each method against plain KD of the same kind, KD against
    labelled-only, and the samplers against each other at each budget."""
    pairs = [(f"student: {a}", f"student: {b}") for a, b in (
        ("weighted hard", "KD hard (teacher's label)"), ("weighted soft", "KD soft (T = 1)"),
        ("SLaM (unnormalised)", "KD soft (T = 1)"), ("SLaM (normalised)", "KD soft (T = 1)"),
        ("KD soft (T = 1)", "labelled only"))]  # fmt: skip
    for b in s.budgets:
        pairs += [(f"active margin, {b} queries", f"active random, {b} queries"),
                  (f"active robust, {b} queries", f"active random, {b} queries"),
                  (f"active robust, {b} queries", f"active margin, {b} queries")]  # fmt: skip
    return pairs


def format_table(r: Result) -> str:
    s = r.settings
    cols = list(r.acc)
    rows = list(next(iter(r.acc.values())))
    width = max(24, *(len(c) for c in cols))
    lines = [
        f"noisy-teacher distillation: test accuracy % (mean ± std over {len(s.seeds)} seed(s)); validation/test sizes "
        f"{SPLITS}, pool = the rest; teacher MLP 128 on 20 / 50 / 100 labels, student MLP 16; {s.student_steps} "
        f"student steps; active: {s.rounds} rounds x {s.round_steps} steps; 'teacher mislabels among the queried' "
        "is the share of the queried pool points whose teacher label is wrong (%)",
        "",
        "| " + f"{'row':<52}" + " | " + " | ".join(f"{c:>{width}}" for c in cols) + " |",
        "|" + "-" * 54 + "|" + "|".join("-" * (width + 1) + ":" for _ in cols) + "|",
    ]
    for row in rows:
        lines.append(f"| {row:<52} | " + " | ".join(f"{_ms(r.acc[c][row]):>{width}}" for c in cols) + " |")
    pairs = contrasts(s)
    total = len(pairs) * len(cols)
    level = 1 - 0.05 / total
    lines += ["", f"paired difference in points, mean [95% CI] over seeds. {len(pairs)} differences x {len(cols)} "
              f"columns = {total} intervals: if nothing differed, about {0.05 * total:.1f} of them would exclude 0 "
              f"by chance. * marks an interval that excludes 0 even at the Bonferroni level {100 * level:.2f}% "
              f"(1 - 0.05 / {total}).", "",
              "| " + f"{'difference':<66}" + " | " + " | ".join(f"{c:>{width}}" for c in cols) + " |",
              "|" + "-" * 68 + "|" + "|".join("-" * (width + 1) + ":" for _ in cols) + "|"]  # fmt: skip
    for a, b in pairs:
        cells = []
        for c in cols:
            ci = paired_ci(r.acc[c][a], r.acc[c][b])
            if ci is None:
                cells.append("n/a (1 seed)")
                continue
            strict = paired_ci(r.acc[c][a], r.acc[c][b], level=level)
            star = "*" if strict[1] > 0 or strict[2] < 0 else " "
            cells.append(f"{100 * ci[0]:+5.1f} [{100 * ci[1]:+5.1f}, {100 * ci[2]:+5.1f}]{star}")
        label = f"{a.removeprefix('student: ')} - {b.removeprefix('student: ')}"
        lines.append(f"| {label:<66} | " + " | ".join(f"{x:>{width}}" for x in cells) + " |")
    lines += ["", f"wall time {r.wall_s:.1f} s (1 torch thread per process)"]
    return "\n".join(lines)


def save_plot(r: Result, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = r.settings
    budgets = list(s.budgets)
    fig, axes = plt.subplots(len(s.datasets), len(s.teacher_labels),
                             figsize=(5 * len(s.teacher_labels), 4 * len(s.datasets)), squeeze=False)  # fmt: skip
    colors = {"random": "tab:gray", "margin": "tab:blue", "robust": "tab:red"}
    for i, name in enumerate(s.datasets):
        for j, n in enumerate(s.teacher_labels):
            ax, acc = axes[i][j], r.acc[column(name, n)]
            for k, how in enumerate(SAMPLERS):
                t = torch.tensor([acc[f"active {how}, {b} queries"] for b in budgets]) * 100
                shift = 1 + 0.015 * (k - 1)  # x shifted a little so the error bars do not hide each other
                ax.errorbar([b * shift for b in budgets], t.mean(1), yerr=t.std(1) if t.shape[1] > 1 else None,
                            marker="o", capsize=3, color=colors[how], label=f"active: {how}")  # fmt: skip
            for row, col, ls in (("teacher", "k", "--"), ("student: labelled only", "tab:purple", ":"),
                                 ("student: KD soft (T = 1)", "tab:green", "-."),
                                 ("student: SLaM (normalised)", "tab:orange", "-.")):  # fmt: skip
                ax.axhline(100 * statistics.fmean(acc[row]), color=col, ls=ls, lw=1,
                           label=row + (" (whole pool)" if "KD" in row or "SLaM" in row else ""))  # fmt: skip
            ax.set_title(f"{column(name, n)}: mean ± std, {len(s.seeds)} seed(s)", fontsize=9)
            ax.set_xlabel("teacher queries (active budget)")
            ax.set_ylabel("student test accuracy (%)")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=6, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _run_job(s: Settings, jobs: list[tuple[str, int, int]], i: int) -> dict[str, float]:
    return run_one(*jobs[i], s)


def run(settings: Settings, out_dir: str | Path, log: Callable[[str], None] = print, jobs: int = 1) -> Result:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    s, r = settings, Result(settings)
    t0 = time.perf_counter()
    work = [(name, n, seed) for name in s.datasets for n in s.teacher_labels for seed in s.seeds]
    with torch_threads(1):
        results = map_seeds(functools.partial(_run_job, s, work), list(range(len(work))), jobs)
    for (name, n, _), res in zip(work, results):
        for row, a in res.items():
            r.acc.setdefault(column(name, n), {}).setdefault(row, []).append(a)
    r.wall_s = time.perf_counter() - t0
    r.table = format_table(r)
    log(r.table)
    r.png = save_plot(r, out_dir / "noisy_teacher.png")
    (out_dir / "noisy_teacher.json").write_text(json.dumps({"settings": asdict(s), "acc": r.acc}, indent=1) + "\n")
    log(f"plot: {r.png}; per-seed numbers: {out_dir / 'noisy_teacher.json'}")
    return r


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="noisy_teacher_out", help="folder for the JSON and the PNG")
    p.add_argument("--small", action="store_true", help="seconds: 1 seed, a few steps (for tests)")
    p.add_argument("--seeds", type=int, default=None, help="number of seeds (default 20; 1 with --small)")
    p.add_argument("--jobs", type=int, default=1, help="processes (default 1)")
    args = p.parse_args(argv)
    s = Settings.small() if args.small else Settings()
    if args.seeds is not None:
        s.seeds = tuple(range(args.seeds))
    run(s, args.out, jobs=args.jobs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
