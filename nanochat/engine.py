"""
KV-cached generation. Prefill the prompt once (batch 1), replicate the cache for `num_samples`
rows, then decode one token per step for every row; rows that hit a stop token are finished and
padded. Sampling: temperature (0 = greedy) and top-k, with an explicit torch.Generator so a seed
reproduces a sample.

The MegaContext decode loop (ingest -> refocus -> decode, chunked by K, with cache reuse from the
first edited entry) builds on the same KVCache and forward signature.
"""
import torch

from nanochat.gpt import KVCache


@torch.no_grad()
def sample_next(logits, rng=None, temperature=1.0, top_k=None):
    """logits (B, V) -> (B, 1) token ids."""
    if temperature == 0.0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits / temperature
    if top_k is not None and top_k > 0:
        k = min(top_k, logits.size(-1))
        vals, idx = torch.topk(logits, k, dim=-1)
        probs = torch.softmax(vals, dim=-1)
        choice = torch.multinomial(probs, 1, generator=rng)
        return idx.gather(-1, choice)
    return torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=rng)


class Engine:
    def __init__(self, model, tokenizer=None, autocast=None):
        self.model, self.tokenizer = model, tokenizer
        self.autocast = autocast

    def _fwd(self, *args, **kw):
        if self.autocast is not None:
            with self.autocast:
                return self.model(*args, **kw)
        return self.model(*args, **kw)

    def new_cache(self, batch_size, max_len):
        c = self.model.config
        p = next(self.model.parameters())
        dtype = torch.bfloat16 if p.is_cuda else p.dtype
        return KVCache(batch_size, c.n_kv_head, max_len, c.n_embd // c.n_head, c.n_layer, p.device, dtype)

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
                             f"context of {limit}; a MegaContext model compresses instead")
        rng = torch.Generator(device=device).manual_seed(seed)
        cache = self.new_cache(1, len(tokens) + max_tokens)
        ids = torch.tensor([tokens], dtype=torch.long, device=device)
        logits = self._fwd(ids, kv_cache=cache)[:, -1]
        if num_samples > 1:
            cache.expand_batch(num_samples)
            logits = logits.expand(num_samples, -1)
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
            logits = self._fwd(nxt, kv_cache=cache)[:, -1]

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
