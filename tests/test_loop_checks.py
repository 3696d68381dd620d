"""The loop vouches for what it checked itself: its own num_items, and the labels and sample weights it checked on the
host, for every loss of ours it calls (KDLoss, CodistillLoss and the methods' losses), so no micro-batch pays a
device sync (fastdistill.functional._check_values) to check them again."""

import pytest
import torch
from torch import nn

from fastdistill import CodistillLoss, KDLoss, functional
from fastdistill.methods import SLaMLoss, TeacherReliability, WeakTeacherKDLoss, WeightedKDLoss
from fastdistill.training import ArrayDataset, DistillationLoop


def _reliability():
    torch.manual_seed(0)
    logits = torch.randn(64, 4)
    labels = torch.where(torch.rand(64) < 0.7, logits.argmax(-1), torch.randint(0, 4, (64,)))
    return TeacherReliability.fit(logits, labels)


LOSSES = {
    "kd": lambda: KDLoss(ce_weight=0.5),
    "codistill": lambda: CodistillLoss(),
    "weighted": lambda: WeightedKDLoss(_reliability()),
    "weighted_hard": lambda: WeightedKDLoss(_reliability(), hard=True),
    "slam": lambda: SLaMLoss(_reliability()),
    "weak_teacher": lambda: WeakTeacherKDLoss(hard_weight=1.0, soft_weight=1.0),
}


def _unvouched_checks(monkeypatch) -> list[str]:
    """The arguments whose values a loss reads back from the device from now on (a sync per micro-batch on CUDA):
    the checks no caller vouched for."""
    checked: list[str] = []
    original = functional._check_values

    def counting(arg, x, what, bad):
        if not functional._vouched_for(arg):
            checked.append(arg)
        return original(arg, x, what, bad)

    monkeypatch.setattr(functional, "_check_values", counting)
    return checked


# (SLaMLoss.forward's own values_checked("alpha") replaced the loop's until a nested values_checked added to the
# enclosing one; WeightedKDLoss(hard=True) had kd_loss check the hard labels it builds, the teacher's argmax)
@pytest.mark.parametrize("name", sorted(LOSSES))
@pytest.mark.parametrize("with_weights", [False, True])
def test_the_loop_does_not_check_its_own_values_again(name, with_weights, monkeypatch):
    loss = LOSSES[name]()  # (TeacherReliability.fit checks its validation labels: not the loop's business)
    checked = _unvouched_checks(monkeypatch)
    torch.manual_seed(0)
    x, y = torch.randn(8, 6), torch.randint(0, 4, (8,))
    y[[1, 5]] = -100
    data = {"input": x, "labels": y}
    if with_weights:
        data["sample_weight"] = torch.rand(8) + 0.5
    loop = DistillationLoop(nn.Linear(6, 4), [nn.Linear(6, 4)], loss=loss, batch_size=4,
                            grad_accum_steps=2, shuffle=False, progress=False, device="cpu")  # fmt: skip
    loop.fit(ArrayDataset(**data), max_steps=1)
    assert [a for a in checked if a in ("num_items", "labels", "sample_weight", "k")] == []


def test_a_loss_of_the_users_still_has_its_values_checked(monkeypatch):
    """A loss the loop does not know is given no vouching: the kd_loss it calls checks what it is given."""
    checked = _unvouched_checks(monkeypatch)

    def mine(student, teacher, labels, *, num_items=None):
        import fastdistill

        return fastdistill.kd_loss(student, teacher, labels, ce_weight=0.5, num_items=num_items)

    x, y = torch.randn(8, 6), torch.randint(0, 4, (8,))
    loop = DistillationLoop(nn.Linear(6, 4), [nn.Linear(6, 4)], loss=mine, batch_size=8, progress=False,
                            device="cpu")  # fmt: skip
    loop.fit(ArrayDataset(input=x, labels=y), max_steps=1)
    assert "num_items" in checked and "labels" in checked


def test_nested_values_checked_adds_to_the_enclosing_one():
    """A loss's own values_checked("alpha") inside the loop's values_checked("num_items") replaced it: num_items was
    checked again (SLaMLoss, every micro-batch). Nested, the names add up; leaving restores the outer set."""
    with functional.values_checked("num_items"):
        with functional.values_checked("alpha"):
            assert functional._vouched_for("num_items") and functional._vouched_for("alpha")
        assert functional._vouched_for("num_items") and not functional._vouched_for("alpha")
        with functional.values_checked():
            assert functional._vouched_for("labels")
    assert not functional._vouched_for("num_items")
