"""Distillation with unlabelled examples under a noisy teacher (issue 7): weighted distillation, SLaM and robust
active distillation against plain KD, on scikit-learn's bundled digits and breast-cancer data (offline, CPU).

Per seed s, each data set is split (stratified, ``random_state=s``) into a tiny **teacher-train** set (the teacher's
only data, so it makes real mistakes), a small labelled **validation** set (the methods fit their teacher-accuracy
curves on it; nobody trains on it except the labelled-only student), a large unlabelled **pool** and a held-out
**test** set. Students (one small MLP) learn on the pool from the teacher's outputs; every KD loss is
:func:`fastdistill.kd_loss`, SLaM is :func:`fastdistill.methods.slam_loss`.

    python examples/noisy_teacher.py --out noisy_out          # full: 5 seeds, both data sets, ~1 min on 2 cores
    python examples/noisy_teacher.py --small --out /tmp/nt    # seconds (the tests)

Prints one table (test accuracy %, mean ± std over seeds) and saves ``noisy_teacher.png`` under ``--out``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

import fastdistill
from fastdistill.apps import paired_ci
from fastdistill.methods import (
    RobustActiveSampler,
    TeacherReliability,
    active_distillation,
    distillation_weights,
    slam_loss,
)
from fastdistill.training import torch_threads


@dataclass
class Settings:
    seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
    datasets: tuple[str, ...] = ("digits", "breast_cancer")
    teacher_steps: int = 300
    student_steps: int = 300
    round_steps: int = 100
    budgets: tuple[int, ...] = (40, 80, 160)  # total teacher queries for active distillation
    rounds: int = 4
    batch_size: int = 64

    @classmethod
    def small(cls) -> Settings:
        return cls(seeds=(0,), teacher_steps=20, student_steps=10, round_steps=5, budgets=(20,), rounds=2)


# data set -> (teacher-train, validation, test) sizes; the pool is the rest
SPLITS = {"digits": (30, 60, 500), "breast_cancer": (12, 40, 170)}


@dataclass
class Split:
    x: dict[str, Tensor]
    y: dict[str, Tensor]
    n_classes: int


def load_split(name: str, seed: int) -> Split:
    from sklearn.datasets import load_breast_cancer, load_digits
    from sklearn.model_selection import train_test_split

    data = {"digits": load_digits, "breast_cancer": load_breast_cancer}[name]()
    x = torch.tensor(data.data, dtype=torch.float32)
    # unsupervised feature scaling on all inputs (no labels used): digits to [0, 1], breast cancer standardised
    x = x / 16.0 if name == "digits" else (x - x.mean(0)) / x.std(0)
    y = torch.tensor(data.target, dtype=torch.long)
    n_tt, n_val, n_test = SPLITS[name]
    idx = list(range(len(y)))
    rest, test = train_test_split(idx, test_size=n_test, stratify=y, random_state=seed)
    rest, tt = train_test_split(rest, test_size=n_tt, stratify=y[rest], random_state=seed)
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


def run_one(name: str, seed: int, s: Settings) -> dict[str, float]:
    """Every row of the table for one data set and one seed: {row name: test accuracy}."""
    d = load_split(name, seed)
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
    for budget in s.budgets:
        per_round = [budget // s.rounds + (r < budget % s.rounds) for r in range(s.rounds)]
        for how in ("random", "robust"):
            sampler = RobustActiveSampler(seed)
            gen = torch.Generator().manual_seed(seed)

            def select(m: nn.Module, cand: Tensor, b: int) -> Tensor:
                if how == "random":
                    return torch.randperm(len(cand), generator=gen)[:b]
                with torch.no_grad():
                    return sampler.select(m(cand), m(x["val"]), teacher_val_correct, b)

            def fit(m: nn.Module, xq: Tensor, tq: Tensor) -> None:
                train(m, len(xq), lambda m, i: fastdistill.kd_loss(m(xq[i]), tq[i]), s.round_steps, s.batch_size,
                      seed)  # fmt: skip

            m = train(student(), len(x_tt), lambda m, i: ce(m(x_tt[i]), y_tt[i]), s.student_steps, s.batch_size,
                      seed)  # fmt: skip
            active_distillation(m, xp, teacher, fit, budgets=per_round, select=select)
            out[f"active {how}, {budget} queries"] = accuracy(m, x["test"], y["test"])
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


def format_table(r: Result) -> str:
    s = r.settings
    names = list(r.acc)
    rows = list(next(iter(r.acc.values())))
    head = [f"{n} ({'/'.join(map(str, SPLITS[n]))})" for n in names]
    lines = [
        f"noisy-teacher distillation: test accuracy % (mean ± std over {len(s.seeds)} seed(s)); splits "
        "teacher-train/val/test in brackets, pool = the rest; teacher MLP 128, student MLP 16; "
        f"{s.student_steps} student steps; active: {s.rounds} rounds x {s.round_steps} steps",
        "",
        "| " + f"{'row':<40}" + " | " + " | ".join(f"{h:>24}" for h in head) + " |",
        "|" + "-" * 42 + "|" + "|".join("-" * 25 + ":" for _ in head) + "|",
    ]
    for row in rows:
        lines.append(f"| {row:<40} | " + " | ".join(f"{_ms(r.acc[n][row]):>24}" for n in names) + " |")
    # paired per-seed differences (same split, same initialisation): the methods against plain KD of the same
    # kind, robust against random querying at the same budget
    pairs = [(f"student: {a}", f"student: {b}") for a, b in (
        ("weighted hard", "KD hard (teacher's label)"), ("weighted soft", "KD soft (T = 1)"),
        ("SLaM (unnormalised)", "KD soft (T = 1)"), ("SLaM (normalised)", "KD soft (T = 1)"),
        ("KD soft (T = 1)", "labelled only"))]  # fmt: skip
    pairs += [(f"active robust, {b} queries", f"active random, {b} queries") for b in s.budgets]
    lines += ["", "paired difference in points, mean [95% CI] over seeds (an interval containing 0 is noise):", "",
              "| " + f"{'difference':<66}" + " | " + " | ".join(f"{n:>24}" for n in names) + " |",
              "|" + "-" * 68 + "|" + "|".join("-" * 25 + ":" for _ in names) + "|"]  # fmt: skip
    for a, b in pairs:
        cells = []
        for n in names:
            ci = paired_ci(r.acc[n][a], r.acc[n][b])
            cells.append("n/a (1 seed)" if ci is None else
                         f"{100 * ci[0]:+5.1f} [{100 * ci[1]:+5.1f}, {100 * ci[2]:+5.1f}]")  # fmt: skip
        label = f"{a.removeprefix('student: ')} - {b.removeprefix('student: ')}"
        lines.append(f"| {label:<66} | " + " | ".join(f"{c:>24}" for c in cells) + " |")
    lines += ["", f"wall time {r.wall_s:.1f} s (1 torch thread)"]
    return "\n".join(lines)


def save_plot(r: Result, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    budgets = list(r.settings.budgets)
    fig, axes = plt.subplots(1, len(r.acc), figsize=(6 * len(r.acc), 4.5), squeeze=False)
    for ax, (name, acc) in zip(axes[0], r.acc.items()):
        for how, col, shift in (("random", "tab:gray", 0.985), ("robust", "tab:red", 1.015)):
            t = torch.tensor([acc[f"active {how}, {b} queries"] for b in budgets]) * 100
            # x shifted a little so the two error bars do not hide each other
            ax.errorbar([b * shift for b in budgets], t.mean(1), yerr=t.std(1) if t.shape[1] > 1 else None,
                        marker="o", capsize=3, color=col, label=f"active: {how} queries")  # fmt: skip
        lines = [("teacher", "k", "--"), ("student: labelled only", "tab:blue", ":"),
                 ("student: KD soft (T = 1)", "tab:green", "-."), ("student: weighted soft", "tab:orange", "-."),
                 ("student: SLaM (unnormalised)", "tab:purple", "-.")]  # fmt: skip
        for row, col, ls in lines:
            label = f"{row} (whole pool)" if "KD" in row or "weighted" in row or "SLaM" in row else row
            ax.axhline(100 * statistics.fmean(acc[row]), color=col, ls=ls, lw=1, label=label)
        ax.set_title(f"{name}: mean ± std over {len(r.settings.seeds)} seed(s)")
        ax.set_xlabel("teacher queries (active distillation budget)")
        ax.set_ylabel("student test accuracy (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def run(settings: Settings, out_dir: str | Path, log: Callable[[str], None] = print) -> Result:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    r = Result(settings)
    t0 = time.perf_counter()
    with torch_threads(1):
        for name in settings.datasets:
            for seed in settings.seeds:
                for row, a in run_one(name, seed, settings).items():
                    r.acc.setdefault(name, {}).setdefault(row, []).append(a)
                log(f"{name} seed {seed} done ({time.perf_counter() - t0:.1f} s)")
    r.wall_s = time.perf_counter() - t0
    r.table = format_table(r)
    log(r.table)
    r.png = save_plot(r, out_dir / "noisy_teacher.png")
    log(f"plot: {r.png}")
    return r


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="noisy_teacher_out", help="folder for the PNG")
    p.add_argument("--small", action="store_true", help="seconds: 1 seed, a few steps (for tests)")
    p.add_argument("--seeds", type=int, default=None, help="number of seeds (default 5; 1 with --small)")
    args = p.parse_args(argv)
    s = Settings.small() if args.small else Settings()
    if args.seeds is not None:
        s.seeds = tuple(range(args.seeds))
    run(s, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
