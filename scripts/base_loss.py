"""
Validation loss of a base checkpoint, in bits per byte. Runs plain or under torchrun:

  python -m scripts.base_loss --run d20
  python -m scripts.base_loss --ckpt-dir /path/to/run --split val --tokens 1048576
  torchrun --standalone --nproc_per_node=8 -m scripts.base_loss --run d20

Prints one JSON line: {"val_bpb": ..., "split", "step", "tokens", ...}. By default the batch shape,
data source and token count are the checkpoint's own (its train config), so at a step where
base_train evaluated, the number equals the val bpb that base_train logged there.
"""
import os
import json
from dataclasses import dataclass

from nanochat.common import compute_init, compute_cleanup, print0, get_base_dir, autocast_ctx, main_guard, fail
from nanochat.configurator import parse_config
from nanochat.tokenizer import get_tokenizer
from nanochat.dataloader import DataLoader
from nanochat.loss_eval import evaluate_bpb, get_token_bytes
from nanochat.checkpoint_manager import load_checkpoint, build_model


@dataclass
class BaseLossConfig:
    run: str = ""                 # run name: <base_dir>/runs/<run>
    ckpt_dir: str = ""            # or a run directory directly
    step: int = -1                # -1: the latest checkpoint
    split: str = "val"            # val | train
    tokens: int = -1              # tokens to evaluate; -1: the checkpoint's eval_tokens
    device_batch_size: int = -1   # -1: the checkpoint's
    data: str = ""                # bundled | fineweb; empty: the checkpoint's
    tokenizer_dir: str = ""       # empty: the checkpoint's, else <base_dir>/tokenizer
    device: str = ""              # cuda | cpu | mps; empty = autodetect


def main():
    cfg = parse_config(BaseLossConfig, section="base_loss")
    if bool(cfg.run) == bool(cfg.ckpt_dir):
        fail("give exactly one of --run NAME or --ckpt-dir DIR")
    if cfg.split not in ("train", "val"):
        fail(f"--split must be train or val, got {cfg.split!r}")
    ddp, rank, _, world_size, device = compute_init(cfg.device or None)
    run_dir = cfg.ckpt_dir or os.path.join(get_base_dir(), "runs", cfg.run)
    if not os.path.isdir(run_dir):
        fail(f"run directory {run_dir} does not exist")

    ckpt = load_checkpoint(run_dir, None if cfg.step < 0 else cfg.step, device=device)
    train_cfg = ckpt.get("train_config") or {}
    tokenizer = get_tokenizer(cfg.tokenizer_dir or train_cfg.get("tokenizer_dir") or None)
    model = build_model(ckpt, device, tokenizer)
    model.eval()

    B = cfg.device_batch_size if cfg.device_batch_size > 0 else train_cfg.get("device_batch_size", 8)
    T = model.config.sequence_len
    tokens = cfg.tokens if cfg.tokens > 0 else train_cfg.get("eval_tokens", 10 * 524288)
    steps = max(1, tokens // (B * T * world_size))  # the same arithmetic as base_train's eval
    source = cfg.data or train_cfg.get("data", "fineweb")
    loader = DataLoader(tokenizer, B, T, cfg.split, source=source, device=device, rank=rank, world_size=world_size)
    bpb = evaluate_bpb(model, loader, steps, get_token_bytes(tokenizer, device), autocast_ctx(device.type))
    print0(json.dumps({f"{cfg.split}_bpb": bpb, "split": cfg.split, "step": ckpt["step"], "run_dir": run_dir,
                       "tokens": steps * B * T * world_size, "batch": [B, T], "data": source,
                       "world_size": world_size, "device": device.type}))
    compute_cleanup()


if __name__ == "__main__":
    main_guard(main)
