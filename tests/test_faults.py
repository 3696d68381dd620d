"""Never a silent wrong number (issue 14): a config ``fastdistill train`` cannot run is one line naming the option and
exit status 2, checked before any factory runs; damaged checkpoints name their file, and resuming skips them."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import safetensors.torch
import torch
import yaml
from torch import nn

from fastdistill import cli
from fastdistill.training import ArrayDataset, write_teacher_cache
from fastdistill.training import checkpoint as ckpt

ROOT = Path(__file__).resolve().parents[1]
CUDA = torch.cuda.is_available()
BF16 = CUDA and torch.cuda.is_bf16_supported()


# factories the configs below name as "test_faults:..." (conftest puts tests/ on sys.path)
def tiny_data(n=16, marker=None):
    """A visible side effect: the tests check that a bad config never gets this far."""
    if marker is not None:
        Path(marker).write_text("the data factory ran")
    g = torch.Generator().manual_seed(0)
    return {"train": ArrayDataset(input=torch.randn(n, 4, generator=g), labels=torch.randint(0, 3, (n,), generator=g))}


def tiny_model(hidden=8, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, hidden), nn.ReLU(), nn.Linear(hidden, 3))


def _raw(tmp_path, **train):
    return {
        "seed": 0, "output_dir": str(tmp_path / "run"),
        "data": {"factory": "test_faults:tiny_data", "kwargs": {"marker": str(tmp_path / "factory_ran")}},
        "student": {"factory": "test_faults:tiny_model"},
        "teachers": [{"factory": "test_faults:tiny_model", "kwargs": {"seed": 1}}],
        "train": {"batch_size": 4, "max_steps": 2, "progress": False, **train},
    }  # fmt: skip


def _train(tmp_path, raw, capsys):
    """(exit status, stderr lines) of `fastdistill train` on ``raw``."""
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(raw))
    rc = cli.main(["train", "--config", str(path)])
    return rc, capsys.readouterr().err.strip().splitlines()


def test_the_tiny_config_runs(tmp_path, capsys):
    """The base of the cases below is a good config: each case breaks exactly one thing."""
    assert _train(tmp_path, _raw(tmp_path), capsys)[0] == 0
    assert (tmp_path / "factory_ran").exists()


def _not_a_cache(tmp_path, raw):
    (tmp_path / "notes.txt").write_text("these are my notes, not a teacher-logit cache\n")
    raw.update(teachers=[], teacher_cache=str(tmp_path / "notes.txt"))


def _checkpoint_of_another_model(tmp_path, raw):
    safetensors.torch.save_model(tiny_model(hidden=5), str(tmp_path / "other.safetensors"))
    raw["student"]["checkpoint"] = str(tmp_path / "other.safetensors")


def _not_safetensors(tmp_path, raw):
    torch.save(tiny_model().state_dict(), tmp_path / "weights.pt")  # a pickle
    raw["student"]["checkpoint"] = str(tmp_path / "weights.pt")


no_cuda = pytest.mark.skipif(CUDA, reason="CUDA is available here")
BAD = [
    pytest.param(lambda p, c: c["train"].update(device="banana"), "train.device must be a torch device", False,
                 id="device"),
    pytest.param(lambda p, c: c["train"].update(device="cuda"),
                 "train.device is 'cuda' but this machine has 0 CUDA device(s)", False, id="cuda", marks=no_cuda),
    pytest.param(lambda p, c: c["train"].update(amp="bf16"), "train.amp: amp='bf16' autocasts on a CUDA", False,
                 id="bf16", marks=pytest.mark.skipif(BF16, reason="bf16 runs here")),
    # T**2 scales the loss: 1e300**2 overflows (the range is functional.check_hyperparameters')
    pytest.param(lambda p, c: c.update(kd={"temperature": 1e300}), "kd.temperature must be finite and in [", False,
                 id="temperature"),
    pytest.param(lambda p, c: c.update(seed=2**70), "seed must be in [0, 17592186044415], got 1180591620717411303424",
                 False, id="seed"),
    pytest.param(lambda p, c: c["train"].update(resume=str(p / "nowhere")), "train.resume: ", False, id="resume"),
    pytest.param(lambda p, c: (p / "taken").write_text("") or c.update(output_dir=str(p / "taken")),
                 "is a file; expected a directory", False, id="output_dir"),
    pytest.param(_not_a_cache, "teacher_cache: ", False, id="cache"),
    pytest.param(lambda p, c: c.update(kd={"backend": "cuda"}), "kd.backend 'cuda' cannot run kd_loss on cpu: ", False,
                 id="backend", marks=no_cuda),
    pytest.param(lambda p, c: c["student"].update(checkpoint=str(p / "no.safetensors")),
                 "student.checkpoint: file ", False, id="checkpoint_missing"),
    pytest.param(_not_safetensors, "is not a readable safetensors file", False, id="checkpoint_pickle"),
    pytest.param(lambda p, c: c["student"].update(kwargs={"widht": 3}),
                 "student.kwargs do not fit test_faults:tiny_model(hidden=8, seed=0): got an unexpected keyword "
                 "argument 'widht'", False, id="kwargs"),
    # only loading the weights into the built model shows that their keys do not fit: after the factories ran
    pytest.param(_checkpoint_of_another_model, "student.checkpoint: ", True, id="checkpoint_keys"),
]


@pytest.mark.parametrize("change, needle, factory_runs", BAD)
def test_a_setting_that_cannot_run_is_one_line_and_exit_2(tmp_path, capsys, change, needle, factory_runs):
    raw = _raw(tmp_path)
    change(tmp_path, raw)
    rc, err = _train(tmp_path, raw, capsys)
    assert rc == 2, err
    assert len(err) == 1 and err[0].startswith("fastdistill train: error: ") and needle in err[0], err
    # a config runs code: a wrong one runs none, unless the problem only shows in what a factory built
    assert (tmp_path / "factory_ran").exists() == factory_runs


def test_setting_messages_say_what_is_wrong(tmp_path, capsys):
    """The cases above, spelled out where the message carries the file or the reason."""
    raw = _raw(tmp_path)
    _not_a_cache(tmp_path, raw)
    err = _train(tmp_path, raw, capsys)[1][0]
    assert "notes.txt is not a valid fastdistill teacher-logit cache: its header length" in err
    raw = _raw(tmp_path)
    _checkpoint_of_another_model(tmp_path, raw)
    err = _train(tmp_path, raw, capsys)[1][0]
    assert "other.safetensors does not fit the Sequential: size mismatch for 0.weight" in err
    raw = _raw(tmp_path, resume=str(tmp_path / "nowhere"))
    assert "nowhere' is not a checkpoint directory (no state.json)" in _train(tmp_path, raw, capsys)[1][0]


def test_resume_with_another_accumulation_is_a_config_error(tmp_path, capsys):
    """grad_accum_steps changes what a step is: resuming under another one would not continue the run."""
    assert _train(tmp_path, _raw(tmp_path, checkpoint_every=2), capsys)[0] == 0
    rc, err = _train(tmp_path, _raw(tmp_path, max_steps=4, resume="latest", grad_accum_steps=2), capsys)
    assert rc == 2 and "train.resume: checkpoint" in err[0] and "grad_accum_steps=1, this run has 2" in err[0]


def test_resume_with_another_model_is_one_line(tmp_path, capsys):
    """The same output_dir and resume: latest after the student changed: one line naming the file, the module and
    the first shape that differs (not kilobytes of state_dict keys in a traceback)."""
    assert _train(tmp_path, _raw(tmp_path, checkpoint_every=2), capsys)[0] == 0
    raw = _raw(tmp_path, max_steps=4, resume="latest")
    raw["student"]["kwargs"] = {"hidden": 5}
    rc, err = _train(tmp_path, raw, capsys)
    path = tmp_path / "run" / "checkpoints" / "step-00000002" / "student.safetensors"
    assert rc == 2 and err == [f"fastdistill train: error: train.resume: {path} does not fit the student "
                               "(Sequential): size mismatch for 0.weight: [8, 4] in the file, [5, 4] in the model "
                               "(and 2 more keys)"]  # fmt: skip


def test_resume_latest_skips_a_damaged_checkpoint_with_a_one_line_warning(tmp_path, capsys):
    assert _train(tmp_path, _raw(tmp_path, max_steps=4, checkpoint_every=2, log_every=1), capsys)[0] == 0
    newest = tmp_path / "run" / "checkpoints" / "step-00000004"
    (newest / "optimizer.json").write_text("{")
    raw = _raw(tmp_path, max_steps=6, checkpoint_every=2, log_every=1, resume="latest")
    rc, err = _train(tmp_path, raw, capsys)
    assert rc == 0 and len(err) == 1
    assert err[0].startswith(f"fastdistill train: warning: UserWarning: skipping damaged checkpoint {newest}: ")
    steps = [json.loads(r)["step"] for r in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]  # resumed from step 2: steps 3 and 4 ran twice, each is logged once


def test_config_is_checked_before_any_factory_runs(tmp_path, capsys):
    """A factory may be anything importable (here a shell command): a config wrong elsewhere must not run it."""
    raw = _raw(tmp_path)
    raw["data"] = {"factory": "os:system", "kwargs": {"command": f"touch {tmp_path / 'factory_ran'}"}}
    raw["student"]["checkpoint"] = str(tmp_path / "missing.safetensors")
    rc, err = _train(tmp_path, raw, capsys)
    assert rc == 2 and "student.checkpoint" in err[0]
    assert not (tmp_path / "factory_ran").exists()


def test_unavailable_device_from_the_shell(tmp_path):
    """End to end: one line on stderr, exit status 2, no traceback."""
    raw = _raw(tmp_path)
    raw["train"]["device"] = "banana"
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(raw))
    proc = subprocess.run([sys.executable, "-m", "fastdistill", "train", "--config", str(path)], capture_output=True,
                          text=True, cwd=ROOT, timeout=120)  # fmt: skip
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [
        "fastdistill train: error: train.device must be a torch device (cpu, cuda, cuda:1, ...), got 'banana'"]


def test_cache_of_another_dataset_is_a_config_error(tmp_path, capsys):
    data = tiny_data(n=12)["train"]
    write_teacher_cache(tmp_path / "c.safetensors", [tiny_model(seed=1)], data)
    raw = _raw(tmp_path)
    raw.update(teachers=[], teacher_cache=str(tmp_path / "c.safetensors"))
    rc, err = _train(tmp_path, raw, capsys)  # the data factory makes 16 items
    assert rc == 2 and "teacher_cache: teacher cache" in err[0] and "has 12 rows but the dataset has 16" in err[0]


# --- checkpoints -----------------------------------------------------------------------------------------------


def test_checkpoint_files_name_themselves(tmp_path):
    (tmp_path / "state.json").write_text('{"step": 3, "epo')
    with pytest.raises(ValueError, match=r"state\.json is not a readable JSON file \(JSONDecodeError"):
        ckpt.read_run_state(tmp_path)
    (tmp_path / "state.json").write_text('{"step": 3}')
    with pytest.raises(ValueError, match=r"state\.json is incomplete: no epoch, batch_in_epoch, world_size"):
        ckpt.read_run_state(tmp_path)
    ckpt.save_state({"a": torch.ones(3)}, tmp_path, "opt")
    raw = (tmp_path / "opt.safetensors").read_bytes()
    (tmp_path / "opt.safetensors").write_bytes(raw[:-4])
    with pytest.raises(ValueError, match=r"opt\.safetensors is not a readable safetensors file \(SafetensorError"):
        ckpt.load_state(tmp_path, "opt")
    with pytest.raises(ValueError, match=r"file .*nothing\.json is missing"):
        ckpt.read_json(tmp_path / "nothing.json")


def test_warnings_name_the_callers_line_and_the_command_shows_others_as_python_does(monkeypatch, capsys):
    """The reference-fallback warning had stacklevel=4 from a select() two frames under kd_loss: it named "sys:1"
    (no file, nothing to filter on), and another line under KDLoss; `fastdistill train` printed every warning, a
    torch or peft one too, as its own one-liner without file or line."""
    import warnings

    import torch

    import fastdistill
    from fastdistill import cli
    from fastdistill.ops import dispatch

    s, ts = torch.randn(3, 5), torch.randn(17, 3, 5)  # K = 17: more than the cpu kernel takes
    for call in (lambda: fastdistill.kd_loss(s, ts), lambda: fastdistill.KDLoss()(s, ts)):
        monkeypatch.setattr(dispatch, "_warned", set())
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            call()
        assert [w.filename for w in seen] == [__file__], [(w.filename, w.lineno) for w in seen]

    def theirs():
        warnings.warn("from another library", DeprecationWarning, stacklevel=1)

    shown = []
    monkeypatch.setattr(cli, "_SHOW_WARNING", lambda msg, category, filename, *_: shown.append((filename, category)))
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = cli._warning_line
        fastdistill._warnings.warn("ours")
        theirs()
    assert capsys.readouterr().err.splitlines() == ["fastdistill train: warning: UserWarning: ours"]
    assert shown == [(__file__, DeprecationWarning)]  # Python's own format, its file and line
