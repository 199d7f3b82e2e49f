"""Attention-Gate: learned in-context KV eviction, and the eviction baselines it is measured against.

Zeng et al., 2024, "In-context KV-Cache Eviction for LLMs via Attention-Gate". A gate before each attention layer
reads the context and gives every token j and KV head h a keep logit z_jh; the flag is keep_jh = [z_jh >= 0]
(keep probability sigmoid(z) >= tau = 0.5). An evicted entry is invisible to every later query and leaves the cache.
Training uses a straight-through estimator: the forward pass uses the hard flag, the backward pass the gradient of
sigmoid(z). Attention weights follow the flags multiplicatively, which stays differentiable at flag 0:

    a_ij = keep_j exp(s_ij) / sum_l keep_l exp(s_il)

Protocol here: eviction after prefill (as kvpress does). The context is prefilled with full attention; then each
(layer, KV head) keeps its flagged context entries, and the continuation sees those plus its own tokens. `keep` is
the kept fraction of the context entries over all layers and heads.

Our gate reads the context through statistics of the layer's own attention in the prefill (what the last `obs`
queries attend to, SnapKV-style, pooled and raw; the mean attention a token receives, H2O-style), its distance to
the end, a sink flag, its own hidden state (a linear term), and a reduced attention of its own (one head of dim 16)
whose received attention is a further feature. Each (layer, KV head) mixes these with its own weights and bias, so
heads and layers get different budgets. It starts as a fixed H2O+SnapKV-like mixture whose biases are calibrated to
the target keep; a gate trained from scratch on a token's own state learns little (see shared/MEASUREMENTS.md).

Baselines (each keeps n = round(T * keep) entries per (layer, KV head)): StreamingLLM (4 sinks + most recent),
H2O (most recent n // 2, then accumulated attention), SnapKV (last 32 always, then the last 32 queries' attention,
max-pooled with kernel 7), Random.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from assets import load_checkpoint
from model import Attention, KVNestError, Transformer, apply_rope

N_FEATURES = 6  # snap, snap pooled, mean received (H2O), log distance to end, sink, own reduced attention
OBS, SINKS, POOL = 32, 4, 7


def check_keep(keep: float) -> None:
    if not 0 < keep <= 1:
        raise KVNestError(f"keep ratio {keep} is outside (0, 1]; pass the kept fraction of the context, e.g. 0.5")


def group_sum(p: torch.Tensor, n_kv: int) -> torch.Tensor:
    """Sum the query heads of each KV group: (B, H, ...) -> (B, H_kv, ...)."""
    return p.unflatten(1, (n_kv, -1)).sum(2)


def received_attention(q: torch.Tensor, k: torch.Tensor, n_kv: int, obs: int | None, chunk: int = 512):
    """Causal attention probabilities received by each key, summed over queries (all, or the last `obs`) and the
    group's query heads. q (B, H, T, D), k (B, H_kv, T, D) -> (B, H_kv, T)."""
    B, H, T, D = q.shape
    k = k.repeat_interleave(H // n_kv, dim=1)  # (B, H, T, D)
    total = q.new_zeros(B, H, T, dtype=torch.float32)
    for start in range(T - obs if obs else 0, T, chunk):
        qi = q[:, :, start: start + chunk]  # (B, H, c, D)
        s = (qi @ k.transpose(-1, -2)).float() / math.sqrt(D)  # (B, H, c, T)
        rows = torch.arange(start, start + qi.shape[2], device=q.device)[:, None]
        s = s.masked_fill(torch.arange(T, device=q.device)[None, :] > rows, float("-inf"))
        total += s.softmax(-1).sum(2)
    return group_sum(total, n_kv)


class Policy:
    """Scores context entries (higher = keep); flags keep the top n = round(T * keep) per (layer, KV head)."""
    exact = True

    def score(self, layer: int, x: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class StreamingLLM(Policy):
    def score(self, layer, x, q, k):
        B, H_kv, T, _ = k.shape
        s = torch.arange(T, device=k.device, dtype=torch.float32).expand(B, H_kv, T).clone()
        s[..., :SINKS] = float("inf")
        return s


class H2O(Policy):
    def __init__(self, keep: float):
        self.keep = keep

    def score(self, layer, x, q, k):
        s = received_attention(q, k, k.shape[1], None)
        T = k.shape[2]
        s[..., T - round(T * self.keep) // 2:] = float("inf")  # the recent half of the budget
        return s


class SnapKV(Policy):
    def score(self, layer, x, q, k):
        s = F.max_pool1d(received_attention(q, k, k.shape[1], OBS), POOL, stride=1, padding=POOL // 2)
        s[..., -OBS:] = float("inf")
        return s


class RandomPolicy(Policy):
    def __init__(self, seed: int = 0):
        self.seed = seed

    def score(self, layer, x, q, k):
        g = torch.Generator().manual_seed(self.seed * 1000 + layer)
        return torch.rand(k.shape[:3], generator=g).to(k.device)


class Gate(nn.Module, Policy):
    """The learned gate of every layer: keep logits z (B, H_kv, T) from context features, flags z >= 0."""
    exact = False

    def __init__(self, n_layers: int, n_kv_heads: int, dim: int, gate_heads: int = 1, gate_dim: int = 16,
                 seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.gate_heads, self.gate_dim = gate_heads, gate_dim
        init = torch.tensor([0.0, 1.0, 1.0, -0.3, 10.0, 0.0])  # an H2O + SnapKV-like start, sinks kept
        self.w = nn.Parameter(init.repeat(n_layers, n_kv_heads, 1))  # (L, H_kv, F)
        self.u = nn.Parameter(torch.zeros(n_layers, n_kv_heads, dim))  # content term on the hidden state
        self.c = nn.Parameter(torch.zeros(n_layers, n_kv_heads))  # bias: sets each head's share of the budget
        self.wq = nn.Parameter(torch.randn(n_layers, gate_heads * gate_dim, dim, generator=g) / math.sqrt(dim))
        self.wk = nn.Parameter(torch.randn(n_layers, gate_heads * gate_dim, dim, generator=g) / math.sqrt(dim))

    def features(self, layer, x, q, k) -> torch.Tensor:
        """(B, H_kv, T, F) features of each context entry; detached inputs except the gate's own attention."""
        B, T, _ = x.shape
        n_kv = k.shape[1]
        snap = received_attention(q, k, n_kv, OBS)
        pooled = F.max_pool1d(snap, POOL, stride=1, padding=POOL // 2)
        seen_by = torch.arange(T, 0, -1, device=x.device, dtype=torch.float32)  # queries that see token j
        mean_received = received_attention(q, k, n_kv, None) / seen_by
        gq = (x @ self.wq[layer].T).view(B, T, self.gate_heads, self.gate_dim).transpose(1, 2)  # (B, h_g, T, d_g)
        gk = (x @ self.wk[layer].T).view(B, T, self.gate_heads, self.gate_dim).transpose(1, 2)
        own = received_attention(gq, gk, 1, OBS).expand(B, n_kv, T)  # reduced attention, shared by the heads
        dist = torch.log(seen_by).expand(B, n_kv, T)
        sink = (torch.arange(T, device=x.device) < SINKS).float().expand(B, n_kv, T)
        log = lambda t: torch.log(t + 1e-6)  # noqa: E731
        return torch.stack([log(snap), log(pooled), log(mean_received), dist, sink, log(own)], dim=-1)

    def score(self, layer, x, q, k):
        f = self.features(layer, x.float(), q.detach(), k.detach())  # (B, H_kv, T, F)
        content = torch.einsum("btd,hd->bht", x.float(), self.u[layer]) / math.sqrt(x.shape[-1])  # O(1) steps
        return (f * self.w[layer][:, None]).sum(-1) + content + self.c[layer][:, None]


def flags_from_scores(scores: list, keep: float, exact: bool, straight_through: bool = False) -> list:
    """Keep masks (B, H_kv, T) per layer. exact: the top round(T * keep) per (layer, head); else the gate's own
    threshold z >= 0, with the straight-through estimator when training (forward: hard flags; backward:
    d sigmoid(z))."""
    if not exact:
        hard = [(z >= 0).float() for z in scores]
        if not straight_through:
            return hard
        return [h + (torch.sigmoid(z) - torch.sigmoid(z).detach()) for h, z in zip(hard, scores)]  # = h exactly
    T = scores[0].shape[-1]
    n = max(1, round(T * keep))
    return [torch.zeros_like(s).scatter_(-1, s.topk(n, dim=-1).indices, 1.0) for s in scores]


def joint_flags(scores: list, keep: float) -> list:
    """A gate at an exact keep ratio: one threshold over all (layer, head, token) logits of each sequence."""
    z = torch.stack(scores, 1)  # (B, L, H_kv, T)
    n = max(1, round(z[0].numel() * keep))
    thr = z.flatten(1).topk(n, dim=-1).values[:, -1]  # (B,)
    return list((z >= thr[:, None, None, None]).float().unbind(1))


class EvictingAttention(Attention):
    """Attention whose context entries can be evicted. Same weights as the base layer; swap in with `evicting`.

    mode "full": the base attention. "prefill": full causal attention over the context, which also records the
    context's keys, values and policy scores. "continue": the continuation attends to the kept context entries
    (self.keep_mask, (B, H_kv, T_ctx)) and causally to itself; with a CompactCache set, to what the cache holds.
    """

    def __init__(self, base: Attention, layer: int):
        self.share_weights(base)
        self.layer, self.mode, self.policy, self.train_scores = layer, "full", None, False
        self.ctx_k = self.ctx_v = self.scores = self.keep_mask = None

    def forward(self, x, pos, cos, sin):
        if self.mode == "full":
            return super().forward(x, pos, cos, sin)
        B, T, _ = x.shape
        q, k, v = self.qkv(x)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if self.mode == "prefill":
            y = self.attend(q, k, v, 0)
            self.ctx_k, self.ctx_v = k, v  # (B, H_kv, T_ctx, D)
            with torch.set_grad_enabled(self.train_scores):  # only the gate's own graph, for its training
                self.scores = self.policy.score(self.layer, x, q, k)  # (B, H_kv, T_ctx)
        elif self.cache is not None:
            y = self.cache.attend(q, k, v)
        else:
            y = self.masked_attend(q, k, v)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))

    def masked_attend(self, q, k, v):
        """a_ij = w_j exp(s_ij) / sum_l w_l exp(s_il), w = keep flags on the context, causal on the continuation."""
        B, H, T, D = q.shape
        G, Tc = H // self.n_kv_heads, self.ctx_k.shape[2]
        K = torch.cat([self.ctx_k, k], 2).repeat_interleave(G, 1)  # (B, H, Tc+T, D)
        V = torch.cat([self.ctx_v, v], 2).repeat_interleave(G, 1)
        s = (q @ K.transpose(-1, -2)).float() / math.sqrt(D)  # (B, H, T, Tc+T)
        w_ctx = self.keep_mask.repeat_interleave(G, 1)[:, :, None, :].expand(B, H, T, Tc)
        w_new = torch.ones(T, T, device=q.device).tril().expand(B, H, T, T)
        w = torch.cat([w_ctx, w_new], -1)
        top = s.masked_fill(w.detach() == 0, float("-inf")).amax(-1, keepdim=True).detach()  # over visible only
        p = torch.exp((s - top).clamp(max=0)) * w  # evicted scores can neither overflow nor shift the kept ones
        return ((p / p.sum(-1, keepdim=True)).to(V.dtype) @ V).to(q.dtype)


class CompactCache(nn.Module):
    """Real eviction: per KV head a static (B, n_h + max_new, D) buffer holding only the kept context entries (n_h:
    the most any sequence of the batch keeps for that head), then room for `max_new` decoded tokens."""

    def __init__(self, k, v, keep_mask, max_new: int):
        super().__init__()
        B, H_kv, Tc, D = k.shape
        self.k, self.v, self.length = [], [], []
        for h in range(H_kv):
            m = keep_mask[:, h].bool()  # (B, Tc)
            n = int(m.sum(-1).max())
            kb, vb = k.new_zeros(B, n + max_new, D), v.new_zeros(B, n + max_new, D)
            for b in range(B):
                idx = m[b].nonzero()[:, 0]
                kb[b, : len(idx)], vb[b, : len(idx)] = k[b, h, idx], v[b, h, idx]
            self.k.append(kb)
            self.v.append(vb)
            self.length.append(m.sum(-1))  # (B,) entries held per sequence

    def attend(self, q, k, v):
        """Append the T new entries (always kept), then attend: q (B, H, T, D) -> (B, H, T, D)."""
        B, H, T, D = q.shape
        G = H // len(self.k)
        rows = torch.arange(B, device=q.device)
        out = []
        for h, (kb, vb) in enumerate(zip(self.k, self.v)):
            start = self.length[h].to(q.device)
            if int(start.max()) + T > kb.shape[1]:
                raise KVNestError(f"compact cache is full ({kb.shape[1]} entries for head {h}); raise max_new")
            for t in range(T):
                kb[rows, start + t], vb[rows, start + t] = k[:, h, t], v[:, h, t]
            self.length[h] = start + T
            S = int(self.length[h].max())
            s = (q[:, h * G: (h + 1) * G] @ kb[:, None, :S].transpose(-1, -2)).float() / math.sqrt(D)  # (B,G,T,S)
            visible = torch.arange(S, device=q.device)[None, None, :] <= (start[:, None, None] + torch.arange(
                T, device=q.device)[None, :, None])  # (B, T, S): held entries up to and including the query
            s = s.masked_fill(~visible[:, None], float("-inf"))
            out.append(s.softmax(-1).to(vb.dtype) @ vb[:, None, :S])  # (B, G, T, D)
        return torch.cat(out, 1)

    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.k + self.v)

    def held_bytes(self) -> int:
        """Bytes of the entries held now, over the batch."""
        per = self.k[0].shape[-1] * self.k[0].element_size() * 2
        return sum(int(n.sum()) * per for n in self.length)


def check_evictable(model: Transformer) -> None:
    if model.args.sliding_window:
        raise KVNestError("eviction with a sliding-window (Mistral) model is not supported; use a full-attention model")


def evicting(model: Transformer) -> list:
    """Swap every attention layer for an EvictingAttention (idempotent); returns them."""
    check_evictable(model)
    for i, layer in enumerate(model.layers):
        if not isinstance(layer.attn, EvictingAttention):
            layer.attn = EvictingAttention(layer.attn, i)
    return [layer.attn for layer in model.layers]


def prefill_scores(model: Transformer, context: torch.Tensor, policy: Policy, train: bool = False):
    """Full-attention prefill of the context (B, T_ctx) that records each layer's keys, values and policy scores.
    Returns (logits, [scores (B, H_kv, T_ctx) per layer])."""
    layers = evicting(model)
    for attn in layers:
        attn.mode, attn.cache, attn.train_scores = "prefill", None, train
        object.__setattr__(attn, "policy", policy)  # a plain reference: a gate must not become a submodule
    with torch.no_grad():
        logits = model(context)
    return logits, [attn.scores for attn in layers]


def prefill_and_evict(model: Transformer, context: torch.Tensor, policy: Policy, keep: float,
                      exact: bool | None = None, compact: bool = False, max_new: int = 0, train: bool = False):
    """Prefill the context (B, T_ctx) with full attention, then evict. Returns (context logits, flags per layer).
    Afterwards the model is in "continue" mode: call model(continuation, pos=T_ctx). exact defaults to the
    policy's own rule (top-n for baselines, the threshold for the gate)."""
    check_keep(keep)
    logits, scores = prefill_scores(model, context, policy, train)
    layers = evicting(model)
    exact = policy.exact if exact is None else exact
    if exact and isinstance(policy, Gate):
        flags = joint_flags(scores, keep)
    else:
        flags = flags_from_scores(scores, keep, exact, straight_through=train)
    for attn, f in zip(layers, flags):
        attn.mode, attn.keep_mask = "continue", f
        if compact:
            attn.cache = CompactCache(attn.ctx_k, attn.ctx_v, f, max_new)
        attn.ctx_k, attn.ctx_v = (None, None) if compact else (attn.ctx_k.detach(), attn.ctx_v.detach())
        attn.scores = None
    return logits, flags


def restore_full(model: Transformer) -> None:
    """Back to the base attention everywhere, caches and recorded context dropped."""
    for layer in model.layers:
        if isinstance(layer.attn, EvictingAttention):
            layer.attn.mode, layer.attn.cache, layer.attn.keep_mask = "full", None, None
            layer.attn.ctx_k = layer.attn.ctx_v = None


def kept_fraction(flags: list) -> float:
    return float(torch.stack([f.detach().float().mean() for f in flags]).mean())


@torch.no_grad()
def score_eviction(model: Transformer, windows: torch.Tensor, policy: Policy, keep: float, ctx_len: int = 384,
                   exact: bool | None = None) -> dict:
    """Each window (N, T) is a context of ctx_len tokens and a continuation. Scores the continuation's T - ctx_len
    predictions (logits at positions ctx_len - 1 ... T - 2): perplexity, KL(full || evicted), top-1 agreement, and
    the achieved kept fraction of the context entries."""
    from eval import kl_and_top1
    nll = kl = top1 = kept = 0.0
    n = 0
    for w in windows:
        w = w[None].to(model.inv_freq.device)
        restore_full(model)
        ref = model(w[:, :-1])[0, ctx_len - 1:]  # (T - ctx_len, V)
        ctx_logits, flags = prefill_and_evict(model, w[:, :ctx_len], policy, keep, exact)
        logits = torch.cat([ctx_logits[0, -1:], model(w[:, ctx_len:-1], ctx_len)[0]]).float()
        nll += F.cross_entropy(logits, w[0, ctx_len:], reduction="sum").item()
        k, t = kl_and_top1(ref, logits)
        kl, top1, kept, n = kl + k.sum().item(), top1 + t.sum().item(), kept + kept_fraction(flags), n + len(logits)
    restore_full(model)
    return {"perplexity": math.exp(nll / n), "kl": kl / n, "top1": top1 / n, "keep": kept / len(windows)}


def baseline(name: str, keep: float) -> Policy:
    policies = {"streaming": StreamingLLM, "h2o": lambda: H2O(keep), "snapkv": SnapKV, "random": RandomPolicy}
    if name not in policies:
        raise KVNestError(f"unknown eviction method {name!r}; use one of {', '.join(policies)} or gate")
    return policies[name]()




@torch.no_grad()
def calibrate_gate(model: Transformer, gate: Gate, context: torch.Tensor, keep: float) -> None:
    """Set each (layer, head) bias so that its flags keep the fraction `keep` of this context: the start point."""
    check_keep(keep)
    gate.c.zero_()
    _, scores = prefill_scores(model, context, gate)
    restore_full(model)
    for i, z in enumerate(scores):
        gate.c[i] = -torch.quantile(z.transpose(0, 1).flatten(1).float(), 1 - keep, dim=1)  # (H_kv,)


def save_gate(path, gate: Gate, meta: dict, extra: dict | None = None) -> None:
    from assets import save_checkpoint
    save_checkpoint(path, {**gate.state_dict(), **(extra or {})}, dict(meta, kvnest="gate", gate_heads=gate.gate_heads,
                                                                       gate_dim=gate.gate_dim))


def load_gate(path, model: Transformer) -> tuple[Gate, dict, dict]:
    """The gate, metadata and extra tensors (optimizer state) of a checkpoint made for this model."""
    tensors, meta = load_checkpoint(path, model, "gate", "python train.py --method gate")
    a = model.args
    gate = Gate(a.n_layers, a.n_kv_heads, a.dim, meta["gate_heads"], meta["gate_dim"])
    gate.load_state_dict({k: tensors.pop(k) for k in ("w", "u", "c", "wq", "wk")})
    return gate.to(model.inv_freq.device), meta, tensors


def gate_overhead(gate: Gate, model: Transformer) -> float:
    """Gate parameters as a fraction of the model's."""
    model_params = {p.data_ptr(): p.numel() for p in model.parameters()}  # tied embeddings count once
    return sum(p.numel() for p in gate.parameters()) / sum(model_params.values())


def eviction_table(model: Transformer, windows: torch.Tensor, gates: dict, keeps: list, ctx_len: int = 384,
                   methods=("streaming", "h2o", "snapkv", "random")) -> tuple[str, dict]:
    """Markdown rows: continuation perplexity (KL) of every method at every keep ratio; gates are scored at the
    exact keep ratio (one threshold over all layers and heads). Returns (table, {method: {keep: result}})."""
    from tqdm import tqdm
    results = {}
    for keep in tqdm(keeps, desc="eviction table"):
        for name in methods:
            results.setdefault(name, {})[keep] = score_eviction(model, windows, baseline(name, keep), keep, ctx_len)
        for name, g in gates.items():
            results.setdefault(name, {})[keep] = score_eviction(model, windows, g, keep, ctx_len, exact=True)
    full = score_eviction(model, windows, StreamingLLM(), 1.0, ctx_len)["perplexity"]
    names = list(results)
    lines = [f"| keep | {' | '.join(names)} |", "|---" * (len(names) + 1) + "|"]
    for keep in keeps:
        lines.append(f"| {keep:.1%} | " + " | ".join(f"{results[n][keep]['perplexity']:.3f} "
                                                      f"({results[n][keep]['kl']:.4f})" for n in names) + " |")
    note = (f"\nContinuation perplexity (KL to the full cache); {len(windows)} windows, {ctx_len}-token context, "
            f"eviction after prefill for every row, kept per (layer, KV head) for the baselines and over all "
            f"layers and heads for gates. Full cache: {full:.3f}.")
    return "\n".join(lines) + note, results
