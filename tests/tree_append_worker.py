"""
Child process for the tree crash test, plus the deterministic stream and gist_fn that the tests
share. Run as `python tests/tree_append_worker.py DIR N`: appends a fixed random stream of N
tokens to a new durable tree in DIR in odd-sized chunks, printing the committed token count after
every append, until it finishes or is SIGKILLed.
"""
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from megacontext.tree import MegaContextTree  # noqa: E402

K, DIM, MAX_LEVEL, VOCAB, MODEL_ID = 8, 16, 3, 1000, "test-model"


def stream(n, seed=0):
    return np.random.default_rng(seed).integers(0, VOCAB, size=n, dtype=np.int64)


def make_gist_fn(dim=DIM, vocab=VOCAB, seed=0):
    """Deterministic stand-in for GistNet. Elementwise ops only (no matmul, no reduction kernels):
    each row's result is then bit-identical whatever the batch size, so tests can use exact equality."""
    g = torch.Generator().manual_seed(seed)
    emb = torch.randn(vocab, dim, generator=g)
    w1, w2, b = torch.randn(3, dim, generator=g)
    level_emb = torch.randn(8, dim, generator=g)

    def gist_fn(child_level, children):
        x = emb[children] if child_level == 0 else children.float()
        h = x[:, 0]
        for k in range(1, x.shape[1]):  # explicit sum: a fixed order of additions
            h = h + x[:, k]
        h = h / x.shape[1]
        return torch.tanh(h * w1 + h.roll(1, -1) * w2 + b + level_emb[child_level])

    return gist_fn


def main():
    path, n = sys.argv[1], int(sys.argv[2])
    ids = stream(n)
    gist_fn = make_gist_fn()
    tree = MegaContextTree.create(path, K=K, dim=DIM, max_level=MAX_LEVEL, dtype="bf16", model_id=MODEL_ID)
    rng = np.random.default_rng(1)
    pos = 0
    while pos < n:
        step = int(rng.integers(1, 300))
        # small batch_size: one append commits many times, so a kill lands between levels often
        tree.append(ids[pos:pos + step], gist_fn, batch_size=4)
        pos += step
        print(tree.num_tokens, flush=True)
    tree.close()
    print("done", flush=True)


if __name__ == "__main__":
    main()
