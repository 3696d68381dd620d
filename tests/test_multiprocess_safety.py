"""Several processes at once: two writers of one teacher cache or one checkpoint directory never mix their files; a
loop under torchrun without a process group says so; a teacher cache goes to spawn DataLoader workers."""

import json
import multiprocessing as mp
import pickle
import time

import pytest
import safetensors.torch
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from fastdistill.training import ArrayDataset, DistillationLoop, TeacherLogitCache, write_teacher_cache
from fastdistill.training.checkpoint import Checkpointer, find_latest, find_problem

N, D, V = 8, 4, 16


def _x():
    return torch.arange(N * D, dtype=torch.float32).reshape(N, D) / 10


def _teacher():
    torch.manual_seed(0)
    return nn.Linear(D, V)


_START = None  # the writers' barrier, in each writer process


def _slow_forward(model, inputs):
    if _START is not None:  # both writers start writing together, whichever took longer to start
        _START.wait(60)
        globals()["_START"] = None
    time.sleep(0.1)  # a real teacher takes a while per batch: the two writers overlap
    return model(inputs["input"] if isinstance(inputs, dict) else inputs)


def _cache_writer(path, out, start):
    torch.set_num_threads(1)
    globals()["_START"] = start
    cache = write_teacher_cache(path, [_teacher()], ArrayDataset(input=_x()), batch_size=2, forward=_slow_forward)
    torch.save(cache.get(range(N)), out)  # what this writer's caller trains on, right away


def test_two_processes_writing_one_cache_each_get_a_whole_one(tmp_path):
    """Both used the fixed temp name <path>.tmp: the second truncated the first's file (its rows zero) and then
    failed to rename a file renamed away."""
    path = tmp_path / "teacher.safetensors"
    ctx = mp.get_context("spawn")
    start = ctx.Barrier(2)
    procs = [ctx.Process(target=_cache_writer, args=(str(path), str(tmp_path / f"rows{i}.pt"), start))
             for i in range(2)]  # fmt: skip
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0, 0]
    with torch.no_grad():
        expected = _teacher()(_x())[None]  # [K = 1, N, V]
    for i in range(2):
        torch.testing.assert_close(torch.load(tmp_path / f"rows{i}.pt"), expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(TeacherLogitCache(path).get(range(N)), expected, rtol=0, atol=1e-6)
    assert sorted(p.name for p in tmp_path.iterdir() if "teacher" in p.name) == ["teacher.safetensors"]


def test_a_cache_writers_leftover_temp_file_is_not_the_cache(tmp_path):
    path = tmp_path / "c.safetensors"
    (tmp_path / ".c.safetensors.123.deadbeef.tmp").write_bytes(b"\0" * 64)  # a writer killed mid-way
    (tmp_path / "c.safetensors.tmp").write_bytes(b"\0" * 64)  # (the old fixed name)
    cache = write_teacher_cache(path, [_teacher()], ArrayDataset(input=_x()))
    with torch.no_grad():
        torch.testing.assert_close(cache.get(range(N)), _teacher()(_x())[None], rtol=0, atol=1e-6)
    assert cache.path == path and (tmp_path / ".c.safetensors.123.deadbeef.tmp").read_bytes() == b"\0" * 64


class _SlowState:
    """An optimizer whose state_dict takes a while (a large one)."""

    def state_dict(self):
        time.sleep(0.4)
        return {"x": torch.ones(3)}

    def load_state_dict(self, state):
        pass


def _checkpoint_saver(job, directory, out):
    torch.set_num_threads(1)
    student = nn.Linear(D, D)
    nn.init.constant_(student.weight, float(job))
    run = {"step": 1, "epoch": 0, "batch_in_epoch": 1, "world_size": 1, "batch_size": 8, "grad_accum_steps": 1,
           "seed": 0, "shuffle": True, "drop_last": False, "job": job}  # fmt: skip
    ck = Checkpointer(None, {"student": student}, lambda: {"optimizer": _SlowState()}, lambda: run, lambda s: None)
    time.sleep(0.1 * job)
    try:
        ck.save(directory)
        result = "saved"
    except RuntimeError as e:  # a loser may fail, with a message that says why
        result = f"raised: {e}"
    with open(out, "w") as f:
        f.write(result)


def test_two_processes_saving_one_checkpoint_never_mix_them(tmp_path):
    """Both wrote the fixed <dir>.tmp, each clearing it first: the checkpoint left was "intact" with one job's
    state.json and the other's weights."""
    directory = tmp_path / "checkpoints" / "step-00000001"
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_checkpoint_saver, args=(job, str(directory), str(tmp_path / f"job{job}.txt")))
             for job in (1, 2)]  # fmt: skip
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0, 0]
    results = [(tmp_path / f"job{job}.txt").read_text() for job in (1, 2)]
    assert "saved" in results, results
    assert all(r == "saved" or "another run" in r for r in results), results
    assert find_problem(directory) is None
    job = json.loads((directory / "state.json").read_text())["job"]
    weight = safetensors.torch.load_file(str(directory / "student.safetensors"))["weight"]
    assert torch.equal(weight, torch.full((D, D), float(job)))  # the weights of the job whose state.json it is
    assert find_latest(directory.parent) == directory
    assert [p.name for p in directory.parent.iterdir() if p.name.startswith("step-")] == [directory.name]


def test_a_killed_saves_temp_directory_is_never_a_checkpoint_and_keep_clears_it(tmp_path):
    student = nn.Linear(D, D)
    run = {"step": 1, "epoch": 0, "batch_in_epoch": 1, "world_size": 1, "batch_size": 8, "grad_accum_steps": 1,
           "seed": 0, "shuffle": True, "drop_last": False}  # fmt: skip
    ck = Checkpointer(tmp_path, {"student": student}, lambda: {}, lambda: run, lambda s: None)
    first = ck.save()
    stale = first.with_name(first.name + ".4242-0123456789ab.tmp")  # a save of step 1 killed before its rename
    stale.mkdir()
    (stale / "state.json").write_text(json.dumps({**run, "step": 1}))
    assert find_latest(tmp_path / "checkpoints") == first
    run["step"] = 2
    second = ck.save(keep=1)
    assert sorted(p.name for p in second.parent.iterdir() if p.name.startswith("step-")) == [second.name]


def test_a_loop_under_torchrun_without_a_process_group_says_so(monkeypatch, tmp_path):
    """WORLD_SIZE=2 in the environment but no init_distributed(): every process trained alone as rank 0 of 1."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    with pytest.raises(ValueError, match=r"WORLD_SIZE=2 .*init_distributed\(\)"):
        DistillationLoop(nn.Linear(4, 3), [nn.Linear(4, 3)], output_dir=tmp_path, progress=False)
    with pytest.raises(ValueError, match="distributed=False under torchrun"):
        DistillationLoop(nn.Linear(4, 3), [nn.Linear(4, 3)], output_dir=tmp_path, progress=False, distributed=False)
    loop = DistillationLoop(nn.Linear(4, 3), [nn.Linear(4, 3)], progress=False, distributed=False)  # each alone
    assert (loop.rank, loop.world_size) == (0, 1)
    monkeypatch.setenv("WORLD_SIZE", "1")
    loop = DistillationLoop(nn.Linear(4, 3), [nn.Linear(4, 3)], output_dir=tmp_path, progress=False)
    assert (loop.rank, loop.world_size) == (0, 1)


class _WithTargets(Dataset):
    def __init__(self, cache):
        self.cache = cache

    def __len__(self):
        return len(self.cache)

    def __getitem__(self, i):
        return self.cache.get([i])[:, 0]


def test_a_teacher_cache_pickles_and_reaches_spawn_workers(tmp_path):
    path = tmp_path / "c.safetensors"
    cache = write_teacher_cache(path, [_teacher()], ArrayDataset(input=_x()), topk=3)
    back = pickle.loads(pickle.dumps(cache))
    assert back.path == path and back.kind == "topk" and back.k == 3
    assert torch.equal(back.get(range(N)), cache.get(range(N)))
    loader = DataLoader(_WithTargets(cache), batch_size=None, num_workers=1, multiprocessing_context="spawn")
    rows = torch.stack(list(loader), dim=1)  # [K, N, V]
    assert torch.equal(rows, cache.get(range(N)))
    state = pickle.dumps(cache)
    write_teacher_cache(path, [nn.Linear(D, V)], ArrayDataset(input=_x()))  # another file at the path now
    with pytest.raises(ValueError, match="was replaced"):
        pickle.loads(state)
