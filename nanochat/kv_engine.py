"""
Engine: KV-cached generation for a plain context (no MegaContext memory): prefill the prompt once
(batch 1, in chunks, logits only for the last position), replicate the cache for `num_samples`
rows, then decode one token per step for every row; rows that hit a stop token are finished and
padded. Sampling: temperature (0 = greedy) and top-k, with an explicit torch.Generator so a seed
reproduces a sample. One-token steps run through DecodeStep (nanochat/decode_step.py). Split out
of nanochat/engine.py (which re-exports it) beside MemorySession, the MegaContext decode loop.
"""
import torch

from nanochat.common import autocast_ctx
from nanochat.decode_step import DecodeStep, sample_next, cache_dtype, check_decode
from nanochat.attention import KVCache

class Engine:
    prefill_chunk = 2048  # tokens per prefill forward: bounds activation memory for long prompts

    def __init__(self, model, tokenizer=None, autocast=None, decode="static"):
        """decode: "static" (one-token steps through a DecodeStep: a CUDA graph on CUDA),
        "compiled" (the same, torch.compile'd before the capture), "fused" (the step as the Triton
        kernels of decode_kernels.py; a batch of several samples decodes "static")
        or "dynamic" (a plain KV-cached forward per step)."""
        self.model, self.tokenizer = model, tokenizer
        # as MemorySession: bf16 autocast on CUDA by default (the KV cache is bf16 there)
        self.autocast = autocast if autocast is not None else autocast_ctx(next(model.parameters()).device.type)
        self.decode = check_decode(decode, next(model.parameters()).device, model)

    def _fwd(self, *args, fn=None, **kw):
        """The model (or fn, e.g. its logits head) under the engine's autocast."""
        with self.autocast:
            return (fn or self.model)(*args, **kw)

    def new_cache(self, batch_size, max_len):
        c = self.model.config
        p = next(self.model.parameters())
        return KVCache(batch_size, c.n_kv_head, max_len, c.n_embd // c.n_head, c.n_layer, p.device, cache_dtype(self.model))

    @torch.no_grad()
    def prefill(self, ids, cache):
        """ids (1, T) -> logits (1, V) of the last position; the cache then holds all T. Never
        materializes (T, V) logits, which at T = 128k would be gigabytes."""
        h = None
        for a in range(0, ids.size(1), self.prefill_chunk):
            h = self._fwd(ids[:, a:a + self.prefill_chunk], kv_cache=cache, return_hidden=True)
        return self._fwd(h[:, -1], fn=self.model.logits_and_loss)

    def decoder(self, cache):
        """step(nxt (B, 1) ids) -> (B, V) logits: one decode step over cache, per self.decode.
        Make it after expand_batch (a static step keys its graph on the cache's buffers anyway)."""
        if self.decode == "dynamic":
            return lambda nxt: self._fwd(nxt, kv_cache=cache)[:, -1]
        step = DecodeStep(self.model, cache, self.autocast, compile=self.decode == "compiled",
                          fused=self.decode == "fused" and cache.k.size(1) == 1)
        return lambda nxt: step(nxt, cache.pos)

    @torch.no_grad()
    def generate(self, tokens, num_samples=1, max_tokens=64, temperature=1.0, top_k=None, seed=42, stop_tokens=()):
        """Yields (token_column (num_samples,) list[int], done mask list[bool]) per step."""
        if not tokens:
            raise ValueError("generate() needs at least one prompt token")
        if max_tokens < 0:
            raise ValueError("max_tokens must be >= 0")
        device = next(self.model.parameters()).device
        limit = self.model.config.sequence_len
        if len(tokens) + max_tokens > limit:
            raise ValueError(f"prompt ({len(tokens)}) + max_tokens ({max_tokens}) exceeds the model's "
                             f"context of {limit}; a MegaContext model compresses instead (MemorySession)")
        rng = torch.Generator(device=device).manual_seed(seed)
        cache = self.new_cache(1, len(tokens) + max_tokens)
        logits = self.prefill(torch.tensor([tokens], dtype=torch.long, device=device), cache)
        if num_samples > 1:
            cache.expand_batch(num_samples)
            logits = logits.expand(num_samples, -1)
        step = self.decoder(cache)
        stop = set(stop_tokens)
        done = [False] * num_samples
        for _ in range(max_tokens):
            nxt = sample_next(logits, rng, temperature, top_k)
            col = nxt[:, 0].tolist()
            for i, t in enumerate(col):
                if t in stop:
                    done[i] = True
            yield col, list(done)
            if all(done):
                return
            logits = step(nxt)

    def generate_batch(self, tokens, num_samples=1, **kw):
        """Returns num_samples lists of generated ids (stop token excluded)."""
        stop = set(kw.get("stop_tokens", ()))
        out = [[] for _ in range(num_samples)]
        finished = [False] * num_samples
        for col, _ in self.generate(tokens, num_samples, **kw):
            for i, t in enumerate(col):
                if finished[i]:
                    continue
                if t in stop:
                    finished[i] = True
                else:
                    out[i].append(t)
        return out


# -----------------------------------------------------------------------------
# MegaContext memory
