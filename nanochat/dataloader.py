"""
Distributed, resumable token stream for pretraining.

- Each rank reads its own row groups (r, r+W, r+2W, ... of the split, see dataset.py),
  tokenizes every document with <|bos|> prepended and concatenates them into one stream; no
  padding, no cropping, long documents simply continue into the next row.
- A batch is the next B*T+1 tokens of the stream: inputs = tokens[:-1].view(B, T),
  targets = tokens[1:].view(B, T); the stream then advances by B*T, so the last target of one
  batch is the first input of the next and no token is skipped.
- The state is (epoch, group, offset): the row group that the next batch starts in and the
  token offset into that group's tokens. Resuming re-tokenizes from that group and skips
  `offset` tokens, so the next batch is exactly the one that would have come. It is plain ints,
  so the checkpoint stores it as JSON, one per rank.
- Infinite: at the end of the split the epoch counter goes up and reading starts again.
- source="tokens": a pre-tokenized flat .bin file (np.memmap, uint16 if the vocab fits, else
  uint32); "group" is then the global batch index, rank r taking batches r, r+W, ...
"""
from itertools import chain
from collections import deque

import numpy as np
import torch

from nanochat.common import fail
from nanochat.dataset import documents_iter_batched, SOURCES


class DataLoader:

    def __init__(self, tokenizer, B, T, split, source="bundled", device="cpu", rank=0, world_size=1, state=None,
                 tokenizer_threads=4, data_dir=None, tokens_path=None):
        if not (isinstance(B, int) and isinstance(T, int) and B > 0 and T > 0):
            fail(f"batch size B and sequence length T must be positive ints, got B={B!r} T={T!r}")
        if split not in ("train", "val"):
            fail(f"split must be train or val, got {split!r}")
        if not (isinstance(world_size, int) and world_size >= 1 and isinstance(rank, int) and 0 <= rank < world_size):
            fail(f"need 0 <= rank < world_size, got rank={rank!r} world_size={world_size!r}")
        if source not in SOURCES + ("tokens",):
            fail(f"unknown data source {source!r}: use {', '.join(SOURCES)} or tokens")
        self.tokenizer, self.B, self.T, self.split, self.source = tokenizer, B, T, split, source
        self.device = torch.device(device)
        self.rank, self.world_size, self.threads, self.data_dir = rank, world_size, tokenizer_threads, data_dir
        self.bos = tokenizer.get_bos_token_id()
        if source == "tokens":
            self.tokens = self._open_tokens(tokens_path, tokenizer.get_vocab_size())
        state = {"epoch": 0, "group": rank, "offset": 0} if state is None else state
        if not (isinstance(state, dict) and all(isinstance(state.get(k), int) and state[k] >= 0
                                                for k in ("epoch", "group", "offset"))):
            fail(f"bad dataloader state {state!r}: expected {{'epoch': int, 'group': int, 'offset': int}}")
        if state["group"] % world_size != rank:
            fail(f"dataloader state {state} belongs to another rank (this is rank {rank} of {world_size}); "
                 f"resume with the same number of ranks")
        self.pending = deque()  # (epoch, group, tokens) fetched but not yet fully consumed
        self.offset = state["offset"]  # tokens of the stream already consumed in pending[0] (or the next group)
        self._start_epoch(state["epoch"], state["group"])

    @staticmethod
    def _open_tokens(path, vocab_size):
        if path is None:
            fail("source='tokens' needs tokens_path=<file.bin>")
        dtype = np.uint16 if vocab_size <= 2 ** 16 else np.uint32
        try:
            tokens = np.memmap(path, dtype=dtype, mode="r")
        except (OSError, ValueError) as e:
            fail(f"cannot read token file {path} as {np.dtype(dtype).name}: {e}")
        return tokens

    def _start_epoch(self, epoch, group):
        self.epoch, self.next_group = epoch, group  # the next group the reader will produce
        self.epoch_groups = 0
        if self.source != "tokens":
            self.reader = documents_iter_batched(self.source, self.split, group, self.world_size, self.data_dir)

    def _fetch(self):
        """Append the next group of this rank's stream to `pending`, rolling over epochs."""
        while True:
            if self.source == "tokens":
                lo, n = self.next_group * self.B * self.T, self.B * self.T
                toks = np.asarray(self.tokens[lo:lo + n + 1], dtype=np.int64) if lo + n + 1 <= len(self.tokens) else None
            else:
                texts = next(self.reader, None)
                toks = None
                if texts is not None:
                    rows = self.tokenizer.encode(texts, prepend=self.bos, num_threads=self.threads)
                    toks = np.fromiter(chain.from_iterable(rows), dtype=np.int64, count=sum(map(len, rows)))
            if toks is not None:
                self.pending.append((self.epoch, self.next_group, toks))
                self.next_group += self.world_size
                self.epoch_groups += 1
                return
            if self.epoch_groups == 0 and self.next_group == self.rank:
                fail(f"rank {self.rank} of {self.world_size} gets no data from the {self.split} split of {self.source} "
                     f"(fewer row groups or token batches than ranks)")
            self._start_epoch(self.epoch + 1, self.rank)

    def state_dict(self):
        """Where the next batch starts; pass it back as `state=` to resume exactly there."""
        if self.pending:
            epoch, group, _ = self.pending[0]
            return {"epoch": epoch, "group": group, "offset": self.offset}
        return {"epoch": self.epoch, "group": self.next_group, "offset": self.offset}

    def __iter__(self):
        return self

    def __next__(self):
        if self.source == "tokens":
            # a token batch is its own window of the file: B*T+1 tokens, nothing carries over
            if not self.pending:
                self._fetch()
            buf = self.pending.popleft()[2]
        else:
            # invariant: the next batch starts at `offset` inside pending[0]
            while True:
                if not self.pending:
                    self._fetch()
                if self.offset < len(self.pending[0][2]):
                    break
                self.offset -= len(self.pending.popleft()[2])
            need = self.B * self.T + 1
            pieces, have, i, skip = [], 0, 0, self.offset
            while have < need:
                if i == len(self.pending):
                    self._fetch()
                pieces.append(self.pending[i][2][skip:skip + need - have])
                have += len(pieces[-1])
                i, skip = i + 1, 0
            buf = np.concatenate(pieces)
            self.offset += self.B * self.T
        buf = torch.from_numpy(buf)
        if self.device.type == "cuda":
            buf = buf.pin_memory().to(self.device, non_blocking=True)
        else:
            buf = buf.to(self.device)
        return buf[:-1].view(self.B, self.T), buf[1:].view(self.B, self.T)
