"""The reference loop against hand-computed steps: normalisation, resume, DDP, feature terms, co-distillation."""

import contextlib
import copy
import json
import os
import random

import pytest
import safetensors.torch
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import fastdistill
from fastdistill.training import ArrayDataset, DistillationLoop, FeatureTerm


def _data(n=24, d=6, v=5, seed=0, ignore_every=None):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    y = torch.randint(0, v, (n,), generator=g)
    if ignore_every:
        y[::ignore_every] = -100
    return ArrayDataset(input=x, labels=y)


def _mlp(d=6, h=16, v=5, seed=0, dropout=0.0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d, h), nn.ReLU(), nn.Dropout(dropout), nn.Linear(h, v))


def _sgd(lr=1.0):
    return lambda params: torch.optim.SGD(params, lr=lr)


def test_loss_decreases():
    ds = _data(n=64)
    teacher = _mlp(h=32, seed=1)
    loop = DistillationLoop(_mlp(seed=2), [teacher], loss=fastdistill.KDLoss(temperature=2.0), batch_size=16,
                            optimizer=lambda p: torch.optim.Adam(p, lr=1e-2), progress=False, log_every=5)
    loop.fit(ds, max_steps=60)
    train = [h["loss"] for h in loop.history if h["split"] == "train"]
    assert train[-1] < 0.3 * train[0]


def test_grad_accumulation_normalises_by_all_items():
    """Two micro-batches of 4 rows with 1 and 4 labelled rows: one step must equal one step on all 8 rows with the
    mean over the 5 labelled ones (not the mean of the two micro-batch means)."""
    x = torch.randn(8, 6, generator=torch.Generator().manual_seed(3))
    y = torch.tensor([0, -100, -100, -100, 1, 2, 3, 4])
    teacher, student = _mlp(seed=1), _mlp(seed=2)
    kd = dict(temperature=2.0, ce_weight=0.3)
    loop = DistillationLoop(copy.deepcopy(student), [teacher], loss=fastdistill.KDLoss(**kd), optimizer=_sgd(),
                            batch_size=4, grad_accum_steps=2, shuffle=False, progress=False, log_every=1)
    loop.fit(ArrayDataset(input=x, labels=y), max_steps=1)

    def one_step(losses):
        ref = copy.deepcopy(student)
        sum(f(ref) for f in losses).backward()
        return [p.detach() - p.grad for p in ref.parameters()]

    expected = one_step([lambda m: fastdistill.kd_loss(m(x), teacher(x).detach(), labels=y, **kd)])
    for p, e in zip(loop.student.parameters(), expected):
        torch.testing.assert_close(p.detach(), e, rtol=1e-5, atol=1e-6)
    assert loop.history[0]["items"] == 5.0
    # the classic accumulation bug (mean per micro-batch, averaged) gives another step: the test can tell them apart
    wrong = one_step([lambda m, s=s: 0.5 * fastdistill.kd_loss(m(x[s]), teacher(x[s]).detach(), labels=y[s], **kd)
                      for s in (slice(0, 4), slice(4, 8))])  # fmt: skip
    assert not all(torch.allclose(p, w, atol=1e-4) for p, w in zip(loop.student.parameters(), wrong))


def test_causal_shift_and_ignore_index():
    """Token-level: logits [B, T, V] of position t are scored against label t+1; -100 labels carry no loss."""
    vocab, d = 11, 8

    class TinyLM(nn.Module):
        def __init__(self, seed):
            super().__init__()
            torch.manual_seed(seed)
            self.emb, self.out = nn.Embedding(vocab, d), nn.Linear(d, vocab)

        def forward(self, input_ids):
            return self.out(torch.tanh(self.emb(input_ids)))

    ids = torch.randint(0, vocab, (4, 7), generator=torch.Generator().manual_seed(0))
    labels = ids.clone()
    labels[:, 5:] = -100  # padding
    student, teacher = TinyLM(0), TinyLM(1)
    kd = dict(temperature=1.5, ce_weight=0.5, divergence="jsd")
    loop = DistillationLoop(copy.deepcopy(student), [teacher], loss=fastdistill.KDLoss(**kd), optimizer=_sgd(0.1),
                            batch_size=4, shift_labels=True, shuffle=False, progress=False, log_every=1)
    loop.fit(ArrayDataset(input_ids=ids, labels=labels), max_steps=1)
    with torch.no_grad():
        expected = fastdistill.kd_loss(student(ids)[:, :-1], teacher(ids)[:, :-1], labels=labels[:, 1:], **kd)
    assert loop.history[0]["loss"] == pytest.approx(float(expected.detach()), rel=1e-6)
    assert loop.history[0]["items"] == float((labels[:, 1:] != -100).sum())


def _resumable_loop(out_dir, model_seed):
    torch.manual_seed(1234)
    teacher = _mlp(h=32, seed=11)
    return DistillationLoop(
        _mlp(seed=model_seed, dropout=0.3), [teacher],
        loss=fastdistill.KDLoss(temperature=2.0, ce_weight=0.2),
        optimizer=lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.01),
        scheduler=lambda opt, total: torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.9**s),
        batch_size=5, grad_accum_steps=2, seed=7, output_dir=out_dir, progress=False, log_every=1,
    )  # fmt: skip


def test_resume_is_bitwise_identical(tmp_path):
    """2N steps in one go == N steps, checkpoint, new objects (other init, scrambled RNG), N more steps. With dropout,
    shuffling across epoch boundaries, accumulation, AdamW and an LR schedule, any state not restored shows."""
    ds, n = _data(n=37, ignore_every=4), 6  # 8 micro-batches per epoch: 2N steps = 3 epochs
    a = _resumable_loop(tmp_path / "a", model_seed=0)
    a.fit(ds, max_steps=2 * n)

    b = _resumable_loop(tmp_path / "b", model_seed=0)
    b.fit(ds, max_steps=n, checkpoint_every=n)
    assert (tmp_path / "b" / "checkpoints" / f"step-{n:08d}" / "student.safetensors").exists()
    torch.manual_seed(99), random.seed(99)
    c = _resumable_loop(tmp_path / "b", model_seed=5)
    assert not torch.equal(c.student[0].weight, a.student[0].weight)
    c.fit(ds, max_steps=2 * n, resume_from="latest")

    for (name, pa), pc in zip(a.student.named_parameters(), c.student.parameters()):
        assert torch.equal(pa, pc), name
    sa, sc = a.optimizer.state_dict()["state"], c.optimizer.state_dict()["state"]
    assert all(torch.equal(sa[i]["exp_avg_sq"], sc[i]["exp_avg_sq"]) for i in sa)
    assert [h["loss"] for h in a.history[n:]] == [h["loss"] for h in c.history]
    assert c.scheduler.get_last_lr() == a.scheduler.get_last_lr()
    # the logs of the resumed run were appended: 2N train records
    lines = (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(r)["step"] for r in lines] == list(range(1, 2 * n + 1))


def test_resume_past_max_steps_warns(tmp_path):
    """A checkpoint of step 4 resumed by a fit of 2 steps trains nothing: said, not silent; a finished run resumed
    at its own last step (to report it) is not warned about."""
    import warnings

    ds = _data(n=37)
    _resumable_loop(tmp_path, model_seed=0).fit(ds, max_steps=4, checkpoint_every=4)
    with pytest.warns(UserWarning, match=r"resumed at step 4 from .*step-00000004, past this fit's 2 steps"):
        assert _resumable_loop(tmp_path, model_seed=0).fit(ds, max_steps=2, resume_from="latest")["step"] == 4
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _resumable_loop(tmp_path, model_seed=0).fit(ds, max_steps=4, resume_from="latest")["step"] == 4


@pytest.mark.parametrize("key, value", [("batch_size", 4), ("grad_accum_steps", 1), ("seed", 8), ("drop_last", True)])
def test_resume_refuses_another_data_order(tmp_path, key, value):
    """Each setting that fixes the data order or what a step is must match the checkpoint's."""
    ds = _data(n=20)
    a = _resumable_loop(tmp_path, model_seed=0)
    a.fit(ds, max_steps=2, checkpoint_every=2)
    b = _resumable_loop(tmp_path, model_seed=0)
    setattr(b, key, value)
    with pytest.raises(ValueError, match=f"{key}=.*this run has {value}"):
        b.fit(ds, max_steps=4, resume_from="latest")
    assert b.step == 0


class _Crash(Exception):
    pass


def _crash_at(step):
    def eval_fn(loop):
        if loop.step == step:
            raise _Crash
        return {"score": 1.0}

    return eval_fn


def test_resume_after_a_crash_logs_each_step_once(tmp_path):
    """A run checkpoints at step 4, logs steps 5 and 6 and dies (a line cut short at the end); resumed, its metrics
    files hold what a run that never stopped writes: each step once, in order."""
    ds, kw = _data(n=37), dict(max_steps=8, eval_every=2, checkpoint_every=4)
    whole = _resumable_loop(tmp_path / "whole", model_seed=0)
    whole.fit(ds, eval_fn=_crash_at(None), **kw)
    with pytest.raises(_Crash):
        _resumable_loop(tmp_path / "crash", model_seed=0).fit(ds, eval_fn=_crash_at(6), **kw)
    with open(tmp_path / "crash" / "metrics.jsonl", "a") as f:
        f.write('{"step": 7, "spl')
    _resumable_loop(tmp_path / "crash", model_seed=0).fit(ds, eval_fn=_crash_at(None), resume_from="latest", **kw)

    def jsonl(run):
        return [json.loads(r) for r in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]

    def csv_rows(run):
        return [r.split(",") for r in (tmp_path / run / "metrics.csv").read_text().splitlines()]

    resumed, expected = jsonl("crash"), jsonl("whole")
    assert [r["step"] for r in resumed if r["split"] == "train"] == list(range(1, 9))
    assert [(r["step"], r["split"], r["loss"] if r["split"] == "train" else r["score"]) for r in resumed] == [
        (r["step"], r["split"], r["loss"] if r["split"] == "train" else r["score"]) for r in expected]
    resumed, expected = csv_rows("crash"), csv_rows("whole")
    assert resumed[0] == expected[0] == ["step", "epoch", "split", "name", "value"]
    assert [r[:4] for r in resumed] == [r[:4] for r in expected]
    steps = [int(r[0]) for r in resumed[1:]]
    assert steps == sorted(steps) and len({tuple(r[:4]) for r in resumed}) == len(resumed)


def _damage(path):
    if path.suffix == ".json":
        path.write_text('{"state": [1, 2')
    else:  # a safetensors file cut short
        path.write_bytes(path.read_bytes()[:-16])


@pytest.mark.parametrize("damaged", ["optimizer.json", "student.safetensors", "rng-rank0.safetensors", "state.json"])
def test_a_damaged_checkpoint_names_its_file_and_latest_skips_it(tmp_path, damaged):
    ds = _data(n=37)
    whole = _resumable_loop(tmp_path / "whole", model_seed=0)
    whole.fit(ds, max_steps=6)
    _resumable_loop(tmp_path / "run", model_seed=0).fit(ds, max_steps=4, checkpoint_every=2)
    newest = tmp_path / "run" / "checkpoints" / "step-00000004"
    _damage(newest / damaged)
    with pytest.raises(ValueError, match=f"step-00000004/{damaged} is not a readable"):
        _resumable_loop(tmp_path / "run", model_seed=0).fit(ds, max_steps=6, resume_from=newest)
    loop = _resumable_loop(tmp_path / "run", model_seed=0)
    with pytest.warns(UserWarning, match=f"skipping damaged checkpoint .*step-00000004: .*{damaged}"):
        loop.fit(ds, max_steps=6, resume_from="latest")
    assert [h["step"] for h in loop.history] == [3, 4, 5, 6]  # from step 2, the newest intact checkpoint
    for p, q in zip(whole.student.parameters(), loop.student.parameters()):
        assert torch.equal(p, q)


def test_resume_latest_with_every_checkpoint_damaged_refuses_to_start_over(tmp_path):
    ds = _data(n=37)
    _resumable_loop(tmp_path, model_seed=0).fit(ds, max_steps=4, checkpoint_every=2)
    for step in (2, 4):
        _damage(tmp_path / "checkpoints" / f"step-{step:08d}" / "student.safetensors")
    loop = _resumable_loop(tmp_path, model_seed=0)
    with pytest.warns(UserWarning), pytest.raises(ValueError, match="no intact checkpoint under"):
        loop.fit(ds, max_steps=6, resume_from="latest")


def test_every_process_picks_the_same_checkpoint_to_resume_from(tmp_path):
    """Under 2 processes a checkpoint whose rank-1 RNG file is missing was intact to rank 0 and damaged to rank 1:
    resume_from="latest" gave rank 0 step 4 and rank 1 step 2 (the run then hung or diverged). Every process now
    judges a checkpoint by every process's files: both pick step 2; naming step 4 is the same error on both."""
    import shutil

    ds = _data(n=37)
    loop = _resumable_loop(tmp_path, model_seed=0)
    loop.fit(ds, max_steps=4, checkpoint_every=2)
    for step in (2, 4):  # as a 2-process run writes them: one RNG file per rank, each listed in state.json
        d = tmp_path / "checkpoints" / f"step-{step:08d}"
        for ext in ("json", "safetensors"):
            if (d / f"rng-rank0.{ext}").exists():
                shutil.copy(d / f"rng-rank0.{ext}", d / f"rng-rank1.{ext}")
        state = json.loads((d / "state.json").read_text())
        state["files"] += ["rng-rank1.json", "rng-rank1.safetensors"]
        (d / "state.json").write_text(json.dumps(state))
    (tmp_path / "checkpoints" / "step-00000004" / "rng-rank1.json").unlink()
    ckpt = loop._checkpointer
    ckpt.world_size = 2
    for rank in (0, 1):
        ckpt.rank = rank
        with pytest.warns(UserWarning, match="skipping damaged checkpoint .*step-00000004"):
            assert ckpt.find("latest").name == "step-00000002"
        with pytest.raises(ValueError, match="step-00000004' is damaged: .*rng-rank1.json"):
            ckpt.find(tmp_path / "checkpoints" / "step-00000004")


def test_a_last_batch_smaller_than_the_process_count_is_dropped_with_a_warning():
    """13 items, 3 per process, 2 processes: the 13th item has no partner, so each epoch drops it although
    drop_last=False (every process must take part); the loop says so rather than training 2 steps where one
    process would train 3."""
    import warnings

    loop = DistillationLoop(_mlp(seed=0), [], batch_size=3, progress=False)
    loop.world_size = 2  # (what a 2-process group sets)
    with pytest.warns(UserWarning, match=r"the last 1 item\(s\) of each epoch \(13 items, 3 x 2 processes"):
        assert loop._epoch_length(_data(n=13), None) == 2
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert loop._epoch_length(_data(n=14), None) == 3  # a last batch of 2: one item per process


def test_feature_term_hooks_and_trainable_projection(tmp_path):
    """A feature term between student layer 0 (8 wide) and teacher layer 0 (12 wide) through a trainable projection:
    the first step's loss is kd + weight * mse(proj(h_s), h_t), and the projection trains and is checkpointed."""
    ds = _data(n=8)
    x = ds.tensors["input"]
    student, teacher = _mlp(h=8, seed=2), _mlp(h=12, seed=1)
    torch.manual_seed(5)
    proj = nn.Linear(8, 12)

    class ProjectedMSE(nn.Module):
        def __init__(self, p):
            super().__init__()
            self.p = p

        def forward(self, s, t):
            return nn.functional.mse_loss(self.p(s), t)

    term = FeatureTerm("0", "0", ProjectedMSE(copy.deepcopy(proj)), weight=0.5)
    loop = DistillationLoop(copy.deepcopy(student), [teacher], feature_terms=[term], optimizer=_sgd(0.1),
                            batch_size=8, shuffle=False, progress=False, log_every=1, output_dir=tmp_path)
    loop.fit(ds, max_steps=1, checkpoint_every=1)
    with torch.no_grad():
        kd = fastdistill.kd_loss(student(x), teacher(x), labels=ds.tensors["labels"])
        mse = nn.functional.mse_loss(proj(student[0](x)), teacher[0](x))
    rec = loop.history[0]
    assert rec["kd"] == pytest.approx(float(kd), rel=1e-6)
    assert rec["feature/0"] == pytest.approx(float(mse), rel=1e-6)
    assert rec["loss"] == pytest.approx(float(kd + 0.5 * mse), rel=1e-6)
    assert not torch.equal(term.loss.p.weight, proj.weight)  # trained
    saved = safetensors.torch.load_file(str(tmp_path / "checkpoints" / "step-00000001" / "feature_term0.safetensors"))
    assert torch.equal(saved["p.weight"], term.loss.p.weight)


@pytest.mark.skipif(not hasattr(fastdistill, "MIAlphaLoss"), reason="MI-alpha not in this tree")
def test_mi_alpha_as_a_feature_term():
    """fastdistill.MIAlphaLoss plugs in as a feature term: the logged value is its value on the hooked features,
    and its critic (projections, baseline) trains with the student."""
    ds = _data(n=16)
    x = ds.tensors["input"]
    student, teacher = _mlp(h=8, seed=2), _mlp(h=12, seed=1)
    torch.manual_seed(5)
    mi = fastdistill.MIAlphaLoss(8, 12, proj_dim=4)
    ref = copy.deepcopy(mi)
    loop = DistillationLoop(copy.deepcopy(student), [teacher], feature_terms=[FeatureTerm("1", "1", mi, 0.1)],
                            optimizer=_sgd(0.1), batch_size=16, shuffle=False, progress=False, log_every=1)
    loop.fit(ds, max_steps=1)
    with torch.no_grad():
        expected = ref(student[1](student[0](x)), teacher[1](teacher[0](x)))
    assert loop.history[0]["feature/1"] == pytest.approx(float(expected), rel=1e-5, abs=1e-6)
    assert not torch.equal(next(mi.student_proj.parameters()), next(ref.student_proj.parameters()))


def test_teachers_frozen_by_default_trainable_for_co_distillation():
    ds = _data(n=16)
    for train_teachers in (False, True):
        teacher = _mlp(seed=1)
        before = teacher[0].weight.detach().clone()
        # a KDLoss gives the teachers no loss of their own: a warning says so (CodistillLoss is co-distillation)
        with pytest.warns(UserWarning, match="use loss=CodistillLoss") if train_teachers else contextlib.nullcontext():
            loop = DistillationLoop(_mlp(seed=2), [teacher], train_teachers=train_teachers, optimizer=_sgd(0.5),
                                    batch_size=8, progress=False)  # fmt: skip
        loop.fit(ds, max_steps=2)
        assert torch.equal(teacher[0].weight, before) != train_teachers


def test_feature_terms_names_masks_and_hooks_of_a_dropped_loop():
    """Two terms with one log name (two on one student module) are an error naming them, not one silently logged;
    a mask_key on inputs that are not a dict names itself; a loop dropped without close() takes its feature hooks
    with it when collected (they held it, its student and its optimizer alive, and captured on every forward)."""
    import gc
    import weakref

    teacher = _mlp(h=12, seed=1)

    class Zero(nn.Module):
        def forward(self, s, t, **kw):
            return (s.sum() + t.sum()) * 0.0

    with pytest.raises(ValueError, match=r"feature_terms \[0, 1\] share the log name 'feature/0'"):
        DistillationLoop(_mlp(seed=2), [teacher], feature_terms=[FeatureTerm("0", "0", Zero()),
                                                                 FeatureTerm("0", "0", Zero())])  # fmt: skip
    loop = DistillationLoop(_mlp(seed=2), [teacher], batch_size=8, progress=False,
                            feature_terms=[FeatureTerm("0", "0", Zero(), mask_key="attention_mask")])  # fmt: skip
    with pytest.raises(ValueError, match=r"feature_terms\[0\].mask_key='attention_mask' reads a dict input .* Tensor"):
        loop.fit(_data(n=16), max_steps=1)
    del loop
    gc.collect()
    refs = []
    for seed in range(3):
        loop = DistillationLoop(_mlp(seed=seed), [teacher], batch_size=8, progress=False,
                                feature_terms=[FeatureTerm("0", "0", Zero(), name="a"),
                                               FeatureTerm("2", "2", Zero(), name="b")])  # fmt: skip
        loop.fit(_data(n=16), max_steps=1)
        refs.append(weakref.ref(loop))
        assert len(teacher[0]._forward_hooks) == 1 and len(teacher[2]._forward_hooks) == 1
        del loop
        gc.collect()
    assert all(r() is None for r in refs)
    assert not teacher[0]._forward_hooks and not teacher[2]._forward_hooks


def test_no_teachers_trains_on_labels():
    ds = _data(n=8)
    x, y = ds.tensors["input"], ds.tensors["labels"]
    student = _mlp(seed=2)
    loop = DistillationLoop(copy.deepcopy(student), [], optimizer=_sgd(), batch_size=8, progress=False, log_every=1)
    loop.fit(ds, max_steps=1)
    with torch.no_grad():
        expected = nn.functional.cross_entropy(student(x), y)
    assert loop.history[0]["loss"] == pytest.approx(float(expected.detach()), rel=1e-6)
    # no teachers: the logit loss is plain cross-entropy, and its log key says so
    assert loop.history[0]["ce"] == loop.history[0]["loss"] and "kd" not in loop.history[0]


def test_metrics_files_and_eval(tmp_path):
    loop = DistillationLoop(_mlp(seed=2), [_mlp(seed=1)], batch_size=8, progress=False, log_every=2,
                            output_dir=tmp_path)  # fmt: skip
    out = loop.fit(_data(n=16), epochs=2, eval_data=_data(n=10, seed=1), eval_every=2)
    assert out["step"] == 4 and 0.0 <= out["accuracy"] <= 1.0
    rows = [json.loads(r) for r in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["split"]) for r in rows] == [(2, "train"), (2, "eval"), (4, "train"), (4, "eval")]
    header = (tmp_path / "metrics.csv").read_text().splitlines()[0]
    assert header == "step,epoch,split,name,value"


# --- DDP: 2 CPU processes on gloo vs one process with the same global batch ---------------------------------------


def _ddp_loop(batch_size, out_dir=None):
    return DistillationLoop(
        _mlp(seed=2), [_mlp(h=32, seed=1)], loss=fastdistill.KDLoss(temperature=2.0, ce_weight=0.4),
        optimizer=lambda p: torch.optim.AdamW(p, lr=1e-2), batch_size=batch_size, grad_accum_steps=2, seed=3,
        progress=False, log_every=1, output_dir=out_dir,
    )  # fmt: skip


def _ddp_worker(rank, world, tmp):
    os.environ.update(MASTER_ADDR="127.0.0.1")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{tmp}/rendezvous", rank=rank, world_size=world)
    try:
        loop = _ddp_loop(batch_size=3, out_dir=tmp)
        loop.fit(_data(n=22, ignore_every=3), max_steps=4, checkpoint_every=4)
        if rank == 0:
            safetensors.torch.save_model(loop.student, f"{tmp}/ddp.safetensors")
            with open(f"{tmp}/ddp_losses.json", "w") as f:
                json.dump([h["loss"] for h in loop.history], f)
    finally:
        dist.destroy_process_group()


def test_ddp_two_processes_equal_one_process(tmp_path):
    mp.spawn(_ddp_worker, args=(2, str(tmp_path)), nprocs=2, join=True)
    single = _ddp_loop(batch_size=6)  # the same global batch: 6 = 3 x 2 processes
    single.fit(_data(n=22, ignore_every=3), max_steps=4)
    ddp = _mlp(seed=0)
    safetensors.torch.load_model(ddp, str(tmp_path / "ddp.safetensors"))
    for p, q in zip(single.student.parameters(), ddp.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-6)
    ddp_losses = json.loads((tmp_path / "ddp_losses.json").read_text())
    assert ddp_losses == pytest.approx([h["loss"] for h in single.history], rel=1e-5)
    # one RNG file per process in the checkpoint
    assert {p.name for p in (tmp_path / "checkpoints" / "step-00000004").glob("rng-rank*.json")} == {
        "rng-rank0.json", "rng-rank1.json"}


def _ddp_eval_worker(rank, world, tmp):
    from torch.utils.data import BatchSampler, DataLoader, DistributedSampler

    os.environ.update(MASTER_ADDR="127.0.0.1")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{tmp}/rendezvous", rank=rank, world_size=world)
    try:
        loop = DistillationLoop(_mlp(seed=2), [_mlp(seed=1)], batch_size=4, progress=False)
        ev = _data(n=16, seed=5, ignore_every=5)
        out = {
            "sampler": loop.evaluate(DataLoader(ev, batch_size=4, sampler=DistributedSampler(ev, shuffle=False))),
            "batch_sampler": loop.evaluate(DataLoader(ev, batch_sampler=BatchSampler(
                DistributedSampler(ev, shuffle=True, seed=1), batch_size=3, drop_last=False))),
            "map_style": loop.evaluate(ev),  # every process evaluates all of it: nothing to reduce
            "own_shard": loop.evaluate(ArrayDataset(**{k: v[rank::world] for k, v in ev.tensors.items()})),
        }  # fmt: skip
        with open(f"{tmp}/eval{rank}.json", "w") as f:
            json.dump(out, f)
    finally:
        dist.destroy_process_group()


def test_ddp_evaluate_of_a_distributed_sampler_reports_every_shard(tmp_path):
    """2 processes: evaluate() of a DataLoader whose (batch) sampler is a DistributedSampler all-reduces the sums, so
    each process reports the metrics of the whole set, as one process does; a map-style dataset is evaluated whole
    on each process, unchanged."""
    mp.spawn(_ddp_eval_worker, args=(2, str(tmp_path)), nprocs=2, join=True)
    single = DistillationLoop(_mlp(seed=2), [_mlp(seed=1)], batch_size=4, progress=False)
    ev = _data(n=16, seed=5, ignore_every=5)
    expected = single.evaluate(ev)
    shards = [json.loads((tmp_path / f"eval{r}.json").read_text()) for r in range(2)]
    assert shards[0]["own_shard"] != shards[1]["own_shard"]  # the shards alone differ: the test can tell
    for out in shards:
        for key in ("sampler", "batch_sampler", "map_style"):
            assert out[key]["accuracy"] == expected["accuracy"], key
            assert out[key]["loss"] == pytest.approx(expected["loss"], rel=1e-6), key


def _checks_run(monkeypatch):
    """The names of the data-dependent checks that read their values (a device sync each on CUDA)."""
    from fastdistill import functional

    ran, check = [], functional._check_values

    def spy(name, x, what, bad):
        checked = functional._VALUES_CHECKED.get()
        if not (checked is True or (checked and name in checked)):
            ran.append(name)
        check(name, x, what, bad)

    monkeypatch.setattr(functional, "_check_values", spy)
    return ran


def _weighted(ds, weights):
    return ArrayDataset(input=ds.tensors["input"], labels=ds.tensors["labels"], sample_weight=weights)


def test_labels_and_weights_are_checked_on_the_host(monkeypatch):
    """CPU data: the loop checks labels and sample weights before copying them to the device, and its KDLoss does
    not read them (nor the loop's own num_items) back from the device: on CUDA each would be a sync per micro-batch.
    Bad values still raise the loss's own error, naming the argument; labels out of range without the
    cross-entropy still train, as kd_loss allows."""
    ran = _checks_run(monkeypatch)
    ds = _data(n=32, ignore_every=5)
    weights = torch.rand(32, generator=torch.Generator().manual_seed(1)) + 0.5

    def loop(**kd):
        return DistillationLoop(_mlp(seed=2), [_mlp(seed=1)], loss=fastdistill.KDLoss(temperature=2.0, **kd),
                                optimizer=_sgd(0.1), batch_size=8, grad_accum_steps=2, progress=False,
                                log_every=100)  # fmt: skip

    loop(ce_weight=0.3).fit(_weighted(ds, weights), max_steps=2)
    assert ran == [], ran

    bad = ArrayDataset(input=ds.tensors["input"], labels=ds.tensors["labels"].clone())
    bad.tensors["labels"][3] = 5  # V = 5
    with pytest.raises(ValueError, match=r"labels must be in \[0, 5\)"):
        loop(ce_weight=0.3).fit(bad, max_steps=4)
    loop(ce_weight=0.0).fit(bad, max_steps=4)  # kd_loss reads labels only for ignore_index without the CE term
    negative = weights.clone()
    negative[9] = -1.0
    huge = weights.double()
    huge[2] = 1e39  # finite in float64, inf in the loss's float32
    for bad_weights in (negative, huge):
        with pytest.raises(ValueError, match="sample_weight must be finite and >= 0"):
            loop().fit(_weighted(ds, bad_weights), max_steps=4)
    assert set(ran) <= {"labels", "sample_weight"}, ran  # the bad batches: checked by the loss, on the device

    def own(student, teachers, labels, num_items=None):  # a loss of the user's: every check its own
        return fastdistill.kd_loss(student, teachers, labels, num_items=torch.tensor(-5))

    with pytest.raises(ValueError, match="num_items must be finite and >= 0"):
        DistillationLoop(_mlp(seed=2), [_mlp(seed=1)], loss=own, optimizer=_sgd(0.1), batch_size=8,
                         progress=False).fit(ds, max_steps=1)  # fmt: skip


def test_values_checked_skips_only_the_named_checks(monkeypatch):
    from fastdistill.functional import values_checked

    ran = _checks_run(monkeypatch)
    s, t = torch.randn(4, 5), torch.randn(4, 5)
    labels, weights = torch.tensor([0, 1, 4, 2]), torch.tensor([1.0, 2.0, 1.0, 1.0])
    with values_checked("labels"):
        fastdistill.kd_loss(s, t, labels, ce_weight=0.5, sample_weight=weights, backend="reference")
        assert ran == ["sample_weight"], ran
        with pytest.raises(ValueError, match="sample_weight must be finite and >= 0"):
            fastdistill.kd_loss(s, t, sample_weight=-weights, backend="reference")
    ran.clear()
    fastdistill.kd_loss(s, t, labels, ce_weight=0.5, sample_weight=weights, backend="reference")
    assert ran == ["labels", "sample_weight"], ran
    ran.clear()
    with values_checked():
        fastdistill.kd_loss(s, t, labels, ce_weight=0.5, sample_weight=weights, backend="reference")
    assert ran == [], ran


# --- review fixes: weights on the CE path, ignore_index, evaluation without labels, argument checks, checkpoints


def test_no_teacher_cross_entropy_weights_each_row():
    """Without teachers the loss is sum_i w_i CE_i / (non-ignored rows), as kd_loss(ce_weight=1, sample_weight=w):
    the weights are not dropped."""
    ds = _data(n=8)
    x, y = ds.tensors["input"], ds.tensors["labels"].clone()
    y[3] = -100
    w = torch.tensor([1.0, 0.0, 0.5, 3.0, 0.0, 2.0, 0.0, 0.0])
    student = _mlp(seed=2)
    loop = DistillationLoop(copy.deepcopy(student), optimizer=_sgd(), batch_size=4, grad_accum_steps=2,
                            shuffle=False, progress=False, log_every=1)  # fmt: skip
    loop.fit(ArrayDataset(input=x, labels=y, sample_weight=w), max_steps=1)
    ref = copy.deepcopy(student)
    expected = fastdistill.kd_loss(ref(x), ref(x).detach(), labels=y, ce_weight=1.0, sample_weight=w)
    rows = torch.nn.functional.cross_entropy(ref(x), y, reduction="none", ignore_index=-100)
    torch.testing.assert_close(expected, (w * rows).sum() / 7)
    expected.backward()
    assert loop.history[0]["ce"] == pytest.approx(float(expected.detach()), rel=1e-6)
    for p, q in zip(loop.student.parameters(), ref.parameters()):
        torch.testing.assert_close(p.detach(), q.detach() - q.grad, rtol=1e-5, atol=1e-6)


def test_no_teacher_cross_entropy_skipped_rows_are_zero_whatever_their_logits():
    """A skipped row (ignored label, or weight 0) gives 0 and a zero gradient even when its logits hold NaN (a padding
    position of a model that produces NaN there) or make its CE +inf, as kd_loss(ce_weight=1) does."""
    loop = DistillationLoop(torch.nn.Linear(1, 1), [], progress=False, device="cpu", amp="off")
    labels = torch.tensor([1, -100, 0, 3])
    w = torch.tensor([1.0, 1.0, 0.0, 0.5])
    logits = torch.randn(4, 5, dtype=torch.float64)
    logits[1] = float("nan")  # ignored
    logits[2, 0] = -float("inf")  # weight 0, label 0: CE +inf
    x, y = logits.clone().requires_grad_(), logits.clone().requires_grad_()
    got = loop._cross_entropy(x, labels, w, None)
    expected = fastdistill.kd_loss(y, y.detach(), labels, ce_weight=1.0, sample_weight=w)
    got.backward()
    expected.backward()
    assert got.dtype == torch.float64  # as kd_loss: float32, float64 for float64 logits
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(x.grad, y.grad)
    assert torch.all(x.grad[1:3] == 0)


def test_loop_and_loss_share_one_ignore_index():
    """ignore_index=-1 with the default loss builds KDLoss(ignore_index=-1): the -1 rows carry no loss and are not
    counted; a loss of another ignore_index is an error naming both."""
    ds = _data(n=8)
    x, y = ds.tensors["input"], ds.tensors["labels"].clone()
    y[:4] = -1
    teacher, student = _mlp(seed=1), _mlp(seed=2)
    loop = DistillationLoop(copy.deepcopy(student), [teacher], optimizer=_sgd(0.0), batch_size=8, shuffle=False,
                            progress=False, log_every=1, ignore_index=-1)  # fmt: skip
    loop.fit(ArrayDataset(input=x, labels=y), max_steps=1)
    with torch.no_grad():
        want = fastdistill.kd_loss(student(x), teacher(x), labels=y, ignore_index=-1)
    assert loop.history[0]["items"] == 4.0
    assert loop.history[0]["loss"] == pytest.approx(float(want), rel=1e-6)
    with pytest.raises(ValueError, match="ignore_index=-1 differs from the loss's ignore_index=-100"):
        DistillationLoop(_mlp(), [teacher], loss=fastdistill.KDLoss(), ignore_index=-1, progress=False)


def test_evaluate_without_a_labelled_item_is_an_error():
    """No labelled item (a spent generator, every label ignored) is an error, not a loss of 0.0."""
    ds = _data(n=8)
    loop = DistillationLoop(_mlp(), batch_size=4, progress=False)
    batches = (ds[list(range(i, i + 4))] for i in (0, 4))
    loop.evaluate(batches)
    with pytest.raises(ValueError, match="eval_data yielded no labelled item"):
        loop.evaluate(batches)
    ignored = ArrayDataset(input=ds.tensors["input"], labels=torch.full((8,), -100))
    with pytest.raises(ValueError, match="eval_data yielded no labelled item"):
        loop.evaluate(ignored)


@pytest.mark.parametrize("loop_kw, fit_kw, needle", [
    ({"max_grad_norm": 0.0}, {}, "max_grad_norm must be None"),
    ({"max_grad_norm": -1.0}, {}, "max_grad_norm must be None"),
    ({}, {"max_steps": 0}, "max_steps must be >= 1"),
    ({}, {"max_steps": -3}, "max_steps must be >= 1"),
    ({}, {"max_steps": 4, "checkpoint_every": 2}, "checkpoint_every=2 .* no output_dir"),
    ({}, {"max_steps": 4, "keep_checkpoints": 1}, "keep_checkpoints=1 .* no output_dir"),
    ({}, {"epochs": 0}, r"epochs must be finite and in \(0.0, inf\)"),
    ({}, {"epochs": 0.1}, "epochs=0.1 of 3 micro-batches rounds to 0"),
])  # fmt: skip
def test_arguments_that_would_train_wrongly_or_nothing_are_errors(loop_kw, fit_kw, needle):
    with pytest.raises(ValueError, match=needle):
        loop = DistillationLoop(_mlp(), [_mlp(seed=1)], batch_size=8, progress=False, **loop_kw)
        loop.fit(_data(n=24), **fit_kw)


def test_config_checks_and_overrides_into_an_empty_section():
    import yaml

    from fastdistill.training import config as C

    raw = yaml.safe_load("data:\n  factory: m:f\nstudent:\n  factory: m:g\nkd:\ntrain:\n  max_steps: 3\n")
    assert C.parse_config(C.apply_overrides(raw, ["kd.temperature=4"])).kd.temperature == 4.0
    for override, needle in [("train.epochs=0", "train.epochs must be > 0"),
                             ("optim.max_grad_norm=0", "optim.max_grad_norm must be > 0")]:  # fmt: skip
        with pytest.raises(C.ConfigError, match=needle):
            C.parse_config(C.apply_overrides(yaml.safe_load("data:\n  factory: m:f\nstudent:\n  factory: m:g\n"
                                                            "train:\n  max_steps: 3\n"), [override]))  # fmt: skip


def _plain_loop(out_dir, **kw):
    return DistillationLoop(_mlp(seed=2), [_mlp(seed=1)], optimizer=_sgd(0.1), batch_size=4, seed=3,
                            output_dir=out_dir, progress=False, log_every=1, **kw)  # fmt: skip


def test_keep_checkpoints_keeps_the_new_one_and_drops_an_abandoned_newer_one(tmp_path):
    """step-8 damaged, so "latest" resumes from step 4; with keep_checkpoints=1 the step-6 just written stays and
    the abandoned step-8 goes, so a crash at step 7 still resumes from step 6."""
    ds = _data(n=40)
    _plain_loop(tmp_path).fit(ds, max_steps=8, checkpoint_every=4)
    _damage(tmp_path / "checkpoints" / "step-00000008" / "student.safetensors")
    with pytest.warns(UserWarning, match="skipping damaged"), pytest.raises(_Crash):
        _plain_loop(tmp_path).fit(ds, max_steps=12, checkpoint_every=2, keep_checkpoints=1, resume_from="latest",
                                  eval_fn=_crash_at(7), eval_every=1)  # fmt: skip
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-00000006"]
    loop = _plain_loop(tmp_path)
    loop.fit(ds, max_steps=8, resume_from="latest")
    assert [h["step"] for h in loop.history if h["split"] == "train"] == [7, 8]
    # keep=2 over steps 2, 4, 6 (and none newer): 4 and 6 stay
    _plain_loop(tmp_path / "b").fit(ds, max_steps=6, checkpoint_every=2, keep_checkpoints=2)
    assert sorted(p.name for p in (tmp_path / "b" / "checkpoints").iterdir()) == ["step-00000004", "step-00000006"]


def test_load_checkpoint_then_fit_restores_a_callable_schedulers_state(tmp_path):
    """load_checkpoint() before fit() builds the scheduler (scheduler= a callable): fit() restores its state, so the
    run continues as the one that never stopped (learning rates and weights)."""
    ds = _data(n=40)

    def loop(out):  # LambdaLR sets the lr from its step count (a chainable one would hide a fresh scheduler)
        return _plain_loop(out, scheduler=lambda o, total: torch.optim.lr_scheduler.LambdaLR(o, lambda s: 0.5**s))

    whole = loop(tmp_path / "w")
    whole.fit(ds, max_steps=6)
    loop(tmp_path / "r").fit(ds, max_steps=3, checkpoint_every=3)
    resumed = loop(tmp_path / "r")
    resumed.load_checkpoint(tmp_path / "r" / "checkpoints" / "step-00000003")
    resumed.fit(ds, max_steps=6)
    assert [h["lr"] for h in resumed.history] == [h["lr"] for h in whole.history][3:]
    for p, q in zip(whole.student.parameters(), resumed.student.parameters()):
        assert torch.equal(p, q)


def test_the_logged_learning_rate_is_the_one_the_step_took(tmp_path):
    """"lr" in a training record is the rate of the step logged, read before the scheduler moves to the next one
    (step 1 of a 0.5**s schedule trained at the base rate, not at half of it)."""
    loop = _plain_loop(tmp_path, scheduler=lambda o, total: torch.optim.lr_scheduler.LambdaLR(o, lambda s: 0.5**s))
    base = loop.optimizer.param_groups[0]["lr"]
    loop.fit(_data(n=40), max_steps=3)
    assert [h["lr"] for h in loop.history if h["split"] == "train"] == [base, base / 2, base / 4]


def test_a_resave_killed_between_its_renames_keeps_the_old_checkpoint(tmp_path, monkeypatch):
    """Re-saving step 2 renames step-2 to step-2.old, then step-2.tmp to step-2: killed in between, "latest" and an
    explicit resume put step-2.old back instead of starting from scratch."""
    from pathlib import Path

    from fastdistill.training import checkpoint as ckpt

    ds = _data(n=16)
    for explicit in (False, True):
        out = tmp_path / str(explicit)
        loop = _plain_loop(out)
        loop.fit(ds, max_steps=2, checkpoint_every=2)
        rename, calls = Path.rename, []

        def killed_on_second(self, target, rename=rename, calls=calls):
            calls.append(self.name)
            if len(calls) == 2:
                raise KeyboardInterrupt
            return rename(self, target)

        monkeypatch.setattr(Path, "rename", killed_on_second)
        with pytest.raises(KeyboardInterrupt):
            loop.save_checkpoint()
        monkeypatch.setattr(Path, "rename", rename)
        final = out / "checkpoints" / "step-00000002"
        assert not final.exists() and final.with_name(final.name + ".old").exists()
        resumed = _plain_loop(out)
        resumed.fit(ds, max_steps=3, resume_from=final if explicit else "latest")
        assert [h["step"] for h in resumed.history] == [3] and final.is_dir()
    assert ckpt.find_latest(tmp_path / "False" / "checkpoints") == tmp_path / "False" / "checkpoints" / "step-00000002"


def test_a_resumed_run_logs_the_training_loss_of_the_run_that_never_stopped(tmp_path):
    """log_every=4, a checkpoint at step 2, a crash at step 3: the resumed run's log at step 4 averages steps 1-4 (the
    logging window is checkpointed), the same numbers as the run that never stopped."""
    ds = _data(n=40)

    def loop(out):
        return DistillationLoop(_mlp(seed=2), [_mlp(seed=1)], optimizer=lambda p: torch.optim.AdamW(p, lr=1e-2),
                                batch_size=4, seed=3, output_dir=out, progress=False, log_every=4)  # fmt: skip

    def train_log(loop):
        return [(h["step"], h["loss"], h["kd"], h["items"]) for h in loop.history if h["split"] == "train"]

    whole = loop(tmp_path / "whole")
    whole.fit(ds, max_steps=8, eval_fn=_crash_at(None), eval_every=1)
    with pytest.raises(_Crash):
        loop(tmp_path / "run").fit(ds, max_steps=8, checkpoint_every=2, eval_fn=_crash_at(3), eval_every=1)
    resumed = loop(tmp_path / "run")
    resumed.fit(ds, max_steps=8, eval_fn=_crash_at(None), eval_every=1, resume_from="latest")
    assert train_log(resumed) == train_log(whole) and [s for s, *_ in train_log(whole)] == [4, 8]
    lines = [json.loads(r) for r in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in lines if r["split"] == "train"] == [h[1] for h in train_log(whole)]


def test_max_grad_norm_clips_the_step_and_logs_the_norm_before_clipping():
    """Only the argument checks of max_grad_norm were tested: clipping at inf passed. One SGD(lr=1) step on 8 rows:
    the logged grad_norm is the global norm of the unclipped gradient; with max_grad_norm=1e-3 the parameters move
    by exactly 1e-3 (the gradient scaled to that norm), without it by the full norm."""
    x = torch.randn(8, 6, generator=torch.Generator().manual_seed(3))
    y = torch.tensor([0, 1, 2, 3, 4, 0, 1, 2])
    teacher, student = _mlp(seed=1), _mlp(seed=2)
    ref = copy.deepcopy(student)
    with torch.no_grad():
        t = teacher(x)
    fastdistill.kd_loss(ref(x), t, labels=y, temperature=2.0, ce_weight=0.3).backward()
    norm = torch.cat([p.grad.flatten() for p in ref.parameters()]).norm()
    assert norm > 1e-2
    for max_norm, moved in ((1e-3, 1e-3), (1e3, float(norm))):
        loop = DistillationLoop(copy.deepcopy(student), [teacher], loss=fastdistill.KDLoss(temperature=2.0,
                                ce_weight=0.3), optimizer=_sgd(), batch_size=8, shuffle=False, progress=False,
                                log_every=1, max_grad_norm=max_norm)  # fmt: skip
        loop.fit(ArrayDataset(input=x, labels=y), max_steps=1)
        assert loop.history[0]["grad_norm"] == pytest.approx(float(norm), rel=1e-5)
        step = torch.cat([(p - q).detach().flatten() for p, q in zip(loop.student.parameters(), student.parameters())])
        assert float(step.norm()) == pytest.approx(moved, rel=1e-4), max_norm
