"""The fastdistill command: config errors are one line naming the option, exit 2, no traceback; train runs."""

import dataclasses
import importlib.metadata
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

import fastdistill
from fastdistill import cli
from fastdistill.training import config

ROOT = Path(__file__).resolve().parents[1]

# a small but complete config: 2 teachers trained briefly on the digits, a student, 20 steps
GOOD = """
seed: 0
output_dir: {out}
data: {{factory: "fastdistill.apps.demo:digits_datasets"}}
student: {{factory: "fastdistill.apps.demo:make_student"}}
teachers:
  - {{factory: "fastdistill.apps.demo:trained_teacher", kwargs: {{name: "MLP 256 (pixels)", epochs: 2}}}}
  - {{factory: "fastdistill.apps.demo:trained_teacher", kwargs: {{name: "CNN 16-32 (image)", epochs: 2}}}}
kd: {{temperature: 2.0, divergence: jsd}}
optim: {{lr: 1e-2, scheduler: cosine, warmup_steps: 2}}
train: {{batch_size: 32, max_steps: 20, eval_every: 10, checkpoint_every: 10, progress: false}}
"""


def _write(tmp_path, text, name="c.yaml"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return str(path)


def _good(tmp_path):
    return yaml.safe_load(GOOD.format(out=tmp_path / "run"))


@pytest.mark.parametrize(
    "change, needle",
    [
        (lambda c: c["kd"].update(temprature=2.0), "unknown option 'kd.temprature' in kd (did you mean 'temperature'"),
        (lambda c: c["kd"].update(temperature=0), "kd.temperature must be finite and in [1e-19, 1e+19]; got 0.0"),
        (lambda c: c["kd"].update(divergence="kll"), "kd.divergence must be one of"),
        (lambda c: c["kd"].update(ce_weight=1.5), "kd.ce_weight must be finite and in [0.0, 1.0]"),
        (lambda c: c["train"].update(batch_size=0), "train.batch_size must be >= 1, got 0"),
        (lambda c: c["train"].update(max_steps="ten"), "train.max_steps must be an integer or null, got 'ten'"),
        (lambda c: c["train"].update(progress="yes"), "train.progress must be true or false"),
        (lambda c: c["train"].pop("max_steps"), "train.max_steps or train.epochs must be set"),
        (lambda c: c.update(lr=1.0), "unknown option 'lr' in the config; options: seed,"),
        (lambda c: c["teachers"][1].update(factori="x"), "unknown option 'teachers[1].factori'"),
        (lambda c: c["optim"].update(betas=[0.9]), "optim.betas must be two numbers"),
        (lambda c: c["kd"].update(teacher_weights=[1.0, 2.0, 3.0]), "kd.teacher_weights has 3 weights for 2"),
    ],
)
def test_bad_key_or_value_names_it(tmp_path, change, needle):
    raw = _good(tmp_path)
    change(raw)
    with pytest.raises(config.ConfigError) as e:
        config.parse_config(raw)
    msg = str(e.value)
    assert needle in msg and "\n" not in msg


def test_bad_factory_and_file_errors(tmp_path, capsys):
    raw = _good(tmp_path)
    raw["student"]["factory"] = "fastdistill.apps.demo:no_such_thing"
    assert cli.main(["train", "--config", _write(tmp_path, yaml.safe_dump(raw))]) == 2
    err = capsys.readouterr().err.strip()
    assert err == ("fastdistill train: error: student.factory: module 'fastdistill.apps.demo' has no attribute "
                   "'no_such_thing'")  # fmt: skip
    assert cli.main(["train", "--config", _write(tmp_path, "kd: [1, 2\n", "broken.yaml")]) == 2
    assert "is not valid YAML at line" in capsys.readouterr().err
    assert cli.main(["train", "--config", str(tmp_path / "missing.yaml")]) == 2
    assert "No such file" in capsys.readouterr().err
    # a relative module, a file that is not UTF-8: one line each, not a traceback
    raw["student"]["factory"] = ".models:make"
    assert cli.main(["train", "--config", _write(tmp_path, yaml.safe_dump(raw))]) == 2
    assert "student.factory: '.models' is a relative module name" in capsys.readouterr().err
    (tmp_path / "latin1.yaml").write_bytes("kd: {temperature: 2}  # température\n".encode("latin-1"))
    assert cli.main(["train", "--config", str(tmp_path / "latin1.yaml")]) == 2
    assert "is not UTF-8 text" in capsys.readouterr().err


def test_yaml_bare_off_is_the_choice_off(tmp_path):
    """YAML 1.1 reads a bare off as false: train.amp: off (a documented choice) means "off", from a file or an
    override; a bool for a choice without on / off is still an error."""
    raw = _good(tmp_path)
    raw["train"]["amp"] = False
    assert config.parse_config(raw).train.amp == "off"
    raw["train"]["amp"] = True  # no "on" among auto / bf16 / off
    with pytest.raises(config.ConfigError, match="train.amp must be one of"):
        config.parse_config(raw)
    path = _write(tmp_path, GOOD.format(out=tmp_path / "run"))
    assert config.load_config(path, ["train.amp=off"]).train.amp == "off"


def test_bad_config_from_the_shell_exits_2_without_traceback(tmp_path):
    """End to end, as a user runs it: one line on stderr, exit status 2."""
    raw = _good(tmp_path)
    raw["kd"]["temperature"] = -1.0
    proc = subprocess.run([sys.executable, "-m", "fastdistill", "train", "--config",
                           _write(tmp_path, yaml.safe_dump(raw))], capture_output=True, text=True,
                          cwd=ROOT, timeout=120)  # fmt: skip
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "fastdistill train: error: kd.temperature must be finite and in [1e-19, 1e+19]; got -1.0"]
    assert "Traceback" not in proc.stderr


def test_train_from_config_runs_and_resumes(tmp_path, capsys):
    path = _write(tmp_path, GOOD.format(out=tmp_path / "run"))
    assert cli.main(["train", "--config", path]) == 0
    out = capsys.readouterr().out
    assert out.startswith("done: step=20,") and "accuracy=" in out
    assert (tmp_path / "run" / "checkpoints" / "step-00000020" / "student.safetensors").exists()
    rows = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert len(rows) == 4  # train + eval at steps 10 and 20 (log_every defaults to 10)
    # the same config with resume: latest and more steps continues from step 20
    raw = yaml.safe_load(Path(path).read_text())
    raw["train"].update(max_steps=30, resume="latest")
    assert cli.main(["train", "--config", _write(tmp_path, yaml.safe_dump(raw), "more.yaml")]) == 0
    assert capsys.readouterr().out.startswith("done: step=30,")


def test_print_config_documents_every_option(capsys):
    assert cli.main(["train", "--print-config"]) == 0
    text = capsys.readouterr().out
    assert yaml.safe_load(text)["kd"]["temperature"] == 1.0
    docs = config.option_docs()
    assert len(docs) > 40 and all(doc for _, _, _, doc in docs)
    for name, *_ in docs:
        assert name.rsplit(".", 1)[-1].removesuffix("[]") + ":" in text


def test_bench_passes_its_options_on(monkeypatch):
    """bench runs `python -m benchmarks.run` in the checkout as a child, options passed on, its status returned
    (nothing put on the importing process's sys.path)."""
    seen = []

    def fake_run(cmd, cwd):
        seen.append((cmd, cwd))
        return subprocess.CompletedProcess(cmd, 3)

    monkeypatch.chdir(ROOT)
    monkeypatch.setattr(cli.subprocess, "run", fake_run)
    path_before = list(sys.path)
    assert cli.main(["bench", "--quick", "--providers", "cpu"]) == 3
    assert seen == [([sys.executable, "-m", "benchmarks.run", "--quick", "--providers", "cpu"], str(ROOT))]
    assert sys.path == path_before


def test_bench_child_finds_the_checkout(monkeypatch, capfd):
    """The child imports benchmarks.run from the current directory alone (no PYTHONPATH)."""
    monkeypatch.chdir(ROOT)
    monkeypatch.delenv("PYTHONPATH", raising=False)
    assert cli.main(["bench", "--help"]) == 0
    assert "usage: python -m benchmarks.run" in capfd.readouterr().out


def test_bench_outside_a_checkout_says_so(tmp_path):
    env = {**os.environ, "PYTHONPATH": ""}
    proc = subprocess.run([sys.executable, "-m", "fastdistill", "bench"], capture_output=True, text=True,
                          cwd=tmp_path, env=env, timeout=120)  # fmt: skip
    assert proc.returncode == 2 and "from the root of a checkout" in proc.stderr and "Traceback" not in proc.stderr


def test_console_script_and_usage(capsys):
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts == {"fastdistill": "fastdistill.cli:main"}
    with pytest.raises(SystemExit) as e:
        cli.main(["nope"])
    assert e.value.code == 2 and "invalid choice" in capsys.readouterr().err


def test_version(capsys, monkeypatch):
    with pytest.raises(SystemExit) as e:
        cli.main(["--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out.strip() == f"fastdistill {importlib.metadata.version('fastdistill')}"

    def not_installed(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "version", not_installed)  # a source tree on the path
    assert cli.version() == fastdistill.__version__


# --- overrides and the saved config: a seconds-long config (factories below, "test_cli:...") -----------------------


# the factories "test_cli:tiny_data" / "test_cli:tiny_model" are test_faults' (one definition, two names)
from test_faults import tiny_data, tiny_model  # noqa: E402, F401


def _tiny(tmp_path):
    return _write(tmp_path, yaml.safe_dump({
        "output_dir": str(tmp_path / "run"),
        "data": {"factory": "test_cli:tiny_data", "kwargs": {"marker": str(tmp_path / "factory_ran")}},
        "student": {"factory": "test_cli:tiny_model"},
        "teachers": [{"factory": "test_cli:tiny_model", "kwargs": {"seed": 1}}],
        "train": {"batch_size": 4, "max_steps": 2, "progress": False},
    }), "tiny.yaml")  # fmt: skip


def test_key_value_overrides_after_the_config(tmp_path, capsys):
    """As torchtune's `tune run` and Hydra take them: dotted keys, values read as YAML, into lists and kwargs."""
    overrides = ["kd.temperature=4", "train.max_steps=3", "student.kwargs.hidden=5", "teachers.0.kwargs.seed=2",
                 "optim.betas=[0.8, 0.9]", "train.shift_labels=false", "kd.teacher_weights=null"]  # fmt: skip
    assert cli.main(["train", "--config", _tiny(tmp_path), *overrides]) == 0
    assert capsys.readouterr().out.startswith("done: step=3,")
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert saved["kd"]["temperature"] == 4.0 and saved["train"]["max_steps"] == 3
    assert saved["student"]["kwargs"] == {"hidden": 5} and saved["teachers"][0]["kwargs"] == {"seed": 2}
    assert saved["optim"]["betas"] == [0.8, 0.9] and saved["train"]["shift_labels"] is False


@pytest.mark.parametrize("override, message", [
    ("kd.temprature=4", "unknown option 'kd.temprature' in kd (did you mean 'temperature'?)"),
    ("train.max_steps=ten", "train.max_steps must be an integer or null, got 'ten'"),
    ("student.kwargs.widht=3", "student.kwargs do not fit test_cli:tiny_model(hidden=8, seed=0): got an unexpected "
                               "keyword argument 'widht'"),
    ("kd.temperature", "override 'kd.temperature' must look like section.option=value (e.g. kd.temperature=4)"),
    ("train.max_steps.x=1", "override 'train.max_steps.x=1': train.max_steps is 2, which has no 'x'"),
    ("teachers.3.factory=m:f", "override 'teachers.3.factory=m:f': teachers is a list of 1, which has no '3'"),
    ("kd.temperature=[1", "override 'kd.temperature=[1': the value is not valid YAML"),
])  # fmt: skip
def test_a_bad_override_is_one_line_and_runs_nothing(tmp_path, capsys, override, message):
    assert cli.main(["train", "--config", _tiny(tmp_path), override]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"fastdistill train: error: {message}"), err
    assert not (tmp_path / "factory_ran").exists() and not (tmp_path / "run" / "config.yaml").exists()


def test_overrides_need_a_config(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["train", "--print-config", "kd.temperature=4"])
    assert e.value.code == 2 and "overrides apply to a --config" in capsys.readouterr().err


def test_the_resolved_config_is_saved_and_runs_again(tmp_path, capsys):
    """output_dir/config.yaml holds every option with its value after the overrides; --config reads it back."""
    path = _tiny(tmp_path)
    assert cli.main(["train", "--config", path, "kd.temperature=3", "train.checkpoint_every=2"]) == 0
    saved = tmp_path / "run" / "config.yaml"
    cfg = config.load_config(saved)
    assert cfg == config.load_config(path, ["kd.temperature=3", "train.checkpoint_every=2"])
    raw = yaml.safe_load(saved.read_text())
    for f in dataclasses.fields(config.TrainConfig):  # every option, not only those the file gave
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            assert set(raw[f.name]) == {g.name for g in dataclasses.fields(value)}, f.name
        else:
            assert f.name in raw
    capsys.readouterr()
    assert cli.main(["train", "--config", str(saved), "train.max_steps=4", "train.resume=latest"]) == 0
    assert capsys.readouterr().out.startswith("done: step=4,")
    assert yaml.safe_load(saved.read_text())["train"]["resume"] == "latest"


def test_fused_linear_of_a_model_without_a_head_is_one_line(tmp_path, capsys):
    """train.fused_linear with the digits MLPs (no output head to fuse): a one-line error naming the option."""
    raw = _good(tmp_path)
    raw["train"]["fused_linear"] = True
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(raw))
    assert cli.main(["train", "--config", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("fastdistill train: error: train.fused_linear: fused_linear: student has no linear output "
                          "head") and "\n" not in err, err


import torch  # noqa: E402

from fastdistill.training import ArrayDataset  # noqa: E402


def unlabelled_data(n=16, marker=None):
    g = torch.Generator().manual_seed(0)
    return {"train": ArrayDataset(input=torch.randn(n, 4, generator=g))}


def counted_model(marker, seed=0):
    """tiny_model, leaving a marker: the tests check that a contradiction stops the run before teachers are built."""
    Path(marker).write_text("a teacher factory ran")
    return tiny_model(seed=seed)


def test_an_override_into_an_aliased_section_changes_that_section_only(tmp_path, capsys):
    """YAML aliases (*name) are one object after parsing: an override into one teacher's kwargs must not change the
    other teacher's."""
    text = (f"output_dir: {tmp_path / 'run'}\ndata: {{factory: 'test_cli:tiny_data'}}\n"
            "student: {factory: 'test_cli:tiny_model'}\n"
            "teachers:\n  - {factory: 'test_cli:tiny_model', kwargs: &tk {seed: 1}}\n"
            "  - {factory: 'test_cli:tiny_model', kwargs: *tk}\n"
            "train: {batch_size: 4, max_steps: 1, progress: false}\n")  # fmt: skip
    assert cli.main(["train", "--config", _write(tmp_path, text), "teachers.0.kwargs.seed=7"]) == 0
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert [t["kwargs"]["seed"] for t in saved["teachers"]] == [7, 1]


@pytest.mark.parametrize("overrides, message", [
    (["data.factory=test_cli:unlabelled_data", "kd.ce_weight=0.5"],
     "data.factory: the training set's items have no labels, and kd.ce_weight=0.5 trains on labels"),
    (["data.factory=test_cli:unlabelled_data", "teachers=[]"],
     "data.factory: the training set's items have no labels, and without teachers or a teacher_cache"),
])  # fmt: skip
def test_a_run_that_needs_labels_on_unlabelled_data_is_one_line_before_the_teachers(tmp_path, capsys, overrides,
                                                                                  message):  # fmt: skip
    marker = tmp_path / "teacher_built"
    extra = ["teachers.0.factory=test_cli:counted_model", f"teachers.0.kwargs.marker={marker}"]
    overrides = overrides if "teachers=[]" in overrides else [*extra, *overrides]
    assert cli.main(["train", "--config", _tiny(tmp_path), *overrides]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"fastdistill train: error: {message}"), err
    assert not marker.exists()


def test_train_teachers_with_a_cache_is_a_config_error():
    from fastdistill.training.config import ConfigError, parse_config

    with pytest.raises(ConfigError, match="train.train_teachers trains live teachers; a teacher_cache"):
        parse_config({"data": {"factory": "m:f"}, "student": {"factory": "m:f"}, "teacher_cache": "c.safetensors",
                      "train": {"max_steps": 1, "train_teachers": True}})  # fmt: skip


def test_codistill_from_the_config_is_the_loop_with_codistill_loss(tmp_path, capsys):
    """codistill.enabled: the run is DistillationLoop(loss=CodistillLoss(...), train_teachers=True) with kd's
    divergence options and codistill's weights: the same logged losses (both models' parts) and the same student
    and teacher after 3 steps as that loop built by hand."""
    import json

    import safetensors.torch

    from fastdistill import CodistillLoss
    from fastdistill.training import DistillationLoop
    from fastdistill.training.loop import seed_everything

    overrides = ["codistill.enabled=true", "codistill.weight_ab=0.5", "codistill.hard_weight=0.7",
                 "codistill.burn_in_steps=1", "kd.temperature=2.0", "kd.divergence=jsd", "train.max_steps=3",
                 "train.log_every=1", "train.checkpoint_every=3", "optim.optimizer=sgd", "optim.lr=0.1"]  # fmt: skip
    assert cli.main(["train", "--config", _tiny(tmp_path), *overrides]) == 0
    assert capsys.readouterr().out.startswith("done: step=3,")
    logged = [json.loads(r) for r in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]

    seed_everything(0)
    student, teacher = tiny_model(), tiny_model(seed=1)
    loss = CodistillLoss(temperature=2.0, weight_ab=0.5, hard_weight=0.7, divergence="jsd", burn_in_steps=1)
    loop = DistillationLoop(student, [teacher], loss=loss, train_teachers=True, batch_size=4, seed=0,
                            optimizer=lambda p: torch.optim.SGD(p, lr=0.1), progress=False, log_every=1,
                            output_dir=tmp_path / "hand")  # fmt: skip
    loop.fit(tiny_data()["train"], max_steps=3)
    assert {"loss_a", "loss_b"} <= set(logged[0])
    for got, want in zip(logged, loop.history, strict=True):
        for key in ("loss", "loss_a", "loss_b"):
            assert got[key] == pytest.approx(want[key], rel=1e-6), (got["step"], key)
    ckpt = tmp_path / "run" / "checkpoints" / "step-00000003"
    for name, model in (("student", student), ("teacher0", teacher)):
        saved = safetensors.torch.load_file(str(ckpt / f"{name}.safetensors"))
        for key, p in model.state_dict().items():
            torch.testing.assert_close(saved[key], p, msg=f"{name}.{key}")
    assert not torch.equal(teacher[0].weight, tiny_model(seed=1)[0].weight)  # the teacher trained


@pytest.mark.parametrize("overrides, message", [
    (["teachers=[]"], "codistill.enabled co-trains the student with exactly one teacher; got 0 teachers"),
    (["teachers=[{factory: 'test_cli:tiny_model'}, {factory: 'test_cli:tiny_model'}]"],
     "codistill.enabled co-trains the student with exactly one teacher; got 2 teachers"),
    (["kd.ce_weight=0.3"], "kd.ce_weight does not apply with codistill.enabled (each model's cross-entropy weight is "
                           "codistill.hard_weight)"),
    (["train.fused_linear=true"], "codistill.enabled: train.fused_linear computes kd_loss only"),
    (["kd.backend=cuda"], "kd.backend 'cuda' cannot run codistill_loss on cpu"),
    (["codistill.weight_ab=-1"], "codistill.weight_ab must be"),
    (["data.factory=test_cli:unlabelled_data", "codistill.burn_in_steps=2"],
     "data.factory: the training set's items have no labels, and codistill.burn_in_steps=2 trains on labels"),
])  # fmt: skip
def test_codistill_config_errors_are_one_line(tmp_path, capsys, overrides, message):
    assert cli.main(["train", "--config", _tiny(tmp_path), "codistill.enabled=true", *overrides]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"fastdistill train: error: {message}"), err
