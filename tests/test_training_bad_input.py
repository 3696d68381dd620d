"""Bad input to the training API, from an adversarial review (2026-12-01): each case trained silently wrong (a
string "False" shifted the labels, a Sequential teacher became its layers, a feature term named "loss" doubled the
logged loss, a resume on a dataset of another size took another data order, "cuda" under torchrun trained on the
CPU), or failed deep inside. Now an error naming the argument."""

import pytest
import torch
from torch import nn

from fastdistill.sequence import mbr_select
from fastdistill.training import ArrayDataset, DistillationLoop, FeatureTerm, write_teacher_cache


def _models():
    torch.manual_seed(0)
    return nn.Linear(4, 5), nn.Linear(4, 5)


def _data(n=8):
    g = torch.Generator().manual_seed(0)
    return ArrayDataset(input=torch.randn(n, 4, generator=g), labels=torch.randint(0, 5, (n,), generator=g))


def _term(**kw):
    return FeatureTerm("", "", lambda a, b: (a - b).pow(2).mean(), **kw)


@pytest.mark.parametrize(("kw", "error", "message"), [
    (dict(shift_labels="False"), TypeError, "shift_labels must be a bool or None, got str 'False'"),
    (dict(shuffle=1), TypeError, "shuffle must be a bool"),
    (dict(batch_size=2.5), TypeError, "batch_size must be an int"),
    (dict(grad_accum_steps=0), ValueError, "grad_accum_steps must be >= 1"),
    (dict(seed="a"), TypeError, "seed must be an int"),
    (dict(device="cuda:3"), ValueError, "device is 'cuda:3' but this machine has"),
    (dict(loss=5), TypeError, "loss must be a callable"),
    (dict(forward=3), TypeError, "forward must be callable"),
    (dict(teacher_cache="cache.safetensors"), TypeError, r"teacher_cache must be a TeacherLogitCache"),
    (dict(feature_terms=[_term(name="loss")]), ValueError, r"feature_terms\[0\] has the log name 'loss'"),
    (dict(feature_terms=[_term(name="items")]), ValueError, r"feature_terms\[0\] has the log name 'items'"),
    (dict(feature_terms=[_term(weight=float("nan"))]), ValueError, r"feature_terms\[0\].weight must be finite"),
    (dict(feature_terms=[("a", "b")]), TypeError, r"feature_terms\[0\] must be a FeatureTerm"),
])  # fmt: skip
def test_constructor_arguments_are_checked(kw, error, message):
    student, teacher = _models()
    if kw.get("device") == "cuda:3" and torch.cuda.device_count() > 3:
        pytest.skip("this machine has a cuda:3")
    with pytest.raises(error, match=message):
        DistillationLoop(student, [teacher], progress=False, **kw)


def test_teachers_must_be_a_list_of_models():
    student, teacher = _models()
    with pytest.raises(TypeError, match="teachers takes a list of models: teachers=\\[model\\], got a Sequential"):
        DistillationLoop(student, nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 5)), progress=False)
    with pytest.raises(TypeError, match=r"teachers\[1\] must be a model"):
        DistillationLoop(student, [teacher, "teacher.pt"], progress=False)
    assert len(DistillationLoop(student, nn.ModuleList([teacher]), progress=False).teachers) == 1
    with pytest.raises(TypeError, match="teachers takes a list of models"):
        write_teacher_cache("unused.safetensors", teacher, _data())
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        write_teacher_cache("unused.safetensors", [teacher], _data(), batch_size=-1)


@pytest.mark.parametrize(("kw", "error", "message"), [
    (dict(max_steps=2.5), TypeError, "max_steps must be an int"),
    (dict(max_steps=True), TypeError, "max_steps must be an int"),
    (dict(max_steps=2, eval_every=0), ValueError, "eval_every must be >= 1"),
    (dict(epochs=float("inf")), ValueError, "epochs must be finite"),
    (dict(epochs=float("nan")), ValueError, "epochs must be finite"),
    (dict(max_steps=2, resume_from=""), ValueError, "resume_from='' is empty: give a checkpoint directory"),
])  # fmt: skip
def test_fit_counts_are_whole_numbers(kw, error, message):
    student, teacher = _models()
    with pytest.raises(error, match=message):
        DistillationLoop(student, [teacher], progress=False).fit(_data(), **kw)


def test_resume_on_a_dataset_of_another_size_is_refused(tmp_path):
    """The data order is randperm(len(data)) per epoch: a checkpoint of a 20-item run resumed on 10 items took
    another order (and epoch) silently."""
    student, teacher = _models()
    DistillationLoop(student, [teacher], batch_size=4, output_dir=tmp_path, progress=False).fit(
        _data(20), max_steps=2, checkpoint_every=2)  # fmt: skip
    loop = DistillationLoop(student, [teacher], batch_size=4, output_dir=tmp_path, progress=False)
    with pytest.raises(ValueError, match=r"was written with data_size=20, this run has 10"):
        loop.fit(_data(10), max_steps=4, resume_from="latest")
    loop.fit(_data(20), max_steps=4, resume_from="latest")
    assert loop.step == 4


def test_mbr_candidates_are_teacher_major_lists_not_strings():
    """A flat list of K strings read each character as an input (7 "inputs" for "the cat")."""
    with pytest.raises(TypeError, match=r"candidates\[0\] must be teacher 0's M outputs"):
        mbr_select(["the cat", "the cat", "a dog"])
    assert mbr_select([["the cat"], ["the cat"], ["a dog"]]) == [0]


def test_the_loops_own_cross_entropy_and_evaluate_check_labels_as_kd_loss_does():
    """Without teachers, and in evaluate(), out-of-range or float labels were torch's IndexError / dtype error."""
    student, _ = _models()
    loop = DistillationLoop(student, [], progress=False)
    for labels, error, message in ((torch.full((8,), 7), ValueError, r"labels must be in \[0, 5\) or ignore_index"),
                                   (torch.zeros(8), TypeError, "labels must be int64")):  # fmt: skip
        data = ArrayDataset(input=torch.randn(8, 4), labels=labels)
        with pytest.raises(error, match=message):
            loop.fit(data, max_steps=1)
        with pytest.raises(error, match=message):
            loop.evaluate(data)


def test_hf_trainer_reads_a_generator_of_teachers_once():
    """Its type check consumed the generator: the trainer was built with no teachers, found out at the first step."""
    pytest.importorskip("transformers")
    from fastdistill.integrations.hf import _teacher_list

    _, teacher = _models()
    assert _teacher_list((t for t in [teacher]), None) == [teacher]
    with pytest.raises(TypeError, match="teachers takes a list of models"):
        _teacher_list(teacher, None)
