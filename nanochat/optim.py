"""
Muon for hidden matrices + AdamW for everything else (embeddings, lm_head, small MC params).

Muon (Keller Jordan): SGD-momentum (Nesterov) whose update is orthogonalised by a quintic
Newton-Schulz iteration, scaled so that its RMS does not depend on the matrix shape.

DDP: the training script wraps the model in DistributedDataParallel, so gradients are already
averaged when step() runs; every rank then applies the same deterministic update and the weights
stay bit-identical across ranks (tests/test_train.py checks that). The Newton-Schulz work is
duplicated on each rank; at our sizes it is a few percent of a step and buys a lot of simplicity.
"""
import torch
import torch._dynamo

# one compiled Newton-Schulz graph per distinct stacked shape (base, GistNet, LensNet matrices)
torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)


@torch.compile(dynamic=False, fullgraph=True, disable=not torch.cuda.is_available())
def zeropower_via_newtonschulz5(G, steps: int = 5):
    """Approximately orthogonalise G (the U V^T of its SVD) in bf16 on GPU, fp32 on CPU."""
    assert G.ndim >= 2
    a, b, c = (3.4445, -4.7750, 2.0315)
    X = G.bfloat16() if G.is_cuda else G.float()
    transposed = G.size(-2) > G.size(-1)
    if transposed:
        X = X.mT
    X = X / (X.norm(dim=(-2, -1), keepdim=True) + 1e-7)
    for _ in range(steps):
        A = X @ X.mT
        B = b * A + c * A @ A
        X = a * X + B @ X
    if transposed:
        X = X.mT
    return X


class Muon(torch.optim.Optimizer):
    def __init__(self, params, lr=0.02, momentum=0.95, nesterov=True, ns_steps=5):
        defaults = dict(lr=lr, momentum=momentum, nesterov=nesterov, ns_steps=ns_steps)
        params = list(params)
        for p in params:
            if p.ndim != 2:
                raise ValueError("Muon only takes 2-D matrices")
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self):
        # Same-shape matrices are stacked and orthogonalised in one batched Newton-Schulz call:
        # a handful of big kernels instead of ~20 small ones per matrix (46 -> a few ms at d12).
        for group in self.param_groups:
            by_shape = {}
            for p in group["params"]:
                if p.grad is not None:
                    by_shape.setdefault(tuple(p.shape), []).append(p)
            for shape, ps in by_shape.items():
                grads = [p.grad for p in ps]
                bufs = []
                for p in ps:
                    st = self.state[p]
                    if "momentum_buffer" not in st:
                        st["momentum_buffer"] = torch.zeros_like(p.grad)
                    bufs.append(st["momentum_buffer"])
                torch._foreach_lerp_(bufs, grads, 1 - group["momentum"])
                upd = torch._foreach_lerp(grads, bufs, group["momentum"]) if group["nesterov"] else bufs
                X = zeropower_via_newtonschulz5(torch.stack(upd), steps=group["ns_steps"])
                scale = max(1.0, shape[-2] / shape[-1]) ** 0.5
                torch._foreach_add_(ps, [x.to(ps[0].dtype) for x in X.unbind(0)], alpha=-group["lr"] * scale)


def build_optimizers(model, matrix_lr=0.02, embedding_lr=0.2, unembedding_lr=0.004, other_lr=0.004,
                     weight_decay=0.0, betas=(0.8, 0.95)):
    """Returns [adamw, muon]. AdamW learning rates scale as 1/sqrt(d_model/768) (nanochat).
    Each group remembers its base lr in 'initial_lr' for the schedule."""
    muon_params, groups = model.param_groups()
    dscale = (model.config.n_embd / 768) ** -0.5
    adam_groups = [
        dict(params=groups["embed"], lr=embedding_lr * dscale),
        dict(params=groups["lm_head"], lr=unembedding_lr * dscale),
        dict(params=groups["other"], lr=other_lr * dscale),
    ]
    adam_groups = [g for g in adam_groups if g["params"]]
    fused = next(model.parameters()).is_cuda
    adamw = torch.optim.AdamW(adam_groups, betas=betas, eps=1e-10, weight_decay=weight_decay, fused=fused)
    muon = Muon(muon_params, lr=matrix_lr)
    opts = [adamw, muon]
    for opt in opts:
        for g in opt.param_groups:
            g["initial_lr"] = g["lr"]
    n_all = sum(1 for _ in model.parameters())
    n_opt = sum(len(g["params"]) for o in opts for g in o.param_groups)
    assert n_all == n_opt, f"{n_all - n_opt} parameters are in no optimizer"
    return opts
