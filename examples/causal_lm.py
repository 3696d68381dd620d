"""Causal-LM distillation on text every machine has: Python's own standard-library sources.

    python examples/causal_lm.py            # ~1-2 minutes on 2 CPU cores
    python examples/causal_lm.py --small    # seconds (what the tests run)

A byte-level BPE tokenizer is trained locally (``tokenizers``) on a few stdlib modules; the text is cut into
sequences of whole lines (right-padded: ``labels`` = -100 and ``attention_mask`` = 0 on padding). K = 2 GPT-2
teachers built from small configs train briefly on it; then a smaller GPT-2 student learns:

- ``no KD``: next-token cross-entropy on the text;
- ``token KD (loop)``: ``kd_loss`` to the teachers' ``prob_mean`` ensemble at every position, plus cross-entropy
  (``ce_weight``), through :class:`fastdistill.training.DistillationLoop` (``shift_labels=True``);
- ``token KD (HF Trainer)``: the same loss through :class:`fastdistill.integrations.hf.DistillationTrainer`;
- sequence level, **ensemble-then-distill**: the ensemble generates (at each step the next token is sampled from
  the mean of the teachers' next-token distributions) and the student learns those sequences by cross-entropy;
- sequence level, **union of teachers**: each teacher generates its own share of the sequences, the student learns
  the union.

Everything is evaluated by perplexity on held-out stdlib modules. Results depend on the Python version (its stdlib
is the data); seeds are fixed.
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import tempfile
import time
from dataclasses import dataclass

import torch
from torch import Tensor

import fastdistill
from fastdistill.apps import single_thread
from fastdistill.training import ArrayDataset, DistillationLoop

TRAIN_MODULES = ["textwrap", "string", "shlex", "fnmatch", "glob", "heapq", "bisect", "copy", "csv", "difflib",
                 "argparse", "dataclasses", "functools", "enum"]  # fmt: skip
HELD_OUT_MODULES = ["calendar", "colorsys", "contextlib", "graphlib"]
PAD, EOS = "<pad>", "<eos>"


@dataclass
class Settings:
    vocab: int = 1024
    seq_len: int = 64
    teacher_steps: int = 300
    student_steps: int = 300
    batch_size: int = 16
    generated: int = 256  # sequences generated for the sequence-level students
    gen_len: int = 48
    max_chars: int | None = None  # per module; None: whole files

    @classmethod
    def small(cls) -> Settings:
        return cls(vocab=300, seq_len=32, teacher_steps=8, student_steps=8, batch_size=8, generated=16, gen_len=12,
                   max_chars=6000)  # fmt: skip


def stdlib_text(modules: list[str], max_chars: int | None) -> list[str]:
    texts = []
    for name in modules:
        spec = importlib.util.find_spec(name)
        if spec is None or not spec.origin or not spec.origin.endswith(".py"):
            continue
        with open(spec.origin, encoding="utf-8") as f:
            texts.append(f.read()[:max_chars])
    return texts


def train_tokenizer(texts: list[str], vocab: int):
    from tokenizers import ByteLevelBPETokenizer

    tok = ByteLevelBPETokenizer()
    tok.train_from_iterator(texts, vocab_size=vocab, min_frequency=2, special_tokens=[PAD, EOS], show_progress=False)
    return tok


def to_sequences(tok, texts: list[str], seq_len: int) -> ArrayDataset:
    """Whole lines packed into sequences of at most ``seq_len`` tokens, right-padded: input_ids / attention_mask /
    labels [N, seq_len] (labels -100 on padding)."""
    pad, eos = tok.token_to_id(PAD), tok.token_to_id(EOS)
    rows: list[list[int]] = []
    for text in texts:
        current: list[int] = []
        for line in text.splitlines(keepends=True):
            ids = tok.encode(line).ids[:seq_len]
            if len(current) + len(ids) > seq_len:
                rows.append(current)
                current = []
            current += ids
        rows.append(current[: seq_len - 1] + [eos])
    rows = [r for r in rows if len(r) > 1]
    ids = torch.full((len(rows), seq_len), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
        mask[i, : len(r)] = 1
    return ArrayDataset(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100))


def gpt2(vocab: int, seq_len: int, layers: int, width: int, seed: int):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=vocab, n_positions=seq_len, n_layer=layers, n_embd=width, n_head=4, bos_token_id=1,
                     eos_token_id=1, pad_token_id=0)  # fmt: skip
    return GPT2LMHeadModel(cfg)


def _loop(model, teachers=(), **kw) -> DistillationLoop:
    kw.setdefault("optimizer", lambda p: torch.optim.AdamW(p, lr=3e-3, weight_decay=0.01))
    kw.setdefault("seed", 0)
    return DistillationLoop(model, teachers, shift_labels=True, progress=False, log_every=10**9, **kw)


def perplexity(model, data: ArrayDataset) -> float:
    """exp of the mean next-token cross-entropy over the non-padding tokens."""
    return math.exp(_loop(model).evaluate(data, batch_size=64)["loss"])


@torch.no_grad()
def generate(teachers: list, prompts: Tensor, length: int, seed: int) -> Tensor:
    """Sample ``length`` tokens after ``prompts`` [M, P] from the mean of the teachers' next-token distributions
    (``prob_mean``; one teacher: its own distribution). No KV cache: the models are tiny."""
    g = torch.Generator().manual_seed(seed)
    seq = prompts.clone()
    for t in teachers:
        t.eval()
    for _ in range(length):
        last = [t(input_ids=seq).logits[:, -1] for t in teachers]
        probs = fastdistill.ensemble_soft_targets(last, ensemble="prob_mean")
        seq = torch.cat([seq, torch.multinomial(probs, 1, generator=g)], dim=1)
    return seq


def run(settings: Settings, log=print) -> dict[str, float]:
    t0 = time.perf_counter()
    s = settings
    train_text = stdlib_text(TRAIN_MODULES, s.max_chars)
    held_text = stdlib_text(HELD_OUT_MODULES, s.max_chars)
    tok = train_tokenizer(train_text, s.vocab)
    vocab = tok.get_vocab_size()
    train, held = to_sequences(tok, train_text, s.seq_len), to_sequences(tok, held_text, s.seq_len)
    ppl: dict[str, float] = {}

    teachers = [gpt2(vocab, s.seq_len, 2, 64, seed=1), gpt2(vocab, s.seq_len, 2, 96, seed=2)]
    for k, t in enumerate(teachers):
        _loop(t, seed=k).fit(train, max_steps=s.teacher_steps)
        ppl[f"teacher {k} (GPT-2 2x{t.config.n_embd})"] = perplexity(t, held)

    def student():
        return gpt2(vocab, s.seq_len, 1, 32, seed=3)

    m = student()
    _loop(m, batch_size=s.batch_size).fit(train, max_steps=s.student_steps)
    ppl["student (GPT-2 1x32): no KD"] = perplexity(m, held)

    kd = fastdistill.KDLoss(temperature=1.0, ce_weight=0.5, ensemble="prob_mean")
    m = student()
    _loop(m, teachers, loss=kd, batch_size=s.batch_size).fit(train, max_steps=s.student_steps)
    ppl["student: token KD, prob_mean (loop)"] = perplexity(m, held)

    from transformers import TrainingArguments

    from fastdistill.integrations.hf import DistillationTrainer

    m = student()
    rows = [train[i] for i in range(len(train))]
    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(output_dir=out, use_cpu=True, report_to=[], save_strategy="no", disable_tqdm=True,
                                 per_device_train_batch_size=s.batch_size, max_steps=s.student_steps,
                                 learning_rate=3e-3, weight_decay=0.01, lr_scheduler_type="constant",
                                 logging_strategy="no", seed=0)  # fmt: skip
        DistillationTrainer(model=m, args=args, train_dataset=rows, teachers=teachers, temperature=1.0,
                            ce_weight=0.5, ensemble="prob_mean").train()  # fmt: skip
    ppl["student: token KD, prob_mean (HF Trainer)"] = perplexity(m, held)

    # sequence level: prompts are the first 4 tokens of training sequences
    prompts = train.tensors["input_ids"][torch.randperm(len(train), generator=torch.Generator().manual_seed(0))[
        : s.generated], :4]  # fmt: skip
    ens = generate(teachers, prompts, s.gen_len, seed=0)
    share = s.generated // len(teachers)
    union = torch.cat([generate([t], prompts[k * share : (k + 1) * share], s.gen_len, seed=k)
                       for k, t in enumerate(teachers)])  # fmt: skip
    for name, seqs in (("sequence KD: ensemble generates", ens), ("sequence KD: union of teachers' generations",
                                                                  union)):  # fmt: skip
        m = student()
        _loop(m, batch_size=s.batch_size).fit(ArrayDataset(input_ids=seqs, labels=seqs), max_steps=s.student_steps)
        ppl[f"student: {name}"] = perplexity(m, held)

    wall = time.perf_counter() - t0
    log(f"causal-LM distillation on the stdlib sources (Python's own; held out: {', '.join(HELD_OUT_MODULES)}), "
        f"vocab {vocab}, {len(train)} training sequences of <= {s.seq_len} tokens")  # fmt: skip
    log(f"| {'model':<52} | held-out perplexity |")
    log(f"|{'-' * 54}|--------------------:|")
    for name, v in ppl.items():
        log(f"| {name:<52} | {v:19.2f} |")
    log(f"wall time {wall:.1f} s")
    return ppl


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--small", action="store_true", help="seconds: tiny sizes (the tests' run)")
    args = p.parse_args(argv)
    with single_thread():  # tiny models: a second thread only adds synchronisation
        run(Settings.small() if args.small else Settings())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
