"""
Checkpoints: one directory per run, one file per saved step.

  <run_dir>/model_<step>.pt   model state (GistNet/LensNet included), model config, train config,
                              optimizer states, every rank's dataloader state, RNG states, meta
  <run_dir>/latest            the step of the newest complete checkpoint (written last, atomically)

Optimizer state is identical on every rank (see optim.py), so rank 0 writes it once; dataloader
states differ per rank and are gathered. Loading checks the tokenizer's vocab size against the
model's and fails with one clear message on a mismatch or a corrupt file.
"""
import os

import torch
import torch.distributed as dist

from nanochat.common import atomic_torch_save, atomic_write_bytes, fail
from nanochat.gpt import GPT, GPTConfig, LENS_FEATURES


def _gather(obj):
    if dist.is_available() and dist.is_initialized():
        out = [None] * dist.get_world_size()
        dist.all_gather_object(out, obj)
        return out
    return [obj]


def save_checkpoint(run_dir, step, model, optimizers=None, loader_state=None, train_config=None, meta=None):
    """Collective under DDP (every rank must call it); rank 0 writes."""
    loader_states = _gather(loader_state)
    rng = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state()
    rngs = _gather(rng)
    rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
    if rank == 0:
        raw = getattr(model, "_orig_mod", model)
        ckpt = {
            "step": step,
            "model": {k: v.detach().cpu() for k, v in raw.state_dict().items()},
            "model_config": raw.config.to_dict(),
            "train_config": train_config,
            "optimizers": [o.state_dict() for o in optimizers] if optimizers else None,
            "loader_states": loader_states,
            "rng_states": rngs,
            "meta": meta or {},
        }
        atomic_torch_save(ckpt, os.path.join(run_dir, f"model_{step:06d}.pt"))
        atomic_write_bytes(os.path.join(run_dir, "latest"), f"{step}\n".encode())
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def find_last_step(run_dir):
    p = os.path.join(run_dir, "latest")
    if not os.path.exists(p):
        fail(f"no checkpoint in {run_dir} (expected a 'latest' file; train first)")
    try:
        return int(open(p).read().strip())
    except ValueError:
        fail(f"corrupt 'latest' file in {run_dir}")


def load_checkpoint(run_dir, step=None, device="cpu"):
    step = find_last_step(run_dir) if step is None else step
    path = os.path.join(run_dir, f"model_{step:06d}.pt")
    if not os.path.exists(path):
        fail(f"checkpoint not found: {path}")
    try:
        return torch.load(path, map_location=device, weights_only=False)
    except Exception as e:  # truncated / not a torch file
        fail(f"cannot read checkpoint {path}: {type(e).__name__}: {e}")


def build_model(ckpt, device, tokenizer=None, dtype=None):
    """Rebuild the GPT from a checkpoint dict; checks vocab against the tokenizer if given.
    dtype: cast the weights after loading (inference only, e.g. common.inference_dtype)."""
    config = GPTConfig(**ckpt["model_config"])
    if tokenizer is not None and tokenizer.get_vocab_size() != config.vocab_size:
        fail(f"checkpoint was trained with vocab size {config.vocab_size} but the tokenizer has "
             f"{tokenizer.get_vocab_size()}: wrong tokenizer directory for this checkpoint?")
    with torch.device("meta"):
        model = GPT(config)
    model.to_empty(device=device)
    sd = ckpt["model"]
    w = sd.get("lensnet.feat.weight")
    if w is not None and w.size(1) < LENS_FEATURES:
        # a checkpoint from before the query-match feature: a zero column reads nothing, so the
        # model computes exactly what it did (its config has lens_match off)
        sd = {**sd, "lensnet.feat.weight": torch.nn.functional.pad(w, (0, LENS_FEATURES - w.size(1)))}
    try:
        missing, unexpected = model.load_state_dict(sd, strict=False)
    except RuntimeError as e:   # shape mismatches
        fail(f"checkpoint does not match the model: {str(e).splitlines()[-1].strip()}")
    if missing or unexpected:
        fail(f"checkpoint does not match the model: missing {missing[:4]}, unexpected {unexpected[:4]}")
    if dtype is not None:
        model.to(dtype)
    return model


def restore_training_state(ckpt, optimizers, rank):
    if ckpt.get("optimizers") and optimizers:
        for opt, sd in zip(optimizers, ckpt["optimizers"]):
            opt.load_state_dict(sd)
    rngs = ckpt.get("rng_states") or []
    if rank < len(rngs):
        torch.set_rng_state(rngs[rank]["torch"])
        if "cuda" in rngs[rank] and torch.cuda.is_available():
            torch.cuda.set_rng_state(rngs[rank]["cuda"])
    states = ckpt.get("loader_states") or []
    return states[rank] if rank < len(states) else None
