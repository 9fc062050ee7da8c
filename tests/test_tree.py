"""MegaContext tree: addressing, completeness, chunking invariance, on-disk format, crash recovery."""
import os
import sys
import math
import signal
import struct
import subprocess

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

from nanochat.common import UserError
from megacontext.tree import MegaContextTree, HEADER_BYTES, MAGIC, pack_header

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from tree_append_worker import stream, make_gist_fn, K as WK, DIM as WDIM, MAX_LEVEL as WMAX, MODEL_ID  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GIST = make_gist_fn()


def assert_same_tree(a, b):
    assert a.num_tokens == b.num_tokens
    np.testing.assert_array_equal(a.tokens(0, a.num_tokens), b.tokens(0, b.num_tokens))
    for l in range(1, a.max_level + 1):
        assert a.num_nodes(l) == b.num_nodes(l), f"level {l}"
        assert torch.equal(a.gists(l, 0, a.num_nodes(l)), b.gists(l, 0, b.num_nodes(l))), f"level {l}"


def assert_complete(t):
    for l in range(1, t.max_level + 1):
        assert t.num_nodes(l) == t.num_nodes(l - 1) // t.K


def ram_tree(ids, K=WK, dim=WDIM, max_level=WMAX, dtype="bf16"):
    t = MegaContextTree(K=K, dim=dim, max_level=max_level, dtype=dtype, model_id=MODEL_ID)
    t.append(ids, GIST)
    return t


# ---------------------------------------------------------------- addressing and completeness

def test_parents_appear_exactly_when_k_children_exist_max_level_3():
    t = MegaContextTree(K=4, dim=WDIM, max_level=3)
    ids = stream(150)
    for n in range(1, 151):
        tel = t.append(ids[n - 1:n], GIST)
        assert [t.num_nodes(l) for l in range(4)] == [n, n // 4, n // 16, n // 64]
        assert tel["new_nodes"] == [1] + [int(n % 4 ** l == 0) for l in (1, 2, 3)]
    assert t.node_span(0, 7) == (7, 1)
    assert t.node_span(1, 3) == (12, 4)
    assert t.node_span(2, 3) == (48, 16)
    assert t.node_span(3, 1) == (64, 64)
    for l in range(1, 4):  # spans of the existing nodes tile [0, covered) with no gaps
        spans = [t.node_span(l, i) for i in range(t.num_nodes(l))]
        assert all(s == i * 4 ** l and w == 4 ** l for i, (s, w) in enumerate(spans))


def test_each_gist_summarizes_exactly_its_aligned_children():
    ids = stream(600)
    t = ram_tree(ids, K=4, max_level=3)
    g1 = t.gists(1, 0, t.num_nodes(1))
    for i in (0, 5, 149):
        want = t._decode(t._encode(GIST(0, torch.from_numpy(ids[i * 4:(i + 1) * 4]).view(1, 4))))
        assert torch.equal(t.gists(1, i, i + 1), want)
    for l in (2, 3):
        below = t.gists(l - 1, 0, t.num_nodes(l - 1))
        for i in (0, t.num_nodes(l) - 1):
            want = t._decode(t._encode(GIST(l - 1, below[i * 4:(i + 1) * 4].unsqueeze(0))))
            assert torch.equal(t.gists(l, i, i + 1), want)
    assert g1.dtype == torch.float32 and g1.shape == (150, WDIM)


# ---------------------------------------------------------------- chunking invariance

def test_one_batch_equals_token_by_token_and_odd_chunks():
    ids = stream(3000)
    ref = ram_tree(ids, K=32, max_level=2)
    one = MegaContextTree(K=32, dim=WDIM, max_level=2, model_id=MODEL_ID)
    for i in range(len(ids)):
        one.append(ids[i:i + 1], GIST)
    assert_same_tree(ref, one)
    odd = MegaContextTree(K=32, dim=WDIM, max_level=2, model_id=MODEL_ID)
    pos = 0
    for step in [1, 31, 33, 7, 1000, 64, 999] * 3:
        odd.append(torch.from_numpy(ids[pos:pos + step]), GIST, batch_size=3)
        pos += step
    odd.append(list(ids[pos:]), GIST, batch_size=3)
    assert_same_tree(ref, odd)


@settings(max_examples=40, deadline=None)
@given(chunks=st.lists(st.integers(0, 90), min_size=1, max_size=25), batch_size=st.integers(1, 9))
def test_random_chunkings_build_the_same_tree(chunks, batch_size):
    ids = stream(sum(chunks), seed=3)
    ref = ram_tree(ids, K=4, max_level=3)
    t = MegaContextTree(K=4, dim=WDIM, max_level=3, model_id=MODEL_ID)
    pos = 0
    for c in chunks:
        t.append(ids[pos:pos + c], GIST, batch_size=batch_size)
        pos += c
    assert_same_tree(ref, t)
    assert_complete(t)


def test_gist_calls_are_batched_not_per_node():
    t = MegaContextTree(K=32, dim=WDIM, max_level=2)
    tel = t.append(stream(32 * 1000), GIST, batch_size=4096)
    assert tel["new_nodes"] == [32000, 1000, 31]
    assert tel["gist_calls"] == 2  # one per level


# ---------------------------------------------------------------- amortized O(1) append

def test_single_token_appends_are_amortized_constant():
    n = 100_000
    t = MegaContextTree(K=32, dim=WDIM, max_level=2)
    ids = stream(n)
    for i in range(n):
        t.append(ids[i:i + 1], GIST)
    # capacity doubling: the history is copied O(log n) times in total, never once per append
    for lv in t.levels:  # first allocation (1024 rows) + one per doubling
        assert lv.reallocs <= 1 + max(0, math.ceil(math.log2(lv.count / 1024)))
    assert t.levels[0].reallocs == 8
    np.testing.assert_array_equal(t.tokens(0, n), ids)


# ---------------------------------------------------------------- on disk

@pytest.mark.parametrize("dtype,n", [("bf16", 100_000), ("fp16", 5000), ("fp32", 5000)])
def test_disk_round_trip_matches_ram(tmp_path, dtype, n):
    ids = stream(n, seed=1)
    ref = ram_tree(ids, K=32, max_level=2, dtype=dtype)
    with MegaContextTree.create(tmp_path, K=32, dim=WDIM, max_level=2, dtype=dtype, model_id=MODEL_ID) as t:
        pos = 0
        for step in (1, 4095, 17, 50_000):
            t.append(ids[pos:pos + step], GIST, batch_size=256)
            pos += step
        t.append(ids[pos:], GIST, batch_size=256)
        assert_same_tree(ref, t)
    with MegaContextTree.open(tmp_path, model_id=MODEL_ID) as t:
        assert (t.K, t.dim, t.max_level, t.dtype, t.model_id) == (32, WDIM, 2, dtype, MODEL_ID)
        assert t.recovered == {}
        assert t.tokens(0, n).dtype == np.uint32
        assert_same_tree(ref, t)
        more = stream(500, seed=9)
        t.append(more, GIST)
        ref.append(more, GIST)
        assert_same_tree(ref, t)


def test_reading_back_what_was_just_appended_needs_no_remap(tmp_path):
    """A decode step appends its token and reads it back (MemorySession._materialize): the newest
    rows are served from RAM, so the grown file is not remapped at every step. Reads that reach
    older rows, past that tail, still come from the file; every read equals the RAM tree's."""
    from megacontext import tree as T
    ids = stream(3 * T.TAIL_BYTES // 4 + 20_000, seed=3)   # single appends that wrap the tail buffer
    ref = ram_tree(ids, K=32, max_level=2)
    with MegaContextTree.create(tmp_path, K=32, dim=WDIM, max_level=2, model_id=MODEL_ID, durable=False) as t:
        t.append(ids[:-20_000], GIST)
        lod0 = t.levels[0]
        start = lod0.remaps
        for i in range(len(ids) - 20_000, len(ids)):
            t.append(ids[i:i + 1], GIST)
            assert t.tokens(i, i + 1)[0] == ids[i]
        assert lod0.remaps == start, "the just-appended token came from the RAM tail"
        keep = T.TAIL_BYTES // lod0.record_bytes
        assert keep <= len(lod0.tail) <= 2 * keep and lod0.tail_start == len(ids) - len(lod0.tail)
        np.testing.assert_array_equal(lod0.tail, ids[lod0.tail_start:])
        assert_same_tree(ref, t)                                # reads before the tail: the file
        assert lod0.remaps > start
        np.testing.assert_array_equal(t.tokens(len(ids) - keep - 5, len(ids)), ids[-keep - 5:])
    with MegaContextTree.open(tmp_path, model_id=MODEL_ID) as t:
        assert t.levels[0].tail is None
        assert_same_tree(ref, t)


def test_header_layout_and_fixed_offsets(tmp_path):
    ids = stream(1000)
    with MegaContextTree.create(tmp_path, K=32, dim=WDIM, max_level=2, dtype="bf16", model_id="gpt-d12@abc") as t:
        t.append(ids, GIST)
        g = t.gists(1, 0, t.num_nodes(1))
    raw0 = (tmp_path / "LOD0.ctx").read_bytes()
    raw1 = (tmp_path / "LOD1.ctx").read_bytes()
    assert raw0[:4] == MAGIC
    version, level, K, dim, code = struct.unpack_from("<5H", raw1, 4)
    assert (version, level, K, dim, code) == (1, 1, 32, WDIM, 2)
    assert raw1[14:46].rstrip(b"\0") == b"gpt-d12@abc"
    assert struct.unpack_from("<H", raw1, 46)[0] == 2  # max_level
    assert struct.unpack_from("<Q", raw1, 48)[0] == 31  # committed count
    assert raw1[60:64] == bytes(4)
    assert len(raw0) == HEADER_BYTES + 1000 * 4 and len(raw1) == HEADER_BYTES + 31 * WDIM * 2
    assert np.frombuffer(raw0, np.uint32, offset=HEADER_BYTES).tolist() == ids.tolist()
    i = 17  # record i lives at 64 + i * dim * 2, raw bf16 = top half of the fp32
    rec = np.frombuffer(raw1, np.uint16, count=WDIM, offset=HEADER_BYTES + i * WDIM * 2)
    assert torch.equal(torch.from_numpy((rec.astype(np.uint32) << 16).view(np.float32)), g[i])


def make_disk_tree(path, n=2000):
    with MegaContextTree.create(path, K=WK, dim=WDIM, max_level=WMAX, model_id=MODEL_ID) as t:
        t.append(stream(n), GIST)


def patch(path, offset, data):
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def test_bad_files_are_user_errors(tmp_path):
    make_disk_tree(tmp_path)
    lod1 = tmp_path / "LOD1.ctx"
    good = lod1.read_bytes()
    with pytest.raises(UserError, match="not 'other-model'"):
        MegaContextTree.open(tmp_path, model_id="other-model")
    patch(lod1, 20, bytes([good[20] ^ 0x01]))  # one flipped byte in the model id
    with pytest.raises(UserError, match="corrupted header"):
        MegaContextTree.open(tmp_path)
    lod1.write_bytes(good)
    patch(lod1, 0, b"XXXX")
    with pytest.raises(UserError, match="bad magic"):
        MegaContextTree.open(tmp_path)
    lod1.write_bytes(good[:40])
    with pytest.raises(UserError, match="truncated header"):
        MegaContextTree.open(tmp_path)
    lod1.write_bytes(good[:-10])  # records the header says were committed are gone
    with pytest.raises(UserError, match="truncated file"):
        MegaContextTree.open(tmp_path)
    count = struct.unpack_from("<Q", good, 48)[0]
    lod1.write_bytes(pack_header(1, WK, WDIM + 1, 2, MODEL_ID.encode(), WMAX, count) + good[64:])
    with pytest.raises(UserError, match="dim"):
        MegaContextTree.open(tmp_path)
    lod1.write_bytes(good)
    with MegaContextTree.open(tmp_path, model_id=MODEL_ID) as t:
        assert t.num_tokens == 2000
        with pytest.raises(UserError, match="already open"):
            MegaContextTree.open(tmp_path)
    with pytest.raises(UserError, match="non-empty"):
        MegaContextTree.create(tmp_path, K=WK, dim=WDIM)
    with pytest.raises(UserError, match="no MegaContext tree"):
        MegaContextTree.open(tmp_path / "nope")


def test_bad_inputs_are_user_errors():
    t = MegaContextTree(K=4, dim=WDIM, max_level=2)
    with pytest.raises(UserError, match="uint32"):
        t.append([1, -2, 3], GIST)
    with pytest.raises(UserError, match="expected float"):
        t.append(np.arange(8), lambda lvl, ch: torch.zeros(ch.shape[0], WDIM + 1))
    with pytest.raises(UserError, match="non-finite"):
        MegaContextTree(K=4, dim=WDIM).append(np.arange(8), lambda lvl, ch: torch.full((ch.shape[0], WDIM), float("nan")))
    with pytest.raises(UserError, match="32 utf-8 bytes"):
        MegaContextTree(model_id="x" * 33)


@pytest.mark.parametrize("dtype", ["bf16", "fp16", "fp32"])
def test_non_finite_gists_are_refused_as_stored(dtype):
    """The check reads the encoded rows: inf or nan in any one value is refused at every
    storage dtype, and so is an fp32 gist that overflows the fp16 records; nothing is stored."""
    for bad in (float("nan"), float("inf"), float("-inf")) + ((1e6,) if dtype == "fp16" else ()):
        t = MegaContextTree(K=4, dim=WDIM, dtype=dtype)

        def gist(lvl, ch, bad=bad):
            out = torch.randn(ch.shape[0], WDIM)
            out[-1, 3] = bad
            return out
        with pytest.raises(UserError, match="non-finite"):
            t.append(np.arange(8), gist)
        assert t.num_nodes(1) == 0
    t = MegaContextTree(K=4, dim=WDIM, dtype=dtype)   # large but finite values are kept
    t.append(np.arange(8), lambda lvl, ch: torch.full((ch.shape[0], WDIM), 6e4 if dtype == "fp16" else 1e30))
    assert t.num_nodes(1) == 2 and torch.isfinite(t.gists(1, 0, 2)).all()


# ---------------------------------------------------------------- crash recovery

def test_torn_tail_is_truncated_and_reported(tmp_path):
    make_disk_tree(tmp_path)
    with open(tmp_path / "LOD0.ctx", "ab") as f:
        f.write(b"\x07" * 13)  # a torn append: payload written, header count never updated
    with open(tmp_path / "LOD2.ctx", "ab") as f:
        f.write(b"\x01" * (WDIM * 2 + 5))
    with MegaContextTree.open(tmp_path) as t:
        assert t.recovered == {"LOD0": {"torn_tail_bytes": 13}, "LOD2": {"torn_tail_bytes": WDIM * 2 + 5}}
        assert_same_tree(ram_tree(stream(2000)), t)
        t.append(stream(3000)[2000:], GIST)
        assert_same_tree(ram_tree(stream(3000)), t)


def test_crash_between_levels_is_repaired_by_next_append(tmp_path):
    make_disk_tree(tmp_path)
    with MegaContextTree.open(tmp_path) as t:
        t.levels[0].append(stream(2500)[2000:].astype(np.uint32))  # LOD0 committed, then "crash"
    with MegaContextTree.open(tmp_path) as t:
        assert t.num_tokens == 2500 and t.num_nodes(1) == 2000 // WK
        tel = t.append([], GIST)
        assert tel["new_nodes"][1] == 2500 // WK - 2000 // WK
        assert_complete(t)
        assert_same_tree(ram_tree(stream(2500)), t)


def test_orphan_parents_are_dropped(tmp_path):
    make_disk_tree(tmp_path)
    lod0 = tmp_path / "LOD0.ctx"  # shrink LOD0 to 1000 tokens behind the tree's back
    os.truncate(lod0, HEADER_BYTES + 1000 * 4)
    patch(lod0, 0, pack_header(0, WK, WDIM, 0, MODEL_ID.encode(), WMAX, 1000))
    with MegaContextTree.open(tmp_path) as t:
        assert t.recovered["LOD1"] == {"dropped_orphan_nodes": 2000 // WK - 1000 // WK}
        assert_complete(t)
        assert_same_tree(ram_tree(stream(1000)), t)


@pytest.mark.slow
def test_sigkill_mid_append_then_reopen(tmp_path):
    n_total = 200_000
    for trial, kill_after in enumerate((1500, 4000)):
        path = tmp_path / f"t{trial}"
        env = dict(os.environ, PYTHONPATH=ROOT)
        p = subprocess.Popen([sys.executable, os.path.join(ROOT, "tests", "tree_append_worker.py"), str(path), str(n_total)],
                             stdout=subprocess.PIPE, text=True, env=env, cwd=ROOT)
        last = 0
        for line in p.stdout:  # each printed count was committed durably before it was printed
            last = int(line)
            if last >= kill_after:
                break
        os.kill(p.pid, signal.SIGKILL)  # it is already inside the next append
        p.wait()
        p.stdout.close()
        assert p.returncode == -signal.SIGKILL and last >= kill_after
        with MegaContextTree.open(path, model_id=MODEL_ID) as t:
            n = t.num_tokens
            assert last <= n <= last + 300  # lost at most the append in flight
            np.testing.assert_array_equal(t.tokens(0, n), stream(n_total)[:n])
            for l in range(1, t.max_level + 1):
                assert t.num_nodes(l) <= t.num_nodes(l - 1) // t.K
            t.append([], GIST)
            assert_complete(t)
            assert_same_tree(ram_tree(stream(n)), t)  # every gist equals a fresh recompute
