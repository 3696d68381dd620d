"""Initialise a student transformer from a teacher's weights, before distillation: GUIDE and parameter remapping.

:func:`init_student_from_teacher` overwrites (in place) parts of a ``transformers`` causal LM with values computed
from a teacher of the same family: GPT-2 (``GPT2LMHeadModel``) or Llama-style (``LlamaForCausalLM``,
``MistralForCausalLM``, ``Qwen2ForCausalLM``). Three methods:

- ``"guide"``: GUIDE, Trinh, Menghani & Vee (Google Research, 2025), "GUIDE: Guided Initialization and Distillation
  of Embeddings", arXiv:2510.06502. A smaller student: the embedding table by PCA of the teacher's (E_S = E_T M),
  the first block (``blocks="all"``: every block) mapped through the same projection M, heads, dimensions and
  neurons by :func:`uniform_selection`.
- ``"remap"``: parameter remapping as a student initialisation for distillation from a weak (smaller) teacher,
  Lee et al., "A Study on Knowledge Distillation from Weak Teacher for Scaling Up Pre-trained Language Models",
  Findings of ACL 2023 (arXiv:2305.18239). A larger (or equal) student: the teacher's weights in its leading slices
  of each structural axis, student layer i from teacher layer min(i, L_T - 1).
- ``"random"``: the baseline; the student is left as it is.

The sources, what is the papers' and what is ours (the PCA and its signs, the residual stream as the PCA space,
norms folded into the next linear map, the selection rule, ``blocks="all"``, the remapping rule), and the
experiment: ``docs/lm_methods.md``.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from .. import functional

__all__ = ["init_student_from_teacher", "uniform_selection"]

METHODS = ("guide", "remap", "random")
BLOCKS = ("none", "first", "all")
_GPT2, _LLAMA = "gpt2", "llama"
_LLAMA_TYPES = ("llama", "mistral", "qwen2")  # same module layout: q/k/v/o_proj, gate/up/down_proj, RMSNorm
SUPPORTED = "GPT-2 (GPT2LMHeadModel) and Llama-style (LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM)"
_LAYER_NAME = re.compile(r"^(transformer\.h|model\.layers)\.(\d+)\.")


def uniform_selection(n_teacher: int, n_student: int) -> list[int]:
    """``n_student`` evenly spaced indices out of ``range(n_teacher)``, starting at 0: ``i * n_teacher // n_student``.

    8 -> 4: [0, 2, 4, 6]; 5 -> 2: [0, 2]; 10 -> 4: [0, 2, 5, 7]; n -> n: all of them. Distinct and increasing
    because n_teacher / n_student >= 1.
    """
    n_teacher = functional.check_int("n_teacher", n_teacher, low=1)  # (2.5 layers: float indices further on)
    n_student = functional.check_int("n_student", n_student, low=1)
    if not 1 <= n_student <= n_teacher:
        raise ValueError(f"uniform_selection needs 1 <= n_student <= n_teacher, got n_student={n_student}, "
                         f"n_teacher={n_teacher}")  # fmt: skip
    return [i * n_teacher // n_student for i in range(n_student)]


@dataclass(frozen=True)
class _Dims:
    vocab: int
    width: int  # d: residual stream
    heads: int
    kv_heads: int  # = heads for GPT-2
    head_dim: int
    inner: int  # MLP intermediate size f
    layers: int
    positions: int | None  # learned position table rows (GPT-2); None: RoPE


def _family(model: nn.Module, arg: str) -> str:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type == "gpt2" and hasattr(model, "transformer") and hasattr(model.transformer, "h"):
        return _GPT2
    if model_type in _LLAMA_TYPES and hasattr(getattr(model, "model", None), "layers"):
        layer = model.model.layers[0] if len(model.model.layers) else None
        needed = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
                  "mlp.up_proj", "mlp.down_proj", "input_layernorm", "post_attention_layernorm")  # fmt: skip
        names = {n for n, _ in layer.named_modules()} if layer is not None else set()
        if all(n in names for n in needed):
            return _LLAMA
    raise NotImplementedError(f"{arg}: unsupported model {type(model).__name__} (model_type={model_type!r}); "
                              f"supported: {SUPPORTED}")  # fmt: skip


def _dims(model: nn.Module, family: str) -> _Dims:
    cfg = model.config
    if family == _GPT2:
        tr = model.transformer
        d, h = tr.wte.weight.shape[1], cfg.n_head
        inner = tr.h[0].mlp.c_fc.weight.shape[1] if len(tr.h) else (cfg.n_inner or 4 * d)
        return _Dims(tr.wte.weight.shape[0], d, h, h, d // h, inner, len(tr.h), tr.wpe.weight.shape[0])
    base = model.model
    d, h = base.embed_tokens.weight.shape[1], cfg.num_attention_heads
    kv = getattr(cfg, "num_key_value_heads", None) or h
    layer = base.layers[0]
    return _Dims(base.embed_tokens.weight.shape[0], d, h, kv, layer.self_attn.q_proj.weight.shape[0] // h,
                 layer.mlp.gate_proj.weight.shape[0], len(base.layers), None)  # fmt: skip


def _block(model: nn.Module, family: str, index: int, dims: _Dims) -> dict[str, Any]:
    """Views (sharing storage: writing into them writes the model) of block ``index`` in one math layout, ``x @ W``:

    ``q``, ``k``, ``v``: (W [d, heads, head_dim], b [heads, head_dim] | None); ``o``: (W [heads, head_dim, d], b [d]);
    ``n1``, ``n2``: (gain [d], bias [d] | None) of the norms before attention and MLP; ``mlp_in``: [(W [d, f], b [f])]
    (GPT-2: c_fc; Llama: gate, up); ``mlp_out``: (W [f, d], b [d] | None).
    """
    d, h, kv, hd = dims.width, dims.heads, dims.kv_heads, dims.head_dim
    if family == _GPT2:
        layer = model.transformer.h[index]
        attn, mlp = layer.attn, layer.mlp
        w, b = attn.c_attn.weight.view(d, 3, h, hd), attn.c_attn.bias.view(3, h, hd)  # Conv1D: [in, out], q|k|v
        return {
            "n1": (layer.ln_1.weight, layer.ln_1.bias), "n2": (layer.ln_2.weight, layer.ln_2.bias),
            "q": (w[:, 0], b[0]), "k": (w[:, 1], b[1]), "v": (w[:, 2], b[2]),
            "o": (attn.c_proj.weight.view(h, hd, d), attn.c_proj.bias),
            "mlp_in": [(mlp.c_fc.weight, mlp.c_fc.bias)], "mlp_out": (mlp.c_proj.weight, mlp.c_proj.bias),
        }  # fmt: skip
    layer = model.model.layers[index]
    attn, mlp = layer.self_attn, layer.mlp

    def reads(lin: nn.Linear, n: int):  # nn.Linear weight is [out, in]: transpose to [in, out]
        return lin.weight.T.view(d, n, hd), None if lin.bias is None else lin.bias.view(n, hd)

    return {
        "n1": (layer.input_layernorm.weight, None), "n2": (layer.post_attention_layernorm.weight, None),
        "q": reads(attn.q_proj, h), "k": reads(attn.k_proj, kv), "v": reads(attn.v_proj, kv),
        "o": (attn.o_proj.weight.T.view(h, hd, d), attn.o_proj.bias),
        "mlp_in": [(mlp.gate_proj.weight.T, mlp.gate_proj.bias), (mlp.up_proj.weight.T, mlp.up_proj.bias)],
        "mlp_out": (mlp.down_proj.weight.T, mlp.down_proj.bias),
    }  # fmt: skip


def _final_norm(model: nn.Module, family: str) -> nn.Module:
    return model.transformer.ln_f if family == _GPT2 else model.model.norm


def _f64(x: Tensor | None, device: torch.device) -> Tensor | None:
    return None if x is None else x.detach().to(device=device, dtype=torch.float64)


def _assign(dst: Tensor | None, src: Tensor | None) -> None:
    if dst is None or src is None:
        return
    if dst.shape != src.shape:  # a bug here, never the user's: shapes are validated up front
        raise RuntimeError(f"internal shape mismatch: {tuple(dst.shape)} <- {tuple(src.shape)}")
    dst.copy_(src.to(device=dst.device, dtype=dst.dtype))


def _reset_norm(norm: tuple[Tensor, Tensor | None]) -> None:
    norm[0].fill_(1.0)
    if norm[1] is not None:
        norm[1].zero_()


# ---------------------------------------------------------------------------------------------------------------
# GUIDE


def _pca_basis(table: Tensor, k: int) -> tuple[Tensor, float]:
    """Top-``k`` principal directions M [d, k] (float64, orthonormal columns) of the centred rows of ``table``
    [V, d], each signed so that its largest-|entry| component is positive; and the explained variance ratio."""
    x = table.detach().to(torch.float64)
    _, s, vh = torch.linalg.svd(x - x.mean(0, keepdim=True), full_matrices=False)
    basis = vh[:k].T
    pivot = basis.abs().argmax(0)
    sign = torch.sign(basis[pivot, torch.arange(k, device=basis.device)])
    basis = basis * torch.where(sign == 0, torch.ones_like(sign), sign)
    var = s.square()
    total = float(var.sum())
    return basis.contiguous(), float(var[:k].sum()) / total if total > 0 else float("nan")


def _width_ratio(basis: Tensor) -> float:
    """sqrt(d_T / d_S), folded into every norm gain: a norm divides by the RMS over its own width, so the student's
    normed stream, x M over d_S coordinates, is sqrt(d_S / d_T) times the teacher's (x in the span of M, where
    ||x M|| = ||x||) projected."""
    return math.sqrt(basis.shape[0] / basis.shape[1])


def _head_selection(ds: _Dims, dt: _Dims) -> tuple[list[int], list[int]]:
    """(query heads, key/value heads) of the teacher kept by the student: kv heads uniformly, then the same uniform
    choice of query heads inside each kept group, so student query head j still reads its own group's kv head."""
    kv = uniform_selection(dt.kv_heads, ds.kv_heads)
    g_t, g_s = dt.heads // dt.kv_heads, ds.heads // ds.kv_heads
    within = uniform_selection(g_t, g_s)
    return [k * g_t + w for k in kv for w in within], kv


def _guide_block(t: dict, s: dict, basis: Tensor, q_idx: Tensor, kv_idx: Tensor, dim_idx: Tensor,
                 neurons: Tensor) -> None:  # fmt: skip
    dev = basis.device
    ratio = _width_ratio(basis)

    def reading(pair, norm, select):
        """A linear map reading the normed residual stream: fold the norm's affine into it, then W -> M^T W."""
        w, b = _f64(pair[0], dev), _f64(pair[1], dev)
        gain, beta = _f64(norm[0], dev), _f64(norm[1], dev)
        if b is not None and beta is not None:
            b = b + torch.tensordot(beta, w, dims=1)  # beta W: computed before the gain is folded into W
        gain = (torch.ones(w.shape[0], dtype=w.dtype, device=dev) if gain is None else gain) * ratio
        w = torch.tensordot(basis.T, gain.view(-1, *([1] * (w.dim() - 1))) * w, dims=1)
        return select(w), None if b is None else select(b)

    def heads(x, idx):  # trailing dims [..., heads, head_dim]
        return x.index_select(-2, idx).index_select(-1, dim_idx)

    for name, idx in (("q", q_idx), ("k", kv_idx), ("v", kv_idx)):
        w, b = reading(t[name], t["n1"], lambda x, idx=idx: heads(x, idx))
        _assign(s[name][0], w)
        _assign(s[name][1], b)
    w_o, b_o = _f64(t["o"][0], dev), _f64(t["o"][1], dev)
    _assign(s["o"][0], w_o.index_select(0, q_idx).index_select(1, dim_idx) @ basis)  # writes: W -> W M
    _assign(s["o"][1], None if b_o is None else b_o @ basis)
    for t_pair, s_pair in zip(t["mlp_in"], s["mlp_in"]):
        w, b = reading(t_pair, t["n2"], lambda x: x.index_select(-1, neurons))
        _assign(s_pair[0], w)
        _assign(s_pair[1], b)
    w_out, b_out = _f64(t["mlp_out"][0], dev), _f64(t["mlp_out"][1], dev)
    _assign(s["mlp_out"][0], w_out.index_select(0, neurons) @ basis)
    _assign(s["mlp_out"][1], None if b_out is None else b_out @ basis)
    _reset_norm(s["n1"])
    _reset_norm(s["n2"])


def _check_rope(ds: _Dims, dt: _Dims, family: str) -> None:
    if family == _LLAMA and ds.head_dim != dt.head_dim:
        raise ValueError(f"student head_dim ({ds.head_dim}) must equal the teacher's ({dt.head_dim}) for "
                         f"Llama-style models: RoPE pairs the dimensions of a head")  # fmt: skip


def _check_guide(ds: _Dims, dt: _Dims, family: str, blocks: str) -> None:
    checks = [("width", ds.width, dt.width), ("number of attention heads", ds.heads, dt.heads),
              ("number of key/value heads", ds.kv_heads, dt.kv_heads), ("head_dim", ds.head_dim, dt.head_dim),
              ("MLP inner size", ds.inner, dt.inner)]  # fmt: skip
    if blocks == "all":
        checks.append(("number of layers (blocks='all')", ds.layers, dt.layers))
    for what, s, t in checks:
        if s > t:
            raise ValueError(f"student {what} ({s}) exceeds the teacher's ({t}): GUIDE initialises a smaller "
                             f"student; for a larger one use method='remap'")  # fmt: skip
    _check_rope(ds, dt, family)
    if ds.heads // ds.kv_heads > dt.heads // dt.kv_heads:
        raise ValueError(f"student query heads per key/value head ({ds.heads // ds.kv_heads}) exceed the "
                         f"teacher's ({dt.heads // dt.kv_heads})")  # fmt: skip
    if ds.width > dt.vocab:
        raise ValueError(f"student width ({ds.width}) exceeds the vocabulary size ({dt.vocab}): the PCA of the "
                         f"embedding table has fewer directions")  # fmt: skip


def _guide(student: nn.Module, teacher: nn.Module, family: str, ds: _Dims, dt: _Dims, blocks: str) -> dict[str, Any]:
    e_t, e_s = teacher.get_input_embeddings().weight, student.get_input_embeddings().weight
    basis, explained = _pca_basis(e_t, ds.width)  # [d_T, d_S], float64 on the teacher's device
    dev = basis.device
    _assign(e_s, _f64(e_t, dev) @ basis)
    positions = None
    if family == _GPT2:  # same projection: X = E[z] + P stays X M in the student
        p_t, p_s = teacher.transformer.wpe.weight, student.transformer.wpe.weight
        positions = min(p_t.shape[0], p_s.shape[0])
        _assign(p_s[:positions], _f64(p_t[:positions], dev) @ basis)

    q_heads, kv_heads = _head_selection(ds, dt)
    dims_kept = uniform_selection(dt.head_dim, ds.head_dim)
    neurons = uniform_selection(dt.inner, ds.inner)
    layers = uniform_selection(dt.layers, ds.layers) if blocks == "all" else [0] if blocks == "first" else []

    def ix(xs):
        return torch.tensor(xs, dtype=torch.long, device=dev)

    for i, j in enumerate(layers[: ds.layers]):
        _guide_block(_block(teacher, family, j, dt), _block(student, family, i, ds), basis, ix(q_heads),
                     ix(kv_heads), ix(dims_kept), ix(neurons))  # fmt: skip

    # the output side: lm_head (tied: follows E_S) and, with blocks="all", the final norm
    norm_t, norm_s = _final_norm(teacher, family), _final_norm(student, family)
    out_s = student.get_output_embeddings()
    tied = out_s is None or out_s.weight is e_s
    bias_t = getattr(norm_t, "bias", None)
    final = "untouched"
    if not tied:
        w_lm = _f64(teacher.get_output_embeddings().weight, dev)  # [V, d_T]
        if blocks == "all" and bias_t is None:  # logits = (g * n) W_lm^T: fold g into W_lm, student norm gain 1
            w_lm = w_lm * (_f64(norm_t.weight, dev) * _width_ratio(basis))
            _reset_norm((norm_s.weight, getattr(norm_s, "bias", None)))
            final = "folded into lm_head"
        _assign(out_s.weight, w_lm @ basis)
    if blocks == "all" and final == "untouched":  # no map to fold into: the diagonal of M^T diag(g) M
        _assign(norm_s.weight, basis.square().T @ _f64(norm_t.weight, dev) * _width_ratio(basis))
        _assign(getattr(norm_s, "bias", None), None if bias_t is None else _f64(bias_t, dev) @ basis)
        final = "diagonal of the projected gain"
    return {
        "method": "guide", "family": family, "blocks": blocks, "basis": basis.float().cpu(),
        "explained_variance": explained, "teacher_layers": layers, "heads": q_heads, "kv_heads": kv_heads,
        "head_dims": dims_kept, "neurons": neurons, "positions": positions, "lm_head": "tied" if tied else "projected",
        "final_norm": final,
    }  # fmt: skip


# ---------------------------------------------------------------------------------------------------------------
# parameter remapping


def _remap_view(family: str, name: str, dims: _Dims) -> tuple[int, ...] | None:
    """Shape exposing a fused tensor's structural axes, so that the leading overlap keeps heads and q/k/v apart."""
    d, h, kv, hd = dims.width, dims.heads, dims.kv_heads, dims.head_dim
    if family == _GPT2:
        shapes = {"attn.c_attn.weight": (d, 3, h, hd), "attn.c_attn.bias": (3, h, hd), "attn.c_proj.weight": (h, hd, d)}
    else:
        shapes = {"self_attn.o_proj.weight": (d, h, hd)}
        for proj, n in (("q_proj", h), ("k_proj", kv), ("v_proj", kv)):
            shapes[f"self_attn.{proj}.weight"], shapes[f"self_attn.{proj}.bias"] = (n, hd, d), (n, hd)
    return next((shape for suffix, shape in shapes.items() if name.endswith(suffix)), None)


def _remap(student: nn.Module, teacher: nn.Module, family: str, ds: _Dims, dt: _Dims) -> dict[str, Any]:
    teacher_params = dict(teacher.named_parameters(remove_duplicate=False))  # tied lm_head under both names
    layers = [min(i, dt.layers - 1) for i in range(ds.layers)]  # FNA's depth rule: extra layers repeat the last
    copied, skipped = 0, []
    for name, p in student.named_parameters():
        m = _LAYER_NAME.match(name)
        t_name = name if m is None else f"{m.group(1)}.{layers[int(m.group(2))]}.{name[m.end() :]}"
        src = teacher_params.get(t_name)
        if src is None:
            skipped.append(name)
            continue
        shape_s, shape_t = _remap_view(family, name, ds), _remap_view(family, name, dt)
        dst = p.view(shape_s) if shape_s else p
        src = src.view(shape_t) if shape_t else src
        if dst.dim() != src.dim():
            skipped.append(name)
            continue
        overlap = tuple(slice(0, min(a, b)) for a, b in zip(dst.shape, src.shape))
        dst[overlap].copy_(src[overlap].to(device=dst.device, dtype=dst.dtype))
        copied += 1
    overlap_dims = {field: min(getattr(ds, field), getattr(dt, field))
                    for field in ("width", "heads", "kv_heads", "head_dim", "inner")}  # fmt: skip
    if family == _GPT2:
        overlap_dims["positions"] = min(ds.positions, dt.positions)
    return {"method": "remap", "family": family, "teacher_layers": layers, "overlap": overlap_dims,
            "copied": copied, "skipped": skipped}  # fmt: skip


# ---------------------------------------------------------------------------------------------------------------


def _reinitialise(model: nn.Module, seed: int) -> None:
    """Redraw the model's parameters with its own initialiser under ``seed``; the global RNG state is restored."""
    devices = sorted({p.device.index or 0 for p in model.parameters() if p.device.type == "cuda"})
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        init = getattr(model, "_init_weights", None)
        if callable(init):
            # transformers skips tensors marked as loaded (_is_hf_initialized): unmark them for the redraw
            marked = [p for p in model.parameters() if getattr(p, "_is_hf_initialized", False)]
            for p in marked:
                p._is_hf_initialized = False
            try:
                model.apply(init)
            finally:
                for p in marked:
                    p._is_hf_initialized = True
        else:
            for module in model.modules():
                if hasattr(module, "reset_parameters"):
                    module.reset_parameters()


def init_student_from_teacher(student: nn.Module, teacher: nn.Module, method: str = "guide", *,
                              seed: int | None = None, blocks: str = "first") -> dict[str, Any]:  # fmt: skip
    """Initialise ``student`` in place (under ``torch.no_grad``) from ``teacher``'s weights; the teacher is not
    modified. Both are ``transformers`` causal LMs of one family (GPT-2, or Llama/Mistral/Qwen2) with one vocabulary.

    Args:
        student: the model to initialise. ``"guide"`` needs it no larger than the teacher in width d, heads,
            key/value heads, head_dim (equal for Llama-style), MLP size f (and layers with ``blocks="all"``).
            ``"remap"`` takes any sizes (meant for a larger or equal student; Llama-style needs equal head_dim).
        teacher: the model to read.
        method: ``"guide"`` (GUIDE: embedding table by PCA, first block mapped through the same projection with
            uniformly selected heads and neurons), ``"remap"`` (parameter remapping: the teacher's weights in the
            student's leading slices, layer i from teacher layer min(i, L_T - 1)), ``"random"`` (nothing copied).
            See docs/lm_methods.md for which parts are the papers' and which are ours.
        seed: ``None``: the student's current values are kept wherever nothing is copied. An int: first every
            parameter of the student is redrawn by its own initialiser (``_init_weights``) under this seed (the global
            RNG state is restored), so the result depends only on the teacher, the student's config and ``seed``.
        blocks: GUIDE only. ``"first"`` (the paper): embedding table, positions and block 0. ``"none"``: the
            embedding table and positions only (the ablation). ``"all"`` (ours): every student block from a uniformly
            selected teacher block, and the final norm.

    Returns:
        A report. Always ``method`` and ``seed``. GUIDE adds ``family``, ``blocks``, ``basis`` (M [d_T, d_S] float32,
        E_S = E_T M), ``explained_variance`` (of the centred teacher table by the d_S directions), ``teacher_layers``
        (teacher block of each mapped student block), ``heads`` / ``kv_heads`` / ``head_dims`` / ``neurons`` (teacher
        indices kept, in student order), ``positions`` (GPT-2 position rows mapped), ``lm_head``, ``final_norm``.
        Remap adds ``family``, ``teacher_layers`` (one per student layer), ``overlap`` (the sizes copied per axis),
        ``copied`` (parameter tensors written), ``skipped`` (student parameters with no teacher counterpart).

    Raises:
        ValueError: unknown ``method`` or ``blocks``, a ``seed`` that is not an int, ``student`` is ``teacher``,
            different families or vocabulary sizes, or sizes the method cannot map (the message names the argument).
        NotImplementedError: a model outside the supported families.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if blocks not in BLOCKS:
        raise ValueError(f"blocks must be one of {BLOCKS}, got {blocks!r}")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise ValueError(f"seed must be an int or None, got {seed!r}")
    if student is teacher:
        raise ValueError("student and teacher must be different modules (student is teacher)")
    family = ds = dt = None
    if method != "random":
        family, t_family = _family(student, "student"), _family(teacher, "teacher")
        if family != t_family:
            names = f"student is {family} ({type(student).__name__}), teacher is {t_family} ({type(teacher).__name__})"
            raise ValueError(f"student and teacher must be of one model family: {names}")
        ds, dt = _dims(student, family), _dims(teacher, family)
        if ds.vocab != dt.vocab:
            raise ValueError(f"student vocab size ({ds.vocab}) differs from the teacher's ({dt.vocab}): one tokenizer "
                             f"is needed")  # fmt: skip
        if method == "guide":
            _check_guide(ds, dt, family, blocks)
        else:
            _check_rope(ds, dt, family)
    with torch.no_grad():
        if seed is not None:
            _reinitialise(student, seed)
        if method == "random":
            report: dict[str, Any] = {"method": "random"}
        elif method == "guide":
            report = _guide(student, teacher, family, ds, dt, blocks)
        else:
            report = _remap(student, teacher, family, ds, dt)
    report["seed"] = seed
    return report
