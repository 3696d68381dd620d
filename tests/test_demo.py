"""The demo: its smoke run end to end, its losses against hand-computed ones, and the gradient identities that decide
which union-vs-ensemble pairs it may show."""

import pytest
import torch
import torch.nn.functional as F

import fastdistill

pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")

from fastdistill.apps import demo  # noqa: E402


def test_smoke_run_prints_the_table_and_saves_the_png(tmp_path, capsys):
    assert demo.main(["--smoke", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    for name in [*demo.TEACHERS, *demo.STUDENTS, "ensemble of the 4 (prob_mean)", "wall time"]:
        assert name in out
    png = tmp_path / "learning_curves.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    assert (tmp_path / "teacher_logits_seed0.safetensors").exists()


def test_bad_arguments_are_one_line(tmp_path, capsys):
    """--seeds 0 and an --out that names a file: argparse's one-line error and exit status 2, not a traceback."""
    (tmp_path / "afile").write_text("")
    for argv, message in ((["--seeds", "0"], "--seeds must be >= 1"),
                          (["--smoke", "--out", str(tmp_path / "afile")], "is a file, not a folder")):  # fmt: skip
        with pytest.raises(SystemExit) as e:
            demo.main(argv)
        assert e.value.code == 2 and message in capsys.readouterr().err


def test_splits_are_disjoint_and_fixed():
    a, b = demo.load_digits_splits(), demo.load_digits_splits()
    assert a.sizes() == {"labelled": 100, "transfer": 1097, "test": 600}
    assert torch.equal(a.x["test"], b.x["test"]) and a.index == b.index
    assert len(set().union(*map(set, a.index.values()))) == 1797  # disjoint, and together all the digits
    assert sorted(torch.bincount(a.y["labelled"]).tolist()) == [10] * 10  # stratified


def _inputs(k=4, b=6, v=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    s = (2 * torch.randn(b, v, generator=g, dtype=torch.float64)).requires_grad_(True)
    t = 2 * torch.randn(k, b, v, generator=g, dtype=torch.float64)
    return s, t


def test_union_hard_is_mean_cross_entropy_to_each_teachers_label():
    s, t = _inputs()
    expected = torch.stack([F.cross_entropy(s, tk.argmax(-1)) for tk in t]).mean()
    torch.testing.assert_close(demo._union_hard(s, t, None), expected)


def test_ensemble_hard_is_cross_entropy_to_the_mixtures_label():
    s, t = _inputs()
    label = t.softmax(-1).mean(0).argmax(-1)
    torch.testing.assert_close(demo._ensemble_hard(s, t, None), F.cross_entropy(s, label))


def _grad(s, t, **kw):
    (g,) = torch.autograd.grad(fastdistill.kd_loss(s, t, temperature=2.0, backend="reference", **kw), s)
    return g


def test_which_union_vs_ensemble_pairs_differ():
    """Forward KL: loss_mean and prob_mean have one gradient (SPEC §1). Reverse KL: loss_mean and logit_mean have one
    gradient (sum_k w_k KL(Q||P_k) = KL(Q || softmax(mean logits)) + const), while loss_mean and prob_mean differ:
    the demo's union-vs-ensemble soft pair is reverse KL loss_mean vs prob_mean."""
    s, t = _inputs()
    torch.testing.assert_close(_grad(s, t, ensemble="loss_mean"), _grad(s, t, ensemble="prob_mean"))
    rkl = dict(divergence="reverse_kl")
    torch.testing.assert_close(_grad(s, t, ensemble="loss_mean", **rkl), _grad(s, t, ensemble="logit_mean", **rkl))
    gap = (_grad(s, t, ensemble="loss_mean", **rkl) - _grad(s, t, ensemble="prob_mean", **rkl)).abs().max()
    assert gap > 1e-3


def test_table_reports_paired_confidence_intervals():
    r = demo.DemoResult(demo.DemoSettings(seeds=(0, 1, 2)), {"labelled": 1, "transfer": 2, "test": 3})
    r.accuracy = {"student: " + next(iter(demo.STUDENTS)): [0.90, 0.91, 0.92], "student: x": [0.92, 0.92, 0.95]}
    table = demo.format_table(r)
    # differences 2, 1, 3 points: mean 2, sd 1, half-width 4.30 * 1 / sqrt(3) = 2.48
    assert "+2.0 [ -0.5,  +4.5]" in table
    m, lo, hi = demo.paired_ci([0.92, 0.92, 0.95], [0.90, 0.91, 0.92])
    assert m == pytest.approx(0.02) and hi - m == pytest.approx(0.0430 / 3**0.5, rel=1e-3)


def test_causal_lm_example_small(capsys):
    """examples/causal_lm.py --small: tokenizer trained on the stdlib, GPT-2 teachers, students through the loop and
    DistillationTrainer, token- and sequence-level KD, held-out perplexities."""
    pytest.importorskip("transformers")
    pytest.importorskip("tokenizers")
    import importlib.util
    import sys
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "examples" / "causal_lm.py"
    spec = importlib.util.spec_from_file_location("causal_lm_example", path)
    example = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = example  # dataclasses look their module up there
    spec.loader.exec_module(example)
    ppl = {}
    with demo.single_thread():
        ppl = example.run(example.Settings.small(), log=lambda *a: None)
    assert len(ppl) == 7 and all(1.0 < v < 1e4 for v in ppl.values())
    # the data: right padding is masked out of the labels
    ds = example.to_sequences(example.train_tokenizer(["a = 1\nb = 2\n" * 50], 300), ["x = 1\n" * 3], 16)
    ids, mask, labels = ds.tensors["input_ids"], ds.tensors["attention_mask"], ds.tensors["labels"]
    assert (labels[mask == 0] == -100).all() and (labels[mask == 1] == ids[mask == 1]).all() and (mask == 0).any()


def test_the_documented_table_is_what_the_demo_prints(tmp_path):
    """The full demo (5 seeds, ~45 s) against the table docs/training.md and the README show: a change that moves a
    number (the CPU kernels' rounding does) fails here until the docs are rerun (they were stale for a day). Run as
    `make demo` runs it: in a process of its own with torch's CPU kernels held to AVX2 (demo.REPRODUCIBLE_ENV; an
    AVX-512 machine otherwise prints student rows 0.1 point off)."""
    import os
    import re
    import subprocess
    import sys
    from pathlib import Path

    env = {**os.environ, **demo.REPRODUCIBLE_ENV}
    run = subprocess.run([sys.executable, "-m", "fastdistill", "demo", "--out", str(tmp_path)], env=env,
                         capture_output=True, text=True, timeout=900)  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    assert "documented table is printed with" not in run.stderr  # the note of a run without the settings
    out = run.stdout.splitlines()
    printed = [line for line in out if re.match(r"\| (teacher|student|ensemble)", line)]
    assert len(printed) == len(demo.TEACHERS) + len(demo.STUDENTS) + 1
    root = Path(__file__).resolve().parents[1]
    training = (root / "docs" / "training.md").read_text()
    assert all(line in training for line in printed), "docs/training.md's demo table differs from the demo's output"
    readme = (root / "README.md").read_text()
    for line in printed:  # the README's compact form: "| name | 92.0 ± 0.7 | +1.4 [+0.3, +2.4] |", minus signs as −
        cells = [" ".join(c.split()) for c in line.strip("|").split("|")]
        cells[2] = cells[2].replace("[ ", "[").replace("-", "−")
        compact = ("| " + " | ".join(cells).rstrip() + " |").replace(" |  |", " | |")
        assert compact in readme, f"the README's demo table lacks {compact!r}"
