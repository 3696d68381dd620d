"""init_student_from_teacher: GUIDE (PCA + uniform selection) and parameter remapping, against hand-computed maps, on
tiny models built from configs (random weights, nothing downloaded)."""

import pytest
import torch

transformers = pytest.importorskip("transformers")

from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM  # noqa: E402, I001

from fastdistill.methods.init import init_student_from_teacher, uniform_selection  # noqa: E402

VOCAB, SEQ = 50, 8


def _gpt2(layers, width, heads, seed, inner=None, vocab=VOCAB):
    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=vocab, n_positions=SEQ, n_layer=layers, n_embd=width, n_head=heads, n_inner=inner,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)  # fmt: skip
    return GPT2LMHeadModel(cfg).eval()


def _llama(layers, width, heads, kv, inner, seed, cls=LlamaForCausalLM, tie=False):
    torch.manual_seed(seed)
    config = Qwen2Config if cls is Qwen2ForCausalLM else LlamaConfig
    cfg = config(vocab_size=VOCAB, hidden_size=width, intermediate_size=inner, num_hidden_layers=layers,
                 num_attention_heads=heads, num_key_value_heads=kv, max_position_embeddings=SEQ,
                 tie_word_embeddings=tie, bos_token_id=0, eos_token_id=0, pad_token_id=0)  # fmt: skip
    return cls(cfg).eval()


def _perturb(model, seed=7):
    """Move norm gains and biases away from 1 and 0 (so that folding them is exercised) and give the embedding table
    a decaying spectrum and a mean (so that its principal directions are well separated and centring matters)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(0.3 * torch.randn(p.shape, generator=g))
        emb = model.get_input_embeddings().weight
        d = emb.shape[1]
        rotation, _ = torch.linalg.qr(torch.randn(d, d, generator=g))
        scales = torch.logspace(0.5, -1.5, d)
        emb.copy_((torch.randn(emb.shape, generator=g) * scales) @ rotation.T + torch.randn(d, generator=g))
    return model


def _snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _ids(seed=0):
    return torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(seed))


def _d(x):
    return x.detach().double()


def _signed(basis):
    """The implementation's sign rule, applied to an independently computed basis: largest-|entry| positive."""
    pivot = basis.abs().argmax(0)
    return basis * torch.sign(basis[pivot, torch.arange(basis.shape[1])])


# ---------------------------------------------------------------------------------------------------------------
# uniform selection


@pytest.mark.parametrize(
    "n_teacher,n_student,expected",
    [(8, 4, [0, 2, 4, 6]), (4, 2, [0, 2]), (5, 2, [0, 2]), (10, 4, [0, 2, 5, 7]), (3, 3, [0, 1, 2]), (7, 1, [0])],
)
def test_uniform_selection(n_teacher, n_student, expected):
    assert uniform_selection(n_teacher, n_student) == expected


@pytest.mark.parametrize("n_teacher,n_student", [(4, 5), (4, 0)])
def test_uniform_selection_rejects_bad_sizes(n_teacher, n_student):
    with pytest.raises(ValueError, match="n_student"):
        uniform_selection(n_teacher, n_student)
    with pytest.raises(TypeError, match="n_student must be an int, got float"):  # was [0.0, 2.5]-style indices
        uniform_selection(n_teacher, 2.0)


# ---------------------------------------------------------------------------------------------------------------
# GUIDE


def test_guide_embedding_is_the_top_principal_projection():
    teacher, student = _perturb(_gpt2(2, 32, 4, seed=0)), _gpt2(2, 16, 2, seed=1)
    report = init_student_from_teacher(student, teacher)
    e = _d(teacher.transformer.wte.weight)
    _, s, vh = torch.linalg.svd(e - e.mean(0), full_matrices=False)
    top = vh[:16].T
    basis = _d(report["basis"])
    assert basis.shape == (32, 16)
    torch.testing.assert_close((basis.T @ top).abs(), torch.eye(16, dtype=torch.float64), atol=1e-5, rtol=0)
    pivot = basis.abs().argmax(0)
    assert (basis[pivot, torch.arange(16)] > 0).all(), "each direction's largest-|entry| component is positive"
    torch.testing.assert_close(basis, _signed(top), atol=1e-5, rtol=0)
    # the table is projected without subtracting the mean: E_S = E_T M
    torch.testing.assert_close(_d(student.transformer.wte.weight), e @ _signed(top), atol=1e-5, rtol=1e-5)
    assert student.lm_head.weight is student.transformer.wte.weight  # tied: the LM head follows the table
    assert report["explained_variance"] == pytest.approx(float(s[:16].square().sum() / s.square().sum()), rel=1e-9)


def test_guide_directions_capture_more_variance_than_random_bases():
    teacher, student = _perturb(_gpt2(1, 32, 4, seed=0)), _gpt2(1, 16, 2, seed=1)
    report = init_student_from_teacher(student, teacher)
    e = _d(teacher.transformer.wte.weight)
    centred = e - e.mean(0)
    pca = centred @ _d(report["basis"])
    assert float(pca.square().sum() / centred.square().sum()) == pytest.approx(report["explained_variance"], rel=1e-6)
    g = torch.Generator().manual_seed(3)
    for _ in range(20):
        q, _ = torch.linalg.qr(torch.randn(32, 16, generator=g, dtype=torch.float64))
        assert (centred @ q).square().sum() < pca.square().sum()


def test_guide_first_block_is_the_hand_computed_map():
    teacher, student = _perturb(_gpt2(2, 32, 4, seed=0, inner=64)), _gpt2(2, 16, 2, seed=1, inner=32)
    teacher_before, student_before = _snapshot(teacher), _snapshot(student)
    report = init_student_from_teacher(student, teacher)
    heads, neurons = [0, 2], list(range(0, 64, 2))
    assert (report["heads"], report["neurons"], report["head_dims"]) == (heads, neurons, list(range(8)))
    assert report["teacher_layers"] == [0] and report["positions"] == SEQ
    m = _d(report["basis"])
    tb, sb = teacher.transformer.h[0], student.transformer.h[0]
    g1, b1, g2, b2 = _d(tb.ln_1.weight), _d(tb.ln_1.bias), _d(tb.ln_2.weight), _d(tb.ln_2.bias)

    def close(actual, expected):
        torch.testing.assert_close(_d(actual), expected, atol=1e-5, rtol=1e-5)

    # fused q|k|v (Conv1D [in, out]); head h of part p sits at columns p*32 + h*8 .. + 8
    w, b = _d(tb.attn.c_attn.weight), _d(tb.attn.c_attn.bias)
    cols = [p * 32 + h * 8 + j for p in range(3) for h in heads for j in range(8)]
    r = 2**0.5  # sqrt(d_T / d_S): a norm over 16 coordinates, not 32 (see the d_S < d_T exactness test)
    close(sb.attn.c_attn.weight, m.T @ (r * g1[:, None] * w)[:, cols])  # LayerNorm gain folded, input side M^T
    close(sb.attn.c_attn.bias, (b + b1 @ w)[cols])  # LayerNorm bias folded
    rows = [h * 8 + j for h in heads for j in range(8)]
    close(sb.attn.c_proj.weight, _d(tb.attn.c_proj.weight)[rows] @ m)  # writes into the residual: W M
    close(sb.attn.c_proj.bias, _d(tb.attn.c_proj.bias) @ m)
    w, b = _d(tb.mlp.c_fc.weight), _d(tb.mlp.c_fc.bias)
    close(sb.mlp.c_fc.weight, m.T @ (r * g2[:, None] * w)[:, neurons])
    close(sb.mlp.c_fc.bias, (b + b2 @ w)[neurons])
    close(sb.mlp.c_proj.weight, _d(tb.mlp.c_proj.weight)[neurons] @ m)
    close(sb.mlp.c_proj.bias, _d(tb.mlp.c_proj.bias) @ m)
    for ln in (sb.ln_1, sb.ln_2):
        assert torch.equal(ln.weight, torch.ones(16)) and torch.equal(ln.bias, torch.zeros(16))
    close(student.transformer.wpe.weight, _d(teacher.transformer.wpe.weight) @ m)
    # blocks="first": everything after block 0 keeps the student's values; the teacher is not modified
    after = _snapshot(student)
    for name in after:
        if not name.startswith(("transformer.wte", "transformer.wpe", "transformer.h.0.")):
            assert torch.equal(after[name], student_before[name]), name
    assert all(torch.equal(p, teacher_before[n]) for n, p in teacher.named_parameters())


def test_guide_blocks_none_maps_only_the_embeddings():
    """blocks="none" (the embeddings-only ablation): the same table and positions as "first", no block touched."""
    teacher = _perturb(_gpt2(2, 32, 4, seed=0, inner=64))
    first, none = _gpt2(2, 16, 2, seed=1, inner=32), _gpt2(2, 16, 2, seed=1, inner=32)
    before = _snapshot(none)
    init_student_from_teacher(first, teacher)
    report = init_student_from_teacher(none, teacher, blocks="none")
    assert report["teacher_layers"] == [] and report["blocks"] == "none"
    for name in ("transformer.wte.weight", "transformer.wpe.weight"):
        assert torch.equal(dict(none.named_parameters())[name], dict(first.named_parameters())[name]), name
        assert not torch.equal(dict(none.named_parameters())[name], before[name]), name
    for name, p in none.named_parameters():
        if not name.startswith(("transformer.wte", "transformer.wpe", "lm_head")):
            assert torch.equal(p, before[name]), name


def test_guide_smaller_head_dim_keeps_uniformly_selected_dimensions():
    teacher, student = _perturb(_gpt2(1, 32, 2, seed=0)), _gpt2(1, 16, 2, seed=1)  # head_dim 16 -> 8
    report = init_student_from_teacher(student, teacher)
    dims = list(range(0, 16, 2))
    assert (report["heads"], report["head_dims"]) == ([0, 1], dims)
    tb, sb, m = teacher.transformer.h[0], student.transformer.h[0], _d(report["basis"])
    w = 2**0.5 * _d(tb.ln_1.weight)[:, None] * _d(tb.attn.c_attn.weight)  # the gain times sqrt(d_T / d_S)
    cols = [p * 32 + h * 16 + j for p in range(3) for h in (0, 1) for j in dims]
    torch.testing.assert_close(_d(sb.attn.c_attn.weight), m.T @ w[:, cols], atol=1e-5, rtol=1e-5)
    rows = [h * 16 + j for h in (0, 1) for j in dims]
    torch.testing.assert_close(_d(sb.attn.c_proj.weight), _d(tb.attn.c_proj.weight)[rows] @ m, atol=1e-5, rtol=1e-5)


def test_guide_grouped_query_attention_keeps_each_query_head_with_its_kv_head():
    teacher = _perturb(_llama(1, 32, 8, 4, 64, seed=0))  # head_dim 4, 2 query heads per kv head
    student = _llama(1, 16, 4, 2, 32, seed=1)
    report = init_student_from_teacher(student, teacher)
    assert (report["kv_heads"], report["heads"]) == ([0, 2], [0, 1, 4, 5])
    ta, sa, m = teacher.model.layers[0].self_attn, student.model.layers[0].self_attn, _d(report["basis"])
    g = _d(teacher.model.layers[0].input_layernorm.weight)
    for proj, heads in (("q_proj", [0, 1, 4, 5]), ("k_proj", [0, 2]), ("v_proj", [0, 2])):
        rows = [h * 4 + j for h in heads for j in range(4)]
        w = _d(getattr(ta, proj).weight)[rows]  # nn.Linear [out, in]
        torch.testing.assert_close(_d(getattr(sa, proj).weight), 2**0.5 * w * g @ m, atol=1e-5, rtol=1e-5)
    rows = [h * 4 + j for h in [0, 1, 4, 5] for j in range(4)]
    torch.testing.assert_close(_d(sa.o_proj.weight), m.T @ _d(ta.o_proj.weight)[:, rows], atol=1e-5, rtol=1e-5)
    # untied LM head: projected like the input table
    torch.testing.assert_close(_d(student.lm_head.weight), _d(teacher.lm_head.weight) @ m, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("cls", [LlamaForCausalLM, Qwen2ForCausalLM])  # Qwen2: q/k/v biases
def test_guide_untruncated_rmsnorm_student_reproduces_the_teacher(cls):
    # Nothing truncated: M is a rotation. RMSNorm is rotation invariant and the gains are folded into the next
    # linear maps, so the rotated student computes the teacher's logits exactly.
    teacher = _perturb(_llama(2, 16, 4, 2, 32, seed=0, cls=cls))
    student = _llama(2, 16, 4, 2, 32, seed=1, cls=cls)
    report = init_student_from_teacher(student, teacher, blocks="all")
    assert report["final_norm"] == "folded into lm_head" and report["teacher_layers"] == [0, 1]
    ids = _ids()
    with torch.no_grad():
        expected, actual = teacher(ids).logits, student(ids).logits
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("blocks", ["first", "all"])
def test_guide_narrower_rmsnorm_student_is_exact_on_a_stream_in_the_subspace(blocks):
    """d_S < d_T, the teacher's embedding table of rank d_S (the PCA then loses nothing): on the embedded tokens the
    student's q, k, v and MLP inputs are the teacher's (selected heads and neurons), and with blocks="all" its
    logits on the same stream too. A norm divides by the RMS over its own width, so the folded gains carry
    sqrt(d_T / d_S) (without it everything read after a norm was 0.71 of the teacher's at 32 -> 16)."""
    teacher, student = _perturb(_llama(1, 32, 4, 4, 64, seed=0)), _llama(1, 16, 2, 2, 64, seed=1)  # head_dim 8
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        basis, _ = torch.linalg.qr(torch.randn(32, 16, generator=g))
        table = (torch.randn(VOCAB, 16, generator=g) * torch.logspace(0.5, -1, 16)) @ basis.T
        teacher.model.embed_tokens.weight.copy_(table)
        teacher.model.norm.weight.mul_(1 + 0.3 * torch.randn(32, generator=g))
    report = init_student_from_teacher(student, teacher, blocks=blocks)
    ids = torch.arange(VOCAB)
    tl, sl = teacher.model.layers[0], student.model.layers[0]
    with torch.no_grad():
        xt, xs = teacher.model.embed_tokens(ids), student.model.embed_tokens(ids)
        nt, ns = tl.input_layernorm(xt), sl.input_layernorm(xs)
        rows = [h * 8 + j for h in report["heads"] for j in range(8)]
        for name in ("q_proj", "k_proj", "v_proj"):
            torch.testing.assert_close(getattr(sl.self_attn, name)(ns), getattr(tl.self_attn, name)(nt)[:, rows],
                                       atol=1e-4, rtol=1e-4)  # fmt: skip
        nt, ns = tl.post_attention_layernorm(xt), sl.post_attention_layernorm(xs)
        torch.testing.assert_close(sl.mlp.up_proj(ns), tl.mlp.up_proj(nt)[:, report["neurons"]], atol=1e-4,
                                   rtol=1e-4)  # fmt: skip
        if blocks == "all":
            assert report["final_norm"] == "folded into lm_head"
            torch.testing.assert_close(student.lm_head(student.model.norm(xs)), teacher.lm_head(teacher.model.norm(xt)),
                                       atol=1e-4, rtol=1e-4)  # fmt: skip


def test_guide_untruncated_gpt2_is_the_teacher_rotated_in_its_linear_parts():
    # GPT-2's LayerNorm subtracts the mean of the coordinates, which a rotation does not commute with, so the logits
    # are not the teacher's; every linear map (with the folded LayerNorm affine) is, up to the rotation M.
    teacher, student = _perturb(_gpt2(2, 16, 4, seed=0)), _gpt2(2, 16, 4, seed=1)
    report = init_student_from_teacher(student, teacher, blocks="all")
    m = _d(report["basis"]).float()
    torch.testing.assert_close(m.T @ m, torch.eye(16), atol=1e-5, rtol=0)
    torch.testing.assert_close(student.transformer.wte.weight @ m.T, teacher.transformer.wte.weight, atol=1e-5,
                               rtol=1e-5)  # fmt: skip
    g = torch.Generator().manual_seed(1)
    u, z, a = (torch.randn(5, n, generator=g) for n in (16, 16, 64))
    with torch.no_grad():
        for tb, sb in zip(teacher.transformer.h, student.transformer.h):
            pairs = [
                (sb.attn.c_attn(u @ m), tb.attn.c_attn(tb.ln_1.weight * u + tb.ln_1.bias)),
                (sb.attn.c_proj(z), tb.attn.c_proj(z) @ m),
                (sb.mlp.c_fc(u @ m), tb.mlp.c_fc(tb.ln_2.weight * u + tb.ln_2.bias)),
                (sb.mlp.c_proj(a), tb.mlp.c_proj(a) @ m),
            ]
            for actual, expected in pairs:
                torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-4)


def test_guide_all_blocks_uses_uniformly_selected_teacher_layers_and_the_final_norm():
    teacher, student = _perturb(_gpt2(4, 32, 4, seed=0)), _gpt2(2, 16, 2, seed=1)
    report = init_student_from_teacher(student, teacher, blocks="all")
    assert report["teacher_layers"] == [0, 2]
    m, neurons = _d(report["basis"]), report["neurons"]
    tb, sb = teacher.transformer.h[2], student.transformer.h[1]
    torch.testing.assert_close(_d(sb.mlp.c_proj.weight), _d(tb.mlp.c_proj.weight)[neurons] @ m, atol=1e-5, rtol=1e-5)
    # tied LM head: the final LayerNorm cannot be folded; its gain becomes the diagonal of M^T diag(g) M
    ln_t, ln_s = teacher.transformer.ln_f, student.transformer.ln_f
    assert report["final_norm"] == "diagonal of the projected gain"
    torch.testing.assert_close(_d(ln_s.weight), 2**0.5 * torch.diagonal(m.T @ torch.diag(_d(ln_t.weight)) @ m),
                               atol=1e-5, rtol=1e-5)  # fmt: skip
    torch.testing.assert_close(_d(ln_s.bias), _d(ln_t.bias) @ m, atol=1e-5, rtol=1e-5)


def test_guide_experiment_shapes():
    # the experiment's GUIDE pair: teacher width 128, 4 layers, 4 heads -> student 64, 2 layers, 2 heads (head_dim 32)
    teacher, student = _gpt2(4, 128, 4, seed=0, vocab=256), _gpt2(2, 64, 2, seed=1, vocab=256)
    report = init_student_from_teacher(student, teacher)
    assert report["heads"] == [0, 2] and report["head_dims"] == list(range(32)) and len(report["neurons"]) == 256
    assert 0.5 < report["explained_variance"] < 1.0


# ---------------------------------------------------------------------------------------------------------------
# parameter remapping


def test_remap_larger_student_gets_the_teacher_in_its_leading_slices():
    teacher = _perturb(_gpt2(2, 16, 4, seed=0, inner=64))  # head_dim 4
    student = _gpt2(4, 32, 4, seed=1, inner=128)  # head_dim 8
    before = _snapshot(student)
    report = init_student_from_teacher(student, teacher, "remap")
    assert report["teacher_layers"] == [0, 1, 1, 1] and report["skipped"] == []
    assert report["overlap"] == {"width": 16, "heads": 4, "kv_heads": 4, "head_dim": 4, "inner": 64, "positions": SEQ}
    t = _snapshot(teacher)
    expected = {n: v.clone() for n, v in before.items()}
    expected["transformer.wte.weight"][:, :16] = t["transformer.wte.weight"]
    expected["transformer.wpe.weight"][:, :16] = t["transformer.wpe.weight"]
    for suffix in ("weight", "bias"):
        expected[f"transformer.ln_f.{suffix}"][:16] = t[f"transformer.ln_f.{suffix}"]
    for i, j in enumerate([0, 1, 1, 1]):
        s_, t_ = f"transformer.h.{i}.", f"transformer.h.{j}."
        for name in ("ln_1.weight", "ln_1.bias", "ln_2.weight", "ln_2.bias", "attn.c_proj.bias", "mlp.c_proj.bias"):
            expected[s_ + name][:16] = t[t_ + name]
        # q|k|v and heads stay apart: teacher head h, dimension j -> student head h, dimension j
        expected[s_ + "attn.c_attn.weight"].view(32, 3, 4, 8)[:16, :, :, :4] = t[t_ + "attn.c_attn.weight"].view(
            16, 3, 4, 4)  # fmt: skip
        expected[s_ + "attn.c_attn.bias"].view(3, 4, 8)[:, :, :4] = t[t_ + "attn.c_attn.bias"].view(3, 4, 4)
        expected[s_ + "attn.c_proj.weight"].view(4, 8, 32)[:, :4, :16] = t[t_ + "attn.c_proj.weight"].view(4, 4, 16)
        expected[s_ + "mlp.c_fc.weight"][:16, :64] = t[t_ + "mlp.c_fc.weight"]
        expected[s_ + "mlp.c_fc.bias"][:64] = t[t_ + "mlp.c_fc.bias"]
        expected[s_ + "mlp.c_proj.weight"][:64, :16] = t[t_ + "mlp.c_proj.weight"]
    for name, value in _snapshot(student).items():
        assert torch.equal(value, expected[name]), name
    assert student.lm_head.weight is student.transformer.wte.weight


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_remap_equal_shapes_reproduces_the_teacher(family):
    if family == "gpt2":
        teacher, student = _perturb(_gpt2(2, 16, 4, seed=0)), _gpt2(2, 16, 4, seed=1)
    else:
        teacher, student = _perturb(_llama(2, 16, 4, 2, 32, seed=0)), _llama(2, 16, 4, 2, 32, seed=1)
    init_student_from_teacher(student, teacher, "remap")
    assert all(torch.equal(p, dict(teacher.named_parameters())[n]) for n, p in student.named_parameters())
    with torch.no_grad():
        assert torch.equal(student(_ids()).logits, teacher(_ids()).logits)


def test_remap_deeper_llama_repeats_the_last_teacher_layer():
    teacher, student = _perturb(_llama(2, 16, 4, 2, 32, seed=0)), _llama(3, 32, 8, 4, 64, seed=1)
    report = init_student_from_teacher(student, teacher, "remap")
    assert report["teacher_layers"] == [0, 1, 1]
    t_q = teacher.model.layers[1].self_attn.q_proj.weight.view(4, 4, 16)
    s_q = student.model.layers[2].self_attn.q_proj.weight.view(8, 4, 32)
    assert torch.equal(s_q[:4, :, :16], t_q)
    assert torch.equal(student.lm_head.weight[:, :16], teacher.lm_head.weight)


def test_remap_experiment_shapes():
    # the experiment's remap pair: teacher width 64, 2 layers -> student width 128, 4 layers (n_head 4 both)
    teacher, student = _gpt2(2, 64, 4, seed=0), _gpt2(4, 128, 4, seed=1)
    report = init_student_from_teacher(student, teacher, "remap")
    assert report["teacher_layers"] == [0, 1, 1, 1] and report["overlap"]["head_dim"] == 16
    c_attn = student.transformer.h[3].attn.c_attn.weight.view(128, 3, 4, 32)
    assert torch.equal(c_attn[:64, :, :, :16], teacher.transformer.h[1].attn.c_attn.weight.view(64, 3, 4, 16))


# ---------------------------------------------------------------------------------------------------------------
# random, seed, training


def test_random_leaves_the_student_and_seed_makes_it_reproducible():
    a, b, teacher = _gpt2(1, 16, 2, seed=1), _gpt2(1, 16, 2, seed=2), _gpt2(1, 32, 4, seed=0)
    before = _snapshot(a)
    assert init_student_from_teacher(a, teacher, "random") == {"method": "random", "seed": None}
    assert all(torch.equal(p, before[n]) for n, p in a.named_parameters())
    rng = torch.random.get_rng_state()
    for method in ("random", "guide"):
        init_student_from_teacher(a, teacher, method, seed=5)
        init_student_from_teacher(b, teacher, method, seed=5)
        assert all(torch.equal(p, dict(b.named_parameters())[n]) for n, p in a.named_parameters()), method
    assert torch.equal(torch.random.get_rng_state(), rng), "the global RNG state is restored"


@pytest.mark.parametrize("method", ["guide", "remap", "random"])
def test_student_trains_after_init(method):
    teacher = _perturb(_gpt2(2, 32, 4, seed=0)) if method == "guide" else _perturb(_gpt2(1, 16, 2, seed=0))
    student = _gpt2(2, 16, 2, seed=1) if method == "guide" else _gpt2(2, 32, 4, seed=1)
    init_student_from_teacher(student, teacher, method)
    student.train()
    opt = torch.optim.AdamW(student.parameters(), lr=1e-3)
    ids = _ids()
    losses = []
    for _ in range(2):
        loss = student(ids, labels=ids).loss
        losses.append(loss.item())
        opt.zero_grad()
        loss.backward()
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in student.parameters())
        opt.step()
    assert all(torch.isfinite(torch.tensor(losses))) and losses[1] < losses[0]


# ---------------------------------------------------------------------------------------------------------------
# errors


def _err_cases():
    g = _gpt2
    return [
        ("method", lambda: (g(1, 16, 2, 1), g(1, 32, 4, 0), {"method": "pca"}), "method"),
        ("blocks", lambda: (g(1, 16, 2, 1), g(1, 32, 4, 0), {"blocks": "some"}), "blocks"),
        ("seed", lambda: (g(1, 16, 2, 1), g(1, 32, 4, 0), {"seed": "1"}), "seed"),
        ("families", lambda: (_llama(1, 16, 4, 2, 32, 1), g(1, 32, 4, 0), {}), "student and teacher"),
        ("vocab", lambda: (g(1, 16, 2, 1, vocab=60), g(1, 32, 4, 0), {}), "student vocab"),
        ("wider", lambda: (g(1, 32, 4, 1), g(1, 16, 4, 0), {}), "student width"),
        ("heads", lambda: (g(1, 16, 4, 1), g(1, 32, 2, 0), {}), "student number of attention heads"),
        ("head_dim", lambda: (g(1, 16, 1, 1), g(1, 32, 4, 0), {}), "student head_dim"),
        ("inner", lambda: (g(1, 16, 2, 1, inner=256), g(1, 32, 4, 0), {}), "student MLP inner size"),
        ("deeper", lambda: (g(3, 16, 2, 1), g(2, 32, 4, 0), {"blocks": "all"}), "student number of layers"),
        ("width>vocab", lambda: (g(1, 64, 2, 1), g(1, 128, 4, 0), {}), "vocabulary size"),
        ("rope guide", lambda: (_llama(1, 16, 4, 4, 32, 1), _llama(1, 32, 4, 4, 64, 0), {}), "student head_dim"),
        ("rope remap", lambda: (_llama(1, 32, 2, 2, 64, 1), _llama(1, 16, 4, 4, 32, 0), {"method": "remap"}),
         "student head_dim"),
        ("groups", lambda: (_llama(1, 16, 4, 1, 32, 1), _llama(1, 32, 8, 8, 64, 0), {}), "student query heads"),
    ]  # fmt: skip


@pytest.mark.parametrize("case", _err_cases(), ids=[c[0] for c in _err_cases()])
def test_bad_arguments_raise_value_errors_naming_them(case):
    _, make, match = case
    student, teacher, kwargs = make()
    before = _snapshot(student)
    with pytest.raises(ValueError, match=match):
        init_student_from_teacher(student, teacher, seed=kwargs.pop("seed", 3), **kwargs)
    assert all(torch.equal(p, before[n]) for n, p in student.named_parameters()), "validated before any change"


def test_same_module_and_unsupported_families():
    model = _gpt2(1, 16, 2, seed=0)
    with pytest.raises(ValueError, match="student is teacher"):
        init_student_from_teacher(model, model)
    with pytest.raises(NotImplementedError, match="GPT-2"):
        init_student_from_teacher(torch.nn.Linear(4, 4), model)
    with pytest.raises(NotImplementedError, match="teacher"):
        init_student_from_teacher(model, torch.nn.Linear(4, 4), "remap")
