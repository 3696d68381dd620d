"""Teacher-logit caches: what is written is what the teachers produced; top-k parts and their dense form; a student
trained from a cache takes the steps it takes with live teachers."""

import copy
import math

import pytest
import safetensors
import safetensors.torch
import torch
from torch import nn

import fastdistill
from fastdistill.training import ArrayDataset, DistillationLoop, TeacherLogitCache, topk_to_logits, write_teacher_cache


class SeqModel(nn.Module):
    """[B, T] token ids -> [B, T, V] logits."""

    def __init__(self, vocab=17, d=8, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.emb, self.out = nn.Embedding(vocab, d), nn.Linear(d, vocab)

    def forward(self, input_ids):
        return self.out(torch.tanh(self.emb(input_ids)))


def _teachers(k=2):
    return [SeqModel(seed=s) for s in range(1, k + 1)]


def _ids(n=13, t=5):
    return torch.randint(0, 17, (n, t), generator=torch.Generator().manual_seed(0))


def test_full_cache_holds_the_teachers_logits(tmp_path):
    ids, teachers = _ids(), _teachers()
    cache = write_teacher_cache(tmp_path / "c.safetensors", teachers, ArrayDataset(input_ids=ids), batch_size=4)
    with torch.no_grad():
        expected = torch.stack([t(ids) for t in teachers], dim=1)  # [N, K, T, V]
    assert cache.kind == "full" and len(cache) == 13 and cache.num_teachers == 2 and cache.vocab_size == 17
    assert cache.item_shape == (5,)
    torch.testing.assert_close(cache.logits, expected, rtol=0, atol=1e-6)
    rows = [3, 0, 12]
    torch.testing.assert_close(cache.get(rows), expected[rows].transpose(0, 1), rtol=0, atol=1e-6)  # [K, B, T, V]
    for dtype in (None, torch.float32, torch.float64, torch.bfloat16):  # contiguous: kd_loss need not copy again
        got = cache.get(rows, dtype=dtype)
        assert got.is_contiguous() and got.dtype == (dtype or cache.logits.dtype)
        torch.testing.assert_close(got, expected[rows].transpose(0, 1).to(got.dtype))
    # a standard safetensors file
    plain = safetensors.torch.load_file(str(tmp_path / "c.safetensors"))
    assert torch.equal(plain["logits"], cache.logits)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.safetensors"]  # no temporary file left


def test_cache_is_a_private_memory_map(tmp_path):
    path = tmp_path / "c.safetensors"
    cache = write_teacher_cache(path, _teachers(1), ArrayDataset(input_ids=_ids()), dtype=torch.bfloat16)
    assert cache.logits.dtype == torch.bfloat16
    before = path.read_bytes()
    cache.logits[0].zero_()  # copy-on-write: the process's pages change, the file never does
    assert path.read_bytes() == before
    assert TeacherLogitCache(path).logits[0].abs().sum() > 0
    # the bytes are the tensor itself, nothing more: header + N*K*T*V*2
    header = int.from_bytes(before[:8], "little")
    assert len(before) == 8 + header + 13 * 1 * 5 * 17 * 2


def test_topk_cache_parts_and_dense_logits(tmp_path):
    ids, teachers = _ids(), _teachers()
    k = 4
    cache = write_teacher_cache(tmp_path / "k.safetensors", teachers, ArrayDataset(input_ids=ids), topk=k,
                                batch_size=5)  # fmt: skip
    with torch.no_grad():
        full = torch.stack([t(ids) for t in teachers], dim=0)  # [K, N, T, V]
    values, indices, tail = cache.topk(range(13))
    ref_v, ref_i = full.topk(k, dim=-1)
    torch.testing.assert_close(values, ref_v, rtol=0, atol=1e-6)
    assert torch.equal(indices, ref_i)
    probs = full.softmax(-1)
    assert tail.dtype == torch.float64  # (a confident teacher's tail is below float32's range)
    tail = tail.float()
    torch.testing.assert_close(tail, 1 - probs.gather(-1, ref_i).sum(-1), rtol=0, atol=1e-6)
    # dense: the stored entries keep their probabilities, the V - k others share the tail mass equally
    dense = cache.get(range(13)).softmax(-1)
    torch.testing.assert_close(dense.gather(-1, ref_i), probs.gather(-1, ref_i), rtol=1e-5, atol=1e-6)
    others = dense.scatter(-1, ref_i, 0.0)
    torch.testing.assert_close(others.sum(-1), tail, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(others.amax(-1), tail / (17 - k), rtol=1e-5, atol=1e-6)
    with safetensors.safe_open(str(tmp_path / "k.safetensors"), "pt") as f:  # safetensors' own reader agrees
        assert f.metadata()["kind"] == "topk" and torch.equal(f.get_tensor("indices").long(), cache.indices.long())


def test_topk_cache_of_a_confident_teacher_keeps_its_tail(tmp_path):
    """A confident teacher's tail mass (1.4e-8 here) is stored as such, not as 1 - sum(kept) = 0 in float32: its
    dense logits stay finite and reverse KL from the cache is the live one's (it was inf, with NaN gradients)."""

    class Confident(nn.Module):
        def forward(self, x):
            out = torch.zeros(x.shape[0], 1000)
            out[:, 0], out[:, 1] = 25.0, 5.0
            return out + 0 * x.sum()

    x = torch.randn(4, 3)
    cache = write_teacher_cache(tmp_path / "k.safetensors", [Confident()], ArrayDataset(input=x), topk=2)
    want = torch.logsumexp(torch.zeros(998), 0) + 0 - torch.logsumexp(torch.tensor([25.0, 5.0] + [0.0] * 998), 0)
    torch.testing.assert_close(cache.tail_mass[:, 0].float(), want.exp().expand(4), rtol=1e-5, atol=0)
    dense = cache.get(range(4))[0]
    assert torch.isfinite(dense).all()
    student = torch.randn(4, 1000, requires_grad=True)
    live = Confident()(x)
    got = fastdistill.kd_loss(student, dense, divergence="reverse_kl")
    got.backward()
    torch.testing.assert_close(got, fastdistill.kd_loss(student, live, divergence="reverse_kl"), rtol=1e-4, atol=0)
    assert torch.isfinite(student.grad).all()


def test_topk_cache_keeps_a_tail_below_float32s_range_and_reads_float32_tails(tmp_path):
    """A teacher sure of one token by a logit gap of 120 has a tail mass of ~4e-48, below float32's smallest
    number: stored in float64, its dense logits stay finite and reverse KL from the cache is the live one's (in
    float32 the tail was 0, its logits -inf, reverse KL inf). A cache whose tail was written in float32 (before
    2026-11-30) still reads."""
    vocab = 5000
    logits = torch.zeros(2, vocab)
    logits[0, 0], logits[1, 3] = 120.0, 90.0

    class Fixed(nn.Module):
        def forward(self, x):
            return logits[x]

    path = tmp_path / "c.safetensors"
    cache = write_teacher_cache(path, [Fixed()], ArrayDataset(input=torch.arange(2)), topk=1)
    want = torch.tensor([-120.0, -90.0], dtype=torch.float64) + math.log(vocab - 1)
    torch.testing.assert_close(cache.tail_mass[:, 0], want.exp(), rtol=1e-5, atol=0)
    dense = cache.get(range(2))[0]
    assert torch.isfinite(dense).all()
    student = torch.randn(2, vocab, generator=torch.Generator().manual_seed(0))
    for s in (student, torch.zeros(2, vocab)):
        torch.testing.assert_close(fastdistill.kd_loss(s, dense, divergence="reverse_kl"),
                                   fastdistill.kd_loss(s, logits, divergence="reverse_kl"), rtol=1e-5, atol=0)
    with safetensors.safe_open(str(path), "pt") as f:
        meta, parts = f.metadata(), {name: f.get_tensor(name) for name in f.keys()}
    old = tmp_path / "old.safetensors"
    safetensors.torch.save_file({**parts, "tail_mass": parts["tail_mass"].float()}, str(old), metadata=meta)
    values, indices, tail = TeacherLogitCache(old).topk([1])
    assert tail.dtype == torch.float32
    torch.testing.assert_close(TeacherLogitCache(old).get([1]), cache.get([1]))


def test_topk_with_k_equal_v_is_exact():
    logits = torch.randn(3, 6, dtype=torch.float64).float()
    v, i = logits.topk(6)
    dense = topk_to_logits(v, i, torch.zeros(3), 6)
    torch.testing.assert_close(dense.softmax(-1), logits.softmax(-1), rtol=1e-6, atol=1e-7)


def test_student_from_cache_equals_student_from_live_teachers(tmp_path):
    x = torch.randn(20, 6, generator=torch.Generator().manual_seed(1))
    y = torch.randint(0, 5, (20,), generator=torch.Generator().manual_seed(2))
    torch.manual_seed(0)
    teachers = [nn.Linear(6, 5), nn.Linear(6, 5)]
    student = nn.Linear(6, 5)
    ds = ArrayDataset(input=x, labels=y)
    cache = write_teacher_cache(tmp_path / "c.safetensors", teachers, ds)
    kd = fastdistill.KDLoss(temperature=2.0, ce_weight=0.2, ensemble="logit_mean", divergence="reverse_kl")
    runs = []
    for kw in ({"teachers": teachers}, {"teacher_cache": cache}):
        loop = DistillationLoop(copy.deepcopy(student), loss=kd, batch_size=8, progress=False, **kw)
        loop.fit(ds, max_steps=5)
        runs.append(loop.student)
    for p, q in zip(runs[0].parameters(), runs[1].parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_cache_errors(tmp_path):
    safetensors.torch.save_file({"x": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="not a fastdistill teacher-logit cache"):
        TeacherLogitCache(tmp_path / "other.safetensors")
    with pytest.raises(ValueError, match="topk"):
        write_teacher_cache(tmp_path / "c.safetensors", _teachers(1), ArrayDataset(input_ids=_ids()), topk=18)

    class Ragged(torch.utils.data.Dataset):  # sequences of two lengths: cannot share one cache tensor
        def __len__(self):
            return 4

        def __getitem__(self, i):
            return {"input_ids": torch.zeros(3 if i < 2 else 4, dtype=torch.long)}

    with pytest.raises(ValueError, match="same teacher-logit shape"):
        write_teacher_cache(tmp_path / "r.safetensors", _teachers(1), Ragged(), batch_size=2)
    assert not (tmp_path / "r.safetensors").exists() and not list(tmp_path.glob(".r.safetensors.*.tmp"))


def _damaged_cache(tmp_path, how):
    """A valid cache file, then damaged: ``how(bytes, header_len) -> bytes``."""
    path = tmp_path / "c.safetensors"
    write_teacher_cache(path, _teachers(1), ArrayDataset(input_ids=_ids()))
    raw = path.read_bytes()
    path.write_bytes(how(raw, int.from_bytes(raw[:8], "little")))
    return path


def _header_edit(old, new):
    """Replace text inside the JSON header, keeping its length (so only that field changes)."""
    assert len(old) == len(new)
    return lambda raw, n: raw[:8] + raw[8 : 8 + n].replace(old, new) + raw[8 + n :]


@pytest.mark.parametrize("how, problem", [
    (lambda raw, n: b"these are my notes, not a cache\n", "its header length 8241904413164529780 exceeds the file"),
    (lambda raw, n: raw[:5], "5 bytes, too short"),
    (lambda raw, n: raw[:8] + b"\xff" * n + raw[8 + n :], "its header is not JSON"),
    (lambda raw, n: raw[:8] + b"[" + b" " * (n - 2) + b"]" + raw[8 + n :], "its header is not a JSON object"),
    (_header_edit(b'"F32"', b'"F64"'), "tensor 'logits' has dtype 'F64', expected F32 or F16 or BF16"),
    (_header_edit(b'"kind":"full"', b'"kind":"fuzz"'), "metadata kind='fuzz'"),
    (_header_edit(b'"shape":[13,', b'"shape":[99,'), "tensor 'logits' ([99, 1, 5, 17] F32) does not fit"),
    (lambda raw, n: raw[:-4], "tensor 'logits' ([13, 1, 5, 17] F32) does not fit bytes 0 to 4420"),
])  # fmt: skip
def test_a_damaged_cache_is_a_value_error_naming_the_file(tmp_path, how, problem):
    """Not a MemoryError (8 bytes of text read as a header length), a KeyError('F64') or rows read from the
    wrong bytes."""
    path = _damaged_cache(tmp_path, how)
    with pytest.raises(ValueError) as e:
        TeacherLogitCache(path)
    assert str(path) in str(e.value) and problem in str(e.value)


def test_a_cache_of_wrong_dtypes_shapes_or_indices_is_named(tmp_path):
    """Integer logits, float indices, top-k tensors whose shapes disagree, and stored indices outside [0, V): each a
    ValueError naming the file, not wrong numbers or a raw scatter error (a device-side assert on CUDA)."""
    from safetensors.torch import save_file

    n, k, v, top = 4, 2, 10, 3
    meta = {"format": "fastdistill.teacher_cache", "version": "1", "kind": "full", "num_teachers": str(k),
            "vocab_size": str(v)}  # fmt: skip
    topk = dict(meta, kind="topk", topk=str(top))
    cases = [
        ({"logits": torch.randint(0, 5, (n, k, v), dtype=torch.int32)}, meta, "dtype 'I32', expected F32"),
        ({"tail_mass": torch.zeros(n, k), "indices": torch.zeros(n, k, top), "values": torch.randn(n, k, top)}, topk,
         "'indices' has dtype 'F32', expected I32"),
        ({"tail_mass": torch.zeros(n, k, 7), "indices": torch.zeros(n, k, 5, top, dtype=torch.int32),
          "values": torch.randn(n, k, 5, top)}, topk, "expected indices = values"),
    ]  # fmt: skip
    for i, (tensors, metadata, problem) in enumerate(cases):
        path = tmp_path / f"c{i}.safetensors"
        save_file(tensors, str(path), metadata=metadata)
        with pytest.raises(ValueError, match=problem):
            TeacherLogitCache(path)
    path = tmp_path / "oob.safetensors"
    save_file({"tail_mass": torch.zeros(n, k), "indices": torch.full((n, k, top), 99, dtype=torch.int32),
               "values": torch.randn(n, k, top)}, str(path), metadata=topk)  # fmt: skip
    cache = TeacherLogitCache(path)
    for read in (cache.get, cache.topk):
        with pytest.raises(ValueError, match=r"damaged: rows \[0\] hold vocabulary indices outside \[0, 10\)"):
            read([0])


def test_cache_rows_are_integers_in_range(tmp_path):
    cache = write_teacher_cache(tmp_path / "c.safetensors", _teachers(1), ArrayDataset(input_ids=_ids()), topk=3)
    for get in (cache.get, cache.topk):
        with pytest.raises(ValueError, match="cache rows must be integer indices, got torch.float32"):
            get([0.5])  # was row 0
        with pytest.raises(ValueError, match="integer indices, got torch.bool"):
            get(torch.ones(13, dtype=torch.bool))
        for bad in (-1, 13):  # -1 was the last row
            with pytest.raises(IndexError, match=f"cache row {bad} out of range: .*c.safetensors has rows 0 to 12"):
                get([0, bad])
        with pytest.raises(ValueError, match=r"1-D sequence of row numbers \[B\] \(one row: \[i\]\), got shape \[\]"):
            get(3)  # was [*, V] rows transposed
    with pytest.raises(ValueError, match="dtype must be a floating-point torch.dtype"):
        cache.get([0], dtype=torch.long)  # was the logits truncated
    assert cache.get(torch.tensor([12, 0], dtype=torch.int32)).shape == (1, 2, 5, 17)
    assert cache.get([]).shape[1] == 0


@pytest.mark.parametrize("n", [10, 20])
def test_cache_must_have_one_row_per_dataset_item(tmp_path, n):
    """Shorter: an IndexError mid-run; longer: almost certainly another dataset's logits. Both stop before step 1."""
    x = torch.randn(13, 6, generator=torch.Generator().manual_seed(1))
    cache = write_teacher_cache(tmp_path / "c.safetensors", [nn.Linear(6, 5)], ArrayDataset(input=x))
    ds = ArrayDataset(input=torch.randn(n, 6), labels=torch.randint(0, 5, (n,)))
    loop = DistillationLoop(nn.Linear(6, 5), teacher_cache=cache, batch_size=4, progress=False)
    with pytest.raises(ValueError, match=f"c.safetensors has 13 rows but the dataset has {n} items"):
        loop.fit(ds, max_steps=5)
    assert loop.step == 0


def test_loop_warns_about_a_topk_cache_at_another_temperature(tmp_path):
    """A top-k cache's flat tail is the teacher's only at temperature 1: a loop whose loss tempers it warns, a full
    cache or temperature 1 does not."""
    import warnings

    x = torch.randn(8, 6, generator=torch.Generator().manual_seed(2))
    topk = write_teacher_cache(tmp_path / "k.safetensors", [nn.Linear(6, 5)], ArrayDataset(input=x), topk=2)
    full = write_teacher_cache(tmp_path / "f.safetensors", [nn.Linear(6, 5)], ArrayDataset(input=x))
    with pytest.warns(UserWarning, match="top-k teacher cache .* at temperature 2.0"):
        DistillationLoop(nn.Linear(6, 5), teacher_cache=topk, loss=fastdistill.KDLoss(temperature=2.0), progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        DistillationLoop(nn.Linear(6, 5), teacher_cache=topk, loss=fastdistill.KDLoss(), progress=False)
        DistillationLoop(nn.Linear(6, 5), teacher_cache=full, loss=fastdistill.KDLoss(temperature=2.0), progress=False)
