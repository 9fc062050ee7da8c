"""Run under torchrun by tests/test_dataloader.py: each rank reads a few batches and rank 0 writes what
every rank saw (row groups, and the first tokens after each <|bos|> as document fingerprints)."""
import sys
import json

import torch.distributed as dist

from nanochat.common import compute_init, compute_cleanup
from nanochat.tokenizer import Tokenizer
from nanochat.dataloader import DataLoader


def main(tokenizer_dir, out_path, n_batches):
    ddp, rank, _, world_size, device = compute_init("cpu")
    assert ddp and world_size == 2
    tok = Tokenizer.from_directory(tokenizer_dir)
    bos = tok.get_bos_token_id()
    loader = DataLoader(tok, B=4, T=512, split="train", device=device, rank=rank, world_size=world_size)
    groups, prints = set(), set()
    for _ in range(n_batches):
        groups.add(loader.state_dict()["group"])
        x, _ = next(loader)
        for row in x.tolist():
            prints.update(tuple(row[p + 1:p + 17]) for p, t in enumerate(row) if t == bos and p + 17 <= len(row))
    seen = [None] * world_size
    dist.all_gather_object(seen, {"rank": rank, "groups": sorted(groups), "prints": sorted(prints)})
    if rank == 0:
        with open(out_path, "w") as f:
            json.dump(seen, f)
    compute_cleanup()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]))
