"""DistillationLoop fits the habits of TRL, torchtune and Hugging Face users (issue 15): causal LMs are shifted
without being told, a DataLoader is data, feature terms train alone, a checkpoint of another model is one line, a
finished run reports its loss."""

import copy
import importlib.util
import json
import math
import os
import random
import tempfile

import numpy as np
import pytest
import safetensors.torch
import torch
from torch import nn
from torch.utils.data import DataLoader, IterableDataset

import fastdistill
from fastdistill.training import ArrayDataset, DistillationLoop, FeatureTerm, write_teacher_cache
from fastdistill.training import checkpoint as ckpt
from fastdistill.training.data import detect_causal_lm, epoch_batches, is_causal_lm

requires_transformers = pytest.mark.skipif(importlib.util.find_spec("transformers") is None,
                                           reason="transformers is not installed (the hf extra)")  # fmt: skip


def _gpt2(seed=0, n_embd=16, n_layer=1, head="lm"):
    """A tiny GPT-2 of ``transformers`` (no download): a causal LM, or a token classifier with ``head="token"``."""
    from transformers import GPT2Config, GPT2ForTokenClassification, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(n_layer=n_layer, n_head=2, n_embd=n_embd, vocab_size=50, bos_token_id=0, eos_token_id=0,
                     num_labels=50, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)  # fmt: skip
    return (GPT2LMHeadModel if head == "lm" else GPT2ForTokenClassification)(cfg)


def _tokens(n=8, t=6, seed=0):
    ids = torch.randint(0, 50, (n, t), generator=torch.Generator().manual_seed(seed))
    labels = ids.clone()
    labels[:, -1] = -100
    return ArrayDataset(input_ids=ids, labels=labels)


def _data(n=24, d=6, v=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return ArrayDataset(input=torch.randn(n, d, generator=g), labels=torch.randint(0, v, (n,), generator=g))


def _mlp(d=6, h=16, v=5, seed=0, dropout=0.0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d, h), nn.ReLU(), nn.Dropout(dropout), nn.Linear(h, v))


def _sgd(lr=0.1):
    return lambda params: torch.optim.SGD(params, lr=lr)


class TinyLM(nn.Module):
    """A language model that is not a transformers model: its class does not say it is causal."""

    def __init__(self, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.emb, self.out = nn.Embedding(50, 8), nn.Linear(8, 50)

    def forward(self, input_ids):
        return self.out(torch.tanh(self.emb(input_ids)))


# --- 1. causal LMs are shifted by default ------------------------------------------------------------------------


@requires_transformers
def test_detect_causal_lm_as_the_trainer_does():
    lm, token = _gpt2(), _gpt2(head="token")

    class Wrapped(nn.Module):  # DDP / accelerate keep the model in .module
        def __init__(self, m):
            super().__init__()
            self.module = m

    class MyForCausalLM(nn.Module):
        pass

    assert detect_causal_lm(lm) is True and detect_causal_lm(Wrapped(lm)) is True
    assert detect_causal_lm(MyForCausalLM()) is True
    assert detect_causal_lm(token) is False  # a transformers model: its class tells, and says no
    assert detect_causal_lm(TinyLM()) is None and detect_causal_lm(nn.Linear(2, 2)) is None  # it cannot tell
    assert [is_causal_lm(m) for m in (lm, token, TinyLM())] == [True, False, False]


def _llava(vocab=50, width=16, seed=0):
    """A tiny LlavaForConditionalGeneration (Llama text model, CLIP vision tower; no download): a decoder-only
    next-token LM outside transformers' causal-LM classes."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    torch.manual_seed(seed)
    vision = CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                              image_size=8, patch_size=4)  # fmt: skip
    text = LlamaConfig(vocab_size=vocab, hidden_size=width, intermediate_size=2 * width, num_hidden_layers=1,
                       num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32)  # fmt: skip
    return LlavaForConditionalGeneration(LlavaConfig(vision_config=vision, text_config=text,
                                                     image_token_index=vocab - 1))  # fmt: skip


@requires_transformers
def test_a_vision_language_lm_is_not_guessed():
    """LlavaForConditionalGeneration (and Qwen2-VL, PaliGemma, ...) is a next-token LM outside transformers' causal-LM
    mapping: it was taken for a classifier (False) and trained on unshifted labels. Its class does not tell now:
    the loop and the trainer ask for shift_labels; with shift_labels=True the loop's cross-entropy is the model's
    own (shifted) loss. An encoder-decoder model still says False."""
    from transformers import T5Config, T5ForConditionalGeneration

    from fastdistill.integrations.hf import DistillationTrainer

    model = _llava()
    assert detect_causal_lm(model) is None and not is_causal_lm(model)
    t5 = T5ForConditionalGeneration(T5Config(vocab_size=50, d_model=16, d_kv=8, d_ff=32, num_layers=1, num_heads=2))
    assert detect_causal_lm(t5) is False
    ids = torch.randint(0, 49, (4, 8), generator=torch.Generator().manual_seed(0))
    ds = ArrayDataset(input_ids=ids, labels=ids)
    loop = DistillationLoop(copy.deepcopy(model), [], optimizer=_sgd(0.0), batch_size=4, shuffle=False,
                            progress=False)  # fmt: skip
    with pytest.raises(ValueError, match="shift_labels=None: the student's class"):
        loop.fit(ds, max_steps=1)
    loop = DistillationLoop(copy.deepcopy(model), [], optimizer=_sgd(0.0), batch_size=4, shuffle=False,
                            progress=False, shift_labels=True)  # fmt: skip
    with torch.no_grad():
        own = model(input_ids=ids, labels=ids).loss
    assert loop.fit(ds, max_steps=1)["train_loss"] == pytest.approx(own.item(), rel=1e-5)
    from transformers import TrainingArguments

    args = TrainingArguments(output_dir=tempfile.mkdtemp(), use_cpu=True, report_to=[])
    with pytest.raises(ValueError, match="LlavaForConditionalGeneration's class does not tell"):
        DistillationTrainer(model=model, args=args, teachers=[_llava(seed=1)])
    assert DistillationTrainer(model=model, args=args, teachers=[_llava(seed=1)], shift_labels=True).shift_labels


@requires_transformers
def test_gpt2_loop_shifts_labels_without_being_told():
    """A GPT-2 loop with no shift_labels trains next-token prediction: position t against token t+1, as
    DistillationTrainer does; before, it silently trained on the current token."""
    ds, kd = _tokens(), dict(temperature=2.0, ce_weight=0.5)
    student, teacher = _gpt2(seed=0), _gpt2(seed=1)
    loop = DistillationLoop(copy.deepcopy(student), [teacher], loss=fastdistill.KDLoss(**kd), optimizer=_sgd(),
                            batch_size=8, shuffle=False, progress=False, log_every=1)  # fmt: skip
    assert loop.shift_labels is True
    loop.fit(ds, max_steps=1)
    ids, labels = ds.tensors["input_ids"], ds.tensors["labels"]
    with torch.no_grad():
        s, t = student(input_ids=ids).logits, teacher(input_ids=ids).logits
        expected = fastdistill.kd_loss(s[:, :-1], t[:, :-1], labels=labels[:, 1:], **kd)
        unshifted = fastdistill.kd_loss(s, t, labels=labels, **kd)
    assert loop.history[0]["loss"] == pytest.approx(float(expected), rel=1e-5)
    assert float(expected) != pytest.approx(float(unshifted), rel=1e-3)  # the test tells the two apart
    assert loop.history[0]["items"] == float((labels[:, 1:] != -100).sum())
    # evaluation scores the same next-token targets
    with torch.no_grad():
        logits = loop.student(input_ids=ids).logits[:, :-1]
        keep = labels[:, 1:] != -100
        ce = nn.functional.cross_entropy(logits[keep], labels[:, 1:][keep])
    assert loop.evaluate(ds)["loss"] == pytest.approx(float(ce), rel=1e-5)


@requires_transformers
def test_gpt2_loop_hands_the_loss_whole_logits(monkeypatch):
    """The loop's shift cut the logits ([..., :-1, :] slices), which KDLoss copied whole: a [B, T-1, V] buffer per
    model and step. The labels (and sample weights) move now, the last position ignored; the loss is the same (the
    test above)."""
    seen = []
    real = fastdistill.KDLoss.forward

    def spy(self, student, teachers, labels=None, **kw):
        seen.append((student, teachers, labels, kw.get("sample_weight")))
        return real(self, student, teachers, labels, **kw)

    monkeypatch.setattr(fastdistill.KDLoss, "forward", spy)
    tokens = _tokens().tensors
    ds = ArrayDataset(**tokens, sample_weight=torch.rand(tokens["labels"].shape))
    loop = DistillationLoop(_gpt2(seed=0), [_gpt2(seed=1)], loss=fastdistill.KDLoss(temperature=2.0),
                            optimizer=_sgd(), batch_size=8, shuffle=False, progress=False)  # fmt: skip
    loop.fit(ds, max_steps=1)
    s, ts, labels, sw = seen[0]
    assert s.is_contiguous() and all(t.is_contiguous() for t in ts)
    assert torch.equal(labels[:, :-1], ds.tensors["labels"][:, 1:]) and (labels[:, -1] == -100).all()
    assert torch.equal(sw[:, :-1], ds.tensors["sample_weight"][:, 1:]) and (sw[:, -1] == 0).all()
    # evaluate(): float32 copies of a few rows at a time (here one), not of the whole [N, V] logits
    whole = loop.evaluate(ds)
    monkeypatch.setattr(fastdistill.training.loop, "_EVAL_CHUNK_ELEMENTS", 1)
    by_row = loop.evaluate(ds)
    assert by_row["accuracy"] == whole["accuracy"] and by_row["loss"] == pytest.approx(whole["loss"], rel=1e-6)


@requires_transformers
def test_the_label_shift_is_for_losses_that_skip_ignored_positions(monkeypatch):
    """The shift moves the labels for every loss of ours that is 0 at ignored positions (the methods' losses, the
    cross-entropy without teachers), not for a subclass of KDLoss, whose forward may add a term of its own: it gets
    the [..., :-1, :] slices, as before."""
    from fastdistill.methods import WeakTeacherKDLoss

    class WithEntropy(fastdistill.KDLoss):
        def forward(self, s, t, labels=None, **kw):
            seen.append(s.shape)
            return super().forward(s, t, labels, **kw) - 0.01 * (s.softmax(-1) * s.log_softmax(-1)).sum(-1).mean()

    seen = []
    ds = _tokens()
    DistillationLoop(_gpt2(seed=0), [_gpt2(seed=1)], loss=WithEntropy(), optimizer=_sgd(), batch_size=8,
                     shuffle=False, progress=False).fit(ds, max_steps=1)  # fmt: skip
    real = fastdistill.methods.weak_teacher.weak_teacher_kd_loss
    monkeypatch.setattr(fastdistill.methods.weak_teacher, "weak_teacher_kd_loss",
                        lambda s, *a, **kw: seen.append(s.shape) or real(s, *a, **kw))  # fmt: skip
    DistillationLoop(_gpt2(seed=0), [_gpt2(seed=1)], loss=WeakTeacherKDLoss(hard_weight=1.0, soft_weight=1.0),
                     optimizer=_sgd(), batch_size=8, shuffle=False, progress=False).fit(ds, max_steps=1)  # fmt: skip
    assert seen[0][1] == 5 and seen[1][1] == 6  # T = 6: the subclass's logits cut, the method's whole


@requires_transformers
def test_unlabelled_padding_is_left_out_as_the_trainer_does():
    """Pure KD (no labels, ce_weight 0) on right-padded GPT-2 batches: the attention mask leaves the padding out of
    the loss and of the item count, as DistillationTrainer does (before, every position counted, pads included);
    the same loss as labels with -100 at the padding. With ce_weight > 0 or a loss of the user's, no labels are
    made up; a mask that does not line up with the logits is an error naming attention_mask."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 50, (8, 7), generator=g)
    mask = torch.ones_like(ids)
    mask[0, 4:], mask[3, 2:] = 0, 0
    ids = ids.masked_fill(mask == 0, 0)
    kd = dict(temperature=2.0)
    student, teacher = _gpt2(seed=0), _gpt2(seed=1)

    def first_loss(ds, loss=None):
        loop = DistillationLoop(copy.deepcopy(student), [teacher], loss=loss or fastdistill.KDLoss(**kd),
                                optimizer=_sgd(0.0), batch_size=8, shuffle=False, progress=False, log_every=1)
        loop.fit(ds, max_steps=1)
        return loop.history[0]

    got = first_loss(ArrayDataset(input_ids=ids, attention_mask=mask))
    with torch.no_grad():
        s = student(input_ids=ids, attention_mask=mask).logits[:, :-1]
        t = teacher(input_ids=ids, attention_mask=mask).logits[:, :-1]
        keep = mask[:, 1:].bool()
        want = fastdistill.kd_loss(s[keep], t[keep], **kd)
        everything = fastdistill.kd_loss(s, t, **kd)
    assert got["loss"] == pytest.approx(float(want), rel=1e-5) and got["items"] == float(keep.sum())
    assert float(want) != pytest.approx(float(everything), rel=1e-3)  # the padding made a difference
    labelled = first_loss(ArrayDataset(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)))
    assert labelled["loss"] == pytest.approx(got["loss"], rel=1e-6)
    # every loss of ours whose labels only mark rows to skip (its hard-label weight 0) masks the padding too
    from fastdistill.methods import WeakTeacherKDLoss
    for loss in (WeakTeacherKDLoss(hard_weight=0.0, soft_weight=1.0, **kd),
                 fastdistill.CodistillLoss(hard_weight=0.0, **kd)):  # fmt: skip
        assert first_loss(ArrayDataset(input_ids=ids, attention_mask=mask), loss)["items"] == float(keep.sum())
    assert first_loss(ArrayDataset(input_ids=ids, attention_mask=mask),
                      WeakTeacherKDLoss(hard_weight=0.0, soft_weight=1.0, **kd))["loss"] == pytest.approx(
        float(want), rel=1e-5)  # fmt: skip

    def custom(s, t, labels, num_items=None):
        assert labels is None  # a loss of the user's gets no made-up labels
        return fastdistill.kd_loss(s, t, **kd)

    assert first_loss(ArrayDataset(input_ids=ids, attention_mask=mask), custom)["loss"] == pytest.approx(
        float(everything), rel=1e-5)
    with pytest.raises(ValueError, match=r"attention_mask \[8, 6\] does not line up with the positions"):
        first_loss(ArrayDataset(input_ids=ids, attention_mask=mask[:, :6]))


@requires_transformers
def test_other_transformers_models_and_explicit_settings_are_not_shifted():
    token = DistillationLoop(_gpt2(head="token"), [_gpt2(seed=1, head="token")], progress=False)
    assert token.shift_labels is False
    token.fit(_tokens(), max_steps=1)  # per-position labels of a token classifier: no guess needed
    assert DistillationLoop(_gpt2(), shift_labels=False, progress=False).shift_labels is False
    assert DistillationLoop(TinyLM(), shift_labels=True, progress=False).shift_labels is True


def test_a_model_that_does_not_tell_refuses_to_guess_with_sequence_labels():
    """A plain nn.Module with labels [B, T]: next-token targets or token labels? A ValueError naming shift_labels."""
    loop = DistillationLoop(TinyLM(0), [TinyLM(1)], batch_size=4, progress=False)
    assert loop.shift_labels is None
    with pytest.raises(ValueError, match=r"labels \[4, 6\] .*shift_labels=True.*shift_labels=False"):
        loop.fit(_tokens(), max_steps=1)
    assert loop.step == 0
    for shift in (True, False):  # an explicit setting trains
        DistillationLoop(TinyLM(0), [TinyLM(1)], batch_size=4, shift_labels=shift, progress=False).fit(
            _tokens(), max_steps=1)
    # per-item labels [B] (a classifier) and no labels at all need no shift: no error
    DistillationLoop(_mlp(seed=2), [_mlp(seed=1)], batch_size=8, progress=False).fit(_data(), max_steps=1)
    unlabelled = ArrayDataset(input_ids=_tokens().tensors["input_ids"])
    DistillationLoop(TinyLM(0), [TinyLM(1)], batch_size=4, progress=False).fit(unlabelled, max_steps=1)


class LastTokenForCausalLM(nn.Module):
    """A causal LM by its class name whose forward returns one position per item: the last one's logits [B, V]."""

    def __init__(self, seed=0):
        super().__init__()
        self.lm = TinyLM(seed)

    def forward(self, input_ids):
        return self.lm(input_ids)[:, -1]


def _last_token_data(n=8):
    ids = _tokens(n=n).tensors["input_ids"]
    return ArrayDataset(input_ids=ids, labels=torch.randint(0, 50, (n,), generator=torch.Generator().manual_seed(1)))


def test_a_causal_lm_scored_on_one_position_per_item_is_not_shifted_along_the_batch():
    """A detected causal LM with logits [B, V] and labels [B]: item i is scored against label i, not i + 1; in
    training (loss, items) and in evaluate()."""
    ds, student = _last_token_data(), LastTokenForCausalLM(0)
    ids, y = ds.tensors["input_ids"], ds.tensors["labels"]
    loop = DistillationLoop(copy.deepcopy(student), optimizer=_sgd(0.0), batch_size=8, shuffle=False,
                            progress=False, log_every=1)  # fmt: skip
    assert loop.shift_labels is True
    loop.fit(ds, max_steps=1)
    with torch.no_grad():
        logits = student(ids)
    assert loop.history[0]["items"] == 8.0
    assert loop.history[0]["ce"] == pytest.approx(float(nn.functional.cross_entropy(logits, y)), rel=1e-6)
    accuracy = float((logits.argmax(-1) == y).float().mean())
    assert loop.evaluate(ds)["accuracy"] == pytest.approx(accuracy)
    # with a teacher too
    kd = DistillationLoop(LastTokenForCausalLM(0), [LastTokenForCausalLM(1)], batch_size=8, progress=False,
                          log_every=1)  # fmt: skip
    kd.fit(ds, max_steps=1)
    assert kd.history[0]["items"] == 8.0


def test_explicit_shift_labels_with_one_position_per_item_is_an_error():
    loop = DistillationLoop(LastTokenForCausalLM(0), [LastTokenForCausalLM(1)], shift_labels=True, batch_size=8,
                            progress=False)  # fmt: skip
    with pytest.raises(ValueError, match=r"shift_labels=True .*one position per item \(labels \[8\]"):
        loop.fit(_last_token_data(), max_steps=1)
    assert loop.step == 0
    with pytest.raises(ValueError, match=r"shift_labels=True .*logits \[8, 50\]"):
        loop.evaluate(_last_token_data())
    unlabelled = ArrayDataset(input_ids=_tokens().tensors["input_ids"])  # no labels: the logits [B, V] tell
    with pytest.raises(ValueError, match=r"shift_labels=True .*labels None and logits \[8, 50\]"):
        loop.fit(unlabelled, max_steps=1)


def test_per_sequence_weights_with_per_token_labels_name_sample_weight():
    """sample_weight [B] with labels [B, T] (one weight per position, SPEC 1): the error names the shapes given, not
    those after the causal shift."""
    ds = _tokens(n=4)
    weighted = ArrayDataset(**ds.tensors, sample_weight=torch.ones(4))
    loop = DistillationLoop(TinyLM(0), [TinyLM(1)], shift_labels=True, batch_size=4, progress=False)
    with pytest.raises(ValueError, match=r"sample_weight must have shape \[4, 6\] .*got \[4\]"):
        loop.fit(weighted, max_steps=1)


def test_detect_causal_lm_looks_through_peft_wrappers():
    """A LoRA-wrapped causal LM (peft's PeftModel: get_base_model()), also inside DDP's .module, is detected."""

    class PeftLike(nn.Module):
        def __init__(self, m):
            super().__init__()
            self.base_model = m

        def get_base_model(self):
            return self.base_model

    class Wrapped(nn.Module):
        def __init__(self, m):
            super().__init__()
            self.module = m

    lm = LastTokenForCausalLM()
    assert detect_causal_lm(PeftLike(lm)) is True and detect_causal_lm(Wrapped(PeftLike(lm))) is True
    assert DistillationLoop(PeftLike(lm), progress=False).shift_labels is True
    assert detect_causal_lm(PeftLike(TinyLM())) is None


# --- 2. a DataLoader, or any iterable of batches, is data ---------------------------------------------------------


def _loop(out_dir=None, model_seed=2, **kw):
    torch.manual_seed(1234)
    kw = dict(optimizer=lambda p: torch.optim.AdamW(p, lr=1e-2), batch_size=4, seed=7, progress=False,
              log_every=1, output_dir=out_dir, **kw)  # fmt: skip
    return DistillationLoop(_mlp(seed=model_seed, dropout=0.3), [_mlp(h=32, seed=1)],
                            loss=fastdistill.KDLoss(temperature=2.0, ce_weight=0.2), **kw)  # fmt: skip


def test_fit_iterates_a_dataloader_as_built():
    """fit(DataLoader(...)) trains on the loader's batches: in order, batch size 4, the same steps as the loop's own
    batching of the dataset in order."""
    ds = _data(n=16)
    own = _loop(shuffle=False)
    own.fit(ds, max_steps=6)
    loader = _loop()
    out = loader.fit(DataLoader(ds, batch_size=4), max_steps=6)  # was: 'DataLoader' object is not subscriptable
    assert out["step"] == 6 and out["epoch"] == pytest.approx(1.5)
    for p, q in zip(own.student.parameters(), loader.student.parameters()):
        assert torch.equal(p, q)
    assert loader.evaluate(DataLoader(ds, batch_size=5)) == pytest.approx(loader.evaluate(ds))
    # epochs count the loader's batches
    assert _loop().fit(DataLoader(ds, batch_size=4), epochs=2)["step"] == 8


class Batches:
    """An iterable of batches without len that restarts (as a streaming source does)."""

    def __init__(self, batches):
        self.batches = batches

    def __iter__(self):
        return iter(self.batches)


def test_a_second_fit_counts_max_steps_from_the_run_start():
    """max_steps is the run's step count: a second fit(max_steps=n) with n <= the loop's step trains nothing, and
    says so; a larger n trains on to it."""
    ds = _data(n=16)
    loop = _loop()
    loop.fit(ds, max_steps=3)
    before = [p.detach().clone() for p in loop.student.parameters()]
    with pytest.warns(UserWarning, match=r"at step 3 .* steps end at 3 .*nothing is trained; give max_steps > 3"):
        assert loop.fit(ds, max_steps=3)["step"] == 3
    assert all(torch.equal(p, q) for p, q in zip(before, loop.student.parameters()))
    assert loop.fit(ds, max_steps=5)["step"] == 5


def test_fit_takes_an_iterable_or_a_generator_of_batches():
    ds = _data(n=16)
    batches = [torch.utils.data.default_collate(ds.__getitems__(list(range(i, i + 4)))) for i in range(0, 16, 4)]
    ref = _loop(shuffle=False)
    ref.fit(ds, max_steps=4)
    stream = _loop()
    stream.fit(Batches(batches), max_steps=4)
    for p, q in zip(ref.student.parameters(), stream.student.parameters()):
        assert torch.equal(p, q)
    assert _loop().fit(Batches(batches), max_steps=6)["step"] == 6  # a second epoch when the first ends
    # a generator has one pass: training stops where it runs out, logged and reported, with a warning
    gen = _loop()
    with pytest.warns(UserWarning, match="train_data ran out at step 4 of 10"):
        out = gen.fit((b for b in batches), max_steps=10)
    assert out["step"] == 4 and out["train_loss"] == gen.history[-1]["loss"]
    for p, q in zip(ref.student.parameters(), gen.student.parameters()):
        assert torch.equal(p, q)
    with pytest.raises(ValueError, match="epochs needs the number of batches .* has no len"):
        _loop().fit((b for b in batches), epochs=1)
    # fit() ends its own iterator when it returns, not the caller's generator: the rest is still there
    rest = (b for b in batches)
    _loop().fit(rest, max_steps=2)
    assert torch.equal(next(rest)["input"], batches[2]["input"])


def test_dataloader_resume_is_exact(tmp_path):
    """A shuffling DataLoader (no generator of its own) and dropout: 2N steps in one go == N steps, a checkpoint,
    fresh objects with scrambled RNGs, N more. The loader's order is drawn from (seed, epoch), so the resumed run
    draws the same epoch and skips what it trained on."""
    ds, n = _data(n=22), 5  # 6 batches per epoch: the checkpoint falls inside epoch 0, the run ends in epoch 1

    def loader():
        return DataLoader(ds, batch_size=4, shuffle=True)

    whole = _loop(tmp_path / "whole")
    whole.fit(loader(), max_steps=2 * n)
    _loop(tmp_path / "run").fit(loader(), max_steps=n, checkpoint_every=n)
    torch.manual_seed(99), random.seed(99)
    resumed = _loop(tmp_path / "run", model_seed=5)
    resumed.fit(loader(), max_steps=2 * n, resume_from="latest")
    for p, q in zip(whole.student.parameters(), resumed.student.parameters()):
        assert torch.equal(p, q)
    assert [h["loss"] for h in whole.history[n:]] == [h["loss"] for h in resumed.history]
    # and the loader still shuffles: another order in each epoch
    orders = []
    probe = DataLoader(ArrayDataset(input=torch.arange(8.0)), batch_size=8, shuffle=True)
    for epoch in (0, 1):
        orders.append(next(epoch_batches(probe, seed=7, epoch=epoch))["input"].tolist())
    assert orders[0] != orders[1] and sorted(orders[0]) == sorted(orders[1])


class _Noisy(torch.utils.data.Dataset):
    """Random augmentation drawn in ``__getitem__`` from torch's global RNG (a torchvision transform does this),
    numpy's or python's: item i is ``{"input": x_i + 0.1 * noise [6], "labels": y_i}``."""

    def __init__(self, n: int, source: str = "torch") -> None:
        self.base, self.source = _data(n=n), source

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        item = self.base[i]
        if self.source == "torch":
            noise = torch.randn(6)
        else:
            draws = np.random.standard_normal(6) if self.source == "numpy" else [random.gauss(0, 1) for _ in range(6)]
            noise = torch.tensor(draws, dtype=torch.float32)
        return {"input": item["input"] + 0.1 * noise, "labels": item["labels"]}


@pytest.mark.parametrize("shuffle,source", [(False, "torch"), (True, "torch"), (True, "numpy"), (True, "python")])
def test_dataloader_resume_is_exact_with_random_augmentation(tmp_path, shuffle, source):
    """A DataLoader (no workers) over a dataset that draws random noise when it loads an item: a run resumed from
    step k (inside an epoch, at its first batch, at an epoch boundary) draws the same noise for the same batches as
    the run that never stopped, so the weights are bit-identical. (Batch k was loaded with the (seed, epoch) RNG.)
    numpy's and python's RNGs advanced a second time while the resumed run skipped the batches it had trained on."""
    ds, total = _Noisy(n=16, source=source), 10  # 4 batches per epoch: steps 4 and 8 end an epoch

    def loader():
        return DataLoader(ds, batch_size=4, shuffle=shuffle)

    whole = _loop(tmp_path / "whole")
    whole.fit(loader(), max_steps=total, checkpoint_every=1)
    for k in (1, 3, 4, 6):
        torch.manual_seed(99), random.seed(99)
        resumed = _loop(tmp_path / f"from{k}", model_seed=5)
        resumed.fit(loader(), max_steps=total, resume_from=tmp_path / "whole" / "checkpoints" / f"step-{k:08d}")
        for p, q in zip(whole.student.parameters(), resumed.student.parameters()):
            assert torch.equal(p, q), f"resumed from step {k}"
        assert [h["loss"] for h in resumed.history] == [h["loss"] for h in whole.history[k:]], k


def test_persistent_workers_resume_is_exact_and_fit_ends_its_workers(tmp_path):
    """DataLoader(shuffle=True, num_workers=2, persistent_workers=True): a first iter() draws the workers' base seed
    before the sampler's order, a later iter() of the same workers does not; so epoch 1 of the run that never
    stopped had another order than epoch 1 of a resumed run. And fit() left its last epoch's workers running."""
    import multiprocessing

    ds, n = _data(n=16), 6  # 4 batches per epoch: the checkpoint falls inside epoch 1

    def loader():
        return DataLoader(ds, batch_size=4, shuffle=True, num_workers=2, persistent_workers=True)

    whole = _loop(tmp_path / "whole")
    whole.fit(loader(), max_steps=2 * n)
    _loop(tmp_path / "run").fit(loader(), max_steps=n, checkpoint_every=n)
    resumed = _loop(tmp_path / "run", model_seed=5)
    resumed.fit(loader(), max_steps=2 * n, resume_from="latest")
    assert [h["loss"] for h in whole.history[n:]] == [h["loss"] for h in resumed.history]
    for p, q in zip(whole.student.parameters(), resumed.student.parameters()):
        assert torch.equal(p, q)

    del whole, resumed
    _loop().fit(DataLoader(ds, batch_size=4, shuffle=True, num_workers=2), max_steps=5)  # stops inside epoch 1
    assert not multiprocessing.active_children()


def test_data_that_is_not_data_is_a_clear_error(tmp_path):
    class Items(IterableDataset):
        def __iter__(self):
            return iter(_data(n=4))

    with pytest.raises(TypeError, match="expected a map-style dataset .*DataLoader or an iterable of batches, got int"):
        _loop().fit(42, max_steps=1)
    with pytest.raises(TypeError, match="Items is an IterableDataset: it yields items, not batches; wrap it"):
        _loop().fit(Items(), max_steps=1)
    assert _loop().fit(DataLoader(Items(), batch_size=2), max_steps=2)["step"] == 2
    with pytest.raises(ValueError, match="train_data yields no batch"):
        _loop().fit(iter([]), max_steps=1)
    # a teacher cache is read by item index, which a DataLoader's batches do not carry
    ds = _data(n=8)
    cache = write_teacher_cache(tmp_path / "c.safetensors", [_mlp(seed=1)], ds)
    loop = DistillationLoop(_mlp(seed=2), teacher_cache=cache, progress=False)
    with pytest.raises(ValueError, match="teacher_cache is read by dataset index"):
        loop.fit(DataLoader(ds, batch_size=4), max_steps=1)


# --- 3. feature terms alone ---------------------------------------------------------------------------------------


class Encoder(nn.Module):
    """A model whose output holds no logits (a dict of hidden states)."""

    def __init__(self, width, seed):
        super().__init__()
        torch.manual_seed(seed)
        self.body = nn.Linear(6, width)

    def forward(self, input):
        return {"hidden": torch.tanh(self.body(input))}


def test_feature_terms_train_alone_with_loss_none():
    """loss=None: the feature term is the whole loss (no KDLoss added, no logits looked for in the outputs)."""
    ds = _data(n=8)
    x = ds.tensors["input"]
    student, teacher = Encoder(8, seed=2), Encoder(8, seed=1)
    term = FeatureTerm("body", "body", nn.MSELoss(), weight=0.5)
    loop = DistillationLoop(copy.deepcopy(student), [teacher], loss=None, feature_terms=[term], optimizer=_sgd(),
                            batch_size=8, progress=False, log_every=1)  # fmt: skip
    loop.fit(ds, max_steps=1)
    with torch.no_grad():
        mse = nn.functional.mse_loss(student.body(x), teacher.body(x))
    rec = loop.history[0]
    assert "kd" not in rec and rec["feature/body"] == pytest.approx(float(mse), rel=1e-6)
    assert rec["loss"] == pytest.approx(0.5 * float(mse), rel=1e-6)
    assert not torch.equal(loop.student.body.weight, student.body.weight)  # trained


def test_nothing_to_train_is_a_clear_error():
    with pytest.raises(ValueError, match="nothing to train: loss=None .* no feature_terms"):
        DistillationLoop(_mlp(), [_mlp(seed=1)], loss=None)
    with pytest.raises(ValueError, match="loss must be a callable, 'kd'"):
        DistillationLoop(_mlp(), [_mlp(seed=1)], loss="kl")


# --- 4. a checkpoint of another model: one line ---------------------------------------------------------------------


@requires_transformers
@pytest.mark.parametrize("change, needle", [
    (dict(n_embd=32), "size mismatch for transformer.wpe.weight: [1024, 16] in the file, [1024, 32] in the model "
                      "(and 15 more keys)"),
    (dict(n_layer=2), "12 missing keys [transformer.h.1.ln_1.weight, transformer.h.1.ln_1.bias, "
                      "transformer.h.1.attn.c_attn.weight, ...]"),
])  # fmt: skip
def test_resume_with_another_model_names_the_mismatch_in_one_line(tmp_path, change, needle):
    """The snippet re-run with the same output_dir after the model changed: one line naming the module, the file and
    what differs, and nothing of this loop restored (before: kilobytes of state_dict keys)."""
    ds = _tokens()
    DistillationLoop(_gpt2(), [_gpt2(seed=1)], batch_size=4, output_dir=tmp_path, progress=False).fit(
        ds, max_steps=2, checkpoint_every=2)
    loop = DistillationLoop(_gpt2(**change), [_gpt2(seed=1)], batch_size=4, output_dir=tmp_path, progress=False)
    before = copy.deepcopy(loop.student.state_dict())
    with pytest.raises(ValueError) as e:
        loop.fit(ds, max_steps=4, resume_from="latest")
    msg = str(e.value)
    path = tmp_path / "checkpoints" / "step-00000002" / "student.safetensors"
    assert msg.startswith(f"{path} does not fit the student (GPT2LMHeadModel): ") and needle in msg, msg
    assert "\n" not in msg and len(msg) < 400
    assert loop.step == 0 and all(torch.equal(v, loop.student.state_dict()[k]) for k, v in before.items())


def test_resume_from_a_run_set_up_otherwise_says_so_not_damaged(tmp_path):
    """A checkpoint lists the files it was written with (state.json): one of a run without a scheduler is intact,
    not "damaged" because this run's scheduler files are absent; resuming from it names what differs, in one line.
    A file it lists that is missing is still damage."""
    ds = _data(n=16)
    _loop(tmp_path).fit(ds, max_steps=2, checkpoint_every=2)
    step = tmp_path / "checkpoints" / "step-00000002"
    expected = [*_loop(tmp_path)._checkpointer.files(), "scheduler.json"]  # a run with a scheduler
    assert ckpt.find_latest(tmp_path / "checkpoints", expected) == step  # intact: no warning, found
    with_scheduler = _loop(tmp_path, scheduler=lambda opt, total: torch.optim.lr_scheduler.LinearLR(opt))
    with pytest.raises(ValueError) as e:
        with_scheduler.fit(ds, max_steps=4, resume_from="latest")
    msg = str(e.value)
    assert msg.startswith(f"checkpoint {step} is of a run set up otherwise (it has no [scheduler.json, "
                          "scheduler.safetensors]"), msg  # fmt: skip
    assert "\n" not in msg and with_scheduler.step == 0
    (step / "optimizer.json").unlink()
    with pytest.warns(UserWarning, match="skipping damaged checkpoint"), pytest.raises(
            ValueError, match=r"no intact checkpoint .*optimizer.json is missing"):  # fmt: skip
        _loop(tmp_path).fit(ds, max_steps=4, resume_from="latest")


def test_unexpected_keys_are_counted(tmp_path):
    small, big = _mlp(), nn.Sequential(*_mlp(), nn.Linear(5, 5), nn.Linear(5, 5))
    safetensors.torch.save_model(big, str(tmp_path / "m.safetensors"))
    with pytest.raises(ValueError, match=r"does not fit the student \(Sequential\): 4 unexpected keys "
                                         r"\[4.bias, 4.weight, 5.bias, \.\.\.\]$"):  # fmt: skip
        ckpt.load_model(small, tmp_path / "m.safetensors", name="student")


# --- 5. a finished run reports its loss ----------------------------------------------------------------------------


def test_resuming_a_finished_run_reports_its_last_loss(tmp_path):
    """A run resumed from its last step's checkpoint runs nothing and returns what the finished run returned: its
    last training loss and its final evaluation (computed again, not logged twice)."""
    ds = _data(n=16)
    first = _loop(tmp_path).fit(ds, max_steps=4, checkpoint_every=2, eval_data=ds)
    logged = (tmp_path / "metrics.jsonl").read_text()
    again = _loop(tmp_path).fit(ds, max_steps=4, resume_from="latest", eval_data=ds)  # nothing left to do
    assert again == first and "loss" in again and "accuracy" in again
    assert (tmp_path / "metrics.jsonl").read_text() == logged
    again = _loop(tmp_path).fit(ds, max_steps=4, resume_from="latest")  # no evaluation asked for
    assert again["step"] == 4 and again["train_loss"] == first["train_loss"] and "accuracy" not in again
    assert not math.isnan(again["train_loss"])
    # a checkpoint of an older version has no train_loss: None, not NaN
    state = tmp_path / "checkpoints" / "step-00000004" / "state.json"
    raw = json.loads(state.read_text())
    del raw["train_loss"]
    state.write_text(json.dumps(raw))
    assert _loop(tmp_path).fit(ds, max_steps=4, resume_from="latest")["train_loss"] is None


@requires_transformers
def test_fused_linear_loss_runs_under_the_loops_autocast(monkeypatch):
    """The fused loss's head matmuls run under the loop's autocast, as the student's lm_head does in the logits path
    (they once ran outside it: float32 matmuls of a float32 head). The loop autocasts on CUDA only; here its
    autocast is a CPU bf16 one (tests/test_fused_linear_gpu.py runs the CUDA case)."""
    from fastdistill.training import loop as loop_module

    seen, real = [], loop_module.fused_linear_kd_loss

    def spy(*args, **kwargs):
        seen.append(torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else torch.float32)
        return real(*args, **kwargs)

    monkeypatch.setattr(loop_module, "fused_linear_kd_loss", spy)
    loop = DistillationLoop(_gpt2(), [_gpt2(seed=1)], batch_size=4, progress=False, fused_linear=True)
    monkeypatch.setattr(loop, "_autocast", lambda: torch.autocast("cpu", dtype=torch.bfloat16))
    loop.fit(_tokens(), max_steps=1)
    assert seen and set(seen) == {torch.bfloat16}, seen


@requires_transformers
def test_fused_linear_loop_takes_the_steps_of_the_logits_loop():
    """fused_linear=True trains on hidden states and heads (the logits never whole): the same losses and the same
    student after two SGD steps as the plain loop, from live teachers and from a teacher cache."""
    ds, kd = _tokens(), dict(temperature=2.0, ce_weight=0.3, divergence="jsd")
    student, teacher = _gpt2(seed=0), _gpt2(seed=1, n_embd=24)
    runs = {}
    for fused in (False, True):
        loop = DistillationLoop(copy.deepcopy(student), [teacher], loss=fastdistill.KDLoss(**kd), optimizer=_sgd(),
                                batch_size=4, shuffle=False, progress=False, log_every=1, fused_linear=fused)
        loop.fit(ds, max_steps=2)
        runs[fused] = ([h["loss"] for h in loop.history if h["split"] == "train"],
                       [p.detach().clone() for p in loop.student.parameters()])  # fmt: skip
    assert runs[True][0] == pytest.approx(runs[False][0], rel=1e-5)
    for a, b in zip(runs[True][1], runs[False][1]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    with tempfile.TemporaryDirectory() as d:
        cache = write_teacher_cache(os.path.join(d, "t.safetensors"), [teacher],
                                    ArrayDataset(input_ids=ds.tensors["input_ids"]))  # fmt: skip
        loop = DistillationLoop(copy.deepcopy(student), loss=fastdistill.KDLoss(**kd), optimizer=_sgd(), batch_size=4,
                                shuffle=False, progress=False, log_every=1, teacher_cache=cache, fused_linear=True)
        loop.fit(ds, max_steps=2)
        assert [h["loss"] for h in loop.history if h["split"] == "train"] == pytest.approx(runs[False][0], rel=1e-4)
    with pytest.raises(ValueError, match="fused_linear: student has no linear output head"):
        DistillationLoop(_mlp(), [_mlp(seed=1)], fused_linear=True)
    with pytest.raises(ValueError, match="not with train_teachers"):
        DistillationLoop(_gpt2(), [_gpt2(seed=1)], fused_linear=True, train_teachers=True)
