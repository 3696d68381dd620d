"""Co-training with co-distillation (CTCD) on a close pair, the small -> large weight swept (issue 22).

    python examples/cotraining_experiment.py --jobs 2   # 3 seeds, ~17 min on 2 CPU cores; docs/cotraining.*
    python examples/cotraining_experiment.py --small    # seconds (what the tests run)

The claim (Lee et al., Findings of EMNLP 2023): training a large and a small model together, each distilling into the
other, helps both; the small -> large term helps the large model, which then teaches the small one better. It can
only show where the small model has something to teach, so the pair is close: GPT-2 ``large`` (4 x 128) and
``medium`` (2 x 64), both from scratch without dropout, ``steps`` steps of 8 sequences each (data, models and
optimiser of ``examples/lm_methods.py``: Python's standard-library sources, AdamW at each size's learning rate). Per
seed (one initialisation of each model and one data order for every condition):

- ``co-training, w``: both together through the loop's co-training mode, one fused
  :func:`fastdistill.codistill_loss` per step: large -> medium weight 1, medium -> large weight w in
  {0, 0.1, 0.3, 1}. At w = 0 the medium model gets online one-way KD and the large one trains on its own CE alone:
  that large model is the ``independent`` one (without dropout nothing random ties it to its partner);
- ``independent``: the medium model on its own CE;
- ``one-way KD``: medium with CE + KL to the independent large model after its training (a second stage, soft
  weight 1).

T = 1. Reported: held-out perplexity curves (``eval_points`` points), and at the end the paired differences (same
seed) of each co-trained model from its independent twin and of the co-trained medium from one-way KD, with 95% t
intervals and how many intervals the report holds (``*``: also at the Bonferroni level). Work is split by (seed,
condition) over the processes. Saves ``cotraining.json`` and ``cotraining.png``.

Budget: ~32 minutes of one core, ~17 on 2 (measured: 1003 s). Most of it is the design the issue sets: 3 seeds x 4
weights x 1500 co-training steps of the 4 x 128 and 2 x 64 models at ~82 ms a step (batch 8, ``fast_cpu`` models,
fused AdamW, no dropout). The independent large model is the w = 0 run's, not trained a fifth time.
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import fastdistill
from fastdistill.apps import load_script, map_seeds, paired_ci, single_thread
from fastdistill.methods import WeakTeacherKDLoss


@dataclass
class Settings:
    vocab: int = 1024
    seq_len: int = 64
    batch_size: int = 8  # half of lm_methods.py's 16: 1500 steps of the large model stay within the time budget
    steps: int = 1500
    # 1500 steps of 8 see each of the 11629 training sequences about once: nothing to overfit, and dropout's masks
    # cost 13 % of a step on the CPU
    dropout: float = 0.0
    eval_points: int = 5
    weights: tuple[float, ...] = (0.0, 0.1, 0.3, 1.0)  # medium -> large
    seeds: tuple[int, ...] = (0, 1, 2)
    max_chars: int | None = None

    @classmethod
    def small(cls) -> Settings:
        return cls(vocab=300, seq_len=32, batch_size=8, steps=4, eval_points=2, weights=(0.0, 1.0), seeds=(0, 1),
                   max_chars=6000)  # fmt: skip

    def tasks(self) -> list[tuple[int, str]]:
        """(seed, condition) units of work, the longest first. "co 0" also trains one-way KD: its large model, on its
        own CE alone, is the independent large model that one-way KD learns from."""
        assert self.weights[0] == 0, "the w = 0 run provides the independent large model"
        return [(seed, f"co {w:g}") for w in self.weights for seed in self.seeds] + [
            (seed, "medium independent") for seed in self.seeds]

def _lm():
    return load_script(Path(__file__).with_name("lm_methods.py"), "lm_methods_example")


def run_task(index: int, s: Settings) -> dict:
    """One (seed, condition): {"seed", "condition", "curves": {model label: [ppl]}, "steps": [...]}."""
    seed, cond = s.tasks()[index]
    lm = _lm()
    cl = lm._causal_lm()
    train, held, vocab = lm._data(lm.Settings(vocab=s.vocab, seq_len=s.seq_len, batch_size=s.batch_size,
                                              max_chars=s.max_chars))  # fmt: skip
    every = max(1, s.steps // s.eval_points)

    def model(size: str):
        return lm.gpt2(size, vocab, s.seq_len, 1000 * seed + {"large": 1, "medium": 3}[size], dropout=s.dropout,
                       fast_cpu=True)  # fmt: skip

    curves: dict[str, list[float]] = {}
    steps: list[int] = []

    def fit(labels: dict[str, object], student, teachers=(), **kw) -> None:
        for label, m in labels.items():
            curves[label] = [cl.perplexity(m, held)]

        def eval_fn(lp) -> dict[str, float]:
            for label, m in labels.items():
                curves[label].append(cl.perplexity(m, held))
            if lp.step not in steps:
                steps.append(lp.step)
            return {}

        lm._loop(student, list(teachers), seed=seed, batch_size=s.batch_size, fused=True, **kw).fit(
            train, max_steps=s.steps, eval_fn=eval_fn, eval_every=every)  # fmt: skip

    if cond == "medium independent":
        medium = model("medium")
        fit({"medium: independent": medium}, medium)
    else:
        w = float(cond.split()[1])
        large, medium = model("large"), model("medium")
        co = fastdistill.CodistillLoss(temperature=1.0, weight_ab=1.0, weight_ba=w)  # a = large, b = medium
        fit({"large: independent" if w == 0 else f"large: co-training, w={w:g}": large,
             f"medium: co-training, w={w:g}": medium}, large, [medium], loss=co, train_teachers=True)  # fmt: skip
        if w == 0:
            kd = WeakTeacherKDLoss(hard_weight=1.0, soft_weight=1.0, temperature=1.0)
            one_way = model("medium")
            fit({"medium: one-way KD": one_way}, one_way, [large.eval()], loss=kd)
    return {"seed": seed, "condition": cond, "curves": curves, "steps": [0, *steps]}


def collect(parts: list[dict]) -> dict[str, dict[int, list[float]]]:
    """{model label: {seed: curve}}."""
    out: dict[str, dict[int, list[float]]] = {}
    for p in parts:
        for label, curve in p["curves"].items():
            out.setdefault(label, {})[p["seed"]] = curve
    return out


def _ms(xs: list[float]) -> str:
    return f"{statistics.fmean(xs):.1f}" + (f" ± {statistics.stdev(xs):.1f}" if len(xs) > 1 else "")


def report(curves: dict, steps: list[int], s: Settings, log=print) -> dict:
    seeds = list(s.seeds)
    log(f"held-out perplexity (mean ± std over {len(seeds)} seeds) at steps {steps}; large 4x128, medium 2x64, "
        f"{s.steps} steps each")  # fmt: skip
    log("| model | " + " | ".join(f"step {p}" for p in steps) + " |")
    log("|---|" + "---:|" * len(steps))
    for label, by_seed in curves.items():
        log(f"| {label} | " + " | ".join(_ms([by_seed[k][i] for k in seeds]) for i in range(len(steps))) + " |")
    comps = [(f"large: co-training, w={w:g}", "large: independent") for w in s.weights if w]
    comps += [(f"medium: co-training, w={w:g}", base) for base in ("medium: independent", "medium: one-way KD")
              for w in s.weights]  # fmt: skip
    out: dict[str, dict] = {}
    if len(seeds) < 2:
        return out
    level = 1 - 0.05 / len(comps)
    log(f"\nat step {steps[-1]}: paired difference in perplexity (negative = the first is better), mean [95% CI] "
        f"over {len(seeds)} seeds; {len(comps)} intervals, * = also at the Bonferroni level")  # fmt: skip
    for new, base in comps:
        a, b = [curves[new][k][-1] for k in seeds], [curves[base][k][-1] for k in seeds]
        ci, bci = paired_ci(a, b), paired_ci(a, b, level)
        star = "*" if bci[1] > 0 or bci[2] < 0 else ""
        out[f"{new} − {base}"] = {"mean": ci[0], "ci95": ci[1:], "ci_bonferroni": bci[1:]}
        log(f"  {new} − {base}: {ci[0]:+.2f} [{ci[1]:+.2f}, {ci[2]:+.2f}] {star}")
    return out


def plot(curves: dict, steps: list[int], s: Settings, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, size in zip(axes, ("large", "medium")):
        for label, by_seed in curves.items():
            if label.startswith(size):
                ys = [statistics.fmean(c[i] for c in by_seed.values()) for i in range(len(steps))]
                ax.plot(steps[1:], ys[1:], marker="o", ms=3, label=label.split(": ")[1],
                        ls="--" if "co-training" not in label else "-")  # fmt: skip
        ax.set(yscale="log", title=f"{size} ({'4x128' if size == 'large' else '2x64'})", xlabel="step",
               ylabel="held-out perplexity (mean over seeds)")  # fmt: skip
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def run(s: Settings, out: Path | None = None, jobs: int = 1, log=print) -> dict:
    t0 = time.perf_counter()
    parts = map_seeds(functools.partial(run_task, s=s), list(range(len(s.tasks()))), jobs)
    curves, steps = collect(parts), parts[0]["steps"]
    result = {"settings": asdict(s), "steps": steps, "curves": curves}
    result["summary"] = report(curves, steps, s, log)
    result["seconds"] = time.perf_counter() - t0
    log(f"wall time {result['seconds']:.0f} s")
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
        plot(curves, steps, s, out.with_suffix(".png"))
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--small", action="store_true", help="seconds: tiny sizes (the tests' run)")
    p.add_argument("--jobs", type=int, default=1, help="processes (default 1)")
    p.add_argument("--out", type=Path, default=None, help="JSON + PNG path stem (default docs/cotraining; none with "
                   "--small)")  # fmt: skip
    args = p.parse_args(argv)
    out = args.out or (None if args.small else Path(__file__).resolve().parents[1] / "docs" / "cotraining")
    with single_thread():
        run(Settings.small() if args.small else Settings(), out=out, jobs=args.jobs)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
