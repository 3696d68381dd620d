"""The training loop's parts: data order and batches (data.py), the logs (metrics.py), torchrun setup (launcher.py)
and the demo's helpers (apps): regression tests of the review of those files."""

import json
import math
import os
import re
import socket
import textwrap
from collections import namedtuple

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.utils.data import BatchSampler, DataLoader, DistributedSampler, TensorDataset

from fastdistill import cli
from fastdistill.apps import map_seeds, paired_ci
from fastdistill.training import ArrayDataset, DistillationLoop, config, launcher
from fastdistill.training.data import epoch_batches, epoch_permutation, epoch_seed, to_device
from fastdistill.training.metrics import MetricsLogger

# --- data.py ------------------------------------------------------------------------------------------------------


def _orders(loader, epochs=3):
    return [[int(x) for (b,) in epoch_batches(loader, seed=0, epoch=e) for x in b] for e in range(epochs)]


def test_a_distributed_sampler_inside_a_batch_sampler_gets_its_epoch():
    """DataLoader(batch_sampler=BatchSampler(DistributedSampler(...))): the layout the loop's evaluate() and its
    "no DistributedSampler" warning recognise; each epoch must reshuffle, as with sampler=DistributedSampler."""
    ds = TensorDataset(torch.arange(16))
    inner = DistributedSampler(ds, num_replicas=2, rank=0, shuffle=True, seed=0)
    orders = _orders(DataLoader(ds, batch_sampler=BatchSampler(inner, batch_size=4, drop_last=False)))
    assert inner.epoch == 2
    assert orders[0] != orders[1] and orders[1] != orders[2]
    plain = DistributedSampler(ds, num_replicas=2, rank=0, shuffle=True, seed=0)
    assert orders == _orders(DataLoader(ds, sampler=plain, batch_size=4))  # the same orders as sampler=


def test_to_device_keeps_named_tuples():
    Pair = namedtuple("Pair", "image mask")
    out = to_device({"input": Pair(torch.zeros(2), torch.ones(2))}, torch.device("cpu"))
    assert isinstance(out["input"], Pair) and torch.equal(out["input"].mask, torch.ones(2))
    assert to_device((torch.zeros(1), [torch.ones(1)]), torch.device("cpu"))[1][0].item() == 1.0


def test_a_dict_of_tensors_as_train_data_is_a_clear_type_error():
    loop = DistillationLoop(nn.Linear(4, 3), progress=False)
    batch = {"input": torch.randn(8, 4), "labels": torch.randint(0, 3, (8,))}
    with pytest.raises(TypeError, match=r"one batch, not a dataset: give ArrayDataset\(\*\*batch\)"):
        loop.fit(batch, max_steps=1)
    loop.fit(ArrayDataset(**batch), max_steps=1)  # what the message says works


def test_array_dataset_errors_name_the_tensor():
    with pytest.raises(ValueError, match="ArrayDataset needs at least one tensor"):
        ArrayDataset()
    with pytest.raises(ValueError, match="ArrayDataset temperature is a 0-d tensor; each tensor needs a first"):
        ArrayDataset(input=torch.randn(3, 2), temperature=torch.tensor(2.0))
    with pytest.raises(ValueError, match=r"must share their first dimension, got \{'input': 3, 'labels': 2\}"):
        ArrayDataset(input=torch.randn(3, 2), labels=torch.zeros(2))


def test_epoch_seed_takes_any_integer_seed_as_the_generator_does():
    assert epoch_seed(3, 2) == 3 * 1_000_003 + 2  # unchanged where it fitted
    # a negative seed: the generator already read it modulo 2**64, so its orders stay the same
    assert epoch_seed(-1, 0) == 2**64 - 1_000_003
    expected = torch.randperm(10, generator=torch.Generator().manual_seed(-1_000_003))
    assert torch.equal(epoch_permutation(10, -1, 0, True), expected)
    # a large one (the loop's seed is not capped as a config's is) wraps instead of an overflow at the first batch
    assert len(epoch_permutation(10, 2**60, 0, True)) == 10
    loop = DistillationLoop(nn.Linear(4, 3), progress=False, seed=2**60, batch_size=4)
    loop.fit(ArrayDataset(input=torch.randn(8, 4), labels=torch.randint(0, 3, (8,))), max_steps=2)


# --- metrics.py ---------------------------------------------------------------------------------------------------


def test_metrics_take_one_element_tensors_and_numpy_scalars(tmp_path):
    np = pytest.importorskip("numpy")
    logger = MetricsLogger(tmp_path)
    record = logger.log("eval", {"accuracy": torch.tensor(0.25), "n": np.int64(3), "f": np.float32(0.5)}, step=1,
                        epoch=0)  # fmt: skip
    assert record == {"step": 1, "epoch": 0, "split": "eval", "accuracy": 0.25, "n": 3, "f": 0.5}
    assert json.loads((tmp_path / "metrics.jsonl").read_text()) == record
    assert (tmp_path / "metrics.csv").read_text().splitlines()[1] == "1,0,eval,accuracy,0.25"
    with pytest.raises(TypeError, match=r"metric eval/per_class: expected a number .* of shape \[3\]"):
        logger.log("eval", {"per_class": torch.ones(3)}, step=2, epoch=0)
    assert len(logger.history) == 1 and len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 1


def test_an_eval_fn_returning_a_tensor_does_not_crash_the_run(tmp_path):
    x, y = torch.randn(32, 4), torch.randint(0, 3, (32,))
    loop = DistillationLoop(nn.Linear(4, 3), progress=False, output_dir=tmp_path, batch_size=8)

    def eval_fn(loop):
        with torch.no_grad():
            return {"accuracy": (loop.student(x).argmax(-1) == y).float().mean()}

    loop.fit(ArrayDataset(input=x, labels=y), max_steps=4, eval_fn=eval_fn, eval_every=2)
    evals = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in evals if r["split"] == "eval"] == [2, 4]


# --- launcher.py --------------------------------------------------------------------------------------------------

CONFIG = """
seed: 0
output_dir: {out}
data: {{factory: "fastdistill.apps.demo:digits_datasets", kwargs: {{labels_on_transfer: true}}}}
student: {{factory: "fastdistill.apps.demo:make_student"}}
train: {{batch_size: 16, max_steps: 2, progress: false, device: {device}}}
"""


def _config(tmp_path, device="cpu"):
    path = tmp_path / f"{device}.yaml"
    path.write_text(textwrap.dedent(CONFIG.format(out=tmp_path / "run", device=device)))
    return str(path)


class _Stop(Exception):
    pass


@pytest.fixture
def torchrun_on_two_gpus(monkeypatch):
    """torchrun's environment for rank 1 of 2 on a machine with 2 (mocked) GPUs; records what the launcher asks of
    torch before the process group starts (init_process_group stops the run)."""
    pytest.importorskip("sklearn")
    calls = []
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "29555")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: calls.append(("set_device", str(torch.device(d)))))

    def init(backend=None, **kw):
        calls.append(("init_process_group", backend))
        raise _Stop

    monkeypatch.setattr(dist, "init_process_group", init)
    return calls


@pytest.mark.parametrize(
    "device, expected",
    [
        ("cpu", [("init_process_group", "gloo")]),  # not NCCL, which cannot reduce a cpu run's tensors
        ("cuda", [("set_device", "cuda:1"), ("init_process_group", "nccl")]),  # this rank's GPU, not cuda:0
        ("null", [("set_device", "cuda:1"), ("init_process_group", "nccl")]),
        ("cuda:0", [("set_device", "cuda:0"), ("init_process_group", "nccl")]),  # an explicit index as given
    ],
)
def test_torchrun_backend_and_device_follow_train_device(tmp_path, torchrun_on_two_gpus, device, expected):
    with pytest.raises(_Stop):
        launcher.run(config.load_config(_config(tmp_path, device), []))
    assert torchrun_on_two_gpus == expected


def test_torchrun_local_rank_beyond_the_visible_gpus_is_a_config_error(tmp_path, torchrun_on_two_gpus, monkeypatch):
    monkeypatch.setenv("LOCAL_RANK", "2")
    with pytest.raises(config.ConfigError, match=r"cuda:2 under torchrun, but this process sees 2 CUDA device"):
        launcher.run(config.load_config(_config(tmp_path, "cuda"), []))
    assert torchrun_on_two_gpus == []  # nothing started


@pytest.mark.parametrize(
    "env, message",
    [
        ({"WORLD_SIZE": "two"}, "torchrun environment: WORLD_SIZE must be an integer, got 'two'"),
        ({"WORLD_SIZE": "2", "MASTER_PORT": "29555"}, "WORLD_SIZE=2 but RANK is not set"),
        ({"WORLD_SIZE": "2", "RANK": "2", "MASTER_ADDR": "h", "MASTER_PORT": "1"}, "RANK must be in [0, 1], got 2"),
        ({"WORLD_SIZE": "2", "RANK": "0", "MASTER_PORT": "29555"}, "WORLD_SIZE=2 but MASTER_ADDR is not set"),
        ({"WORLD_SIZE": "2", "RANK": "0", "MASTER_ADDR": "h", "MASTER_PORT": "x"}, "MASTER_PORT must be an integer"),
    ],
)
def test_a_broken_torchrun_environment_is_one_line(tmp_path, capsys, monkeypatch, env, message):
    pytest.importorskip("sklearn")
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert cli.main(["train", "--config", _config(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("fastdistill train: error: ") and message in err
    assert not dist.is_initialized()


BROKEN_ENVIRONMENTS = [
    ({"WORLD_SIZE": "two"}, "WORLD_SIZE must be an integer, got 'two'"),
    ({"WORLD_SIZE": "2", "MASTER_PORT": "29555"}, "WORLD_SIZE=2 but RANK is not set"),
    ({"WORLD_SIZE": "2", "RANK": "2", "MASTER_ADDR": "h", "MASTER_PORT": "1"}, "RANK must be in [0, 1], got 2"),
]


@pytest.mark.parametrize("env, message", BROKEN_ENVIRONMENTS)
def test_init_distributed_names_a_broken_torchrun_environment(monkeypatch, env, message):
    """A script's own init_distributed() checks the environment as the launcher does: a rank beyond WORLD_SIZE
    waited in the rendezvous forever, WORLD_SIZE=two was a bare int() traceback."""
    from fastdistill.training.loop import init_distributed

    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ValueError, match=re.escape("torchrun environment: ") + ".*" + re.escape(message)):
        init_distributed()
    assert not dist.is_initialized()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun_worker(rank, world, port, path, out):
    torch.set_num_threads(1)
    os.environ.update(WORLD_SIZE=str(world), RANK=str(rank), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))  # fmt: skip
    summary = launcher.run(config.load_config(path, []))
    assert not dist.is_initialized()  # the launcher started the group, so it destroys it
    torch.save(summary["step"], f"{out}/rank{rank}.pt")


def test_launcher_runs_under_a_torchrun_environment(tmp_path):
    """Two CPU processes with torchrun's variables: the launcher starts the gloo group, trains, destroys it."""
    pytest.importorskip("sklearn")
    mp.spawn(_torchrun_worker, args=(2, _free_port(), _config(tmp_path), str(tmp_path)), nprocs=2, join=True)
    assert [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)] == [2, 2]
    assert (tmp_path / "run" / "config.yaml").exists()


# --- apps: the demo and its helpers ------------------------------------------------------------------------------


def test_paired_ci_refuses_lists_of_different_lengths():
    with pytest.raises(ValueError, match="a has 4 values and b has 3"):
        paired_ci([0.9, 0.8, 0.7, 0.95], [0.5, 0.5, 0.5])


def _threads(seed):
    return torch.get_num_threads()


def test_map_seeds_runs_on_one_thread_here_as_in_its_processes():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        assert map_seeds(_threads, [0, 1]) == [1, 1]  # as each spawned process: the same numbers
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_demo_table_says_how_many_intervals_and_marks_the_corrected_ones():
    pytest.importorskip("sklearn")
    pytest.importorskip("scipy")
    from fastdistill.apps import demo

    base = [0.900, 0.905, 0.915, 0.895, 0.910]
    r = demo.DemoResult(demo.DemoSettings(), {"labelled": 1, "transfer": 2, "test": 3})
    r.accuracy = {"student: " + next(iter(demo.STUDENTS)): base,
                  "student: clear": [b + d for b, d in zip(base, (0.030, 0.031, 0.029, 0.030, 0.032))],
                  "student: marginal": [b + d for b, d in zip(base, (0.015, 0.005, 0.010, 0.018, 0.002))],
                  "student: union = ensemble: prob_mean KL (Hinton)": list(base)}  # fmt: skip
    table = demo.format_table(r)
    rows = {line.split("|")[1].strip(): line for line in table.splitlines() if line.startswith("| student: ")}
    assert rows["student: clear"].rstrip(" |").endswith("]*")  # excludes 0 after the correction for 3
    assert paired_ci(r.accuracy["student: marginal"], base)[1] > 0  # its 95% interval alone excludes 0, but
    assert not rows["student: marginal"].rstrip(" |").endswith("*")  # not at the Bonferroni level for 3
    assert "3 paired 95% intervals over 5 seeds each: about 0.2 would exclude 0 by chance" in table
    assert "exclude 0 at the Bonferroni level (1 - 0.05/3)" in table
    assert len({len(line) for line in table.splitlines() if line.startswith("|")}) == 1  # aligned columns


def _teacher_worker(rank, world, tmp):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{tmp}/rendezvous", rank=rank, world_size=world)
    from fastdistill.apps import demo

    teacher = demo.trained_teacher("MLP 256 (pixels)", seed=1, epochs=3)
    torch.save(teacher.state_dict(), f"{tmp}/teacher{rank}.pt")
    dist.destroy_process_group()


def test_trained_teacher_under_torchrun_is_the_one_process_teacher(tmp_path):
    """examples/digits.yaml's teacher factory inside a process group trains each process's copy as one process
    does (not data-parallel: another batch, fewer steps, another teacher)."""
    pytest.importorskip("sklearn")
    from fastdistill.apps import demo

    one = demo.trained_teacher("MLP 256 (pixels)", seed=1, epochs=3).state_dict()
    mp.spawn(_teacher_worker, args=(2, str(tmp_path)), nprocs=2, join=True)
    for rank in range(2):
        other = torch.load(tmp_path / f"teacher{rank}.pt")
        assert all(torch.equal(one[k], other[k]) for k in one), rank
    assert math.isfinite(float(one["body.0.weight"].sum()))


def test_a_loop_outside_the_process_group_writes_no_files(tmp_path):
    """DistillationLoop(distributed=False) inside a process group runs as one process (no DDP, world_size 1); with
    an output_dir every process would write the same files: a ValueError."""
    from fastdistill.training import DistillationLoop

    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/rendezvous", rank=0, world_size=1)
    try:
        model = torch.nn.Linear(3, 2)
        loop = DistillationLoop(model, [], distributed=False, progress=False)
        assert (loop.rank, loop.world_size, loop._ddp) == (0, 1, None)
        with pytest.raises(ValueError, match="distributed=False under torchrun"):
            DistillationLoop(model, [], distributed=False, output_dir=tmp_path / "out", progress=False)
    finally:
        dist.destroy_process_group()


def test_a_key_beside_input_is_an_error_not_dropped():
    """{"input", "attention_mask", "labels"}: the model gets batch["input"] alone, so the mask would vanish."""
    from fastdistill.training.data import split_batch

    x, mask, y = torch.ones(2, 3), torch.ones(2, 3), torch.zeros(2, dtype=torch.long)
    assert split_batch({"input": x, "labels": y, "sample_weight": torch.ones(2)}).inputs is x
    assert set(split_batch({"input_ids": x, "attention_mask": mask, "labels": y}).inputs) == {"input_ids",
                                                                                             "attention_mask"}
    with pytest.raises(ValueError, match=r"\['attention_mask'\] would be dropped"):
        split_batch({"input": x, "attention_mask": mask, "labels": y})


@pytest.mark.parametrize(
    "device, expected",
    [
        ("cpu", [("init_process_group", "gloo")]),
        (None, [("set_device", "cuda:1"), ("init_process_group", "nccl")]),
        ("cuda", [("set_device", "cuda:1"), ("init_process_group", "nccl")]),
    ],
)
def test_init_distributed_makes_the_process_gpu_current_and_fits_the_backend(torchrun_on_two_gpus, device, expected):
    """The same rule for a script that calls init_distributed itself as for the launcher."""
    from fastdistill.training.loop import init_distributed

    with pytest.raises(_Stop):
        init_distributed(device=device)
    assert torchrun_on_two_gpus == expected
