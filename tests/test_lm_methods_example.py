"""examples/lm_methods.py --small: weak-teacher KD, co-distillation and GUIDE on tiny GPT-2s, end to end (~20 s)."""

import importlib.util
import math
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

from fastdistill.apps import single_thread  # noqa: E402


def _example():
    path = Path(__file__).resolve().parents[1] / "examples" / "lm_methods.py"
    spec = importlib.util.spec_from_file_location("lm_methods_example", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_lm_methods_example_small(tmp_path):
    ex = _example()
    lines = []
    with single_thread():
        (run,) = ex.run(ex.Settings.small(), log=lines.append, plot_path=tmp_path / "plot.png")
    keys = {key for rows in ex.EXPERIMENTS.values() for _, key in rows}
    assert keys <= set(run) and all(math.isfinite(run[k]) and run[k] > 1 for k in keys)
    # GUIDE's initialisation alone carries the teacher's knowledge: far better than a random model before training
    assert run["guide: GUIDE init, before training"] < 0.85 * run["guide: random init, before training"]
    # the co-trained pair differs from the independently trained one (both models took the KL term)
    assert run["large: co-distillation"] != run["large: independent"]
    assert run["small: co-distillation"] != run["small: independent"]
    assert (tmp_path / "plot.png").stat().st_size > 10_000
    assert any(line.startswith("| paired difference") for line in lines)


@pytest.mark.parametrize("size", ["large", "small"])
def test_fast_cpu_models_compute_the_same_function(size):
    """gpt2(fast_cpu=True) changes kernels, not the model: same weights under the same seed, same logits up to
    rounding, in training (dropout off) and evaluation; dropout=0 leaves no stochastic layer."""
    import torch

    ex = _example()
    ref, fast = ex.gpt2(size, 97, 16, 5, dropout=0.0), ex.gpt2(size, 97, 16, 5, dropout=0.0, fast_cpu=True)
    assert fast.config.activation_function == "gelu_pytorch_tanh" and fast.config._attn_implementation == "eager"
    for (name, a), (_, b) in zip(ref.state_dict().items(), fast.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    x = torch.randint(0, 97, (3, 16), generator=torch.Generator().manual_seed(0))
    for mode in (True, False):
        ref.train(mode), fast.train(mode)
        torch.testing.assert_close(fast(input_ids=x).logits, ref(input_ids=x).logits, rtol=1e-5, atol=1e-5)
    ref.train()
    torch.testing.assert_close(ref(input_ids=x).logits, ref(input_ids=x).logits, rtol=0, atol=0)
    assert ex.gpt2(size, 97, 16, 5).config.resid_pdrop == 0.1  # GPT-2's default where the docs' numbers came from
