"""fused_linear=True with real peft (LoRA) models: the student's and the teachers' output heads read as peft's forward
computes them (a plain head under LoRA elsewhere, a ``modules_to_save`` copy, LoRA on ``lm_head`` itself: merged,
unmerged, disabled, two adapters at once), held to the logits path's loss and gradients, in ``DistillationTrainer``
and ``DistillationLoop``; what no single weight can express (DoRA, LoRA dropout on the head) refused by name.

The adapters' B matrices (zero at peft's initialisation) and the ``modules_to_save`` copies are perturbed first, so
an adapter left out or the wrong copy read changes the numbers.
"""

from __future__ import annotations

import copy

import pytest
import torch

import fastdistill

peft = pytest.importorskip("peft")  # a [test] dependency: skipped only outside the test install
transformers = pytest.importorskip("transformers")

from fastdistill.integrations.hf import DistillationTrainer, _on_device  # noqa: E402
from fastdistill.training.data import ArrayDataset  # noqa: E402
from fastdistill.training.loop import DistillationLoop  # noqa: E402

VOCAB = 40
KD = dict(temperature=2.0, ce_weight=0.3, divergence="jsd", ensemble="logit_mean")


def _llama(seed: int, width: int = 16) -> torch.nn.Module:
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(hidden_size=width, intermediate_size=2 * width, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=1, vocab_size=VOCAB,
                                   max_position_embeddings=32)  # fmt: skip
    return transformers.LlamaForCausalLM(cfg)


def _gpt2(seed: int, width: int = 16) -> torch.nn.Module:  # lm_head tied to the token embeddings
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(n_layer=1, n_embd=width, n_head=2, vocab_size=VOCAB, n_positions=32, bos_token_id=0,
                                  eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)  # fmt: skip
    return transformers.GPT2LMHeadModel(cfg)


def _perturbed(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Every LoRA B (zero at initialisation) and every modules_to_save copy made to differ from the base model."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name or "modules_to_save" in name:
                p.add_(0.3 * torch.randn(p.shape, generator=g))
    return model


def _lora(model: torch.nn.Module, head: str, seed: int, attn: tuple[str, ...] = ("q_proj", "v_proj")):
    """``model`` with a LoRA adapter "default" on ``attn`` and, by ``head``: "plain" (lm_head untouched),
    "modules_to_save" (a trainable copy of lm_head), "lora" (LoRA on lm_head, with lora_bias), "two" (LoRA on
    lm_head, two adapters active at once)."""
    kw = dict(r=4, lora_alpha=8, lora_dropout=0.0)
    if head == "plain":
        cfg = peft.LoraConfig(target_modules=list(attn), **kw)
    elif head == "modules_to_save":
        cfg = peft.LoraConfig(target_modules=list(attn), modules_to_save=["lm_head"], **kw)
    else:
        cfg = peft.LoraConfig(target_modules=[*attn, "lm_head"], lora_bias=head == "lora", **kw)
    wrapped = peft.get_peft_model(model, cfg)
    if head == "two":
        wrapped.add_adapter("second", peft.LoraConfig(target_modules=["lm_head"], r=2, lora_alpha=4, use_rslora=True))
        wrapped.base_model.set_adapter(["default", "second"])
    return _perturbed(wrapped, seed)


def _batch(b: int = 3, t: int = 9, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (b, t), generator=g)
    mask = torch.ones(b, t, dtype=torch.long)
    mask[0, 6:] = 0
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}


def _args(tmp_path):
    return transformers.TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[], save_strategy="no")


def _trainer_step(student, teachers, tmp_path, fused: bool):
    """The trainer's loss on one batch and the student's gradients (none when no trainable parameter took part)."""
    trainer = DistillationTrainer(model=student, args=_args(tmp_path), teachers=teachers, fused_linear=fused, **KD)
    student.train()
    student.zero_grad()
    loss = trainer.compute_loss(student, _batch(), num_items_in_batch=torch.tensor(20))
    if loss.requires_grad:
        loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in student.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("head", ["plain", "modules_to_save", "lora", "two", "gpt2"])
def test_trainer_fused_linear_reads_peft_heads_as_their_forward(tmp_path, head):
    """The fused loss and the student's gradients (adapters, head copy) are the logits path's, for a LoRA student and
    a LoRA teacher whose heads are adapted the same way (the teacher's under no_grad); "gpt2": LoRA on a head tied
    to the embeddings (GPT-2's Conv1D attention adapted too)."""
    if head == "gpt2":
        student = _lora(_gpt2(0), "lora", seed=10, attn=("c_attn",))
        teachers = [_lora(_gpt2(1, width=24), "lora", seed=11, attn=("c_attn",)), _gpt2(2)]
    else:
        student = _lora(_llama(0), head, seed=10)
        teachers = [_lora(_llama(1, width=24), head, seed=11), _llama(2)]
    plain = _trainer_step(student, teachers, tmp_path / "p", fused=False)
    fused = _trainer_step(student, teachers, tmp_path / "f", fused=True)
    torch.testing.assert_close(fused[0], plain[0], rtol=1e-5, atol=1e-6)
    assert fused[1].keys() == plain[1].keys()
    want = {"plain": "q_proj", "modules_to_save": "lm_head.modules_to_save.default", "lora": "lm_head.lora_B.default",
            "two": "lm_head.lora_A.second", "gpt2": "lm_head.lora_B.default"}[head]  # fmt: skip
    assert any(want in name for name in plain[1])  # the head's own trainable parameters get gradients
    for name in plain[1]:
        torch.testing.assert_close(fused[1][name], plain[1][name], rtol=1e-4, atol=1e-6, msg=name)


def test_merged_and_disabled_lora_heads(tmp_path):
    """Merged adapters (in the base weight) and disabled adapters (the base model alone, a merged one unmerged by
    peft's forward): the fused loss follows the logits path in each state. (Llama: a head tied to the embeddings, as
    GPT-2's, would carry a merged head adapter into the input embeddings too.)"""
    student = _lora(_llama(0), "two", seed=3)  # (lora_bias: no merge into a bias-free head)
    teachers = [_llama(1, width=24)]
    plain = _trainer_step(student, teachers, tmp_path / "p", fused=False)
    student.base_model.merge_adapter()  # every adapter in its base weight, none trained while merged
    merged = _trainer_step(student, teachers, tmp_path / "m", fused=True)
    torch.testing.assert_close(merged[0], plain[0], rtol=1e-5, atol=1e-6)
    assert merged[1] == {}
    with student.disable_adapter():
        off_plain = _trainer_step(student, teachers, tmp_path / "op", fused=False)
        off_fused = _trainer_step(student, teachers, tmp_path / "of", fused=True)
    assert not torch.allclose(off_plain[0], plain[0])  # disabling changed the loss
    torch.testing.assert_close(off_fused[0], off_plain[0], rtol=1e-5, atol=1e-6)


def test_loop_fused_linear_trains_a_lora_head_as_the_logits_loop(monkeypatch):
    """DistillationLoop(fused_linear=True) with LoRA on the student's lm_head: the same losses and adapters after two
    SGD steps as the plain loop, with the adapters' gradients formed chunk by chunk: no [V, H] weight W + s B A and
    no [V, H] gradient buffer (the base head is frozen)."""
    from fastdistill import fused_linear
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, VOCAB, (8, 9), generator=g)
    ds = ArrayDataset(input_ids=ids, labels=ids)
    student, teacher = _lora(_llama(0), "lora", seed=4), _llama(1, width=24)
    runs = {}
    for fused in (False, True):
        s = copy.deepcopy(student)
        if fused:
            monkeypatch.setattr(fused_linear, "_HeadGrad", None)  # raises if a [V, H] gradient were built
            head, _ = fused_linear.hidden_and_head(s, {"input_ids": ids[:2]})
            assert head.weight is s.get_base_model().lm_head.base_layer.weight and len(head.lora) == 1
        loop = DistillationLoop(s, [teacher], loss=fastdistill.KDLoss(**KD), batch_size=4, shuffle=False,
                                optimizer=lambda p: torch.optim.SGD(p, 0.5), progress=False, log_every=1,
                                fused_linear=fused)  # fmt: skip
        loop.fit(ds, max_steps=2)
        runs[fused] = ([h["loss"] for h in loop.history if h["split"] == "train"],
                       {n: p.detach().clone() for n, p in s.named_parameters() if p.requires_grad})  # fmt: skip
    assert runs[True][0] == pytest.approx(runs[False][0], rel=1e-5)
    assert any("lm_head.lora_A" in n for n in runs[True][1])
    for name, p in runs[False][1].items():
        assert not torch.equal(p, dict(student.named_parameters())[name]), name  # the step moved it
        torch.testing.assert_close(runs[True][1][name], p, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("what", ["dora", "dropout"])
def test_heads_no_weight_can_express_are_refused_by_name(tmp_path, what):
    """DoRA (a per-column norm of the adapted weight) and LoRA dropout on lm_head (a random mask per row) are no
    single linear map: refused when the trainer / loop is built, naming the model and the cure."""
    kw = {"use_dora": True} if what == "dora" else {"lora_dropout": 0.1}
    student = peft.get_peft_model(_llama(0), peft.LoraConfig(target_modules=["q_proj", "lm_head"], **kw))
    match = "a LoRA variant" if what == "dora" else "LoRA dropout"
    with pytest.raises(ValueError, match=rf"fused_linear: model \(LlamaForCausalLM inside PeftModel\)'s output head "
                                         rf"has {match}"):  # fmt: skip
        DistillationTrainer(model=student, args=_args(tmp_path), teachers=[_llama(1)], fused_linear=True, **KD)
    with pytest.raises(ValueError, match=rf"fused_linear: student .*'s output head has {match}"):
        DistillationLoop(student, [_llama(1)], fused_linear=True)
    peft.get_peft_model(_llama(0), peft.LoraConfig(target_modules=["q_proj"], **kw))  # elsewhere: no matter
    DistillationTrainer(model=peft.get_peft_model(_llama(3), peft.LoraConfig(target_modules=["q_proj"], **kw)),
                        args=_args(tmp_path), teachers=[_llama(1)], fused_linear=True, **KD)  # fmt: skip


def test_a_head_tensor_formed_per_call_is_not_cached_by_id():
    """A device_map teacher's LoRA head: its bias with the adapters' biases folded in is a new tensor on every call,
    copied every time (a cached copy found by a freed tensor's id could be a stale one); its frozen weight and the
    adapters' a and b (parameters) are copied once."""
    from fastdistill import LoRATerm, TeacherHead

    cache: dict = {}
    weight = torch.nn.Parameter(torch.randn(VOCAB, 8), requires_grad=False)
    a, b = (torch.nn.Parameter(torch.randn(*shape), requires_grad=False) for shape in ((2, 8), (VOCAB, 2)))
    for step in range(3):
        bias = torch.full((VOCAB,), float(step))  # formed per call, like _head_bias' bias + s (B a_bias + b_bias)
        moved = _on_device(TeacherHead(torch.randn(2, 3, 8), weight, bias, (LoRATerm(a, b, 2.0),)),
                           torch.device("meta"), cache)  # fmt: skip
        assert moved.bias.device.type == "meta" and moved.weight is cache[id(weight)]
        assert moved.lora[0].a is cache[id(a)] and moved.lora[0].b is cache[id(b)] and moved.lora[0].scaling == 2.0
    assert sorted(cache) == sorted(map(id, (weight, a, b)))
