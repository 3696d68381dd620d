"""examples/sequence_ensemble.py --small: K = 3 GPT-2 teachers on disjoint module sets, their greedy continuations,
the MBR consensus, and the five students, end to end (~10 s)."""

import math
from pathlib import Path

import pytest

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

from fastdistill.apps import load_script, single_thread  # noqa: E402


def test_sequence_ensemble_example_small(tmp_path):
    ex = load_script(Path(__file__).resolve().parents[1] / "examples" / "sequence_ensemble.py",
                     "sequence_ensemble_example")  # fmt: skip
    lines = []
    s = ex.Settings.small()
    s.seeds = (0, 1)
    with single_thread():
        runs = ex.run(s, log=lines.append, out=tmp_path / "runs.json")
    assert len(runs) == 2 and (tmp_path / "runs.json").stat().st_size > 1000
    for r in runs:
        assert set(r["final"]) == set(ex.ARMS)
        for arm, curve in r["curves"].items():
            assert [c["step"] for c in curve] == [2, 4], arm  # eval_every = 2 of 4 steps: a curve, not an end point
            for m in ex.METRICS:
                assert math.isfinite(curve[-1][m]), (arm, m)
            assert 0.0 <= curve[-1]["f1"] <= 1.0 and 0.0 <= curve[-1]["exact_line"] <= 1.0
        shares = r["data_f1"]["mbr_choice_share"]
        assert len(shares) == s.k and abs(sum(shares) - 1.0) < 1e-9
    text = "\n".join(lines)
    assert "| mbr - union |" in text and "intervals" in text  # paired differences, multiplicity stated


def test_continuation_dataset_targets_only_the_continuation():
    import torch

    ex = load_script(Path(__file__).resolve().parents[1] / "examples" / "sequence_ensemble.py",
                     "sequence_ensemble_example")  # fmt: skip
    seqs = torch.tensor([[5, 6, 7, 8, 1, 9], [5, 6, 7, 8, 9, 9]])  # prompt 2 tokens; eos = 1, pad = 0
    ds = ex.continuation_dataset(seqs, 2, eos=1, pad=0)
    assert ds.tensors["labels"].tolist() == [[-100, -100, 7, 8, 1, -100], [-100, -100, 7, 8, 9, 9]]
    assert ds.tensors["attention_mask"].tolist() == [[1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1]]
