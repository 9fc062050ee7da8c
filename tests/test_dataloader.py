import os
import sys
import json
import socket
import subprocess

import numpy as np
import pytest
import torch

from nanochat.common import UserError
from nanochat.dataset import load_bundled
from nanochat.dataloader import DataLoader

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def take(loader, n):
    return [next(loader) for _ in range(n)]


def stream_of(tok, docs):
    bos = tok.get_bos_token_id()
    return [t for ids in tok.encode(docs, prepend=bos) for t in ids]


def test_batches_are_the_bos_prefixed_stream(tiny_tokenizer):
    B, T = 3, 64
    loader = DataLoader(tiny_tokenizer, B, T, "train", rank=1, world_size=2)
    x, y = next(loader)
    x2, _ = next(loader)
    assert x.shape == y.shape == (B, T) and x.dtype == y.dtype == torch.int64
    docs = [d["text"] for d in load_bundled()["train"][1::2][:2]]  # rank 1 of 2: documents 1, 3, ...
    stream = torch.tensor(stream_of(tiny_tokenizer, docs)[:2 * B * T + 1])
    assert torch.equal(x.flatten(), stream[:B * T]) and torch.equal(y.flatten(), stream[1:B * T + 1])
    assert torch.equal(x2.flatten(), stream[B * T:2 * B * T]), "the stream advances by B*T, skipping nothing"


def test_deterministic(tiny_tokenizer):
    a = take(DataLoader(tiny_tokenizer, 2, 128, "val"), 5)
    b = take(DataLoader(tiny_tokenizer, 2, 128, "val", tokenizer_threads=1), 5)
    assert all(torch.equal(p[0], q[0]) and torch.equal(p[1], q[1]) for p, q in zip(a, b))


def test_resume_gives_identical_next_batches(tiny_tokenizer):
    B, T = 8, 512  # the val split is ~25 batches of this size, so 40 batches cross into epoch 1
    ref = DataLoader(tiny_tokenizer, B, T, "val")
    states, batches = [], []
    for _ in range(40):
        states.append(json.loads(json.dumps(ref.state_dict())))  # must survive a JSON checkpoint
        batches.append(next(ref))
    assert states[-1]["epoch"] == 1 and states[0] == {"epoch": 0, "group": 0, "offset": 0}
    for k in (1, 2, 13, len(states) - 3):
        resumed = DataLoader(tiny_tokenizer, B, T, "val", state=states[k])
        for j in range(k, len(states)):
            x, y = next(resumed)
            assert torch.equal(x, batches[j][0]) and torch.equal(y, batches[j][1]), (k, j)


def test_two_ranks_read_disjoint_documents(tiny_tokenizer):
    bos = tiny_tokenizer.get_bos_token_id()
    seen = []
    for rank in range(2):
        loader = DataLoader(tiny_tokenizer, 8, 512, "train", rank=rank, world_size=2)
        groups, prints = set(), set()
        for _ in range(30):
            groups.add(loader.state_dict()["group"])
            x, _ = next(loader)
            for row in x.tolist():
                prints.update(tuple(row[p + 1:p + 17]) for p, t in enumerate(row) if t == bos and p + 17 <= len(row))
        assert {g % 2 for g in groups} == {rank} and len(prints) >= 10
        seen.append(prints)
    assert not seen[0] & seen[1]


def test_bad_arguments_are_user_errors(tiny_tokenizer):
    tok = tiny_tokenizer
    for kwargs, match in [(dict(B=0), "positive"), (dict(split="test"), "split"), (dict(rank=2, world_size=2), "rank"),
                          (dict(source="c4"), "unknown data source"), (dict(state={"epoch": 0}), "bad dataloader state"),
                          (dict(state={"epoch": 0, "group": 1, "offset": 0}, world_size=2), "another rank"),
                          (dict(source="tokens"), "tokens_path")]:
        args = dict(tokenizer=tok, B=2, T=16, split="val") | kwargs
        with pytest.raises(UserError, match=match):
            DataLoader(**args)
    loader = DataLoader(tok, 2, 16, "val", rank=15, world_size=16)  # val has 11 documents
    with pytest.raises(UserError, match="rank 15 of 16 gets no data"):
        next(loader)
    with pytest.raises(UserError, match="data directory"):
        next(DataLoader(tok, 2, 16, "train", source="fineweb", data_dir="/nonexistent/nanochat-data"))


def test_pretokenized_bin(tiny_tokenizer, tmp_path):
    path = tmp_path / "tokens.bin"
    data = (np.arange(10_000) % 500).astype(np.uint16)
    data.tofile(path)
    B, T = 2, 100  # 49 windows of B*T (+1) tokens; rank 1 of 2 takes windows 1, 3, ...
    loader = DataLoader(tiny_tokenizer, B, T, "train", source="tokens", tokens_path=str(path), rank=1, world_size=2)
    batches = take(loader, 30)  # 24 windows per epoch for rank 1: wraps around
    for k, (x, y) in enumerate(batches[:3]):
        lo = (2 * k + 1) * B * T
        assert torch.equal(x.flatten(), torch.from_numpy(data[lo:lo + B * T].astype(np.int64)))
        assert torch.equal(y.flatten(), torch.from_numpy(data[lo + 1:lo + B * T + 1].astype(np.int64)))
    assert torch.equal(batches[24][0], batches[0][0]) and loader.state_dict()["epoch"] == 1
    state = loader.state_dict()
    nxt = next(loader)
    resumed = DataLoader(tiny_tokenizer, B, T, "train", source="tokens", tokens_path=str(path), rank=1, world_size=2,
                         state=state)
    assert torch.equal(next(resumed)[0], nxt[0])


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_disjoint_torchrun(tiny_tokenizer, tmp_path):
    out = tmp_path / "seen.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
           os.path.join(REPO, "tests", "ddp_data_worker.py"), tiny_tokenizer.directory, str(out), "20"]
    env = dict(os.environ, PYTHONPATH=REPO, OMP_NUM_THREADS="1")
    r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    seen = json.loads(out.read_text())
    assert [s["rank"] for s in seen] == [0, 1]
    assert all(g % 2 == s["rank"] for s in seen for g in s["groups"])
    p0, p1 = ({tuple(p) for p in s["prints"]} for s in seen)
    assert len(p0) >= 3 and len(p1) >= 3 and not p0 & p1
