"""DistillationTrainer against hand-computed kd_loss, on tiny models built from configs (nothing downloaded)."""

import copy
import inspect
import json
import math

import pytest
import torch
from conftest import PeftLike

import fastdistill

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from transformers import (  # noqa: E402
    BertConfig,
    BertForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
    HfArgumentParser,
    TrainingArguments,
)

from fastdistill.integrations.hf import (  # noqa: E402
    KD_DEFAULTS,
    DistillationArguments,
    DistillationTrainer,
)
from fastdistill.training.data import is_causal_lm  # noqa: E402

VOCAB = 40
KD = dict(temperature=2.0, ce_weight=0.3, divergence="jsd", ensemble="logit_mean")


def _gpt2(layers, width, seed):
    torch.manual_seed(seed)
    cfg = GPT2Config(n_layer=layers, n_embd=width, n_head=2, vocab_size=VOCAB, n_positions=32, bos_token_id=0,
                     eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)  # fmt: skip
    return GPT2LMHeadModel(cfg)


def _bert(width, seed):
    torch.manual_seed(seed)
    cfg = BertConfig(num_hidden_layers=2, hidden_size=width, num_attention_heads=2, intermediate_size=2 * width,
                     vocab_size=VOCAB, num_labels=3, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return BertForSequenceClassification(cfg)


def _lm_batch(b=3, t=9, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (b, t), generator=g)
    mask = torch.ones(b, t, dtype=torch.long)
    mask[0, 6:] = 0  # right padding
    mask[2, 4:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


BASE_ARGS = dict(use_cpu=True, report_to=[], save_strategy="no", max_grad_norm=0.0, lr_scheduler_type="constant",
                 disable_tqdm=True, logging_steps=1)  # fmt: skip


def _args(tmp_path, cls=TrainingArguments, **kw):
    return cls(**{"output_dir": str(tmp_path), **BASE_ARGS, **kw})


def _hand_lm(student, teachers, batch, **extra):
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    s = student(input_ids=ids, attention_mask=mask).logits[:, :-1]
    with torch.no_grad():
        ts = [t(input_ids=ids, attention_mask=mask).logits[:, :-1] for t in teachers]
    return fastdistill.kd_loss(s, ts, labels=labels[:, 1:], **KD, **extra)


def test_causal_lm_compute_loss_shifts_and_ignores_padding(tmp_path):
    student, teachers = _gpt2(1, 16, 0), [_gpt2(2, 32, 1), _gpt2(2, 32, 2)]
    assert is_causal_lm(student)
    trainer = DistillationTrainer(model=student, args=_args(tmp_path), teachers=teachers, **KD)
    batch = _lm_batch()
    student.eval()  # the same numbers in train and eval mode (no dropout); eval ignores num_items_in_batch
    got = trainer.compute_loss(student, dict(batch))
    torch.testing.assert_close(got, _hand_lm(student, teachers, batch), rtol=1e-5, atol=1e-6)
    # num_items_in_batch: the sum over this batch's items divided by the count of the whole accumulated step
    student.train()
    got = trainer.compute_loss(student, dict(batch), num_items_in_batch=torch.tensor(50))
    expected = _hand_lm(student, teachers, batch, reduction="sum") / 50
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    # and the count that Trainer hands in is over the shifted labels, all micro-batches of the step
    b2 = _lm_batch(seed=1)
    _, n = trainer.get_batch_samples(iter([batch, b2]), 2, torch.device("cpu"))
    assert int(n) == int((batch["labels"][:, 1:] != -100).sum() + (b2["labels"][:, 1:] != -100).sum())


def test_causal_lm_loss_reads_whole_logits(tmp_path, monkeypatch):
    """The shift moved the logits ([:, :-1] slices of [B, T, V]), which kd_loss copied whole: a [B, T-1, V] buffer
    per model and step. The labels move now (ignore_index at the last position); the logits reach kd_loss whole,
    the loss unchanged (the test above)."""
    seen = []
    real = fastdistill.functional.kd_loss

    def spy(student, teachers, **kw):
        seen.append((student, teachers, kw["labels"]))
        return real(student, teachers, **kw)

    monkeypatch.setattr(fastdistill.functional, "kd_loss", spy)
    student, teachers = _gpt2(1, 16, 0), [_gpt2(2, 32, 1)]
    trainer = DistillationTrainer(model=student, args=_args(tmp_path), teachers=teachers, **KD)
    batch = _lm_batch()
    trainer.compute_loss(student, dict(batch))
    s, ts, labels = seen[0]
    assert s.is_contiguous() and all(t.is_contiguous() for t in ts) and s.shape[:2] == (3, 9)
    assert torch.equal(labels[:, :-1], batch["labels"][:, 1:]) and (labels[:, -1] == -100).all()


def test_sequence_classification_no_shift(tmp_path):
    student, teachers = _bert(16, 0), [_bert(32, 1), _bert(32, 2), _bert(32, 3)]
    assert not is_causal_lm(student)
    trainer = DistillationTrainer(model=student, args=_args(tmp_path), teachers=teachers, **KD)
    g = torch.Generator().manual_seed(0)
    batch = {"input_ids": torch.randint(1, VOCAB, (4, 7), generator=g), "labels": torch.tensor([0, 2, -100, 1])}
    student.eval()
    got = trainer.compute_loss(student, dict(batch))
    s = student(input_ids=batch["input_ids"]).logits
    with torch.no_grad():
        ts = [t(input_ids=batch["input_ids"]).logits for t in teachers]
    torch.testing.assert_close(got, fastdistill.kd_loss(s, ts, labels=batch["labels"], **KD), rtol=1e-5, atol=1e-6)


class PlainLM(torch.nn.Module):
    """A student that is not a transformers model and whose forward takes no **kwargs (Trainer then assumes that
    the loss is not normalised by num_items_in_batch unless told otherwise)."""

    def __init__(self, lm):
        super().__init__()
        self.lm = lm

    def forward(self, input_ids, attention_mask=None):
        return self.lm(input_ids=input_ids, attention_mask=attention_mask)


@pytest.mark.parametrize("kind", ["gpt2", "plain"])
def test_train_steps_with_accumulation_equal_one_big_batch(tmp_path, kind):
    """One Trainer step over 2 accumulated micro-batches of 2 sequences with SGD(lr=1) moves the student by minus the
    gradient of kd_loss over all 4 sequences, normalised by all their labelled (shifted) tokens."""
    student, teachers = _gpt2(1, 16, 0), [_gpt2(2, 32, 1), _gpt2(2, 32, 2)]
    if kind == "plain":
        student = PlainLM(student)
    ref = copy.deepcopy(student)
    rows = [{k: v[i] for k, v in _lm_batch(b=4, seed=3).items()} for i in range(4)]
    rows[1]["labels"][:7] = -100  # an uneven count between micro-batches
    args = _args(tmp_path, per_device_train_batch_size=2, gradient_accumulation_steps=2, max_steps=1)
    trainer = DistillationTrainer(model=student, args=args, teachers=teachers, train_dataset=rows, shift_labels=True,
                                  optimizers=(torch.optim.SGD(student.parameters(), lr=1.0), None), **KD)  # fmt: skip
    trainer.train()
    full = {k: torch.stack([r[k] for r in rows]) for k in rows[0]}
    _hand_lm(ref, teachers, full).backward()
    for (name, p), q in zip(student.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.detach(), q.detach() - q.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_the_trainers_own_token_count_is_not_checked_again(tmp_path, monkeypatch):
    """get_batch_samples counts num_items_in_batch itself; compute_loss had kd_loss check that count on the device
    (a sync per micro-batch on CUDA). Its own count is now vouched for; a count from elsewhere is still checked."""
    from fastdistill import functional

    checked = []
    real = functional._check_values
    monkeypatch.setattr(functional, "_check_values",
                        lambda name, *a: functional._vouched_for(name) or checked.append(name) or real(name, *a))
    student, teachers = _gpt2(1, 16, 0), [_gpt2(2, 32, 1)]
    rows = [{k: v[i] for k, v in _lm_batch(b=4, seed=3).items()} for i in range(4)]
    args = _args(tmp_path, per_device_train_batch_size=2, gradient_accumulation_steps=2, max_steps=2)
    trainer = DistillationTrainer(model=student, args=args, teachers=teachers, train_dataset=rows, shift_labels=True,
                                  temperature=2.0)  # fmt: skip
    trainer.train()
    assert "num_items" not in checked and trainer.state.global_step == 2
    trainer.compute_loss(student.train(), _lm_batch(), num_items_in_batch=torch.tensor(20))
    assert checked.count("num_items") == 1


def test_a_shift_labels_column_reaches_the_loss_through_train(tmp_path):
    """A dataset column ``shift_labels`` (the targets already aligned) survives Trainer's remove_unused_columns and
    is the one step's target: the student moves by minus the gradient of kd_loss against it, not labels[1:]."""
    student, teachers = _gpt2(1, 16, 0), [_gpt2(1, 32, 1)]
    ref = copy.deepcopy(student)
    batch = {k: v[:2] for k, v in _lm_batch(b=3, seed=5).items()}
    shifted = torch.full_like(batch["labels"], -100)
    shifted[:, :3] = batch["labels"][:, 1:4]  # only the first three positions count
    rows = [{**{k: v[i] for k, v in batch.items()}, "shift_labels": shifted[i]} for i in range(2)]
    args = _args(tmp_path, per_device_train_batch_size=2, max_steps=1)
    assert args.remove_unused_columns
    trainer = DistillationTrainer(model=student, args=args, teachers=teachers, train_dataset=rows,
                                  optimizers=(torch.optim.SGD(student.parameters(), lr=1.0), None), **KD)  # fmt: skip
    trainer.train()
    s = ref(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    with torch.no_grad():
        t = [teachers[0](input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits]
    fastdistill.kd_loss(s, t, labels=shifted, **KD).backward()
    for (name, p), q in zip(student.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.detach(), q.detach() - q.grad, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("fused", [False, True])
def test_a_sample_weight_column_weighs_the_loss(tmp_path, fused):
    """A per-position ``sample_weight`` column (DistillationLoop takes one) was dropped by remove_unused_columns, or
    with it off handed to the student's and teachers' forwards, and the loss was unweighted. It is kept, shifted as
    the labels, and weighs kd_loss as its sample_weight; one SGD step from train() equals the hand computation."""
    student, teachers = _gpt2(1, 16, 0), [_gpt2(1, 32, 1)]
    ref = copy.deepcopy(student)
    batch = {k: v[:2] for k, v in _lm_batch(b=3, seed=5).items()}
    weight = torch.rand(batch["labels"].shape, generator=torch.Generator().manual_seed(3))
    rows = [{**{k: v[i] for k, v in batch.items()}, "sample_weight": weight[i]} for i in range(2)]
    trainer = DistillationTrainer(model=student, args=_args(tmp_path, per_device_train_batch_size=2, max_steps=1),
                                  teachers=teachers, train_dataset=rows, fused_linear=fused,
                                  optimizers=(torch.optim.SGD(student.parameters(), lr=1.0), None), **KD)  # fmt: skip
    trainer.train()
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    s = ref(input_ids=ids, attention_mask=mask).logits[:, :-1]
    with torch.no_grad():
        t = [teachers[0](input_ids=ids, attention_mask=mask).logits[:, :-1]]
    n = int((labels[:, 1:] != -100).sum())
    fastdistill.kd_loss(s, t, labels=labels[:, 1:], sample_weight=weight[:, 1:], num_items=n, **KD).backward()
    for (name, p), q in zip(student.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.detach(), q.detach() - q.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_a_few_trainer_steps_lower_the_loss(tmp_path):
    student, teachers = _gpt2(1, 16, 0), [_gpt2(2, 32, 1)]
    rows = [{k: v[i] for k, v in _lm_batch(b=8, seed=4).items()} for i in range(8)]
    args = _args(tmp_path, per_device_train_batch_size=4, max_steps=8, learning_rate=3e-3)
    trainer = DistillationTrainer(model=student, args=args, teachers=teachers, train_dataset=rows,
                                  temperature=2.0)  # fmt: skip
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 8 and losses[-1] < losses[0]


def test_bad_options_fail_before_training(tmp_path):
    with pytest.raises(ValueError, match="temperature"):
        DistillationTrainer(model=_gpt2(1, 16, 0), args=_args(tmp_path), teachers=[_gpt2(1, 16, 1)], temperature=0)
    with pytest.raises(ValueError, match="teacher"):
        DistillationTrainer(model=_gpt2(1, 16, 0), args=_args(tmp_path), teachers=[])
    # teacher weights' values, as keywords or arguments; Trainer settings that change a loss this trainer replaces
    two = [_gpt2(1, 16, 1), _gpt2(1, 16, 2)]
    for weights, match in (([-1, 2], "finite and >= 0"), ([math.nan, 1], "finite and >= 0"), ([0, 0], "positive")):
        with pytest.raises(ValueError, match=f"teacher_weights must be {match}"):
            DistillationTrainer(model=_gpt2(1, 16, 0), args=_args(tmp_path), teachers=two, teacher_weights=weights)
        with pytest.raises(ValueError, match=f"teacher_weights must be {match}"):
            _args(tmp_path, DistillationArguments, teacher_weights=weights)
    for weights in ("ab", ["a", 1]):  # was torch's "new(): invalid data type 'str'"
        with pytest.raises(TypeError, match=r"teacher_weights must be a list of numbers, one per teacher"):
            _args(tmp_path, DistillationArguments, teacher_weights=weights)
    with pytest.raises(ValueError, match="label_smoothing_factor=0.1 is not applied"):
        DistillationTrainer(model=_gpt2(1, 16, 0), args=_args(tmp_path, label_smoothing_factor=0.1), teachers=two)
    with pytest.raises(ValueError, match="use_liger_kernel=True patches the student's own loss"):
        DistillationTrainer(model=_gpt2(1, 16, 0), args=_args(tmp_path, use_liger_kernel=True), teachers=two)
    with pytest.raises(ValueError, match="compute_loss_func would be ignored"):
        DistillationTrainer(model=_gpt2(1, 16, 0), args=_args(tmp_path), teachers=two,
                            compute_loss_func=lambda outputs, labels, num_items_in_batch=None: outputs.logits.sum())


# --- TRL's keyword, and mistakes named ------------------------------------------------------------------------------


def test_teacher_model_is_one_teacher(tmp_path):
    student, teacher = _gpt2(1, 16, 0), _gpt2(2, 32, 1)
    trainer = DistillationTrainer(model=student, args=_args(tmp_path), teacher_model=teacher, **KD)
    assert trainer.teachers == [teacher]
    batch = _lm_batch()
    student.eval()
    torch.testing.assert_close(trainer.compute_loss(student, dict(batch)), _hand_lm(student, [teacher], batch))


def test_teacher_keyword_mistakes_are_named(tmp_path):
    student, teacher = _gpt2(1, 16, 0), _gpt2(1, 16, 1)
    make = lambda **kw: DistillationTrainer(model=student, args=_args(tmp_path), **kw)  # noqa: E731
    with pytest.raises(ValueError, match="not both"):
        make(teachers=[teacher], teacher_model=teacher)
    with pytest.raises(TypeError, match=r"unexpected keyword argument\(s\) teacher: .*teachers=\[\.\.\.\]"):
        make(teacher=teacher)
    with pytest.raises(TypeError, match=r"unexpected keyword argument\(s\) temprature: .*temperature"):
        make(teachers=[teacher], temprature=2.0)
    with pytest.raises(TypeError, match=r"teachers=\[model\]"):
        make(teachers=teacher)
    with pytest.raises(TypeError, match=r"teachers\[0\] must be a model \(torch.nn.Module\)"):
        make(teacher_model="gpt2")


# --- DistillationArguments ------------------------------------------------------------------------------------------


def test_distillation_arguments_defaults_are_kd_loss_defaults():
    kd_loss_defaults = {k: p.default for k, p in inspect.signature(fastdistill.kd_loss).parameters.items()}
    own = {"shift_labels": None, "fused_linear": False}  # the trainer's own settings
    assert KD_DEFAULTS == {**{k: kd_loss_defaults[k] for k in KD_DEFAULTS if k not in own}, **own}


def test_distillation_arguments_from_the_command_line_drive_and_are_saved_by_the_trainer(tmp_path):
    (args,) = HfArgumentParser(DistillationArguments).parse_args_into_dataclasses([
        "--output_dir", str(tmp_path), "--use_cpu", "--report_to", "none", "--temperature", "4",
        "--divergence", "jsd", "--beta", "0.3", "--ensemble", "logit_mean", "--teacher_weights", "0.7", "0.3",
        "--ce_weight", "0.2", "--no_scale_by_temperature_sq", "--shift_labels", "true",
    ])  # fmt: skip
    settings = dict(temperature=4.0, divergence="jsd", beta=0.3, ensemble="logit_mean", teacher_weights=[0.7, 0.3],
                    ce_weight=0.2, scale_by_temperature_sq=False)  # fmt: skip
    assert {k: getattr(args, k) for k in settings} == settings and args.shift_labels is True
    student, teachers = _gpt2(1, 16, 0), [_gpt2(2, 32, 1), _gpt2(2, 32, 2)]
    trainer = DistillationTrainer(model=student, args=args, teachers=teachers)
    batch = _lm_batch()
    student.eval()
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    expected = fastdistill.kd_loss(
        student(input_ids=ids, attention_mask=mask).logits[:, :-1],
        [t(input_ids=ids, attention_mask=mask).logits[:, :-1].detach() for t in teachers],
        labels=labels[:, 1:], **settings,
    )  # fmt: skip
    torch.testing.assert_close(trainer.compute_loss(student, dict(batch)), expected)
    # saved with the run: training_args.bin (save_model, checkpoints) and the JSON/dict of the arguments
    trainer.save_model(str(tmp_path / "saved"))
    saved = torch.load(tmp_path / "saved" / "training_args.bin", weights_only=False)
    assert isinstance(saved, DistillationArguments) and saved.kd_settings() == args.kd_settings()
    assert json.loads(args.to_json_string())["teacher_weights"] == [0.7, 0.3] and args.to_dict()["temperature"] == 4


def test_distillation_arguments_are_validated(tmp_path):
    with pytest.raises(ValueError, match="temperature"):
        _args(tmp_path, DistillationArguments, temperature=0)
    with pytest.raises(ValueError, match="divergence"):
        HfArgumentParser(DistillationArguments).parse_args_into_dataclasses(
            ["--output_dir", str(tmp_path), "--divergence", "kld"]
        )
    with pytest.raises(ValueError, match="one number per teacher"):
        _args(tmp_path, DistillationArguments, teacher_weights=[[0.5, 0.5]])
    with pytest.raises(ValueError, match="2 numbers for 1 teachers"):
        DistillationTrainer(model=_gpt2(1, 16, 0), args=_args(tmp_path, DistillationArguments, teacher_weights=[1, 2]),
                            teachers=[_gpt2(1, 16, 1)])  # fmt: skip


def test_keywords_alongside_distillation_arguments_must_agree(tmp_path):
    args = _args(tmp_path, DistillationArguments, temperature=2.0, teacher_weights=[1.0])
    student, teacher = _gpt2(1, 16, 0), _gpt2(1, 16, 1)
    # repeating args' value is fine (a tensor of weights equals the same list)
    trainer = DistillationTrainer(model=student, args=args, teachers=[teacher], temperature=2,
                                  teacher_weights=torch.tensor([1.0]))  # fmt: skip
    assert trainer.kd_options["temperature"] == 2.0 and trainer.kd_options["teacher_weights"] == [1.0]
    with pytest.raises(ValueError, match=r"temperature=3.0 but args.temperature=2.0"):
        DistillationTrainer(model=student, args=args, teachers=[teacher], temperature=3.0)
    with pytest.raises(ValueError, match="ce_weight=0.5 but args.ce_weight=0.0"):  # args' default counts too
        DistillationTrainer(model=student, args=args, teachers=[teacher], ce_weight=0.5)
    # with plain TrainingArguments the keywords are the settings, the rest kd_loss's defaults
    trainer = DistillationTrainer(model=student, args=_args(tmp_path), teachers=[teacher], ce_weight=0.5)
    defaults = {k: v for k, v in KD_DEFAULTS.items() if k not in ("shift_labels", "fused_linear")}
    assert trainer.kd_options == {**defaults, "ce_weight": 0.5} and trainer.shift_labels is True  # GPT-2: causal


# --- teacher placement ----------------------------------------------------------------------------------------------


def test_single_process_teachers_are_on_the_device_in_eval_mode_frozen_and_used(tmp_path):
    student, teachers = _gpt2(1, 16, 0), [_gpt2(2, 32, 1).train(), _gpt2(2, 32, 2).train()]
    calls = []
    for i, t in enumerate(teachers):
        t.register_forward_hook(lambda *_, i=i: calls.append(i))
    rows = [{k: v[i] for k, v in _lm_batch(b=4, seed=5).items()} for i in range(4)]
    args = _args(tmp_path, per_device_train_batch_size=2, max_steps=2)
    trainer = DistillationTrainer(model=student, args=args, teachers=teachers, train_dataset=rows, **KD)
    assert trainer.accelerator.distributed_type == "NO"
    trainer.train()
    assert calls == [0, 1, 0, 1]  # each teacher once per micro-batch
    for t in trainer.teachers:
        assert not t.training and not any(p.requires_grad for p in t.parameters())
        assert {p.device for p in t.parameters()} == {trainer.args.device}


def test_fused_linear_equals_the_logits_path(tmp_path):
    """fused_linear=True: the loss from hidden states and heads (logits_to_keep=1: the models never form the full
    logits) equals the logits path, in value and in the student's gradients, eval and train (num_items)."""
    student, teachers = _gpt2(1, 16, 0), [_gpt2(2, 32, 1), _gpt2(2, 32, 2)]
    plain = DistillationTrainer(model=student, args=_args(tmp_path), teachers=teachers, **KD)
    fused = DistillationTrainer(model=student, args=_args(tmp_path / "f"), teachers=teachers, fused_linear=True, **KD)
    batch = _lm_batch()
    for training, num_items in ((False, None), (True, torch.tensor(50))):
        student.train(training)
        losses, grads = [], []
        for trainer in (plain, fused):
            student.zero_grad()
            loss = trainer.compute_loss(student, dict(batch), num_items_in_batch=num_items)
            loss.backward()
            losses.append(loss.detach())
            grads.append([p.grad.clone() for p in student.parameters()])
        torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-6)
        for g_fused, g_plain in zip(grads[1], grads[0]):
            torch.testing.assert_close(g_fused, g_plain, rtol=1e-4, atol=1e-6)
    args = _args(tmp_path / "a", DistillationArguments, fused_linear=True, temperature=2.0)
    assert DistillationTrainer(model=student, args=args, teachers=teachers).fused_linear
    with pytest.raises(ValueError, match="fused_linear: model has no linear output head"):
        DistillationTrainer(model=_bert(16, 0), args=_args(tmp_path / "b"), teachers=[_bert(16, 1)],
                            fused_linear=True)  # fmt: skip


def test_fused_linear_refuses_what_it_would_ignore_or_get_wrong(tmp_path):
    """A teacher_logits override (fused_linear never calls it) is refused at construction; a model whose logits are
    not lm_head(hidden) although no config attribute says so is caught on the first batch."""

    class OwnTeacherInputs(DistillationTrainer):
        def teacher_logits(self, teacher, inputs):
            return super().teacher_logits(teacher, inputs)

    student, teacher = _gpt2(1, 16, 0), _gpt2(1, 16, 1)
    with pytest.raises(ValueError, match="OwnTeacherInputs.teacher_logits would be ignored"):
        OwnTeacherInputs(model=student, args=_args(tmp_path), teachers=[teacher], fused_linear=True)
    OwnTeacherInputs(model=student, args=_args(tmp_path), teachers=[teacher])  # the logits path calls it

    class Scaled(GPT2LMHeadModel):
        def forward(self, input_ids=None, attention_mask=None, logits_to_keep=0, **kwargs):
            out = super().forward(input_ids, attention_mask=attention_mask, logits_to_keep=logits_to_keep, **kwargs)
            out.logits = out.logits * 4
            return out

    torch.manual_seed(1)
    scaled = Scaled(teacher.config)
    trainer = DistillationTrainer(model=student, args=_args(tmp_path), teachers=[scaled], fused_linear=True)
    with pytest.raises(ValueError, match=r"teachers\[0\]'s logits are not lm_head\(hidden\)"):
        trainer.compute_loss(student, _lm_batch())


def test_shift_labels_on_non_sequence_logits_is_an_error(tmp_path):
    student, teacher = _bert(16, 0), _bert(16, 1)
    trainer = DistillationTrainer(model=student, args=_args(tmp_path), teachers=[teacher], shift_labels=True)
    batch = {"input_ids": torch.randint(1, VOCAB, (4, 7)), "labels": torch.tensor([0, 2, 1, 1])}
    with pytest.raises(ValueError, match=r"shift_labels=True .* logits of shape \(4, 3\) and labels of shape \(4,\)"):
        trainer.compute_loss(student, batch)


def _unlabelled(pad, seed=6):
    """Two sequences of 6 and 4 tokens, right-padded to 6 + pad positions, no labels."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.cat([torch.randint(1, VOCAB, (2, 6), generator=g), torch.zeros(2, pad, dtype=torch.long)], 1)
    mask = torch.ones(2, 6 + pad, dtype=torch.long)
    mask[0, 6:], mask[1, 4:] = 0, 0
    return {"input_ids": ids, "attention_mask": mask}


@pytest.mark.parametrize("fused", [False, True])
def test_unlabelled_padding_is_not_distilled(tmp_path, fused):
    """Pure KD without labels: positions where attention_mask is 0 are out of the loss and its count (shifted like
    labels for a causal LM), so padding changes neither the loss nor the gradient."""
    student, teachers = _gpt2(1, 16, 0), [_gpt2(2, 32, 1)]
    trainer = DistillationTrainer(model=student, args=_args(tmp_path), teachers=teachers, temperature=2.0,
                                  fused_linear=fused)  # fmt: skip
    student.train()
    results = []
    for pad in (0, 5):
        batch = _unlabelled(pad)
        _, n = trainer.get_batch_samples(iter([batch]), 1, torch.device("cpu"))
        assert int(n) == 5 + 3  # positions 0..T-2 whose next token is not padding
        student.zero_grad()
        loss = trainer.compute_loss(student, dict(batch), num_items_in_batch=n)
        loss.backward()
        results.append((loss.detach(), student.transformer.wte.weight.grad.clone()))
    (l0, g0), (l5, g5) = results
    torch.testing.assert_close(l5, l0, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(g5, g0, rtol=1e-4, atol=1e-7)
    student.eval()
    batch = _unlabelled(5)
    s = student(**batch).logits[:, :-1]
    with torch.no_grad():
        t = teachers[0](**batch).logits[:, :-1]
    keep = batch["attention_mask"][:, 1:].bool()
    want = fastdistill.kd_loss(s[keep], [t[keep]], temperature=2.0)  # the unpadded positions only
    torch.testing.assert_close(trainer.compute_loss(student, dict(batch)), want, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("fused", [False, True])
def test_evaluate_without_labels_reports_eval_loss(tmp_path, fused):
    """Unlabelled evaluation data (pure KD): Trainer alone computes no loss without label_names in the batch, so
    eval_loss (the default metric_for_best_model) would be missing."""
    student, teachers = _gpt2(1, 16, 0), [_gpt2(2, 32, 1)]
    rows = [{k: v[i] for k, v in _unlabelled(2).items()} for i in range(2)]
    args = _args(tmp_path, per_device_eval_batch_size=2)
    trainer = DistillationTrainer(model=student, args=args, teachers=teachers, eval_dataset=rows, temperature=2.0,
                                  fused_linear=fused)  # fmt: skip
    metrics = trainer.evaluate()
    student.eval()
    with torch.no_grad():
        want = trainer.compute_loss(student, _unlabelled(2))
    assert metrics["eval_loss"] == pytest.approx(want.item(), rel=1e-5)
    # predictions: the student's full logits, fused or not (fused_linear forms them for evaluation only)
    out = trainer.predict(rows)
    assert out.predictions.shape == (2, 8, VOCAB) and out.metrics["test_loss"] == pytest.approx(want.item(), rel=1e-5)


def test_teachers_placed_by_from_pretrained_are_left_there(tmp_path, monkeypatch):
    """A teacher loaded with a device_map (here partly offloaded to disk: .to() raises) or quantised is not moved by
    prepare_teacher, and still distils."""
    _gpt2(2, 32, 1).save_pretrained(tmp_path / "teacher")
    device_map = {"transformer.wte": "cpu", "transformer.wpe": "cpu", "transformer.h.0": "cpu",
                  "transformer.h.1": "disk", "transformer.ln_f": "cpu", "lm_head": "cpu"}  # fmt: skip
    teacher = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "teacher", device_map=device_map,
                                                                offload_folder=str(tmp_path / "offload"))
    student = _gpt2(1, 16, 0)
    trainer = DistillationTrainer(model=student, args=_args(tmp_path), teachers=[teacher], **KD)
    batch = _lm_batch()
    student.eval()
    torch.testing.assert_close(trainer.compute_loss(student, dict(batch)), _hand_lm(student, [teacher], batch),
                               rtol=1e-5, atol=1e-7)  # fmt: skip
    quantised = _gpt2(1, 16, 2)
    quantised.is_loaded_in_8bit = True
    monkeypatch.setattr(quantised, "to", lambda *a, **k: pytest.fail("a quantised teacher moved"))
    assert DistillationTrainer(model=student, args=_args(tmp_path), teachers=[quantised]).teachers == [quantised]


def test_encoder_decoder_student_gets_decoder_inputs_from_labels(tmp_path):
    """The labels are kept from the student (the loss is the trainer's), so an encoder-decoder model's
    decoder_input_ids are built from them as the model itself would; without either it is a clear error."""

    def t5(seed, width):
        torch.manual_seed(seed)
        cfg = transformers.T5Config(vocab_size=VOCAB, d_model=width, d_kv=8, d_ff=2 * width, num_layers=1,
                                    num_heads=2, decoder_start_token_id=0, pad_token_id=0, dropout_rate=0.0)
        return transformers.T5ForConditionalGeneration(cfg)

    student, teacher = t5(0, 16), t5(1, 32)
    trainer = DistillationTrainer(model=student, args=_args(tmp_path), teachers=[teacher], **KD)
    assert not trainer.shift_labels
    g = torch.Generator().manual_seed(0)
    ids, labels = torch.randint(1, VOCAB, (2, 7), generator=g), torch.randint(1, VOCAB, (2, 5), generator=g)
    labels[1, 3:] = -100
    student.eval()
    dec = student.prepare_decoder_input_ids_from_labels(labels=labels)
    s = student(input_ids=ids, decoder_input_ids=dec).logits
    with torch.no_grad():
        t = teacher(input_ids=ids, decoder_input_ids=dec).logits
    got = trainer.compute_loss(student, {"input_ids": ids, "labels": labels})
    torch.testing.assert_close(got, fastdistill.kd_loss(s, [t], labels=labels, **KD), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="needs decoder_input_ids in the batch, or labels"):
        DistillationTrainer(model=student, args=_args(tmp_path), teachers=[teacher]).compute_loss(
            student, {"input_ids": ids})
    # pure KD: the decoder's padding (decoder_attention_mask) is left out, never the encoder's mask
    dmask = torch.ones(2, 5, dtype=torch.long)
    dmask[1, 3:] = 0
    emask = torch.ones(2, 7, dtype=torch.long)
    emask[0, 5:] = 0
    pure = DistillationTrainer(model=student, args=_args(tmp_path), teachers=[teacher], **{**KD, "ce_weight": 0.0})
    got = pure.compute_loss(student, {"input_ids": ids, "attention_mask": emask, "decoder_input_ids": dec,
                                      "decoder_attention_mask": dmask})  # fmt: skip
    s = student(input_ids=ids, attention_mask=emask, decoder_input_ids=dec, decoder_attention_mask=dmask).logits
    with torch.no_grad():
        t = teacher(input_ids=ids, attention_mask=emask, decoder_input_ids=dec, decoder_attention_mask=dmask).logits
    kept = torch.where(dmask.bool(), 1, -100)
    want = fastdistill.kd_loss(s, [t], labels=kept, **{**KD, "ce_weight": 0.0})
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_teacher_heads_reach_the_students_device_once_and_offloaded_heads_are_named():
    """A device_map teacher's head on another device is copied to the student's once (the teachers are frozen), not
    on every step; its hidden states every step. An offloaded head (meta weights) is a ValueError naming it."""
    from fastdistill import TeacherHead
    from fastdistill.integrations.hf import _on_device

    w, b = (torch.nn.Parameter(torch.randn(*shape), requires_grad=False) for shape in ((40, 8), (40,)))  # a head's
    h = torch.randn(2, 3, 8)
    cache: dict = {}
    first = _on_device(TeacherHead(h, w, b), torch.device("meta"), cache, "teachers[0]")
    again = _on_device(TeacherHead(h, w, b), torch.device("meta"), cache, "teachers[0]")
    assert first.weight.device.type == "meta" and first.hidden.device.type == "meta"
    assert again.weight is first.weight and again.bias is first.bias and len(cache) == 2
    same = _on_device(TeacherHead(h, w, None), torch.device("cpu"), cache)
    assert same.weight is w and same.hidden is h
    with pytest.raises(ValueError, match=r"teachers\[1\]'s output head is offloaded"):
        _on_device(TeacherHead(h, w.to("meta"), None), torch.device("cpu"), cache, "teachers[1]")


def test_fused_linear_with_peft_wrapped_student_and_teacher(tmp_path):
    """A LoRA (PEFT) student or teacher with fused_linear=True: checked and hooked inside, on the Hugging Face
    model (its decoder's output, its lm_head), called through the wrapper; the loss and the student's gradients are
    the logits path's. An adapter on lm_head other than peft's LoRA or modules_to_save is refused by name."""
    student, teachers = PeftLike(_gpt2(1, 16, 0)), [PeftLike(_gpt2(2, 32, 1)), _gpt2(2, 32, 2)]
    plain = DistillationTrainer(model=student, args=_args(tmp_path), teachers=teachers, **KD)
    fused = DistillationTrainer(model=student, args=_args(tmp_path / "f"), teachers=teachers, fused_linear=True, **KD)
    assert fused.shift_labels
    kept = []
    for m in (student, teachers[0]):
        m.get_base_model().register_forward_hook(lambda _m, _a, out: kept.append(out.logits.shape[1]))
    student.train()
    losses, grads = [], []
    for trainer in (plain, fused):
        student.zero_grad()
        loss = trainer.compute_loss(student, _lm_batch(), num_items_in_batch=torch.tensor(50))
        loss.backward()
        losses.append(loss.detach())
        grads.append([p.grad.clone() for p in student.parameters()])
    assert kept == [9, 9, 1, 1]  # the fused path: logits_to_keep=1 reached the wrapped models
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-6)
    for g_fused, g_plain in zip(grads[1], grads[0]):
        torch.testing.assert_close(g_fused, g_plain, rtol=1e-4, atol=1e-6)

    class LoraHead(torch.nn.Module):  # an adapter around lm_head (a base_layer inside) that is not peft's LoRA
        def __init__(self, base):
            super().__init__()
            self.base_layer = base

        def forward(self, x):
            return self.base_layer(x)

    adapted = _gpt2(1, 16, 3)
    adapted.lm_head = LoraHead(adapted.lm_head)
    with pytest.raises(ValueError, match=r"teachers\[0\] \(GPT2LMHeadModel inside PeftLike\)'s output head is "
                                         r"wrapped by an adapter .*LoraHead"):  # fmt: skip
        DistillationTrainer(model=student, args=_args(tmp_path), teachers=[PeftLike(adapted)], fused_linear=True)


def _first_linear_dtypes(model, seen, name):
    """Record the dtype of the output of ``model``'s first nn.Linear (under autocast: the compute dtype)."""
    lin = next(m for m in model.modules() if isinstance(m, torch.nn.Linear))
    lin.register_forward_hook(lambda _m, _a, out: seen.setdefault(name, set()).add(out.dtype))


@pytest.mark.parametrize("fused", [False, True])
def test_teachers_run_under_the_students_autocast(tmp_path, fused, monkeypatch):
    """bf16=True: the student's forward runs under accelerate's autocast (prepared), and so do the teachers' (not
    prepared), float32-loaded as they are, and with fused_linear the loss's head matmuls (as the student's lm_head in
    the logits path; they once ran in float32); without it all compute in float32."""
    from fastdistill.integrations import hf

    real = hf.fused_linear_kd_loss

    def spy(*args, **kwargs):
        seen.setdefault("fused loss", set()).add(torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu")
                                                 else torch.float32)  # fmt: skip
        return real(*args, **kwargs)

    monkeypatch.setattr(hf, "fused_linear_kd_loss", spy)
    for bf16, want in ((True, torch.bfloat16), (False, torch.float32)):
        student, teacher = _gpt2(1, 16, 0), _gpt2(2, 32, 1)
        seen = {}
        _first_linear_dtypes(student, seen, "student")
        _first_linear_dtypes(teacher, seen, "teacher")
        rows = [{k: v[i] for k, v in _lm_batch(b=3, seed=5).items()} for i in range(2)]
        args = _args(tmp_path, bf16=bf16, per_device_train_batch_size=2, max_steps=1)
        trainer = DistillationTrainer(model=student, args=args, teachers=[teacher], train_dataset=rows,
                                      fused_linear=fused, **KD)  # fmt: skip
        trainer.train()
        assert seen == {"student": {want}, "teacher": {want}, **({"fused loss": {want}} if fused else {})}, (bf16, seen)
        assert next(teacher.parameters()).dtype == torch.float32  # autocast, not a cast of the weights


def test_teachers_are_called_without_a_kv_cache(tmp_path):
    """Teachers whose forward takes use_cache (GPT-2, Llama, a PEFT-like wrapper of one) get use_cache=False when
    the inputs do not set it; a forward without use_cache gets no such keyword; the student is called as given."""
    llama = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
        vocab_size=VOCAB))  # fmt: skip
    teachers = [_gpt2(1, 16, 1), llama, PeftLike(_gpt2(1, 16, 2)), PlainLM(_gpt2(1, 16, 3))]
    student = _gpt2(1, 16, 0)
    calls = {}
    for name, m in [("student", student), *((k, t) for k, t in enumerate(teachers))]:
        m.register_forward_pre_hook(lambda _m, _a, kwargs, name=name: calls.setdefault(name, []).append(
            kwargs.get("use_cache", "unset")), with_kwargs=True)  # fmt: skip
    for fused in (False, True):
        calls.clear()
        used = teachers[:3] if fused else teachers  # PlainLM has no head for fused_linear
        trainer = DistillationTrainer(model=student, args=_args(tmp_path), teachers=used, fused_linear=fused)
        trainer.compute_loss(student, _lm_batch())
        want = {"student": ["unset"], 0: [False], 1: [False], 2: [False]}
        if not fused:
            want[3] = ["unset"]
        assert calls == want, (fused, calls)
    calls.clear()
    trainer = DistillationTrainer(model=student, args=_args(tmp_path), teachers=teachers[:3])
    trainer.compute_loss(student, {**_lm_batch(), "use_cache": True})  # set by the inputs: left alone
    assert calls == {"student": [True], 0: [True], 1: [True], 2: [True]}, calls
