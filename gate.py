"""Attention-Gate: learned in-context KV eviction.

Zeng et al., 2024, "In-context KV-Cache Eviction for LLMs via Attention-Gate". A gate before each attention layer
reads the context and gives every token j and KV head h a keep logit z_jh; the flag is keep_jh = [z_jh >= 0]
(keep probability sigmoid(z) >= tau = 0.5). Training uses a straight-through estimator: the forward pass uses the
hard flag, the backward pass the gradient of sigmoid(z). How flags act on attention, the two eviction protocols
(after or inside the prefill), the compact cache and the baselines live in evict.py.

Our gate reads the context through statistics of the layer's own attention in the prefill (what the last `obs`
queries attend to, SnapKV-style, pooled and raw; the mean attention a token receives, H2O-style), its distance to
the end, a sink flag, its own hidden state (a linear term), and a reduced attention of its own (one head of dim 16)
whose received attention is a further feature. Each (layer, KV head) mixes these with its own weights and bias, so
heads and layers get different budgets. It starts as a fixed H2O+SnapKV-like mixture whose biases are calibrated to
the target keep; a gate trained from scratch on a token's own state learns little (see shared/MEASUREMENTS.md).

Beyond the paper, decoded tokens can be gated too (`judging`, eval.py --gate-new): each stays visible for `window`
queries (DMS's delayed eviction), then the gate judges it from the attention it received meanwhile, with the
features a context token has at that distance from the end, and evicts it from the compact cache or keeps it.

The gate is a policy like evict.py's baselines. Its features depend on `obs`, `pool` and `sinks`: they are fields of
the gate, written into its checkpoint and read back from it, so a changed default never changes what a trained gate
sees; asking `load_gate` for other values than a checkpoint records is a one-line error.
"""
import math
from contextlib import contextmanager

import torch
import torch.nn as nn
import torch.nn.functional as F

from checkpoints import load_checkpoint, load_into, save_checkpoint
from errors import KVNestError
from evict import Policy, check_keep, context_scores, flags_from_scores, received_attention
from model import KVCache, Transformer

N_FEATURES = 6  # snap, snap pooled, mean received (H2O), log distance to end, sink, own reduced attention


def joint_flags(scores: list, keep: float, straight_through: bool = False) -> list:
    """A gate at an exact keep ratio: one threshold over all (layer, head, token) logits of each sequence. The
    keep ratio acts as that threshold, so one gate serves every keep; training at keep ratios drawn per step
    (train.py --keeps) uses the straight-through estimator around it (backward: d sigmoid(z - threshold))."""
    z = torch.stack(scores, 1)  # (B, L, H_kv, T)
    n = max(1, round(z[0].numel() * keep))
    thr = z.detach().flatten(1).topk(n, dim=-1).values[:, -1][:, None, None, None]  # (B, 1, 1, 1)
    hard = (z >= thr).float()
    if straight_through:
        hard = hard + torch.sigmoid(z - thr) - torch.sigmoid(z - thr).detach()  # = hard exactly
    return list(hard.unbind(1))


class Gate(nn.Module, Policy):
    """The learned gate of every layer: keep logits z (B, H_kv, T) from context features, flags z >= 0."""
    exact = False

    def __init__(self, n_layers: int, n_kv_heads: int, dim: int, gate_heads: int = 1, gate_dim: int = 16,
                 seed: int = 0, obs: int = 32, pool: int = 7, sinks: int = 4):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.gate_heads, self.gate_dim = gate_heads, gate_dim
        self.obs, self.pool, self.sinks = obs, pool, sinks  # SnapKV's window and pooling, StreamingLLM's sinks
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
        snap = received_attention(q, k, n_kv, self.obs)
        pooled = F.max_pool1d(snap, self.pool, stride=1, padding=self.pool // 2)
        seen_by = torch.arange(T, 0, -1, device=x.device, dtype=torch.float32)  # queries that see token j
        mean_received = received_attention(q, k, n_kv, None) / seen_by
        gq = (x @ self.wq[layer].T).view(B, T, self.gate_heads, self.gate_dim).transpose(1, 2)  # (B, h_g, T, d_g)
        gk = (x @ self.wk[layer].T).view(B, T, self.gate_heads, self.gate_dim).transpose(1, 2)
        own = received_attention(gq, gk, 1, self.obs).expand(B, n_kv, T)  # reduced attention, shared by the heads
        dist = torch.log(seen_by).expand(B, n_kv, T)
        sink = (torch.arange(T, device=x.device) < self.sinks).float().expand(B, n_kv, T)
        log = lambda t: torch.log(t + 1e-6)  # noqa: E731
        return torch.stack([log(snap), log(pooled), log(mean_received), dist, sink, log(own)], dim=-1)

    def content(self, layer, x) -> torch.Tensor:
        """The linear term on the hidden state x (B, T, dim) -> (B, H_kv, T); scaled so that it moves in O(1) steps."""
        return torch.einsum("btd,hd->bht", x.float(), self.u[layer]) / math.sqrt(x.shape[-1])

    def logits(self, layer, f, content) -> torch.Tensor:
        """z = w_h . f + content + c_h: features (B, H_kv, T, F) -> keep logits (B, H_kv, T)."""
        return (f * self.w[layer][:, None]).sum(-1) + content + self.c[layer][:, None]

    def flags(self, scores, keep, exact, train):
        """Exact: one threshold over all the given layers and heads (n = keep of their entries), or with keep per
        head ((layers, H_kv), a joint plan) each head's top n; else z >= 0."""
        if exact and not torch.is_tensor(keep):
            return joint_flags(scores, keep, train)
        return flags_from_scores(scores, keep, exact, train)

    def score(self, layer, x, q, k, keep):
        f = self.features(layer, x.float(), q.detach(), k.detach())  # (B, H_kv, T, F)
        return self.logits(layer, f, self.content(layer, x))

    def new_token_logits(self, layer, received, own, content, seen: int) -> torch.Tensor:
        """Keep logits (B, H_kv) of decoded tokens that `seen` queries have attended to: received (B, H_kv)
        attention summed over those queries and the group's heads, own (B,) in the gate's reduced attention among
        the pending tokens. The prefill features of a context token at distance `seen` from the end, with the
        snap window and the pooling cut to what was seen."""
        log = lambda t: torch.log(t + 1e-6)  # noqa: E731
        dist = torch.full_like(received, math.log(seen))
        f = torch.stack([log(received), log(received), log(received / seen), dist, torch.zeros_like(received),
                         log(own)[:, None].expand_as(received)], -1)  # (B, H_kv, F)
        return self.logits(layer, f[:, :, None], content[:, :, None])[..., 0]


class NewTokenGate:
    """Gating of decoded tokens for one layer: each new token stays visible while `window` queries (itself
    included) attend to it, accumulating the attention it receives; then the gate's logit decides."""

    def __init__(self, gate: Gate, layer: int, window: int):
        self.gate, self.layer, self.window = gate, layer, window
        self.received = self.own = self.content = self.gk = None  # (B, H_kv, P), (B, P), (B, H_kv, P), (B, h_g, P, d_g)
        self.kept = self.decided = 0

    @property
    def pending(self) -> int:
        return 0 if self.own is None else self.own.shape[1]

    def observe(self, x: torch.Tensor, received: torch.Tensor) -> torch.Tensor | None:
        """A new token x (B, 1, dim) has been written and attended: received (B, H_kv, P) is the attention its query
        gave to the pending tokens (itself last). Returns keep flags (B, H_kv) of the oldest, once it is due."""
        g, B = self.gate, x.shape[0]
        heads = lambda t: t.view(B, -1, g.gate_heads, g.gate_dim).transpose(1, 2)  # noqa: E731  (B, h_g, ., d_g)
        gq, new_k = heads(x.float() @ g.wq[self.layer].T), heads(x.float() @ g.wk[self.layer].T)
        gk = new_k if self.gk is None else torch.cat([self.gk, new_k], 2)  # (B, h_g, P, d_g)
        own = ((gq @ gk.transpose(-1, -2)) / math.sqrt(g.gate_dim)).softmax(-1).sum(1)[:, 0]  # (B, P)
        pad = lambda t, new: new if t is None else torch.cat([t, new], -1)  # noqa: E731
        self.own = pad(self.own, own.new_zeros(own.shape[0], 1)) + own
        self.content = pad(self.content, g.content(self.layer, x))
        self.received = pad(self.received, received.new_zeros(*received.shape[:2], 1)) + received
        self.gk = gk
        if self.pending < self.window:
            return None
        keep = g.new_token_logits(self.layer, self.received[..., 0], self.own[:, 0], self.content[..., 0],
                                  self.window) >= 0  # (B, H_kv)
        self.received, self.own, self.content, self.gk = (self.received[..., 1:], self.own[:, 1:],
                                                          self.content[..., 1:], self.gk[:, :, 1:])
        self.kept, self.decided = self.kept + int(keep.sum()), self.decided + keep.numel()
        return keep

    def __call__(self, attn, args, output) -> None:
        """Forward hook of the layer's attention, after a decode step: judge, and drop what the gate evicts."""
        x, layer_cache = args[0], args[4]
        P = self.pending + 1  # the pending tokens, the new one last
        received = x.new_zeros(x.shape[0], attn.n_kv_heads, P, dtype=torch.float32)
        for g in layer_cache.groups:
            slots = g.length[..., None] - P + torch.arange(P, device=x.device)  # (B, n, P)
            received[:, g.heads] = g.probs.sum((2, 3)).gather(2, slots)  # over the group's query heads
        keep = self.observe(x, received)
        if keep is not None:
            for g in layer_cache.groups:
                g.drop(g.length - self.window, ~keep[:, g.heads])


@contextmanager
def judging(model: Transformer, cache: KVCache, gate: Gate, window: int):
    """Inside, every decode step (one token at a time) on a compact `cache` has the gate judge its new entries after
    `window` queries; yields the per-layer NewTokenGates (their kept/decided counts)."""
    if window < 1:
        raise KVNestError("gating new tokens needs a window >= 1 (how many queries see a token before it is "
                          "judged); pass --window, e.g. 32")
    if not isinstance(gate, Gate):
        raise KVNestError("gating new tokens needs a learned gate (--evict gate --gate CKPT)")
    groups = [g for layer in cache.layers for g in layer.groups]
    if any(g.keep is not None for g in groups):
        raise KVNestError("gating new tokens evicts from a compact cache: prefill with compact=True")
    judges = [NewTokenGate(gate, i, window) for i in range(len(model.layers))]
    handles = [layer.attn.register_forward_hook(j) for layer, j in zip(model.layers, judges)]
    for g in groups:
        g.observe = True
    try:
        with torch.no_grad():
            yield judges
    finally:
        for h in handles:
            h.remove()
        for g in groups:
            g.observe, g.probs = False, None


@torch.no_grad()
def calibrate_gate(model: Transformer, gate: Gate, context: torch.Tensor, keep: float) -> None:
    """Set each (layer, head) bias so that its flags keep the fraction `keep` of this context: the start point."""
    check_keep(keep)
    gate.c.zero_()
    for i, z in enumerate(context_scores(model, context, gate)):
        gate.c[i] = -torch.quantile(z.transpose(0, 1).flatten(1).float(), 1 - keep, dim=1)  # (H_kv,)


FIELDS = ("gate_heads", "gate_dim", "obs", "pool", "sinks")  # what a checkpoint records beside the weights
EARLIER = {"obs": 32, "pool": 7, "sinks": 4}  # what checkpoints written before these were recorded were made with


def save_gate(path, gate: Gate, meta: dict, extra: dict | None = None) -> None:
    save_checkpoint(path, {**gate.state_dict(), **(extra or {})},
                    dict(meta, kvnest="gate", **{f: getattr(gate, f) for f in FIELDS}))


def load_gate(path, model: Transformer, **expected) -> tuple[Gate, dict, dict]:
    """The gate, metadata and extra tensors (optimizer state) of a checkpoint made for this model; `expected`
    fields (e.g. obs=32) must be those it was trained with."""
    tensors, meta = load_checkpoint(path, model, "gate", "python train.py --method gate")
    fields = {**EARLIER, **{f: meta[f] for f in FIELDS if f in meta}}
    differ = {f: v for f, v in expected.items() if fields.get(f) != v}
    if differ:
        raise KVNestError(f"{path} was trained with " + ", ".join(f"{f}={fields.get(f)}" for f in differ) +
                          ", not " + ", ".join(f"{f}={v}" for f, v in differ.items()) + "; train a gate with them")
    for f, v in fields.items():
        if not isinstance(v, int) or v < (0 if f == "sinks" else 1):
            raise KVNestError(f"{path}: gate field {f}={v!r} is not a valid size; the checkpoint is damaged, "
                              f"train again")
    a = model.args
    gate = Gate(a.n_layers, a.n_kv_heads, a.dim, **fields)
    load_into(gate, tensors, path)
    return gate.to(model.inv_freq.device), meta, tensors


def gate_overhead(gate: Gate, model: Transformer) -> float:
    """Gate parameters as a fraction of the model's."""
    model_params = {p.data_ptr(): p.numel() for p in model.parameters()}  # tied embeddings count once
    return sum(p.numel() for p in gate.parameters()) / sum(model_params.values())
