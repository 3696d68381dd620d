"""Distillation from a weak teacher, as learning curves over teachers of three qualities (issue 22).

    python examples/weak_teacher_curves.py --jobs 2   # 3 seeds, ~12 minutes on 2 CPU cores; docs/weak_teacher.*
    python examples/weak_teacher_curves.py --small    # seconds (what the tests run)

The weak-teacher paper's question (Lee et al., Findings of ACL 2023): when a small teacher teaches a larger student,
does KD help, and how should the soft weight be scheduled? A single end point cannot answer it: the typical pattern
is that KD helps early and the student then outgrows its teacher. So: data, models and optimiser of
``examples/lm_methods.py`` (Python's standard-library sources; ``small`` = GPT-2 2 x 32 teaches ``medium`` = 2 x 64,
4x its parameters besides the embeddings); the teacher is trained once per seed and snapshotted at 300, 1200 and
3000 steps (three teacher qualities); the student trains 400 steps with hard CE plus a soft weight alpha_s x KL
(T = 1) for alpha_s in {0 (no KD), 1, 4, 4 -> 1, 4 -> 0} (the schedules linear over the run), with held-out
perplexity every 100 steps (4 points per curve). Paired differences against no KD (same seed: same initialisation
and data order), 95% t intervals, and how many of them the table holds.

Budget: 39 student runs x 400 steps + 3 teachers x 3000 steps, ~24 minutes of one core, split over the processes one
(seed, teacher, weight) at a time. The student is ``medium``, not the 4 x 128 ``large``: 39 runs of the large model
would cost ~40 minutes of one core, twice the ~15 minutes on 2 cores asked for.
"""

from __future__ import annotations

import argparse
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
    teacher: str = "small"
    student: str = "medium"
    teacher_steps: tuple[int, ...] = (300, 1200, 3000)
    student_steps: int = 400
    eval_every: int = 100
    batch_size: int = 16
    seeds: tuple[int, ...] = (0, 1, 2)
    max_chars: int | None = None

    @classmethod
    def small(cls) -> Settings:
        return cls(vocab=300, seq_len=32, teacher_steps=(2, 4), student_steps=4, eval_every=2, batch_size=8,
                   seeds=(0,), max_chars=6000)  # fmt: skip

    def teacher_tasks(self) -> list[tuple[int, str]]:
        """Work that needs no trained teacher: (seed, "teacher") trains and snapshots it, (seed, "no KD") the
        student without KD. The teachers first: they are the longest."""
        return [(seed, job) for job in ("teacher", "no KD") for seed in self.seeds]

    def student_tasks(self) -> list[tuple[int, int, str]]:
        """(seed, teacher steps, soft weight name): one KD student each."""
        kd = [name for name, w in WEIGHTS.items() if w is not None]
        return [(seed, t, name) for seed in self.seeds for t in self.teacher_steps for name in kd]


def _lm():
    return load_script(Path(__file__).with_name("lm_methods.py"), "lm_methods_example")


def _loss(weight) -> WeakTeacherKDLoss:
    if isinstance(weight, tuple):
        weight = SoftWeightSchedule(start=weight[0], end=weight[1], shape="linear")
    return WeakTeacherKDLoss(hard_weight=1.0, soft_weight=weight, temperature=1.0)


class _Run:
    """One seed's data and models: the teacher and the student each from their own fixed initialisation."""

    def __init__(self, s: Settings, seed: int):
        self.s, self.seed = s, seed
        self.lm = _lm()
        self.cl = self.lm._causal_lm()
        ls = self.lm.Settings(vocab=s.vocab, seq_len=s.seq_len, steps=s.student_steps, batch_size=s.batch_size,
                              max_chars=s.max_chars)  # fmt: skip
        self.train, self.held, self.vocab = self.lm._data(ls)

    def model(self, size: str, init_seed: int):
        return self.lm.gpt2(size, self.vocab, self.s.seq_len, 1000 * self.seed + init_seed)

    def teachers(self) -> tuple[dict[int, dict], dict[int, float]]:
        """One teacher run, snapshotted at each quality ({steps: state dict}) with its held-out perplexity: max_steps
        grows, fit() continues the same run."""
        teacher, states, ppl = self.model(self.s.teacher, 2), {}, {}
        loop = self.lm._loop(teacher, seed=self.seed, batch_size=self.s.batch_size)
        for steps in self.s.teacher_steps:
            loop.fit(self.train, max_steps=steps)
            states[steps] = {k: v.detach().clone() for k, v in teacher.state_dict().items()}
            ppl[steps] = self.cl.perplexity(teacher.eval(), self.held)
            teacher.train()
        return states, ppl

    def student_curve(self, teacher_state: dict | None, weight) -> tuple[list[float], list[int]]:
        """Held-out perplexity of the student every ``eval_every`` steps, and those steps."""
        student, points, steps = self.model(self.s.student, 1), [], []
        teachers, kw = [], {}
        if weight is not None:
            teacher = self.model(self.s.teacher, 2)
            teacher.load_state_dict(teacher_state)
            teachers, kw = [teacher.eval()], {"loss": _loss(weight)}

        def eval_fn(lp) -> dict[str, float]:
            points.append(self.cl.perplexity(student, self.held))
            steps.append(lp.step)
            return {"ppl": points[-1]}

        self.lm._loop(student, teachers, seed=self.seed, batch_size=self.s.batch_size, **kw).fit(
            self.train, max_steps=self.s.student_steps, eval_fn=eval_fn, eval_every=self.s.eval_every)  # fmt: skip
        return points, steps


def teacher_task(index: int, s: Settings) -> dict:
    seed, job = s.teacher_tasks()[index]
    r = _Run(s, seed)
    if job == "teacher":
        states, ppl = r.teachers()
        return {"states": states, "teacher_ppl": ppl}
    curve, steps = r.student_curve(None, None)
    return {"curve": curve, "steps": steps}


def student_task(index: int, s: Settings, states: dict) -> list[float]:
    seed, t_steps, name = s.student_tasks()[index]
    return _Run(s, seed).student_curve(states[seed][t_steps], WEIGHTS[name])[0]


def run_all(s: Settings, jobs: int = 1) -> list[dict]:
    """Per seed: {"seed", "teacher_ppl": {steps: ppl}, "curves": {"no KD" | f"{steps}: {weight}": [ppl at each
    eval]}, "steps": [...]}. Two rounds of work over the processes: the teachers (and the students without KD),
    then every KD student, one (seed, teacher, weight) at a time."""
    first = map_seeds(functools.partial(teacher_task, s=s), list(range(len(s.teacher_tasks()))), jobs)
    runs: dict[int, dict] = {seed: {"seed": seed, "curves": {}} for seed in s.seeds}
    states: dict[int, dict] = {}
    for (seed, job), out in zip(s.teacher_tasks(), first):
        if job == "teacher":
            states[seed], runs[seed]["teacher_ppl"] = out["states"], out["teacher_ppl"]
        else:
            runs[seed]["curves"]["no KD"], runs[seed]["steps"] = out["curve"], out["steps"]
    curves = map_seeds(functools.partial(student_task, s=s, states=states), list(range(len(s.student_tasks()))),
                       jobs)  # fmt: skip
    for (seed, t_steps, name), curve in zip(s.student_tasks(), curves):
        runs[seed]["curves"][f"{t_steps}: {name}"] = curve
    return [runs[seed] for seed in s.seeds]


def _arch(size: str) -> str:
    layers, width, _ = _lm().SIZES[size]
    return f"{size} ({layers}x{width})"


def _ms(xs: list[float]) -> str:
    return f"{statistics.fmean(xs):.1f}" + (f" ± {statistics.stdev(xs):.1f}" if len(xs) > 1 else "")


def report(runs: list[dict], s: Settings, log=print) -> None:
    steps = runs[0]["steps"]
    n = len(runs)
    log(f"held-out perplexity of the {_arch(s.student)} student at steps {steps} (mean ± std over {n} seeds); the "
        f"{_arch(s.teacher)} teacher after {' / '.join(map(str, s.teacher_steps))} steps")  # fmt: skip
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
            f"so about {0.05 * total:.1f} may exclude 0 by chance; * : the Bonferroni-corrected interval (level "
            f"1 - 0.05/{total}) excludes 0 too")  # fmt: skip
        log("| teacher steps, soft weight | " + " | ".join(f"step {x}" for x in steps) + " |")
        log("|---|" + "---:|" * len(steps))
        for t_steps in s.teacher_steps:
            for name in kd:
                cells = []
                for i in range(len(steps)):
                    pair = ([r["curves"][f"{t_steps}: {name}"][i] for r in runs],
                            [r["curves"]["no KD"][i] for r in runs])  # fmt: skip
                    m, lo, hi = paired_ci(*pair)
                    _, blo, bhi = paired_ci(*pair, level=1 - 0.05 / total)
                    cells.append(f"{m:+.1f} [{lo:+.1f}, {hi:+.1f}]" + (" *" if blo > 0 or bhi < 0 else ""))
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
    runs = run_all(settings, jobs)
    report(runs, settings, log)
    seconds = time.perf_counter() - t0
    if out is not None:
        out.with_suffix(".json").write_text(json.dumps({"settings": asdict(settings), "runs": runs,
                                                        "seconds": seconds}, indent=1) + "\n")  # fmt: skip
        plot(runs, settings, out.with_suffix(".png"))
        log(f"per-seed curves: {out.with_suffix('.json')}; plot: {out.with_suffix('.png')}")
    log(f"wall time {seconds:.1f} s")
    return runs


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--small", action="store_true", help="seconds: tiny sizes (the tests' run)")
    p.add_argument("--jobs", type=int, default=1, help="processes (default 1)")
    p.add_argument("--out", type=Path, default=None, help="JSON + PNG path stem (default docs/weak_teacher; none "
                   "with --small)")  # fmt: skip
    args = p.parse_args(argv)
    out = args.out or (None if args.small else Path(__file__).resolve().parents[1] / "docs" / "weak_teacher")
    with single_thread():
        run(Settings.small() if args.small else Settings(), out=out, jobs=args.jobs)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
