"""Distillation from a weak teacher, as learning curves over teachers of three qualities (issue 22).

    python examples/weak_teacher_curves.py --jobs 2   # 3 seeds, ~10 minutes on 2 CPU cores; docs/weak_teacher.*
    python examples/weak_teacher_curves.py --small    # seconds (what the tests run)

The weak-teacher paper's question (Lee et al., Findings of ACL 2023): when a small teacher teaches a larger student,
does KD help, and how should the soft weight be scheduled? A single end point cannot answer it: the typical pattern
is that KD helps early and the student then outgrows its teacher. So: data, models and optimiser of
``examples/lm_methods.py`` (Python's standard-library sources; ``small`` = GPT-2 2 x 32 teaches ``large`` = 4 x 128);
the teacher is trained once per seed and snapshotted at 300, 1200 and 3000 steps (three teacher qualities); the
student trains 300 steps with hard CE plus a soft weight alpha_s x KL (T = 1) for alpha_s in {0 (no KD), 1, 4,
4 -> 1, 4 -> 0} (the schedules linear over the run), with held-out perplexity every 75 steps (4 points per curve).
Paired differences against no KD (same seed: same initialisation and data order), 95% t intervals, and how many of
them the table holds.
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import fastdistill  # noqa: F401  (the ops the loss runs on)
from fastdistill.apps import load_script, map_seeds, paired_ci, single_thread
from fastdistill.methods import SoftWeightSchedule, WeakTeacherKDLoss

WEIGHTS = {"no KD": None, "1": 1.0, "4": 4.0, "4 -> 1": (4.0, 1.0), "4 -> 0": (4.0, 0.0)}


@dataclass
class Settings:
    vocab: int = 1024
    seq_len: int = 64
    teacher_steps: tuple[int, ...] = (300, 1200, 3000)
    student_steps: int = 300
    eval_every: int = 75
    batch_size: int = 16
    seeds: tuple[int, ...] = (0, 1, 2)
    max_chars: int | None = None

    @classmethod
    def small(cls) -> Settings:
        return cls(vocab=300, seq_len=32, teacher_steps=(2, 4), student_steps=4, eval_every=2, batch_size=8,
                   seeds=(0,), max_chars=6000)  # fmt: skip


def _lm():
    return load_script(Path(__file__).with_name("lm_methods.py"), "lm_methods_example")


def _loss(weight) -> WeakTeacherKDLoss:
    if isinstance(weight, tuple):
        weight = SoftWeightSchedule(start=weight[0], end=weight[1], shape="linear")
    return WeakTeacherKDLoss(hard_weight=1.0, soft_weight=weight, temperature=1.0)


def run_seed(s: Settings, seed: int) -> dict:
    """{"teacher_ppl": {steps: ppl}, "curves": {f"{steps}: {weight}": [ppl at each eval]}, "steps": [...]}."""
    lm, cl = _lm(), _lm()._causal_lm()
    ls = lm.Settings(vocab=s.vocab, seq_len=s.seq_len, steps=s.student_steps, batch_size=s.batch_size,
                     max_chars=s.max_chars)  # fmt: skip
    train, held, vocab = lm._data(ls)
    t0 = time.perf_counter()

    def model(size: str, init_seed: int):
        return lm.gpt2(size, vocab, s.seq_len, 1000 * seed + init_seed)

    # one teacher run per seed, snapshotted at each quality: max_steps grows, fit() continues the same run
    teacher, teachers, teacher_ppl = model("small", 2), {}, {}
    loop = lm._loop(teacher, seed=seed, batch_size=s.batch_size)
    for steps in s.teacher_steps:
        loop.fit(train, max_steps=steps)
        teachers[steps] = copy.deepcopy(teacher).eval()
        teacher_ppl[steps] = cl.perplexity(teachers[steps], held)

    curves: dict[str, list[float]] = {}
    eval_steps: list[int] = []

    def student_curve(teacher_model, weight) -> list[float]:
        student = model("large", 1)
        points: list[float] = []
        kw = {} if weight is None else {"loss": _loss(weight)}

        def eval_fn(lp) -> dict[str, float]:
            points.append(cl.perplexity(student, held))
            if len(eval_steps) < len(points):
                eval_steps.append(lp.step)
            return {"ppl": points[-1]}

        lm._loop(student, [] if weight is None else [teacher_model], seed=seed, batch_size=s.batch_size, **kw).fit(
            train, max_steps=s.student_steps, eval_fn=eval_fn, eval_every=s.eval_every)  # fmt: skip
        return points

    curves["no KD"] = student_curve(None, None)
    for steps, t in teachers.items():
        for name, weight in WEIGHTS.items():
            if weight is not None:
                curves[f"{steps}: {name}"] = student_curve(t, weight)
    return {"seed": seed, "teacher_ppl": teacher_ppl, "curves": curves, "steps": eval_steps,
            "seconds": time.perf_counter() - t0}  # fmt: skip


def _ms(xs: list[float]) -> str:
    return f"{statistics.fmean(xs):.1f}" + (f" ± {statistics.stdev(xs):.1f}" if len(xs) > 1 else "")


def report(runs: list[dict], s: Settings, log=print) -> None:
    steps = runs[0]["steps"]
    n = len(runs)
    log(f"held-out perplexity of the large student (4x128) at steps {steps} (mean ± std over {n} seeds); the small "
        f"teacher (2x32) after {' / '.join(map(str, s.teacher_steps))} steps")  # fmt: skip
    for t_steps in s.teacher_steps:
        t_ppl = [r["teacher_ppl"][t_steps] if t_steps in r["teacher_ppl"] else r["teacher_ppl"][str(t_steps)]
                 for r in runs]  # fmt: skip
        log("")
        log(f"teacher after {t_steps} steps: perplexity {_ms(t_ppl)}")
        log("| soft weight | " + " | ".join(f"step {x}" for x in steps) + " |")
        log("|---|" + "---:|" * len(steps))
        for name in WEIGHTS:
            key = "no KD" if WEIGHTS[name] is None else f"{t_steps}: {name}"
            log(f"| {name} | " + " | ".join(_ms([r['curves'][key][i] for r in runs]) for i in range(len(steps)))
                + " |")  # fmt: skip
    if n > 1:
        kd = [k for k in WEIGHTS if WEIGHTS[k] is not None]
        total = len(kd) * len(s.teacher_steps) * len(steps)
        log("")
        log(f"KD - no KD, perplexity (negative = KD better), mean [95% CI] over {n} paired seeds; {total} intervals, "
            f"so about {0.05 * total:.1f} may exclude 0 by chance")  # fmt: skip
        log("| teacher steps, soft weight | " + " | ".join(f"step {x}" for x in steps) + " |")
        log("|---|" + "---:|" * len(steps))
        for t_steps in s.teacher_steps:
            for name in kd:
                cells = []
                for i in range(len(steps)):
                    m, lo, hi = paired_ci([r["curves"][f"{t_steps}: {name}"][i] for r in runs],
                                          [r["curves"]["no KD"][i] for r in runs])  # fmt: skip
                    cells.append(f"{m:+.1f} [{lo:+.1f}, {hi:+.1f}]")
                log(f"| {t_steps}, {name} | " + " | ".join(cells) + " |")


def plot(runs: list[dict], s: Settings, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = runs[0]["steps"]
    fig, axes = plt.subplots(1, len(s.teacher_steps), figsize=(5 * len(s.teacher_steps), 4), squeeze=False)
    for ax, t_steps in zip(axes[0], s.teacher_steps):
        for name, weight in WEIGHTS.items():
            key = "no KD" if weight is None else f"{t_steps}: {name}"
            ys = [statistics.fmean(r["curves"][key][i] for r in runs) for i in range(len(steps))]
            ax.plot(steps, ys, marker="o", label=f"soft weight {name}" if weight is not None else "no KD",
                    ls="--" if weight is None else "-")  # fmt: skip
        t_ppl = statistics.fmean(r["teacher_ppl"].get(t_steps, r["teacher_ppl"].get(str(t_steps))) for r in runs)
        ax.axhline(t_ppl, color="k", lw=0.8, ls=":", label=f"teacher ({t_ppl:.0f})")
        ax.set_yscale("log")
        ax.set_title(f"teacher trained {t_steps} steps", fontsize=9)
        ax.set_xlabel("student step")
        ax.set_ylabel("held-out perplexity (mean over seeds)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def run(settings: Settings, log=print, out: Path | None = None, jobs: int = 1) -> list[dict]:
    t0 = time.perf_counter()
    runs = map_seeds(functools.partial(run_seed, settings), settings.seeds, jobs)
    report(runs, settings, log)
    if out is not None:
        out.with_suffix(".json").write_text(json.dumps({"settings": asdict(settings), "runs": runs}, indent=1) + "\n")
        plot(runs, settings, out.with_suffix(".png"))
        log(f"per-seed curves: {out.with_suffix('.json')}; plot: {out.with_suffix('.png')}")
    log(f"wall time {time.perf_counter() - t0:.1f} s")
    return runs


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--small", action="store_true", help="seconds: tiny sizes (the tests' run)")
    p.add_argument("--jobs", type=int, default=1, help="processes, one seed each (default 1)")
    p.add_argument("--out", type=Path, default=None, help="JSON + PNG path stem (default docs/weak_teacher; none "
                   "with --small)")  # fmt: skip
    args = p.parse_args(argv)
    out = args.out or (None if args.small else Path(__file__).resolve().parents[1] / "docs" / "weak_teacher")
    with single_thread():
        run(Settings.small() if args.small else Settings(), out=out, jobs=args.jobs)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
