"""Sequence-level ensembling (fastdistill/sequence.py): token F1, the MBR choice and its errors."""

import functools

import pytest
import torch

from fastdistill import mbr_consensus, mbr_select, token_f1


def test_token_f1():
    assert token_f1([1, 2, 3], [1, 2, 3]) == 1.0
    assert token_f1([1, 2, 3], [4, 5]) == 0.0
    assert token_f1([1, 2], [1, 2, 3, 4]) == pytest.approx(2 * 2 / 6)
    assert token_f1([1, 1, 2], [1, 2, 2]) == pytest.approx(2 * 2 / 6)  # multiset: one 1 and one 2 in common
    assert token_f1([], []) == 1.0 and token_f1([], [1]) == 0.0
    assert token_f1("the cat sat", "the cat") == pytest.approx(0.8)
    assert token_f1(torch.tensor([5, 6, 0, 0]), torch.tensor([5, 6, 0]), ignore={0}) == 1.0
    assert token_f1(torch.tensor([5, 6, 0, 0]), torch.tensor([5, 6, 0])) < 1.0
    with pytest.raises(ValueError, match="1-D"):
        token_f1(torch.zeros(2, 3), [1])


def test_mbr_picks_the_majority_mode():
    """Two teachers agree, one is off: the consensus is one of the two that agree; the off one never wins."""
    agree_a, agree_b, off = [1, 2, 3, 4], [1, 2, 3, 5], [9, 9, 9, 9]
    for order in ([agree_a, agree_b, off], [off, agree_a, agree_b], [agree_b, off, agree_a]):
        k = mbr_select([[c] for c in order])[0]
        assert order[k] in (agree_a, agree_b)
    # an exact duplicate pair beats a near pair
    assert mbr_select([[[1, 2]], [[3, 4]], [[3, 4]], [[1, 5]]]) == [1]


def test_mbr_ties_and_small_k():
    assert mbr_select([[[1], [2]]]) == [0, 0]  # K = 1: the teacher itself
    assert mbr_select([[[1, 2]], [[3]]]) == [0]  # K = 2: a symmetric tie, to the lowest index
    assert mbr_select([[[7]], [[8]], [[9]]]) == [0]  # all equally far apart
    # an exact tie (89/30 each) whose float sums differ in the last bit still goes to the lowest index
    assert mbr_select([[[1, 2, 0]], [[2, 2, 0]], [[1, 1]], [[0]], [[2, 2]]]) == [0]


def test_mbr_weights_and_pluggable_similarity():
    cands = [[[1, 2, 3]], [[1, 2, 4]], [[7, 8, 9]], [[7, 8, 6]]]  # two pairs
    assert mbr_select(cands) == [0]  # tie between the pairs: lowest index
    assert mbr_select(cands, weights=[1.0, 1.0, 3.0, 3.0]) == [2]  # the heavier pair's view wins
    # scale-free: both pairs' scores overflowed to inf, a tie that went to the lower index (was [0])
    assert mbr_select(cands, weights=[1.2e308, 1.2e308, 1.5e308, 1.5e308]) == [2]
    exact = lambda a, b: float(list(a) == list(b))  # noqa: E731
    assert mbr_select([[[1]], [[2]], [[2]]], similarity=exact) == [1]
    ignore0 = functools.partial(token_f1, ignore={0})
    assert mbr_select([[[1, 0, 0]], [[2, 0, 0]], [[1]]], similarity=ignore0) == [0]


def test_mbr_weights_count_for_a_teachers_own_candidate():
    """The score is sum_l w_l sim(c_k, c_l) with l = k included: trusting one teacher alone picks its candidate, and
    K = 2 with unequal weights picks the heavier one's (a leave-one-out mean ignored w_k: [1, 0, 0] picked teacher
    1, [1, 3] teacher 0)."""
    a, b, c = [1, 2, 3, 4], [1, 2, 3, 5], [1, 9, 9, 9]
    cands = [[a], [b], [c]]
    assert mbr_select(cands) == [0]  # a and b agree most; a ties b, lowest index
    assert mbr_select(cands, weights=[1, 0, 0]) == [0]
    assert mbr_select(cands, weights=[0, 0, 1]) == [2]
    assert mbr_select(cands, weights=[0, 1, 1]) == [1]  # b and c are the evidence: b (ties c, lower index)
    assert mbr_select([[a], [c]], weights=[1, 3]) == [1]
    assert mbr_select([[a], [c]], weights=[3, 1]) == [0]
    # sim(c, c) is computed, not assumed to be 1: an unnormalised similarity (shared-token count) counts it
    overlap = lambda x, y: float(len(set(x) & set(y)))  # noqa: E731
    assert mbr_select([[[1]], [[1, 2, 3]], [[1, 2]]], similarity=overlap) == [1]
    # a negative similarity: never a hard-coded 0 score that beats every real one
    neg = lambda x, y: -float(len(set(x) ^ set(y)))  # noqa: E731
    assert mbr_select(cands, similarity=neg, weights=[0, 1, 1]) == [1]


def test_mbr_consensus_lists_and_tensors():
    lists = [[[1, 2], [3]], [[1, 2], [4]], [[5], [4]]]
    assert mbr_consensus(lists) == [[1, 2], [4]]
    t = torch.tensor([[[1, 2], [3, 0]], [[1, 2], [4, 0]], [[5, 0], [4, 0]]])  # [K=3, M=2, L=2]
    out = mbr_consensus(t)
    assert all(isinstance(x, torch.Tensor) for x in out)
    assert torch.equal(torch.stack(out), torch.tensor([[1, 2], [4, 0]]))
    assert mbr_select(t) == mbr_select([list(x.unbind(0)) for x in t.unbind(0)])


def test_tokens_as_0d_tensors_and_no_inputs():
    """A candidate given as a row's unbind() (0-d tensor tokens, which hash by identity) is compared by value, its
    ignored tokens dropped; a [K, 0, L] tensor has no inputs and no consensus (it crashed on a float index)."""
    row = torch.tensor([3, 4, 0])
    assert token_f1(list(row), list(row.clone())) == 1.0
    assert token_f1(list(row), [3, 4], ignore={0}) == 1.0
    cands = [[torch.tensor([1, 2]).unbind()], [torch.tensor([5, 6]).unbind()], [torch.tensor([5, 6]).unbind()]]
    assert mbr_select(cands) == [1]
    assert mbr_consensus(torch.zeros(3, 0, 4, dtype=torch.long)) == []


def test_mbr_errors_name_the_argument():
    with pytest.raises(ValueError, match=r"candidates\[1\] has 1 outputs"):
        mbr_select([[[1], [2]], [[1]]])
    with pytest.raises(ValueError, match="at least one teacher"):
        mbr_select([])
    with pytest.raises(ValueError, match=r"\[K, M, L\]"):
        mbr_select(torch.zeros(3, 4))
    with pytest.raises(ValueError, match="one entry per teacher"):
        mbr_select([[[1]], [[2]], [[3]]], weights=[1.0, 2.0])
    with pytest.raises(ValueError, match="finite, >= 0"):
        mbr_select([[[1]], [[2]], [[3]]], weights=[1.0, -1.0, 1.0])
    with pytest.raises(ValueError, match="finite, >= 0"):
        mbr_select([[[1]], [[2]], [[3]]], weights=[0.0, 0.0, 0.0])


def test_mbr_select_takes_a_small_real_margin_and_leaves_rounding_to_the_lowest_index():
    """The tie tolerance absorbs rounding (sums of the same terms in another order), not real differences: a
    candidate 1% better wins, one better by 1e-13 relative does not (ties go to the lowest index)."""

    def sim(margin):
        return lambda a, b: (1.0 + margin if a == "y" else 1.0) if a == b else 0.0

    assert mbr_select([["x"], ["y"]], sim(0.01)) == [1]
    assert mbr_select([["x"], ["y"]], sim(1e-13)) == [0]
    assert mbr_select([["x"], ["y"]], sim(0.0), weights=[1.0, 1.01]) == [1]
