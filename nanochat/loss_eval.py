"""
Validation in bits per byte: the summed next-token loss in nats divided by the number of UTF-8
bytes those target tokens stand for, converted to bits. Unlike mean loss it does not depend on
the vocabulary, so runs with different tokenizers compare. Special tokens count 0 bytes and are
left out.
"""
import math

import torch
import torch.distributed as dist


def get_token_bytes(tokenizer, device="cpu"):
    """(V,) int64: UTF-8 byte length of each token id; 0 for special tokens."""
    n = tokenizer.get_vocab_size()
    specials = {tokenizer.encode_special(s) for s in tokenizer.get_special_tokens()}
    out = torch.zeros(n, dtype=torch.int64)
    for i in range(n):
        if i not in specials:
            out[i] = len(tokenizer.token_bytes(i))
    return out.to(device)


@torch.no_grad()
def evaluate_bpb(model, batches, steps, token_bytes, autocast=None):
    """Mean bits/byte over `steps` batches of (inputs, targets); all-reduced under DDP."""
    total_nats = torch.zeros((), dtype=torch.float64, device=token_bytes.device)
    total_bytes = torch.zeros((), dtype=torch.int64, device=token_bytes.device)
    it = iter(batches)
    for _ in range(steps):
        x, y = next(it)
        if autocast is not None:
            with autocast:
                loss = model(x, y, loss_reduction="none")
        else:
            loss = model(x, y, loss_reduction="none")
        y = y.reshape(-1)
        valid = y >= 0
        nb = torch.where(valid, token_bytes[y.clamp(min=0)], torch.zeros_like(y))
        total_nats += (loss.view(-1).double() * (nb > 0)).sum()
        total_bytes += nb.sum()
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(total_nats)
        dist.all_reduce(total_bytes)
    if total_bytes.item() == 0:
        return float("inf")
    return total_nats.item() / (math.log(2) * total_bytes.item())
