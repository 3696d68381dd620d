"""GUIDE against fair baselines, from a teacher trained to a plateau (issue 22).

    python examples/guide_experiment.py --jobs 2   # 1 teacher + 3 seeds x 8 students: ~16 min on 2 CPU cores
    python examples/guide_experiment.py --small    # seconds (what the tests run)

GUIDE (Trinh, Menghani, Vee, 2025) initialises a small student from a trained teacher (the embedding table projected
on its top principal directions, the first block mapped through the same projection). Its gain is only meaningful
against students given the same total training: here a random student trained for the budget **plus** the
teacher's steps, a naive leading-slice copy (parameter remapping), and GUIDE's own parts. Data, models and optimiser
are ``examples/lm_methods.py``'s (Python's standard-library sources, GPT-2 ``large`` 4 x 128 as the teacher,
``small`` 2 x 32 as the student). The teacher trains once (seed 0) for ``teacher_steps``, with its held-out
perplexity every ``teacher_eval_every`` steps to show the plateau. Per seed, from one random initialisation of the
student (the same data order for all), students train ``budget`` steps:

- ``random``; ``random, budget + teacher steps`` (the compute the teacher consumed, given to the student instead);
- ``leading-slice copy`` (:func:`~fastdistill.methods.init_student_from_teacher` ``method="remap"``);
- ``GUIDE embeddings`` (``blocks="none"``) and ``GUIDE embeddings + first block`` (``blocks="first"``, the paper's);

each with hard CE only and with CE + KL to the teacher (T = 1, soft weight 1). Reported: held-out perplexity at four
points of the budget (and at the end of the long run), the gap reduction (random − student) / (random − teacher) at
the budget, and what KD adds on top of each initialisation, as paired differences with 95% t intervals and how many
intervals the table holds (``*``: also at the Bonferroni level). Saves ``guide.json`` and ``guide.png``.

Budget: ~28 minutes of one core, ~16 on 2 (measured: 967 s). The teacher's 2400 steps (~6 minutes, one process) run
alongside the students that need no teacher; the rest is dominated by the fair baseline, 3000 student steps under
the teacher's forward pass per seed. Hence 3 seeds, not 5, and ``fast_cpu`` models with fused AdamW (the same
functions, 7 % less time).
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from fastdistill.apps import load_script, map_seeds, paired_ci, single_thread
from fastdistill.methods import WeakTeacherKDLoss, init_student_from_teacher

INITS = {  # name: (init_student_from_teacher method, blocks) | None for random
    "random": None,
    "random, budget + teacher steps": None,
    "leading-slice copy": ("remap", "first"),
    "GUIDE embeddings": ("guide", "none"),
    "GUIDE embeddings + first block": ("guide", "first"),
}
KD = ("no KD", "KD")


@dataclass
class Settings:
    vocab: int = 1024
    seq_len: int = 64
    batch_size: int = 16
    teacher_steps: int = 2400
    teacher_eval_every: int = 300
    budget: int = 600  # student steps
    eval_points: int = 4
    seeds: tuple[int, ...] = (0, 1, 2)
    max_chars: int | None = None

    @classmethod
    def small(cls) -> Settings:
        return cls(vocab=300, seq_len=32, batch_size=8, teacher_steps=4, teacher_eval_every=2, budget=4,
                   eval_points=2, seeds=(0, 1), max_chars=6000)  # fmt: skip


def _lm():
    return load_script(Path(__file__).with_name("lm_methods.py"), "lm_methods_example")


def _data(s: Settings):
    lm = _lm()
    return lm._data(lm.Settings(vocab=s.vocab, seq_len=s.seq_len, batch_size=s.batch_size, max_chars=s.max_chars))


def train_teacher(s: Settings) -> tuple[dict, dict[int, float]]:
    """The teacher's state dict after ``teacher_steps`` and its held-out perplexity curve {step: ppl}."""
    lm = _lm()
    cl = lm._causal_lm()
    train, held, vocab = _data(s)
    teacher = lm.gpt2("large", vocab, s.seq_len, 1, fast_cpu=True)
    curve: dict[int, float] = {}

    def eval_fn(lp) -> dict[str, float]:
        curve[lp.step] = cl.perplexity(teacher, held)
        return {"ppl": curve[lp.step]}

    lm._loop(teacher, seed=0, batch_size=s.batch_size, fused=True).fit(
        train, max_steps=s.teacher_steps, eval_fn=eval_fn, eval_every=s.teacher_eval_every)  # fmt: skip
    return {k: v.detach().clone() for k, v in teacher.state_dict().items()}, curve


def student_curve(seed: int, s: Settings, name: str, kd: str, teacher_state: dict | None) -> tuple[list, list]:
    """One student (initialisation ``name``, ``kd`` in KD): held-out perplexity at step 0 and every budget / eval_points
    steps, and those steps. The teacher is needed for every student but the random one without KD."""
    lm = _lm()
    cl = lm._causal_lm()
    train, held, vocab = _data(s)
    teacher = None
    if teacher_state is not None:
        teacher = lm.gpt2("large", vocab, s.seq_len, 1, fast_cpu=True)
        teacher.load_state_dict(teacher_state)
        teacher.eval()
    how = INITS[name]
    student = lm.gpt2("small", vocab, s.seq_len, 1000 * seed + 2, fast_cpu=True)
    if how is not None:
        init_student_from_teacher(student, teacher, how[0], blocks=how[1])
    total = s.budget + (s.teacher_steps if name.startswith("random, budget") else 0)
    curve, steps = [cl.perplexity(student, held)], [0]

    def eval_fn(lp) -> dict[str, float]:
        curve.append(cl.perplexity(student, held))
        steps.append(lp.step)
        return {"ppl": curve[-1]}

    kw = {"loss": WeakTeacherKDLoss(hard_weight=1.0, soft_weight=1.0, temperature=1.0)} if kd == "KD" else {}
    lm._loop(student, [teacher] if kd == "KD" else [], seed=seed, batch_size=s.batch_size, fused=True, **kw).fit(
        train, max_steps=total, eval_fn=eval_fn, eval_every=max(1, s.budget // s.eval_points))  # fmt: skip
    return curve, steps


# the random students are the first `budget` steps of the long random run (constant lr: the same steps), not trained
# again; the long random run without KD is the one student that needs no teacher
_LONG = "random, budget + teacher steps"
_TRAINED = [(n, k) for n in INITS if n != "random" for k in KD]


def tasks(s: Settings) -> tuple[list, list]:
    """Two rounds of work over the processes: the teacher alongside the teacher-free students, then every other
    (seed, initialisation, KD), the long runs first."""
    first = [("teacher",)] + [(seed, _LONG, "no KD") for seed in s.seeds]
    second = [(seed, n, k) for n, k in _TRAINED if (n, k) != (_LONG, "no KD") for seed in s.seeds]
    return first, second


def _task(index: int, s: Settings, round_: int, teacher_state: dict | None = None):
    job = tasks(s)[round_][index]
    if job == ("teacher",):
        return train_teacher(s)
    return student_curve(*job[:1], s, *job[1:], teacher_state)


def run_all(s: Settings, jobs: int = 1) -> tuple[dict[int, float], list[dict]]:
    """The teacher's curve and per seed {"seed", "curves": {f"{init} | {kd}": [ppl at each eval]}, "steps": {...}}."""
    first, second = tasks(s)
    out1 = map_seeds(functools.partial(_task, s=s, round_=0), list(range(len(first))), jobs)
    (state, t_curve), done = out1[0], dict(zip(first[1:], out1[1:]))
    out2 = map_seeds(functools.partial(_task, s=s, round_=1, teacher_state=state), list(range(len(second))), jobs)
    done.update(zip(second, out2))
    runs = []
    for seed in s.seeds:
        r: dict = {"seed": seed, "curves": {}, "steps": {}}
        for n, k in _TRAINED:
            r["curves"][f"{n} | {k}"], r["steps"][f"{n} | {k}"] = done[(seed, n, k)]
        for k in KD:
            long = r["steps"][f"{_LONG} | {k}"]
            cut = long.index(s.budget) + 1
            r["curves"][f"random | {k}"] = r["curves"][f"{_LONG} | {k}"][:cut]
            r["steps"][f"random | {k}"] = long[:cut]
        runs.append(r)
    return t_curve, runs


def _ms(xs: list[float]) -> str:
    return f"{statistics.fmean(xs):.1f}" + (f" ± {statistics.stdev(xs):.1f}" if len(xs) > 1 else "")


def at_budget(run: dict, key: str, budget: int) -> float:
    return run["curves"][key][run["steps"][key].index(budget)]


def report(result: dict, s: Settings, log=print) -> dict:
    runs, t_curve = result["runs"], result["teacher_curve"]
    t_ppl = t_curve[max(t_curve)]
    log("teacher (large 4x128, seed 0): held-out perplexity by step " + ", ".join(f"{k}: {v:.1f}" for k, v in
        t_curve.items()))  # fmt: skip
    pts = runs[0]["steps"]["random | no KD"]
    log(f"\nstudent (small 2x32), held-out perplexity (mean ± std over {len(runs)} seeds) at steps {pts}; the long "
        f"random run also at step {s.budget + s.teacher_steps}")  # fmt: skip
    log("| init | KD | " + " | ".join(f"step {p}" for p in pts) + " | end of long run |")
    log("|---|---|" + "---:|" * (len(pts) + 1))
    for name in INITS:
        for kd in KD:
            key = f"{name} | {kd}"
            cells = [_ms([at_budget(r, key, p) for r in runs]) for p in pts]
            end = _ms([r["curves"][key][-1] for r in runs]) if name.startswith("random, budget") else ""
            log(f"| {name} | {kd} | " + " | ".join(cells) + f" | {end} |")
    # intervals: gap reduction of every condition but the reference, and KD - no KD per init
    base = "random | no KD"
    gaps = [f"{n} | {k}" for n in INITS for k in KD if f"{n} | {k}" != base]
    total = len(gaps) + len(INITS)
    level = 1 - 0.05 / total
    out: dict[str, dict] = {"gap_reduction": {}, "kd_minus_no_kd": {}}
    if len(runs) < 2:
        return out
    log(f"\ngap reduction at step {s.budget}: (random − student) / (random − teacher), teacher perplexity "
        f"{t_ppl:.1f}; long run at its end. Mean [95% CI] over {len(runs)} paired seeds; {total} intervals in this "
        f"report, * = also at the Bonferroni level")  # fmt: skip
    for key in gaps:
        end = key.startswith("random, budget")
        r0 = [at_budget(r, base, s.budget) for r in runs]
        rx = [r["curves"][key][-1] if end else at_budget(r, key, s.budget) for r in runs]
        fr = [(a - b) / (a - t_ppl) for a, b in zip(r0, rx)]
        ci, bci = paired_ci(fr, [0.0] * len(fr)), paired_ci(fr, [0.0] * len(fr), level)
        star = "*" if bci[1] > 0 or bci[2] < 0 else ""
        out["gap_reduction"][key] = {"mean": ci[0], "ci95": ci[1:], "ci_bonferroni": bci[1:], "per_seed": fr}
        log(f"  {key:45s} {ci[0]:+.3f} [{ci[1]:+.3f}, {ci[2]:+.3f}] {star}")
    log(f"\nKD − no KD, perplexity at step {s.budget} (the long run: at its end), negative = KD helps")
    for name in INITS:
        end = name.startswith("random, budget")
        a = [r["curves"][f"{name} | KD"][-1] if end else at_budget(r, f"{name} | KD", s.budget) for r in runs]
        b = [r["curves"][f"{name} | no KD"][-1] if end else at_budget(r, f"{name} | no KD", s.budget) for r in runs]
        ci, bci = paired_ci(a, b), paired_ci(a, b, level)
        star = "*" if bci[1] > 0 or bci[2] < 0 else ""
        out["kd_minus_no_kd"][name] = {"mean": ci[0], "ci95": ci[1:], "ci_bonferroni": bci[1:]}
        log(f"  {name:45s} {ci[0]:+.2f} [{ci[1]:+.2f}, {ci[2]:+.2f}] {star}")
    out["intervals"] = total
    return out


def plot(result: dict, s: Settings, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = result["runs"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for ax, kd in zip(axes, KD):
        for name in INITS:
            key = f"{name} | {kd}"
            n = min(len(r["curves"][key]) for r in runs)
            xs = runs[0]["steps"][key][:n]
            ys = [statistics.fmean(r["curves"][key][i] for r in runs) for i in range(n)]
            ax.plot(xs[1:], ys[1:], marker="o", ms=3, label=name)
        t_ppl = result["teacher_curve"][max(result["teacher_curve"])]
        ax.axhline(t_ppl, color="k", lw=0.8, ls=":", label=f"teacher ({t_ppl:.0f})")
        ax.axvline(s.budget, color="grey", lw=0.6)
        ax.set(xscale="log", yscale="log", title=f"student 2x32, {kd}", xlabel="student step")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("held-out perplexity (mean over seeds)")
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def run(s: Settings, out: Path | None = None, jobs: int = 1, log=print) -> dict:
    t0 = time.perf_counter()
    with single_thread():
        t_curve, runs = run_all(s, jobs)
    result = {"settings": asdict(s), "teacher_curve": t_curve, "runs": runs}
    result["summary"] = report(result, s, log)
    result["seconds"] = time.perf_counter() - t0
    log(f"wall time {result['seconds']:.0f} s")
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
        plot(result, s, out.with_suffix(".png"))
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--small", action="store_true", help="seconds: tiny sizes (the tests' run)")
    p.add_argument("--jobs", type=int, default=1, help="processes (default 1)")
    p.add_argument("--out", type=Path, default=None, help="JSON + PNG path stem (default docs/guide; none with "
                   "--small)")  # fmt: skip
    args = p.parse_args(argv)
    out = args.out or (None if args.small else Path(__file__).resolve().parents[1] / "docs" / "guide")
    run(Settings.small() if args.small else Settings(), out=out, jobs=args.jobs)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
