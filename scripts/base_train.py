"""
Pretrain the base model. Runs plain or under torchrun (CPU: gloo, GPU: nccl):

  python -m scripts.base_train --config cpu
  torchrun --standalone --nproc_per_node=8 -m scripts.base_train --config d20

One dial: --depth sets width (depth * aspect_ratio), heads (width / head_dim) and, through the
parameter count, the number of steps (target_param_data_ratio tokens per parameter). Everything
else is derived in the few lines of arithmetic below.
"""
import os
import json
import time
import math
import copy
import contextlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, asdict

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from nanochat.common import (compute_init, compute_cleanup, print0, get_base_dir, autocast_ctx, synchronize,
                             peak_flops, main_guard, fail, atomic_write_json)
from nanochat.configurator import parse_config
from nanochat.gpt import GPT, GPTConfig, LENS_QUERIES
from nanochat.optim import build_optimizers
from nanochat.tokenizer import get_tokenizer
from nanochat.dataloader import DataLoader
from nanochat.loss_eval import evaluate_bpb, get_token_bytes
from nanochat.checkpoint_manager import save_checkpoint, load_checkpoint, restore_training_state
from nanochat.engine import Engine
from megacontext.mctrain import MCStep, make_plan, compile_mc, COMPILE_MODES
from megacontext import tasks


class MCBatcher:
    """Turns a (B, T) CPU batch of long contexts into the MC step's inputs: mixes in synthetic
    tasks (answer at the end: the cut point N is the answer start), samples working contexts on
    the CPU and ships index arrays to the device. Text rows are cut at N = T - H."""

    def __init__(self, tokenizer, cfg, rank, device):
        self.tok, self.cfg, self.device = tokenizer, cfg, device
        self.rng = np.random.default_rng(cfg.seed + 1000 * rank)  # every draw: tasks, windows, probes
        self.words = None
        if cfg.mc_task_open_vocab:
            self.words = tasks.open_vocab(tokenizer.decode([i]) for i in range(tokenizer.get_vocab_size()))

    def state_dict(self):
        """Where the sampling stream stands (saved with the loader state, so a resume is exact)."""
        return {"rng": copy.deepcopy(self.rng.bit_generator.state)}

    def load_state_dict(self, st):
        self.rng.bit_generator.state = st["rng"]

    def __call__(self, x):
        cfg, rng = self.cfg, self.rng
        ids = x.numpy().copy()
        B, T = ids.shape
        N = np.full(B, T - cfg.mc_H, np.int64)
        needle = np.full(B, -1, np.int64)
        weights = np.ones((B, T), np.float32)
        filler = tasks.make_text_filler(ids.reshape(-1).copy())
        for b in range(B):
            if rng.random() < cfg.mc_task_rate:
                ex = tasks.random_train_example(rng, T, filler, self.tok.encode, open_nouns=cfg.mc_task_open_nouns,
                                                words=self.words)
                ids[b] = ex["ids"]
                N[b] = ex["answer_start"]
                needle[b] = ex["target_pos"][0]
                weights[b, ex["answer_start"]:] = cfg.mc_answer_weight
        plan = make_plan(N, T, cfg.mc_block_size, cfg.mc_W, cfg.mc_H, cfg.mc_max_level, cfg.mc_random_wcs, rng, needle,
                         n_probe=cfg.mc_probes, collapse=cfg.mc_collapse_probes)
        dev = self.device
        plan = {k: torch.from_numpy(v).to(dev, non_blocking=True) for k, v in plan.items()}
        return (torch.from_numpy(ids).to(dev), torch.from_numpy(N).to(dev), plan,
                torch.from_numpy(weights).to(dev), None)


@dataclass
class TrainConfig:
    run: str = "base"                 # run name: checkpoints in <base_dir>/runs/<run> unless out_dir set
    out_dir: str = ""
    tokenizer_dir: str = ""           # default <base_dir>/tokenizer
    data: str = "fineweb"             # fineweb | bundled | pysrc
    device: str = ""                  # cuda | cpu | mps; empty = autodetect
    seed: int = 1337
    # model
    depth: int = 20
    aspect_ratio: int = 64            # width = depth * aspect_ratio
    head_dim: int = 128
    gqa_ratio: int = 1                # n_head / n_kv_head (1 = MHA)
    max_seq_len: int = 2048
    # batch and horizon
    device_batch_size: int = 32
    total_batch_size: int = 524288    # tokens per optimizer step, across ranks (grad accumulation fills the gap)
    num_iterations: int = -1          # -1: derived from target_param_data_ratio
    time_budget_min: float = -1.0     # > 0: stop after this many minutes of training; the LR schedule
                                      # follows max(step / num_iterations, elapsed / budget)
    target_param_data_ratio: float = 20.0
    # optimisation
    matrix_lr: float = 0.02
    embedding_lr: float = 0.2
    unembedding_lr: float = 0.004
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    warmup_ratio: float = 0.0
    warmdown_ratio: float = 0.2
    final_lr_frac: float = 0.0
    # eval / logging / saving
    eval_every: int = 250
    eval_tokens: int = 10 * 524288
    log_every: int = 1
    sample_every: int = -1            # -1: only at the end
    save_every: int = -1              # -1: only at the end
    resume: bool = False              # continue from <out_dir>/latest
    compile: bool = True              # torch.compile on CUDA
    loss_chunk: int = 0               # > 0: score the loss this many rows at a time (saves the fp32 logits; GPT.logits_and_loss)
    wandb: str = ""                   # wandb project; empty = off
    # MegaContext end-to-end training (DESIGN §8); off = the plain nanochat path
    megacontext: bool = False
    mc_context_len: int = 8192        # tokens per long training context (a multiple of K**max_level and max_seq_len)
    mc_W: int = 512                   # working-context budget (entries)
    mc_H: int = 64                    # horizon: tokens scored after each working context
    mc_block_size: int = 32           # K
    mc_max_level: int = 2
    mc_pos_scheme: str = "entry"      # entry | gaussian
    mc_random_wcs: int = 2            # random LOD mixtures per context (besides pure recency)
    mc_probes: int = 4                # counterfactual expansions per context for LensNet
    mc_collapse_probes: bool = False  # + one collapse counterfactual per context (LensNet learns which LOD0 detail stays)
    mc_lens_query: str = "tokens"     # LensNet's queries: tokens (embeddings) | hidden (base-model states; GPTConfig.lens_query)
    mc_lens_match: bool = False       # LensNet also reads each entry's lexical match with its query (GPTConfig.lens_match)
    mc_compile: str = "pieces"        # pieces | step: what torch.compile wraps on CUDA (megacontext/mctrain.py: compile_mc)
    mc_lambda: float = 0.01           # edit cost (nats) in LensNet's regularised argmin
    mc_weight: float = 0.1            # weight of the working-context horizon loss: its H tokens per row
                                      # weigh ~60x a plain token each; at 1.0 plain loss fell behind
                                      # plain-only training (tests/test_mctrain.py), at 0.1 it keeps up
    lens_weight: float = 1.0          # weight of the LensNet loss
    mc_task_rate: float = 0.5         # fraction of contexts replaced by synthetic long-context tasks
    mc_task_open_nouns: bool = False  # half the passkey/NIAH tasks in a shape with a random noun (tasks.open_template)
    mc_task_open_vocab: bool = False  # those nouns: two words of the tokenizer's vocabulary (tasks.open_vocab), not WORDS x OPEN_HEADS
    mc_answer_weight: float = 4.0     # loss weight of task answer tokens


@contextlib.contextmanager
def eager(*modules):
    """Run modules with their own (uncompiled) forward: sampling gives every decode step a new
    shape, and a dynamic=False compiled forward would recompile at each one."""
    saved = [m.__dict__.pop("forward", None) for m in modules]
    try:
        yield
    finally:
        for m, f in zip(modules, saved):
            if f is not None:
                m.forward = f


def get_lr_multiplier(it, num_iterations, cfg):
    warmup = round(cfg.warmup_ratio * num_iterations)
    warmdown = round(cfg.warmdown_ratio * num_iterations)
    if it < warmup:
        return (it + 1) / warmup
    if it <= num_iterations - warmdown:
        return 1.0
    progress = (num_iterations - it) / max(1, warmdown)
    return progress + (1 - progress) * cfg.final_lr_frac


def get_muon_momentum(it):
    frac = min(it / 300, 1)
    return (1 - frac) * 0.85 + frac * 0.95


class BudgetClock:
    """The clock of --time-budget-min: seconds of training since start, not counting the time
    between pause() and resume() (evals, samples, checkpoints). With them counted, a 3.5-minute
    budget on an H200 reached step 626 of 2,400: its first 25 steps, the step-0 eval and the
    compiles included, took ~2 minutes. The first steps' compile still counts: it is training."""

    def __init__(self):
        self.t0, self.paused, self._since = time.time(), 0.0, None

    def pause(self):
        if self._since is None:
            self._since = time.time()

    def resume(self):
        if self._since is not None:
            self.paused += time.time() - self._since
            self._since = None

    def elapsed(self):
        now = time.time()
        return now - self.t0 - self.paused - (now - self._since if self._since is not None else 0.0)


def main():
    cfg = parse_config(TrainConfig, section="base_train")
    ddp, rank, local_rank, world_size, device = compute_init(cfg.device or None, cfg.seed)
    master = rank == 0
    autocast = autocast_ctx(device.type)
    out_dir = cfg.out_dir or os.path.join(get_base_dir(), "runs", cfg.run)

    # tokenizer + model ---------------------------------------------------------------------
    tokenizer = get_tokenizer(cfg.tokenizer_dir or None)
    vocab_size = tokenizer.get_vocab_size()
    n_embd = cfg.depth * cfg.aspect_ratio
    n_head = max(1, n_embd // cfg.head_dim)
    if n_embd % n_head or n_head % cfg.gqa_ratio:
        fail(f"depth {cfg.depth} x aspect {cfg.aspect_ratio} gives width {n_embd}, not divisible into "
             f"{n_head} heads / gqa_ratio {cfg.gqa_ratio}")
    if cfg.mc_lens_query not in LENS_QUERIES:
        fail(f"mc_lens_query must be one of {', '.join(LENS_QUERIES)}, got {cfg.mc_lens_query!r}")
    model_config = GPTConfig(sequence_len=cfg.max_seq_len, vocab_size=vocab_size, n_layer=cfg.depth,
                             n_head=n_head, n_kv_head=n_head // cfg.gqa_ratio, n_embd=n_embd,
                             megacontext=cfg.megacontext, mc_block_size=cfg.mc_block_size,
                             mc_max_level=cfg.mc_max_level, pos_scheme=cfg.mc_pos_scheme,
                             lens_query=cfg.mc_lens_query, lens_match=cfg.mc_lens_match)
    if cfg.megacontext:
        K, L = cfg.mc_block_size, cfg.mc_max_level
        if cfg.mc_context_len % (K ** L) or cfg.mc_context_len % cfg.max_seq_len:
            fail(f"mc_context_len {cfg.mc_context_len} must be a multiple of K**max_level = {K ** L} "
                 f"and of max_seq_len = {cfg.max_seq_len}")
        if cfg.mc_W + cfg.mc_H > 4 * cfg.max_seq_len or cfg.mc_W < 2 * K + L * (K - 1):
            fail(f"mc_W {cfg.mc_W} must be in [2K + max_level*(K-1), 4*max_seq_len - H] "
                 f"(the probe bases keep room for an oracle's descent of max_level expansions)")
        if cfg.mc_task_open_vocab and not cfg.mc_task_open_nouns:
            fail("mc_task_open_vocab picks the nouns of mc_task_open_nouns: set both")
        if cfg.mc_compile not in COMPILE_MODES:
            fail(f"mc_compile must be one of {', '.join(COMPILE_MODES)}, got {cfg.mc_compile!r}")
    with torch.device("meta"):
        model = GPT(model_config)
    model.to_empty(device=device)
    model.init_weights()
    if cfg.loss_chunk < 0:
        fail(f"loss_chunk must be >= 0, got {cfg.loss_chunk}")
    model.loss_chunk = cfg.loss_chunk
    num_params = model.num_params()
    flops_per_token = model.estimate_flops(cfg.max_seq_len)
    print0(f"model: depth {cfg.depth}, width {n_embd}, heads {n_head}/{n_head // cfg.gqa_ratio}, "
           f"vocab {vocab_size}, params {num_params:,}, {flops_per_token:.3e} FLOPs/token")

    # batch arithmetic ------------------------------------------------------------------------
    if cfg.megacontext and cfg.mc_context_len - cfg.mc_H <= cfg.mc_W:
        fail(f"mc_context_len - mc_H = {cfg.mc_context_len - cfg.mc_H} must exceed mc_W = {cfg.mc_W}: "
             "a context that fits the window whole has nothing to compress")
    seq_per_row = cfg.mc_context_len if cfg.megacontext else cfg.max_seq_len
    tokens_per_fwdbwd = cfg.device_batch_size * seq_per_row * world_size
    if cfg.total_batch_size % tokens_per_fwdbwd:
        fail(f"total_batch_size {cfg.total_batch_size} must be a multiple of device_batch_size x "
             f"{'mc_context_len' if cfg.megacontext else 'max_seq_len'} x world_size = {tokens_per_fwdbwd}")
    grad_accum = cfg.total_batch_size // tokens_per_fwdbwd
    num_iterations = cfg.num_iterations
    if num_iterations <= 0:
        num_iterations = max(1, round(cfg.target_param_data_ratio * num_params / cfg.total_batch_size))
    print0(f"batch: {cfg.total_batch_size:,} tokens/step = {cfg.device_batch_size} x {seq_per_row} x "
           f"{world_size} ranks x {grad_accum} accum; {num_iterations} steps, "
           f"{num_iterations * cfg.total_batch_size:,} tokens")

    optimizers = build_optimizers(model, cfg.matrix_lr, cfg.embedding_lr, cfg.unembedding_lr,
                                  weight_decay=cfg.weight_decay)
    adamw, muon = optimizers

    # resume ------------------------------------------------------------------------------------
    start_step, loader_state, prev_meta = 0, None, {}
    if cfg.resume:
        ckpt = load_checkpoint(out_dir, device=device)
        if ckpt["model_config"] != model_config.to_dict():
            fail(f"cannot resume: the checkpoint in {out_dir} has a different model config")
        model.load_state_dict(ckpt["model"])
        loader_state = restore_training_state(ckpt, optimizers, rank)
        start_step, prev_meta = ckpt["step"], ckpt.get("meta", {})
        print0(f"resumed from step {start_step}")

    orig_model = model
    if cfg.megacontext:
        # the whole MC step is one module so that DDP syncs GistNet/LensNet with the rest
        model = MCStep(orig_model, cfg.mc_W, cfg.mc_H, cfg.mc_random_wcs, cfg.mc_probes, cfg.mc_lambda,
                       cfg.mc_weight, cfg.lens_weight)
        if device.type == "cuda" and cfg.compile:
            compile_mc(model, cfg.mc_compile)
        batcher = MCBatcher(tokenizer, cfg, rank, device)
        if loader_state and "mc" in loader_state:
            batcher.load_state_dict(loader_state["mc"])
    elif device.type == "cuda" and cfg.compile:
        model = torch.compile(model, dynamic=False)
    if ddp:
        model = DDP(model, device_ids=[local_rank] if device.type == "cuda" else None)

    train_loader = DataLoader(tokenizer, cfg.device_batch_size, seq_per_row, "train", source=cfg.data,
                              device="cpu" if cfg.megacontext else device, rank=rank, world_size=world_size,
                              state={k: v for k, v in loader_state.items() if k != "mc"} if loader_state else None)
    token_bytes = get_token_bytes(tokenizer, device)
    eval_steps = max(1, cfg.eval_tokens // tokens_per_fwdbwd)

    wandb_run = None
    if cfg.wandb and master:
        try:
            import wandb
        except ImportError:
            fail("--wandb given but wandb is not installed (pip install wandb)")
        wandb_run = wandb.init(project=cfg.wandb, name=cfg.run, config=asdict(cfg))

    def evaluate():
        model.eval()
        val_loader = DataLoader(tokenizer, cfg.device_batch_size, cfg.max_seq_len, "val", source=cfg.data,
                                device=device, rank=rank, world_size=world_size)
        bpb = evaluate_bpb(orig_model, val_loader, eval_steps, token_bytes, autocast)
        model.train()
        return bpb

    def log(d):
        if wandb_run is not None:
            wandb_run.log(d)

    # training loop -----------------------------------------------------------------------------
    peak = peak_flops(device)
    history = list(prev_meta.get("history", []))
    smooth_loss, n_logged, total_time, val_bpb = 0.0, 0, 0.0, None
    step = start_step
    loader_iter = iter(train_loader)
    if cfg.megacontext:
        # tokenizing long contexts + sampling working contexts is CPU work: do the next batch's
        # in a background thread while the GPU runs this one
        pool = ThreadPoolExecutor(1)

        def next_batch():
            bx, _ = next(loader_iter)
            state = train_loader.state_dict()              # where the batch after bx starts
            out = batcher(bx)
            state["mc"] = batcher.state_dict()             # the sampler's stream right after bx's draws
            return state, out

        fut = pool.submit(next_batch)
        x, y = None, None
    else:
        x, y = next(loader_iter)
    clock, out_of_time = BudgetClock(), False

    def progress_step():
        """The step the LR schedule sees: with a time budget, wall time can move it ahead."""
        if cfg.time_budget_min <= 0:
            return step
        frac = clock.elapsed() / (60 * cfg.time_budget_min)
        if ddp:  # every rank must follow rank 0's clock, or they would stop at different steps
            t = torch.tensor([frac], device=device)
            dist.broadcast(t, 0)
            frac = t.item()
        return max(step, min(num_iterations, round(frac * num_iterations)))

    while True:
        last = step == num_iterations or out_of_time
        clock.pause()   # evals, samples and checkpoints are not training time
        if cfg.eval_every > 0 and (last or step % cfg.eval_every == 0):
            val_bpb = evaluate()
            print0(f"step {step:05d} | val bpb {val_bpb:.4f}")
            history.append({"step": step, "val_bpb": val_bpb})
            log({"step": step, "val/bpb": val_bpb})
        if master and (last or (cfg.sample_every > 0 and step > 0 and step % cfg.sample_every == 0)):
            engine = Engine(orig_model, tokenizer, autocast)
            with eager(orig_model, *(getattr(orig_model, n) for n in ("gistnet", "lensnet") if hasattr(orig_model, n))):
                for prompt in ["The capital of France is", "Once upon a time,"]:
                    ids = tokenizer.encode(prompt, prepend=tokenizer.get_bos_token_id())
                    out = engine.generate_batch(ids, max_tokens=24, temperature=0.0)[0]
                    print0(f"sample: {prompt!r} -> {tokenizer.decode(out)!r}")
            orig_model.drop_inference_caches()   # the samples' q/k/v stacks: stale after the next step
        if last or (cfg.save_every > 0 and step > start_step and step % cfg.save_every == 0):
            meta = {"history": history, "val_bpb": val_bpb, "num_params": num_params}
            save_checkpoint(out_dir, step, orig_model, optimizers, loader_state, asdict(cfg), meta)
        if last:
            break
        clock.resume()

        synchronize(device.type)
        t0 = time.time()
        for micro in range(grad_accum):
            sync = (micro == grad_accum - 1)
            ctx = model.no_sync() if ddp and not sync else torch.enable_grad()
            with ctx:
                with autocast:
                    if cfg.megacontext:
                        loader_state, mc_inputs = fut.result()
                        fut = pool.submit(next_batch)
                        loss, mc_metrics = model(*mc_inputs)
                    else:
                        loss = model(x, y)
                train_loss = loss.detach()
                (loss / grad_accum).backward()
            if not cfg.megacontext:
                loader_state = train_loader.state_dict()  # where the prefetched batch starts: a resume re-reads it
                x, y = next(loader_iter)
        grad_norm = torch.nn.utils.clip_grad_norm_(orig_model.parameters(), cfg.grad_clip) if cfg.grad_clip > 0 else None
        it = progress_step()
        out_of_time = it >= num_iterations
        lrm = get_lr_multiplier(it, num_iterations, cfg)
        for opt in optimizers:
            for g in opt.param_groups:
                g["lr"] = g["initial_lr"] * lrm
        for g in muon.param_groups:
            g["momentum"] = get_muon_momentum(step)
        for opt in optimizers:
            opt.step()
        model.zero_grad(set_to_none=True)
        synchronize(device.type)
        dt = time.time() - t0
        step += 1
        if step - start_step > 10:
            total_time += dt  # skip the first steps (compile, warm-up)

        if step % cfg.log_every == 0 or step == num_iterations or out_of_time:
            lossf = train_loss.item()
            smooth_loss, n_logged = 0.9 * smooth_loss + 0.1 * lossf, n_logged + 1
            debiased = smooth_loss / (1 - 0.9 ** n_logged)
            tok_s = cfg.total_batch_size / dt
            mfu = 100 * flops_per_token * tok_s / (peak * world_size) if peak else float("nan")
            done_steps = max(1, step - start_step - 10)
            eta = (num_iterations - step) * (total_time / done_steps if total_time else dt)
            if cfg.time_budget_min > 0:
                eta = min(eta, max(0.0, 60 * cfg.time_budget_min - clock.elapsed()))
            gn = f" | gnorm {grad_norm.item():.3f}" if grad_norm is not None else ""
            print0(f"step {step:05d}/{num_iterations} | loss {debiased:.4f}{gn} | lrm {lrm:.2f} | "
                   f"dt {dt * 1000:.0f}ms | tok/s {tok_s:,.0f} | mfu {mfu:.1f}% | eta {eta / 60:.1f}m")
            rec = {"step": step, "loss": lossf}
            if cfg.megacontext:
                rec.update({k: round(v.item(), 4) for k, v in mc_metrics.items()})
                print0("    " + " | ".join(f"{k} {v:.4f}" for k, v in rec.items() if k not in ("step", "loss")))
            history.append(rec)
            log({"step": step, "train/loss": lossf, "train/tok_per_s": tok_s, "train/mfu": mfu, "lrm": lrm,
                 **{f"mc/{k}": v for k, v in rec.items() if k not in ("step", "loss")}})

    if master:
        summary = {"run": cfg.run, "steps": step, "val_bpb": val_bpb, "num_params": num_params,
                   "train_time_s": total_time, "world_size": world_size, "device": device.type}
        atomic_write_json(os.path.join(out_dir, "summary.json"), summary)
        atomic_write_json(os.path.join(out_dir, "history.json"), history)  # scripts/plot_train.py draws it
        print0(json.dumps(summary))
    if wandb_run is not None:
        wandb_run.finish()
    del model  # the DDP wrapper (its Reducer) must go before the process group: see compute_cleanup
    compute_cleanup()


if __name__ == "__main__":
    main_guard(main)
