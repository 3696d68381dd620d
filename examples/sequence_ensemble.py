"""Ensemble-then-distill at the sequence level: does one consensus continuation per prompt (minimum Bayes risk over K
teachers) teach a student better than the union of the teachers' continuations, token-level ensembling, or no KD?

    python examples/sequence_ensemble.py --jobs 2   # 10 min on 2 cores (5 seeds); docs/sequence_ensemble.json
    python examples/sequence_ensemble.py --small    # seconds (what the tests run)

The claim under test: a student trained on the *union* of K teachers' outputs averages over their modes (it hedges),
while one ensembled output per input, built at the sequence level, avoids that; so the consensus student should
*generate* better, which perplexity alone does not show. Data and tokenizer as in ``examples/causal_lm.py``
(Python's standard-library sources, a byte-level BPE trained locally; held out: calendar, colorsys, contextlib,
graphlib). Per seed:

- K = 3 GPT-2 teachers (2 layers, width 96), each trained on its own third of the training modules, so that they
  disagree (each knows other code);
- M prompts: the first ``prompt_len`` tokens of training sequences (all modules); each teacher continues each prompt
  greedily for ``cont_len`` tokens;
- students (GPT-2, 2 layers, width 48), same initialisation, steps, batch size and learning rate:

  (a) **union**: cross-entropy on all K x M teacher continuations (the prompt's tokens are not targets);
  (b) **MBR consensus**: per prompt the continuation with the highest mean token-F1 to the other teachers'
      (:func:`fastdistill.mbr_select`), M sequences;
  (e) **token-ensemble decoding**: one continuation per prompt decoded greedily from the teachers' ``prob_mean``
      (the token-level mixture, whose argmax can be a path none of the teachers would take), M sequences;
  (c) **token-level KD**: :class:`fastdistill.KDLoss` to the teachers' ``prob_mean`` at every position of the real
      training text, plus cross-entropy (``ce_weight`` 0.5);
  (d) **no KD**: cross-entropy on the real training text.

Measured on held-out sequences, every ``eval_every`` steps (curves): the student's greedy continuation of the first
``prompt_len`` tokens against the true next ``cont_len`` tokens (token-F1, and whether the first generated line is
exactly the true next line), the mean entropy of its next-token distribution on held-out text (hedging), and
perplexity. Also the quality of each training set itself: the token-F1 of its continuations against the true
training text after the prompt. Paired differences over seeds (same seed: same teachers, prompts, initialisation
and order) with 95% t intervals. Results and what they support: ``docs/sequence_ensemble.md``.
"""

from __future__ import annotations

import argparse
import functools
import inspect
import json
import math
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import Tensor

import fastdistill
from fastdistill.apps import load_script, map_seeds, paired_ci, single_thread
from fastdistill.training import ArrayDataset, DistillationLoop

# causal_lm.py's training modules and more, split round-robin into one group per teacher
EXTRA_TRAIN_MODULES = ["typing", "inspect", "pathlib", "tarfile", "zipfile", "pprint", "ast", "tokenize",
                       "configparser", "statistics", "fractions", "datetime", "shutil", "tempfile", "traceback",
                       "threading", "subprocess", "ipaddress"]  # fmt: skip
ARMS = {
    "union": "(a) union of the K teachers' continuations",
    "mbr": "(b) MBR consensus, one per prompt",
    "token_decode": "(e) greedy decoding of the token-level prob_mean",
    "token_kd": "(c) token-level prob_mean KD on the text (+ CE)",
    "no_kd": "(d) no KD (CE on the text)",
}
METRICS = {"f1": "continuation token-F1", "exact_line": "exact next line", "entropy": "entropy (nats)",
           "ppl": "perplexity"}  # fmt: skip
# paired contrasts, each on every metric: the claim is mbr vs union; the others place it
CONTRASTS = [("mbr", "union"), ("mbr", "token_decode"), ("mbr", "token_kd"), ("mbr", "no_kd")]


@dataclass
class Settings:
    vocab: int = 1024
    seq_len: int = 64
    prompt_len: int = 8
    cont_len: int = 24
    k: int = 3
    teacher_size: tuple[int, int, int] = (2, 96, 4)  # layers, width, heads
    student_size: tuple[int, int, int] = (2, 48, 4)
    teacher_steps: int = 400
    student_steps: int = 400
    eval_every: int = 100
    batch_size: int = 16
    lr: float = 3e-3
    prompts: int = 4096
    held_prompts: int = 200
    seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
    max_chars: int | None = None  # per module; None: whole files

    @classmethod
    def small(cls) -> Settings:
        return cls(vocab=300, seq_len=32, prompt_len=4, cont_len=8, teacher_size=(1, 32, 2), student_size=(1, 16, 2),
                   teacher_steps=6, student_steps=4, eval_every=2, batch_size=8, prompts=24, held_prompts=12,
                   seeds=(0,), max_chars=6000)  # fmt: skip


def _causal_lm():
    return load_script(Path(__file__).with_name("causal_lm.py"), "causal_lm_example")


def gpt2(size: tuple[int, int, int], vocab: int, seq_len: int, seed: int):
    from transformers import GPT2Config, GPT2LMHeadModel

    layers, width, heads = size
    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(vocab_size=vocab, n_positions=seq_len, n_layer=layers, n_embd=width,
                                      n_head=heads, bos_token_id=1, eos_token_id=1, pad_token_id=0))  # fmt: skip


@dataclass
class Data:
    tok: object
    vocab: int
    pad: int
    eos: int
    train: ArrayDataset  # all training modules: the real text of (c), (d)
    groups: list[ArrayDataset]  # one per teacher
    held: ArrayDataset
    held_prompts: Tensor  # [H, P]
    held_truth: list[list[int]]  # the true next cont_len tokens of each held-out prompt


def load_data(s: Settings) -> Data:
    cl = _causal_lm()
    modules = cl.TRAIN_MODULES + EXTRA_TRAIN_MODULES
    texts = cl.stdlib_text(modules, s.max_chars)
    tok = cl.train_tokenizer(texts, s.vocab)
    groups = [cl.to_sequences(tok, texts[k :: s.k], s.seq_len) for k in range(s.k)]
    held = cl.to_sequences(tok, cl.stdlib_text(cl.HELD_OUT_MODULES, s.max_chars), s.seq_len)
    need = s.prompt_len + s.cont_len
    long = held.tensors["attention_mask"].sum(1) >= need
    ids = held.tensors["input_ids"][long][: s.held_prompts]
    return Data(tok, tok.get_vocab_size(), tok.token_to_id(cl.PAD), tok.token_to_id(cl.EOS),
                cl.to_sequences(tok, texts, s.seq_len), groups, held, ids[:, : s.prompt_len],
                [r.tolist() for r in ids[:, s.prompt_len : need]])  # fmt: skip


def _loop(model, teachers=(), seed=0, s: Settings | None = None, **kw) -> DistillationLoop:
    return DistillationLoop(model, teachers, shift_labels=True, progress=False, log_every=10**9, seed=seed,
                            optimizer=lambda p: torch.optim.AdamW(p, lr=s.lr, weight_decay=0.01),
                            batch_size=s.batch_size, **kw)  # fmt: skip


@torch.no_grad()
def greedy(models: list, prompts: Tensor, length: int, batch: int = 256) -> Tensor:
    """Greedy continuations [M, P + length] of ``prompts`` [M, P]: argmax of the one model's next-token
    distribution, or of the models' ``prob_mean`` (token-level ensemble decoding). Each model keeps its KV cache:
    one new token per model call after the prompt (an order of magnitude less work than re-reading the sequence)."""
    for m in models:
        m.eval()
    out = []
    for chunk in prompts.split(batch):
        seq, step, caches = chunk.clone(), chunk, [None] * len(models)
        for _ in range(length):
            last = []
            for j, m in enumerate(models):
                res = m(input_ids=step, use_cache=True, **_cache_kwarg(m, caches[j]))
                caches[j] = res["cache"] if "cache" in res else res["past_key_values"]
                last.append(res.logits[:, -1].float())
            probs = last[0] if len(last) == 1 else fastdistill.ensemble_soft_targets(last, ensemble="prob_mean")
            step = probs.argmax(-1, keepdim=True)
            seq = torch.cat([seq, step], dim=1)
        out.append(seq)
    return torch.cat(out)


def _cache_kwarg(model, cache) -> dict:
    """The KV cache argument by the name this transformers takes (``cache`` in 5.x, ``past_key_values`` before)."""
    if cache is None:
        return {}
    return {"cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values": cache}


def _until_eos(ids: list[int], eos: int, pad: int) -> list[int]:
    out = []
    for t in ids:
        if t in (eos, pad):
            break
        out.append(t)
    return out


def continuation_dataset(seqs: Tensor, prompt_len: int, eos: int, pad: int) -> ArrayDataset:
    """Training sequences from prompt + continuation rows: targets are the continuation up to and including its
    first end-of-sequence token; the prompt and what follows the end are not (labels -100, no attention)."""
    labels = torch.full_like(seqs, -100)
    mask = torch.zeros_like(seqs)
    for i, row in enumerate(seqs.tolist()):
        end = len(row)
        for j in range(prompt_len, len(row)):
            if row[j] in (eos, pad):
                end = j + 1
                break
        mask[i, :end] = 1
        labels[i, prompt_len:end] = seqs[i, prompt_len:end]
    return ArrayDataset(input_ids=seqs, attention_mask=mask, labels=labels)


def _first_line(tok, ids: list[int]) -> str:
    return tok.decode(ids).split("\n", 1)[0].strip()


def evaluate(model, d: Data, s: Settings, loop: DistillationLoop) -> dict[str, float]:
    """The student's held-out metrics (see the module docstring)."""
    gen = greedy([model], d.held_prompts, s.cont_len)[:, s.prompt_len :].tolist()
    gen = [_until_eos(g, d.eos, d.pad) for g in gen]
    truth = [_until_eos(t, d.eos, d.pad) for t in d.held_truth]
    f1 = statistics.fmean(fastdistill.token_f1(g, t) for g, t in zip(gen, truth))
    exact = statistics.fmean(float(_first_line(d.tok, g) == _first_line(d.tok, t)) for g, t in zip(gen, truth))
    ids, mask = d.held.tensors["input_ids"], d.held.tensors["attention_mask"]
    model.eval()
    ent, n = 0.0, 0
    with torch.no_grad():
        for rows in torch.arange(len(ids)).split(64):
            logp = torch.log_softmax(model(input_ids=ids[rows], attention_mask=mask[rows]).logits.float(), -1)
            h = -(logp.exp() * logp).sum(-1)
            ent += float((h * mask[rows]).sum())
            n += int(mask[rows].sum())
    ppl = math.exp(loop.evaluate(d.held, batch_size=64, model=model)["loss"])
    model.train()
    return {"f1": f1, "exact_line": exact, "entropy": ent / max(n, 1), "ppl": ppl}


def data_quality(seqs: Tensor, truth: Tensor, s: Settings, d: Data) -> float:
    """Mean token-F1 of the continuations in ``seqs`` [M, P + L] against the true text after each prompt."""
    gen = [_until_eos(r, d.eos, d.pad) for r in seqs[:, s.prompt_len :].tolist()]
    ref = [_until_eos(r, d.eos, d.pad) for r in truth.tolist()]
    return statistics.fmean(fastdistill.token_f1(g, t) for g, t in zip(gen, ref))


def run_seed(s: Settings, seed: int, d: Data) -> dict:
    """Teachers, the distillation sets and every student for one seed: {"curves": {arm: [{step, metrics}]},
    "final": {arm: metrics}, "teachers": [...], "data_f1": {...}}."""
    t0 = time.perf_counter()
    teachers = []
    for k, group in enumerate(d.groups):
        t = gpt2(s.teacher_size, d.vocab, s.seq_len, 1000 * seed + k)
        _loop(t, seed=seed + k, s=s).fit(group, max_steps=s.teacher_steps)
        t.eval()
        teachers.append(t)
    teacher_metrics = [evaluate(t, d, s, _loop(t, s=s)) for t in teachers]

    g = torch.Generator().manual_seed(seed)
    rows = torch.randperm(len(d.train), generator=g)
    mask = d.train.tensors["attention_mask"][rows].sum(1) >= s.prompt_len + 1
    chosen = rows[mask][: s.prompts]
    text = d.train.tensors["input_ids"][chosen]
    prompts, truth = text[:, : s.prompt_len], text[:, s.prompt_len : s.prompt_len + s.cont_len]
    outputs = [greedy([t], prompts, s.cont_len) for t in teachers]  # K x [M, P + L]
    conts = [[_until_eos(r, d.eos, d.pad) for r in o[:, s.prompt_len :].tolist()] for o in outputs]
    best = fastdistill.mbr_select(conts)
    mbr = torch.stack([outputs[k][i] for i, k in enumerate(best)])
    decoded = greedy(teachers, prompts, s.cont_len)
    sets = {
        "union": continuation_dataset(torch.cat(outputs), s.prompt_len, d.eos, d.pad),
        "mbr": continuation_dataset(mbr, s.prompt_len, d.eos, d.pad),
        "token_decode": continuation_dataset(decoded, s.prompt_len, d.eos, d.pad),
    }
    data_f1 = {"union": statistics.fmean(data_quality(o, truth, s, d) for o in outputs),
               "mbr": data_quality(mbr, truth, s, d), "token_decode": data_quality(decoded, truth, s, d),
               "mbr_choice_share": [best.count(k) / len(best) for k in range(s.k)]}  # fmt: skip

    curves: dict[str, list[dict]] = {}
    final: dict[str, dict[str, float]] = {}
    for arm in ARMS:
        student = gpt2(s.student_size, d.vocab, s.seq_len, 1000 * seed + 99)
        curve: list[dict] = []

        def eval_fn(loop: DistillationLoop, curve=curve, student=student) -> dict[str, float]:
            metrics = evaluate(student, d, s, loop)
            curve.append({"step": loop.step, **metrics})
            return metrics

        if arm == "token_kd":
            kd = fastdistill.KDLoss(temperature=1.0, ce_weight=0.5, ensemble="prob_mean")
            loop, data = _loop(student, teachers, seed=seed, s=s, loss=kd), d.train
        elif arm == "no_kd":
            loop, data = _loop(student, seed=seed, s=s), d.train
        else:
            loop, data = _loop(student, seed=seed, s=s), sets[arm]
        loop.fit(data, max_steps=s.student_steps, eval_fn=eval_fn, eval_every=s.eval_every)
        curves[arm], final[arm] = curve, {k: v for k, v in curve[-1].items() if k != "step"}
    return {"seed": seed, "curves": curves, "final": final, "teachers": teacher_metrics, "data_f1": data_f1,
            "seconds": time.perf_counter() - t0}  # fmt: skip


_DATA: dict[str, Data] = {}


def _run_seed(s: Settings, seed: int) -> dict:
    """run_seed with the data loaded once per process (the tokenizer is trained on the whole text)."""
    key = json.dumps(asdict(s))
    if key not in _DATA:
        _DATA[key] = load_data(s)
    return run_seed(s, seed, _DATA[key])


def _fmt(xs: list[float], digits: int = 3) -> str:
    if len(xs) < 2:
        return f"{xs[0]:.{digits}f}"
    return f"{statistics.fmean(xs):.{digits}f} ± {statistics.stdev(xs):.{digits}f}"


def report(runs: list[dict], s: Settings, log=print) -> None:
    n = len(runs)
    log(f"final metrics after {s.student_steps} steps (mean ± std over {n} seeds; held-out prompts of "
        f"{s.prompt_len} tokens, continuations of {s.cont_len}):")  # fmt: skip
    log("| student | " + " | ".join(METRICS.values()) + " |")
    log("|---|" + "---:|" * len(METRICS))
    for arm, label in ARMS.items():
        log(f"| {label} | " + " | ".join(_fmt([r["final"][arm][m] for r in runs]) for m in METRICS) + " |")
    for k in range(s.k):
        log(f"| (teacher {k}, its own third of the modules) | "
            + " | ".join(_fmt([r["teachers"][k][m] for r in runs]) for m in METRICS) + " |")  # fmt: skip
    log("")
    log("quality of each distillation set: token-F1 of its continuations against the true training text")
    log("| set | token-F1 vs truth |")
    log("|---|---:|")
    for arm in ("union", "mbr", "token_decode"):
        log(f"| {ARMS[arm]} | {_fmt([r['data_f1'][arm] for r in runs])} |")
    shares = [statistics.fmean(r["data_f1"]["mbr_choice_share"][k] for r in runs) for k in range(s.k)]
    log(f"MBR picked teacher 0/1/2 for {' / '.join(f'{x:.0%}' for x in shares)} of the prompts")
    log("")
    steps = [c["step"] for c in runs[0]["curves"]["mbr"]]
    for m in ("f1", "entropy"):
        log(f"curve: {METRICS[m]} by step (mean over {n} seeds)")
        log("| student | " + " | ".join(str(x) for x in steps) + " |")
        log("|---|" + "---:|" * len(steps))
        for arm, label in ARMS.items():
            log(f"| {label} | " + " | ".join(f"{statistics.fmean(r['curves'][arm][i][m] for r in runs):.3f}"
                                            for i in range(len(steps))) + " |")  # fmt: skip
        log("")
    if n > 1:
        total = len(CONTRASTS) * len(METRICS)
        log(f"paired differences (same seed), mean and 95% t interval over {n} seeds; {len(CONTRASTS)} contrasts x "
            f"{len(METRICS)} metrics = {total} intervals, so about {0.05 * total:.1f} may exclude 0 by chance; * : "
            f"the Bonferroni-corrected interval (level 1 - 0.05/{total}) excludes 0 too:")  # fmt: skip
        log("| contrast | " + " | ".join(METRICS.values()) + " |")
        log("|---|" + "---:|" * len(METRICS))
        for a, b in CONTRASTS:
            cells = []
            for m in METRICS:
                pair = ([r["final"][a][m] for r in runs], [r["final"][b][m] for r in runs])
                mean, lo, hi = paired_ci(*pair)
                _, blo, bhi = paired_ci(*pair, level=1 - 0.05 / total)
                cells.append(f"{mean:+.3f} [{lo:+.3f}, {hi:+.3f}]" + (" *" if blo > 0 or bhi < 0 else ""))
            log(f"| {a} - {b} | " + " | ".join(cells) + " |")


def run(settings: Settings, log=print, out: Path | None = None, jobs: int = 1) -> list[dict]:
    t0 = time.perf_counter()
    s = settings
    runs = map_seeds(functools.partial(_run_seed, s), s.seeds, jobs)
    d = load_data(s)
    log(f"stdlib sources, vocab {d.vocab}; K = {s.k} teachers {s.teacher_size} on "
        f"{' / '.join(str(len(g)) for g in d.groups)} sequences, {s.teacher_steps} steps; students {s.student_size}, "
        f"{s.student_steps} steps of {s.batch_size}; {s.prompts} prompts; {len(d.held_prompts)} held-out prompts")
    report(runs, s, log)
    if out is not None:
        out.write_text(json.dumps({"settings": asdict(s), "runs": runs}, indent=1) + "\n")
        log(f"per-seed numbers and curves: {out}")
    log(f"wall time {time.perf_counter() - t0:.1f} s")
    return runs


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--small", action="store_true", help="seconds: tiny sizes (the tests' run)")
    p.add_argument("--jobs", type=int, default=1, help="processes, one seed each (default 1)")
    p.add_argument("--seeds", type=int, default=None, help="the first this many seeds (default: Settings.seeds)")
    p.add_argument("--out", type=Path, default=None,
                   help="JSON of every seed (default docs/sequence_ensemble.json; none with --small)")  # fmt: skip
    args = p.parse_args(argv)
    out = args.out or (None if args.small else Path(__file__).resolve().parents[1] / "docs" / "sequence_ensemble.json")
    s = Settings.small() if args.small else Settings()
    if args.seeds is not None:
        s.seeds = tuple(range(args.seeds))
    with single_thread():
        run(s, out=out, jobs=args.jobs)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
