"""
GPT model plus the learned MegaContext modules. Every nn.Module of the model lives here.

Base model (nanochat-style):
- rotary position embeddings computed from *explicit* positions (any float position, optional
  Gaussian damping per entry), so the same model reads plain tokens or a mixed-LOD working context
- QK norm (applied before rotary so that damping survives), parameter-free RMSNorm everywhere
- relu^2 MLP, no biases, untied token embedding / lm_head, GQA/MQA via n_kv_head
- logit soft-capping; attention through one function (flash-attn if installed, else SDPA;
  nanochat/attention.py, with the MegaAttention masks and the KV cache)
- forward accepts input ids *or* input embeddings, so gists can stand in for tokens

MegaContext modules (created when config.megacontext is true):
- GistNet: K children (token embeddings or gists) + one query slot -> one vector in the input
  embedding space. Bidirectional inside the block, same weights at every level + level embedding.
  Starts as mean-pooling (zero-initialised residual), so untrained gists are already sensible.
- LensNet: a small non-causal transformer over working-context entries plus the recent tail
  tokens; one signed score per entry (>0 wants detail, <0 less). No positional rotary: order
  enters only through per-entry features, so it is permutation-equivariant over entries.

MegaAttention (config.mega_attn_window = w > 0; off by default, needs config.megacontext):
- every complete block of K input entries that lies entirely before some query's local window
  gets a GistNet summary (level 1, the same weights as the tree's LOD1 gists, + lod_emb[1]),
  appended after the T input entries and positioned like the span it covers (mean position,
  Gaussian spread sigma^2 = var(positions) + mean(sigma^2): exactly the working context's
  "gaussian" convention for a gist);
- an input entry i sees entries from mega_local_start(i) = i-w+1 rounded down to a block
  boundary up to i, plus the summaries of every block before that start (so each earlier entry is
  seen once, in full or through its block's summary); a summary sees its own block and itself (so
  a summary is never visible from its block or from earlier entries); loss/logits only for the T
  input entries;
- one predicate (`mega_mask_mod`) gives both the dense boolean mask (SDPA: CPU and reference) and
  the FlexAttention BlockMask (CUDA), each built once per layout (T, w, K).
"""
import math
from dataclasses import dataclass, asdict

from torch.utils.checkpoint import checkpoint

import torch
import torch.nn as nn
import torch.nn.functional as F

# attention kernels, MegaAttention masks and the KV cache (nanochat/attention.py)
from nanochat.attention import attention, mega_mask, mega_num_summaries, mega_summary_positions, create_block_mask


LENS_QUERIES = ("tokens", "hidden")


@dataclass
class GPTConfig:
    sequence_len: int = 1024
    vocab_size: int = 32768
    n_layer: int = 12
    n_head: int = 6
    n_kv_head: int = 6
    n_embd: int = 768
    softcap: float = 15.0
    rope_base: float = 10000.0
    # MegaContext
    megacontext: bool = False
    mc_block_size: int = 32      # K
    mc_max_level: int = 2
    gist_layers: int = 2
    gist_dim: int = 0            # 0 -> n_embd // 2 (keeps ingest < 5% of base FLOPs per token)
    lens_layers: int = 2
    lens_dim: int = 0            # 0 -> n_embd // 4
    pos_scheme: str = "entry"    # "entry" (positions = working-context entry index) or "gaussian"
    lens_query: str = "tokens"   # LensNet's queries: "tokens" (embeddings of the most recent tokens) or
                                 # "hidden" (the base model's final hidden states for them: GPT.lens_queries)
    lens_query_ctx: int = 256    # "hidden": the plain forward runs over this many most recent tokens
    lens_match: bool = False     # LensNet also reads each entry's lexical match with its query (megacontext.match)
    # MegaAttention (DESIGN section 7): local window of w entries + GistNet summaries of older blocks
    mega_attn_window: int = 0    # w in entries; 0 = off (plain causal attention over the window)
    mega_attn_impl: str = "auto" # "auto" (flex on CUDA, else sdpa), "sdpa" (dense mask), "flex"

    def __post_init__(self):
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd={self.n_embd} must be divisible by n_head={self.n_head}")
        if self.n_head % self.n_kv_head:
            raise ValueError(f"n_head={self.n_head} must be divisible by n_kv_head={self.n_kv_head}")
        if (self.n_embd // self.n_head) % 2:
            raise ValueError("head dim must be even for rotary embeddings")
        if self.pos_scheme not in ("entry", "gaussian"):
            raise ValueError(f"pos_scheme must be 'entry' or 'gaussian', got {self.pos_scheme!r}")
        if self.lens_query not in LENS_QUERIES or self.lens_query_ctx < 1:
            raise ValueError(f"lens_query must be one of {LENS_QUERIES} and lens_query_ctx >= 1, "
                             f"got {self.lens_query!r}, {self.lens_query_ctx}")
        if self.mega_attn_window < 0:
            raise ValueError(f"mega_attn_window must be >= 0, got {self.mega_attn_window}")
        if self.mega_attn_window and not self.megacontext:
            raise ValueError("mega_attn_window > 0 needs megacontext=True (its summaries come from GistNet)")
        if self.mega_attn_impl not in ("auto", "sdpa", "flex"):
            raise ValueError(f"mega_attn_impl must be 'auto', 'sdpa' or 'flex', got {self.mega_attn_impl!r}")
        if self.gist_dim == 0:
            self.gist_dim = max(64, self.n_embd // 2)
        if self.lens_dim == 0:
            self.lens_dim = max(64, self.n_embd // 4)

    def to_dict(self):
        return asdict(self)


def norm(x):
    return F.rms_norm(x, (x.size(-1),))


# -----------------------------------------------------------------------------
# Rotary embeddings from explicit positions

@torch.compiler.disable  # computed once per forward, eagerly: inside a compiled graph Inductor
def rotary_cos_sin(pos, head_dim, base, sigma=None, dtype=torch.bfloat16):  # re-derives fp64 trig in every consumer kernel (measured: 25% of a d12 step)
    """pos: (B, T) positions (ints or floats); sigma: optional (B, T) spread of each entry.
    Returns cos, sin of shape (B, T, 1, head_dim/2). A span of spread sigma has its rotary
    components damped by exp(-(omega*sigma)^2/2): the expectation of e^{i omega p} under a
    Gaussian. sigma == 0 gives plain RoPE bit for bit."""
    device = pos.device
    # float64 angles so that positions ~1e6 keep their phase (fp32 would lose ~0.06 rad there)
    fdt = torch.float32 if device.type == "mps" else torch.float64
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, device=device, dtype=fdt) / head_dim))
    ang = pos.to(fdt)[..., None] * inv_freq
    cos, sin = ang.cos(), ang.sin()
    if sigma is not None:
        damp = torch.exp(-0.5 * (sigma.to(fdt)[..., None] * inv_freq) ** 2)
        cos, sin = cos * damp, sin * damp
    return cos[:, :, None, :].to(dtype), sin[:, :, None, :].to(dtype)


def rotary_tables(cos, sin):
    """Half-width (cos, sin) from rotary_cos_sin -> the full-width tables apply_rotary takes:
    cos|cos and sin|-sin along the head dim. Built once per forward, not once per layer."""
    return torch.cat([cos, cos], dim=-1), torch.cat([sin, -sin], dim=-1)


def apply_rotary(x, cos, sin):
    """x (..., D) with halves x1, x2 -> [x1 cos + x2 sin, x2 cos - x1 sin], written as
    x * cos + roll(x, D/2) * sin with rotary_tables: the same products and sums (bit-identical),
    in 4 kernels per tensor instead of 8 when it runs eagerly (a decode step: 20 layers x q, k)."""
    return x * cos + x.roll(x.shape[-1] // 2, dims=-1) * sin


# -----------------------------------------------------------------------------
# Transformer blocks (shared by GPT, GistNet and LensNet)

def weight_version(t):
    """t's in-place update count (inference tensors, made under torch.inference_mode, keep none)."""
    return 0 if t.is_inference() else t._version


class CausalSelfAttention(nn.Module):
    def __init__(self, dim, n_head, n_kv_head, layer_idx=0):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_head, self.n_kv_head, self.head_dim = n_head, n_kv_head, dim // n_head
        self.c_q = nn.Linear(dim, n_head * self.head_dim, bias=False)
        self.c_k = nn.Linear(dim, n_kv_head * self.head_dim, bias=False)
        self.c_v = nn.Linear(dim, n_kv_head * self.head_dim, bias=False)
        self.c_proj = nn.Linear(dim, dim, bias=False)
        self._qkv = None   # (key, stacked q/k/v weight) for KV-cached inference; not state

    def qkv_weight(self):
        """c_q, c_k, c_v stacked for the one-GEMM inference path, kept until one of them changes
        (an in-place update bumps its _version, a .to() swaps its data). Stacking at every call
        copied 9.8 MB per layer per decode step at d20: 22 kernels, 0.12 ms of a 1.9 ms step
        (--step-breakdown on an H200). Costs one more copy of those weights while cached. A
        compiled step takes the cached copy as is: its caller (decode_step.DecodeStep) refreshes it."""
        ws = (self.c_q.weight, self.c_k.weight, self.c_v.weight)
        if torch.compiler.is_compiling():
            return self._qkv[1] if self._qkv is not None else torch.cat(ws)
        key = tuple((weight_version(w), w.data_ptr(), w.dtype) for w in ws)
        if self._qkv is None or self._qkv[0] != key:
            self._qkv = (key, torch.cat(ws).detach())
        return self._qkv[1]

    def forward(self, x, cos_sin, kv_cache=None, causal=True, attn_mask=None):
        B, T, _ = x.shape
        H, Hkv, D = self.n_head, self.n_kv_head, self.head_dim
        if kv_cache is not None:
            # inference (KV-cached forwards run without grad: decode steps, prefill, recompute):
            # one GEMM for q, k, v, then one QK norm and one rotary over the q and k heads together.
            # A d20 decode step, whose cost is its kernel count, drops from 728 to 608 ops (bench_decode
            # --count-ops). The stacked weight is cached (qkv_weight); a captured CUDA graph
            # reads that copy, so decode_step.DecodeStep recaptures when the weights change
            qkv = F.linear(x, self.qkv_weight()).view(B, T, H + 2 * Hkv, D)
            qk, v = norm(qkv[:, :, :H + Hkv]), qkv[:, :, H + Hkv:]
            if cos_sin is not None:
                qk = apply_rotary(qk, *cos_sin)
            q, k = qk[:, :, :H], qk[:, :, H:]
        else:
            q = self.c_q(x).view(B, T, H, D)
            k = self.c_k(x).view(B, T, Hkv, D)
            v = self.c_v(x).view(B, T, Hkv, D)
            q, k = norm(q), norm(k)  # QK norm first: rotary damping must not be normalised away
            if cos_sin is not None:
                cos, sin = cos_sin
                q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        q, k = q.to(v.dtype), k.to(v.dtype)
        if kv_cache is not None:
            k, v = kv_cache.insert_kv(self.layer_idx, k, v)
        y = attention(q, k, v, causal=causal, attn_mask=attn_mask)
        return self.c_proj(y.reshape(B, T, -1))


class MLP(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.c_fc = nn.Linear(dim, 4 * dim, bias=False)
        self.c_proj = nn.Linear(4 * dim, dim, bias=False)

    def forward(self, x):
        return self.c_proj(F.relu(self.c_fc(x)).square())


class Block(nn.Module):
    def __init__(self, dim, n_head, n_kv_head, layer_idx=0):
        super().__init__()
        self.attn = CausalSelfAttention(dim, n_head, n_kv_head, layer_idx)
        self.mlp = MLP(dim)

    def forward(self, x, cos_sin, kv_cache=None, causal=True, attn_mask=None):
        x = x + self.attn(norm(x), cos_sin, kv_cache, causal, attn_mask)
        return x + self.mlp(norm(x))


def _heads(dim):
    return max(1, dim // 64)


# -----------------------------------------------------------------------------
# GistNet: K children -> one embedding

class GistNet(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        D, d, K = config.n_embd, config.gist_dim, config.mc_block_size
        self.K, self.rope_base = K, config.rope_base
        self.head_dim = d // _heads(d)
        self.proj_in = nn.Linear(D, d, bias=False)
        self.query = nn.Parameter(torch.zeros(d))
        self.level_emb = nn.Embedding(config.mc_max_level + 1, d)
        self.blocks = nn.ModuleList([Block(d, _heads(d), _heads(d)) for _ in range(config.gist_layers)])
        self.proj_out = nn.Linear(d, D, bias=False)

    def forward(self, children, level):
        """children: (n, K, D) embeddings of the children (token embeddings for level 1).
        level: the level of the gist being made (>= 1). Returns (n, D)."""
        n, K, _ = children.shape
        assert K == self.K, f"GistNet expects {self.K} children, got {K}"
        h = self.proj_in(norm(children))
        q = (self.query + self.level_emb.weight[level]).to(h.dtype).expand(n, 1, -1)
        x = torch.cat([h, q], dim=1)  # query slot last: position K, sees the whole block
        pos = torch.arange(K + 1, device=x.device)[None]
        cos_sin = rotary_tables(*rotary_cos_sin(pos, self.head_dim, self.rope_base, dtype=x.dtype))
        for block in self.blocks:
            x = block(x, cos_sin, causal=False)
        # mean-pool prior + learned residual (proj_out starts at zero)
        return children.mean(dim=1) + self.proj_out(norm(x[:, -1]))


# -----------------------------------------------------------------------------
# LensNet: working-context entries + recent tail -> one signed score per entry

LENS_FEATURES = 5  # per-entry features: log-age, log-width, relative position, is-tail, query match


def lens_features(starts, widths, num_tokens, match=None):
    """Per-entry LensNet features from spans. starts, widths: (B, E) tensors; num_tokens: (B, 1)
    or int; match: (B, E) query-match mass under each entry (entry_match; None = 0, i.e.
    config.lens_match off). Scale-free (logs and ratios) so they stay in range at any history
    length."""
    starts, widths = starts.float(), widths.float()
    n = torch.as_tensor(num_tokens, dtype=torch.float32, device=starts.device)
    age = (n - (starts + widths)).clamp(min=0)
    m = torch.zeros_like(starts) if match is None else torch.log1p(match.float())
    return torch.stack([torch.log1p(age) / 8.0, torch.log(widths) / 8.0,
                        starts / n.clamp(min=1), torch.zeros_like(starts), m], dim=-1)


class LensNet(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        D, d = config.n_embd, config.lens_dim
        self.proj_in = nn.Linear(D, d, bias=False)
        self.level_emb = nn.Embedding(config.mc_max_level + 2, d)  # last row marks tail tokens
        self.feat = nn.Linear(LENS_FEATURES, d, bias=False)
        self.blocks = nn.ModuleList([Block(d, _heads(d), _heads(d)) for _ in range(config.lens_layers)])
        self.head = nn.Linear(d, 1, bias=False)
        self.tail_level = config.mc_max_level + 1
        if config.lens_match:
            # the query-match feature is also a direct prior on the score: score = learned +
            # match_gain * log1p(match), so that the learned part corrects the feature rather than
            # having to rediscover it. Measured on one H200 (README, #4): with or without the prior
            # LensNet ranked a held-out passkey needle low (0.03 at 64x W) while the feature alone
            # found it (0.95); the gain, logged as lens_match_gain, rose from 1.0 to 1.12
            self.match_gain = nn.Parameter(torch.ones(()))

    def forward(self, entry_emb, entry_level, entry_feat, tail_emb, valid):
        """entry_emb (B, E, D), entry_level (B, E) long, entry_feat (B, E, LENS_FEATURES),
        tail_emb (B, t, D), valid (B, E) bool (False = padding). Returns scores (B, E) float32,
        exactly 0 at padding. Padding never influences valid entries (it is masked as a key)."""
        B, E, _ = entry_emb.shape
        t = tail_emb.size(1)
        lvl = entry_level.clamp(min=0)
        x_e = self.proj_in(norm(entry_emb)) + self.level_emb(lvl) + self.feat(entry_feat.to(entry_emb.dtype))
        tail_feat = torch.zeros(B, t, LENS_FEATURES, device=tail_emb.device, dtype=tail_emb.dtype)
        tail_feat[..., 3] = 1.0
        x_t = self.proj_in(norm(tail_emb)) + self.level_emb.weight[self.tail_level] + self.feat(tail_feat)
        x = torch.cat([x_e, x_t.to(x_e.dtype)], dim=1)
        keys = torch.cat([valid, torch.ones(B, t, dtype=torch.bool, device=valid.device)], dim=1)
        mask = keys[:, None, None, :]  # (B, 1, 1, E+t): every query sees every valid key
        for block in self.blocks:
            x = block(x, None, causal=False, attn_mask=mask)
        scores = self.head(norm(x[:, :E])).squeeze(-1).float()
        if hasattr(self, "match_gain"):
            scores = scores + self.match_gain.float() * entry_feat[..., 4].float()
        return torch.where(valid, scores, torch.zeros_like(scores))


# -----------------------------------------------------------------------------
# The GPT

class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            h=nn.ModuleList([Block(config.n_embd, config.n_head, config.n_kv_head, i) for i in range(config.n_layer)]),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.head_dim = config.n_embd // config.n_head
        # rows per chunk of the training loss (0 = one piece): a training knob, not architecture,
        # so it stays out of the config (and out of checkpoints). See logits_and_loss.
        self.loss_chunk = 0
        if config.megacontext:
            self.gistnet = GistNet(config)
            self.lensnet = LensNet(config)
            # level embedding for working-context entries; row 0 (tokens) is never used, so
            # an all-LOD0 window is exactly the plain model
            self.lod_emb = nn.Embedding(config.mc_max_level + 1, config.n_embd)

    @torch.no_grad()
    def init_weights(self):
        """nanochat-style init: N(0,1) embeddings, uniform(+-sqrt(3/d)) matrices, zero output
        projections (every residual branch starts as identity), small lm_head."""
        def init_block(block, dim):
            s = math.sqrt(3.0 / dim)
            for lin in (block.attn.c_q, block.attn.c_k, block.attn.c_v, block.mlp.c_fc):
                nn.init.uniform_(lin.weight, -s, s)
            nn.init.zeros_(block.attn.c_proj.weight)
            nn.init.zeros_(block.mlp.c_proj.weight)

        nn.init.normal_(self.transformer.wte.weight, std=1.0)
        nn.init.normal_(self.lm_head.weight, std=0.001)
        for b in self.transformer.h:
            init_block(b, self.config.n_embd)
        if self.config.megacontext:
            g, l = self.gistnet, self.lensnet
            for b in g.blocks:
                init_block(b, self.config.gist_dim)
            for b in l.blocks:
                init_block(b, self.config.lens_dim)
            nn.init.normal_(g.proj_in.weight, std=self.config.n_embd ** -0.5)
            nn.init.zeros_(g.proj_out.weight)
            nn.init.normal_(g.query, std=0.02)
            nn.init.normal_(g.level_emb.weight, std=0.02)
            nn.init.normal_(l.proj_in.weight, std=self.config.n_embd ** -0.5)
            nn.init.normal_(l.level_emb.weight, std=0.02)
            nn.init.normal_(l.feat.weight, std=0.02)
            nn.init.zeros_(l.head.weight)
            if hasattr(l, "match_gain"):
                nn.init.ones_(l.match_gain)
            nn.init.zeros_(self.lod_emb.weight)

    # -- bookkeeping ----------------------------------------------------------

    def num_params(self, part=None):
        mods = {"gpt": [self.transformer, self.lm_head]}
        if self.config.megacontext:
            mods.update(gistnet=[self.gistnet], lensnet=[self.lensnet], lod=[self.lod_emb])
        sel = mods if part is None else {part: mods[part]}
        return sum(p.numel() for ms in sel.values() for m in ms for p in m.parameters())

    def estimate_flops(self, seq_len=None):
        """FLOPs per token of the base model for fwd+bwd (6N + attention), nanochat's estimate."""
        c = self.config
        T = seq_len or c.sequence_len
        n = sum(p.numel() for p in self.transformer.h.parameters()) + self.lm_head.weight.numel()
        return 6 * n + 12 * c.n_layer * c.n_head * self.head_dim * T

    def drop_inference_caches(self):
        """Free the stacked q/k/v copies that KV-cached inference made (CausalSelfAttention.qkv_weight):
        a training loop that samples between steps should not carry a stale copy of those weights."""
        for m in self.modules():
            if isinstance(m, CausalSelfAttention):
                m._qkv = None

    def param_groups(self):
        """(matrix params for Muon, {name: params} for AdamW). Every parameter lands in exactly
        one group: GistNet/LensNet included (the earlier implementation forgot them)."""
        muon, embed, head, other = [], [], [], []
        emb_ids = {id(m.weight) for m in self.modules() if isinstance(m, nn.Embedding)}
        for name, p in self.named_parameters():
            if name == "transformer.wte.weight":
                embed.append(p)
            elif name == "lm_head.weight":
                head.append(p)
            elif p.ndim == 2 and id(p) not in emb_ids and min(p.shape) >= 16:
                muon.append(p)  # hidden matrices of every transformer (base, GistNet, LensNet)
            else:
                other.append(p)  # MC embeddings, query slot, tiny feature/score heads
        return muon, {"embed": embed, "lm_head": head, "other": other}

    # -- MegaContext glue: the one place that says how tree nodes become model inputs --------

    def embed(self, idx):
        return self.transformer.wte(idx)

    def lens_context(self, t):
        """How many of the most recent tokens lens_queries(recent, t) reads."""
        return t if self.config.lens_query == "tokens" else self.config.lens_query_ctx

    def lens_queries(self, recent, t):
        """LensNet's queries for the t most recent tokens, from recent (B, L >= t) ids: their
        embeddings (lens_query "tokens"), or ("hidden") the base model's final hidden states for
        them after a plain forward over all of `recent`, i.e. the question as the reader
        understands it in context rather than its raw words. No gradient reaches the base model.
        Training (MCStep), mc_eval and MemorySession all take their queries from here."""
        if self.config.lens_query == "tokens":
            return self.embed(recent[:, -t:]).detach()
        with torch.no_grad():
            return self(recent, return_hidden=True)[:, -t:].detach()

    def gist(self, child_level, children):
        """The tree's gist_fn: child_level 0 -> children are (n, K) token ids; else (n, K, D)
        gists of that level. Returns (n, D) gists of level child_level + 1."""
        if child_level == 0:
            children = self.embed(children)
        return self.gistnet(children, child_level + 1)

    def entry_embeddings(self, levels, token_ids, gists):
        """Working-context entries -> input embeddings. levels (B, E) long (-1 = padding);
        token_ids (B, E) long, used where level == 0; gists (B, E, D), used where level >= 1
        (the level embedding is added there). LOD0 entries are exactly the plain token
        embeddings, so an all-LOD0 window is the plain model."""
        tok = self.embed(token_ids.clamp(min=0))
        x = torch.where((levels > 0)[..., None], gists.to(tok.dtype), tok)
        return self.add_level_embedding(x, levels)

    def add_level_embedding(self, x, levels):
        """x (B, E, D) raw entry vectors (token embedding or gist); adds the level embedding to
        gist entries (level >= 1). Training (gathered tables) and inference (tree reads) both
        go through here, so they feed the model identically."""
        lvl = levels.clamp(min=0)
        return torch.where((levels > 0)[..., None], x + self.lod_emb(lvl).to(x.dtype), x)

    # -- MegaAttention -----------------------------------------------------------

    def mega_window(self, mega=None, kv_cache=None, attn_mask=None):
        """The MegaAttention window w for one forward, 0 = plain attention. mega=None follows
        config.mega_attn_window, but a forward with a KV cache or an explicit attn_mask then runs
        plain attention (decode has no MegaAttention path yet); an explicit mega=w > 0 there is an
        error. mega=0/False forces plain attention."""
        if mega is None:
            w = self.config.mega_attn_window
            return 0 if (kv_cache is not None or attn_mask is not None) else w
        w = int(mega)
        if w < 0:
            raise ValueError(f"mega window must be >= 0, got {w}")
        if w and (kv_cache is not None or attn_mask is not None):
            raise ValueError("MegaAttention does not combine with a KV cache or an explicit attn_mask")
        if w and not hasattr(self, "gistnet"):
            raise ValueError("MegaAttention needs a model built with megacontext=True")
        return w

    def mega_inputs(self, x, pos, sigma, w, impl=None):
        """Append the MegaAttention summaries to the T entries x (B, T, D) with positions pos and
        spreads sigma (B or 1, T; sigma may be None). Returns (x, pos, sigma, mask) over T + S
        entries: the mask is a dense bool (SDPA) or a BlockMask (FlexAttention), per
        impl (default config.mega_attn_impl; "auto" = flex on CUDA, else sdpa)."""
        K = self.config.mc_block_size
        B, T, D = x.shape
        S = mega_num_summaries(T, w, K)
        if S:
            g = self.gistnet(x[:, :S * K].reshape(B * S, K, D), 1).view(B, S, D).to(x.dtype)
            g = self.add_level_embedding(g, torch.ones(B, S, dtype=torch.long, device=x.device))
            x = torch.cat([x, g], dim=1)
            Bp = max(pos.size(0), 1 if sigma is None else sigma.size(0))
            pos = pos.expand(Bp, T)
            sigma = torch.zeros(Bp, T, device=x.device) if sigma is None else sigma.expand(Bp, T)
            ps, ss = mega_summary_positions(pos, sigma, K, S)
            pos = torch.cat([pos.to(ps.dtype), ps], dim=1)
            sigma = torch.cat([sigma.to(ss.dtype), ss], dim=1)  # zeros stay exact zeros: plain RoPE
        impl = impl or self.config.mega_attn_impl
        if impl == "auto":
            impl = "flex" if (x.is_cuda and create_block_mask is not None) else "sdpa"
        return x, pos, sigma, mega_mask(T, w, K, x.device, impl)

    # -- forward ----------------------------------------------------------------

    def forward(self, idx=None, targets=None, kv_cache=None, embeds=None, pos=None, sigma=None,
                attn_mask=None, loss_reduction="mean", return_hidden=False, mega=None):
        """idx (B, T) token ids, or embeds (B, T, D) input embeddings (tokens and/or gists).
        pos (B or 1, T): explicit positions; default 0..T-1 after whatever the cache holds.
        sigma (B or 1, T): Gaussian spread per entry (None = 0 = plain RoPE).
        mega: MegaAttention window (see mega_window; None = config.mega_attn_window, 0 = off).
        targets (B, T) with -1 = ignore. Returns loss if targets given else logits (B, T, V)."""
        x = self.embed(idx) if embeds is None else embeds
        B, T, _ = x.shape
        w = self.mega_window(mega, kv_cache, attn_mask)
        if kv_cache is not None and kv_cache.slot is not None:
            # static decode (see KVCache): the one new entry sees slots [0, slot]; the mask and
            # the default position come from the device slot, so no step depends on a host int
            if T != 1 or attn_mask is not None:
                raise ValueError("a static-mode KV cache takes one entry per forward and no attn_mask")
            slot = kv_cache.slot
            # an additive fp32 bias (0 / -inf), built once here: decode_attention adds it to the
            # scores in one kernel per layer (a bool mask costs a negation and a masked_fill)
            hide = torch.arange(kv_cache.max_len, device=x.device) > slot
            attn_mask = torch.zeros(hide.shape, device=x.device).masked_fill(hide, float("-inf"))[None, None, None]
            pos = slot[None] if pos is None else pos
        if pos is None:
            t0 = kv_cache.pos if kv_cache is not None else 0
            pos = torch.arange(t0, t0 + T, device=x.device)[None]
        if w:
            x, pos, sigma, attn_mask = self.mega_inputs(x, pos, sigma, w)
        dtype = torch.bfloat16 if x.is_cuda else torch.float32
        cos_sin = rotary_tables(*rotary_cos_sin(pos, self.head_dim, self.config.rope_base, sigma, dtype=dtype))
        x = norm(x)
        for block in self.transformer.h:
            x = block(x, cos_sin, kv_cache, causal=True, attn_mask=attn_mask)
        x = norm(x[:, :T] if w else x)  # MegaAttention: summaries carry no loss/logits
        if return_hidden:
            return x
        return self.logits_and_loss(x, targets, loss_reduction)

    def logits_and_loss(self, x, targets=None, loss_reduction="mean"):
        if targets is not None and self.loss_chunk > 0 and loss_reduction in ("mean", "sum") and torch.is_grad_enabled():
            # fp32 logits at vocab 65536 are 17 GB for 32 x 2048 rows (and their gradient as
            # much again): score loss_chunk rows at a time and recompute each chunk's logits in
            # the backward (torch.utils.checkpoint), so that only one chunk's logits ever exist
            xf, tf = x.reshape(-1, x.size(-1)), targets.reshape(-1)
            n = self.loss_chunk
            total = sum(checkpoint(self._loss_sum, xf[i:i + n], tf[i:i + n], use_reentrant=False)
                        for i in range(0, tf.numel(), n))
            return total if loss_reduction == "sum" else total / (tf != -1).sum().clamp(min=1)
        logits = self._softcapped(self.lm_head(x).float())
        if targets is None:
            return logits
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1),
                               ignore_index=-1, reduction=loss_reduction)

    def _loss_sum(self, x, targets):
        return F.cross_entropy(self._softcapped(self.lm_head(x).float()), targets, ignore_index=-1, reduction="sum")

    def _softcapped(self, logits):
        c = self.config.softcap
        return c * torch.tanh(logits / c) if c else logits
