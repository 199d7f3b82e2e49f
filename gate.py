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

One gate can serve every keep ratio (train.py --keeps): it then takes the keep as an input. Its knots are keep
ratios k_1 < ... < k_K, each with offsets of w, u and c (zero at first); at keep k the weights are the shared ones
plus the offsets of the two knots around k, weighed linearly in log2 k (outside them, the nearest knot's). So what
12.5% keeps need not be a subset of what 75% keeps, and each knot's offsets are trained by its own steps alone.

Beyond the paper, decoded tokens can be gated too (`judging`, eval.py --gate-new): each stays visible for `window`
queries (DMS's delayed eviction, Lancucki et al., 2025), then a head of the gate of its own judges it and evicts it
from the compact cache or keeps it. Its features are only what those `window` queries saw, renormalized over the
tokens not yet judged (which are never evicted while they wait): the attention each token received, in the model
and in the gate's reduced attention, and its hidden state. So they do not depend on any earlier eviction, and the
whole continuation can be judged in one forward (`judged_forward`, for training: train.py --new-keep) with the
same flags as one decode step at a time (tested).

The gate is a policy like evict.py's baselines. Its features depend on `obs`, `pool` and `sinks`: they are fields of
the gate, written into its checkpoint and read back from it, so a changed default never changes what a trained gate
sees; asking `load_gate` for other values than a checkpoint records is a one-line error.
"""
import math
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from checkpoints import load_checkpoint, load_into, save_checkpoint
from errors import KVNestError
from evict import Policy, attention_hooks, check_keep, context_scores, flags_from_scores, received_attention
from model import KVCache, Transformer

N_FEATURES = 6  # snap, snap pooled, mean received (H2O), log distance to end, sink, own reduced attention


def joint_flags(scores: list, keep: float) -> list:
    """A gate at an exact keep ratio: one threshold over all (layer, head, token) logits of each sequence, so the
    heads' shares of the budget are the gate's. The keep ratio acts as that threshold: one gate serves every keep."""
    z = torch.stack(scores, 1)  # (B, L, H_kv, T)
    n = max(1, round(z[0].numel() * keep))
    thr = z.flatten(1).topk(n, dim=-1).values[:, -1][:, None, None, None]  # (B, 1, 1, 1)
    return list((z >= thr).float().unbind(1))


@dataclass
class GumbelSigmoid:
    """A relaxation of the flags for training, DMS's Gumbel-sigmoid (the binary concrete of Maddison et al., 2017):
    soft flags sigmoid((z + L) / tau), logistic noise L = log u - log(1 - u), u ~ U(0, 1) drawn from `generator`.
    As tau -> 0 a flag is 1 with probability sigmoid(z), so the kept fraction the loss sees is an expectation; the
    flags outside training are still z >= 0."""
    tau: float
    generator: torch.Generator

    def __call__(self, z: torch.Tensor) -> torch.Tensor:
        u = torch.rand(z.shape, generator=self.generator).clamp(1e-6, 1 - 1e-6).to(z.device)
        return torch.sigmoid((z + torch.log(u) - torch.log1p(-u)) / self.tau)


class Gate(nn.Module, Policy):
    """The learned gate of every layer: keep logits z (B, H_kv, T) from context features, flags z >= 0."""
    exact = False

    def __init__(self, n_layers: int, n_kv_heads: int, dim: int, gate_heads: int = 1, gate_dim: int = 16,
                 seed: int = 0, obs: int = 32, pool: int = 7, sinks: int = 4, new_tokens: bool = False,
                 keeps: tuple = ()):
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
        self.keeps = tuple(sorted(keeps))  # knots of the keep input: per-keep offsets of w, u and c, zero at first
        if keeps:
            K = len(keeps)
            self.w_keep = nn.Parameter(torch.zeros(K, n_layers, n_kv_heads, N_FEATURES))  # (K, L, H_kv, F)
            self.u_keep = nn.Parameter(torch.zeros(K, n_layers, n_kv_heads, dim))
            self.c_keep = nn.Parameter(torch.zeros(K, n_layers, n_kv_heads))
        self.new_tokens = new_tokens  # the decoded tokens' head: weights of (received, own), content term, bias
        if new_tokens:
            self.w_new = nn.Parameter(torch.tensor([1.0, 0.0]).repeat(n_layers, n_kv_heads, 1))  # (L, H_kv, 2)
            self.u_new = nn.Parameter(torch.zeros(n_layers, n_kv_heads, dim))
            self.c_new = nn.Parameter(torch.zeros(n_layers, n_kv_heads))

    def features(self, layer, x, q, k) -> torch.Tensor:
        """(B, H_kv, T, F) features of each context entry; detached inputs except the gate's own attention."""
        B, T, _ = x.shape
        n_kv = k.shape[1]
        snap = received_attention(q, k, n_kv, self.obs)
        pooled = F.max_pool1d(snap, self.pool, stride=1, padding=self.pool // 2)
        seen_by = torch.arange(T, 0, -1, device=x.device, dtype=torch.float32)  # queries that see token j
        mean_received = received_attention(q, k, n_kv, None) / seen_by
        own = received_attention(*self.reduced(layer, x), 1, self.obs).expand(B, n_kv, T)  # shared by the heads
        dist = torch.log(seen_by).expand(B, n_kv, T)
        sink = (torch.arange(T, device=x.device) < self.sinks).float().expand(B, n_kv, T)
        log = lambda t: torch.log(t + 1e-6)  # noqa: E731
        return torch.stack([log(snap), log(pooled), log(mean_received), dist, sink, log(own)], dim=-1)

    def reduced(self, layer, x) -> tuple[torch.Tensor, torch.Tensor]:
        """The gate's own queries and keys, (B, h_g, T, d_g) each, of the hidden states x (B, T, dim)."""
        heads = lambda t: t.view(*x.shape[:2], self.gate_heads, self.gate_dim).transpose(1, 2)  # noqa: E731
        return heads(x.float() @ self.wq[layer].T), heads(x.float() @ self.wk[layer].T)

    def content(self, x, u) -> torch.Tensor:
        """The linear term u . x on the hidden state x (B, T, dim) -> (B, H_kv, T), u one layer's (H_kv, dim)
        weights; scaled so that it moves in O(1) steps."""
        return torch.einsum("btd,hd->bht", x.float(), u) / math.sqrt(x.shape[-1])

    def knot_weights(self, keep) -> torch.Tensor:
        """How much each knot of the keep input counts at this keep (a float, or (H_kv,) per head): piecewise
        linear in log2(keep) between the two knots around it, the nearest knot outside them. (K,) or (H_kv, K)"""
        s = torch.tensor([math.log2(k) for k in self.keeps])  # (K,)
        x = torch.as_tensor(keep, dtype=torch.float32).cpu().log2().clamp(s[0], s[-1])[..., None]
        left, right = torch.cat([s[:1] - 1, s[:-1]]), torch.cat([s[1:], s[-1:] + 1])
        return torch.minimum((x - left) / (s - left), (right - x) / (right - s)).clamp(0, 1)

    def head_weights(self, layer, keep) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One layer's w (H_kv, F), u (H_kv, dim) and c (H_kv,) at this keep: the shared ones plus, with knots,
        their offsets weighed by knot_weights."""
        w, u, c = self.w[layer], self.u[layer], self.c[layer]
        if not self.keeps:
            return w, u, c
        a = self.knot_weights(keep).to(w.device).expand(w.shape[0], -1)  # (H_kv, K)
        offset = lambda t: torch.einsum("hk,kh...->h...", a, t[:, layer])  # noqa: E731
        return w + offset(self.w_keep), u + offset(self.u_keep), c + offset(self.c_keep)

    def flags(self, scores, keep, exact, train):
        """Exact: one threshold over all the given layers and heads (n = keep of their entries), or with keep per
        head ((layers, H_kv), a joint plan) each head's top n; else z >= 0 (the flags a gate trains through)."""
        if exact and train:
            raise KVNestError("a gate trains through its own threshold z >= 0 and a penalty on the kept fraction, "
                              "not at exact keep ratios")
        if exact and not torch.is_tensor(keep):
            return joint_flags(scores, keep)
        return flags_from_scores(scores, keep, exact, train)

    def score(self, layer, x, q, k, keep):
        """z = w_h . f + u_h . x + c_h: features (B, H_kv, T, F) -> keep logits (B, H_kv, T)."""
        w, u, c = self.head_weights(layer, keep)
        f = self.features(layer, x.float(), q.detach(), k.detach())  # (B, H_kv, T, F)
        return (f * w[:, None]).sum(-1) + self.content(x, u) + c[:, None]

    def new_token_logits(self, layer, received, own, content) -> torch.Tensor:
        """Keep logits (B, H_kv, T) of decoded tokens from what the `window` queries that saw each one gave it:
        received (B, H_kv, T), the model's attention (each query's probabilities renormalized over the tokens not
        yet judged, summed over the queries and the group's heads), own (B, T) the same in the gate's reduced
        attention, content (B, H_kv, T) the term u_new . x. z = w_new . (log received, log own) + content + c_new."""
        log = lambda t: torch.log(t + 1e-6)  # noqa: E731
        f = torch.stack([log(received), log(own)[:, None].expand_as(received)], -1)  # (B, H_kv, T, 2)
        return (f * self.w_new[layer][:, None]).sum(-1) + content + self.c_new[layer][:, None]

    def judged_logits(self, layer, x, q, k, window: int) -> torch.Tensor:
        """The parallel form: keep logits (B, H_kv, T) of T decoded tokens, x (B, T, dim), q (B, H, T, D), k (B,
        H_kv, T, D) after RoPE, each from the `window` queries from its own on (a query's last `window` tokens
        are the ones not yet judged)."""
        received = received_attention(q, k, k.shape[1], None, band=window)  # (B, H_kv, T)
        own = received_attention(*self.reduced(layer, x), 1, None, band=window)[:, 0]  # (B, T)
        return self.new_token_logits(layer, received, own, self.content(x, self.u_new[layer]))


class NewTokenGate:
    """Gating of decoded tokens for one layer, one decode step at a time: each new token stays visible while
    `window` queries (itself included) attend to it, accumulating the attention it receives among the tokens not
    yet judged (the pending ones); then the gate's decoded-token head decides."""

    def __init__(self, gate: Gate, layer: int, window: int):
        self.gate, self.layer, self.window = gate, layer, window
        self.received = self.own = self.content = self.gk = None  # (B, H_kv, P), (B, P), (B, H_kv, P), (B, h_g, P, d_g)
        self.kept = self.decided = 0

    @property
    def pending(self) -> int:
        return 0 if self.own is None else self.own.shape[1]

    def observe(self, x: torch.Tensor, received: torch.Tensor) -> torch.Tensor | None:
        """A new token x (B, 1, dim) has been written and attended: received (B, H_kv, P) is the attention its query
        gave to the pending tokens (itself last), renormalized over them. Returns keep flags (B, H_kv) of the
        oldest, once it is due."""
        g = self.gate
        gq, new_k = g.reduced(self.layer, x)  # (B, h_g, 1, d_g)
        gk = new_k if self.gk is None else torch.cat([self.gk, new_k], 2)  # (B, h_g, P, d_g)
        own = ((gq @ gk.transpose(-1, -2)) / math.sqrt(g.gate_dim)).softmax(-1).sum(1)[:, 0]  # (B, P)
        pad = lambda t, new: new if t is None else torch.cat([t, new], -1)  # noqa: E731
        self.own = pad(self.own, own.new_zeros(own.shape[0], 1)) + own
        self.content = pad(self.content, g.content(x, g.u_new[self.layer]))
        self.received = pad(self.received, received.new_zeros(*received.shape[:2], 1)) + received
        self.gk = gk
        if self.pending < self.window:
            return None
        keep = g.new_token_logits(self.layer, self.received[..., :1], self.own[:, :1],
                                  self.content[..., :1])[..., 0] >= 0  # (B, H_kv)
        self.received, self.own, self.content, self.gk = (self.received[..., 1:], self.own[:, 1:],
                                                          self.content[..., 1:], self.gk[:, :, 1:])
        self.kept, self.decided = self.kept + int(keep.sum()), self.decided + keep.numel()
        return keep

    def __call__(self, attn, args, output) -> None:
        """Forward hook of the layer's attention, after a decode step."""
        self.judge(args[0], args[4])

    def judge(self, x: torch.Tensor, layer_cache) -> None:
        """After a decode step has written x (B, 1, dim)'s entries into layer_cache (observing) and attended: judge
        the oldest pending token once it is due, and drop it from the heads that evict it."""
        P = self.pending + 1  # the pending tokens, the new one last
        received = x.new_zeros(x.shape[0], self.gate.c.shape[1], P, dtype=torch.float32)  # (B, H_kv, P)
        for g in layer_cache.groups:
            slots = g.length[..., None] - P + torch.arange(P, device=x.device)  # (B, n, P)
            p = g.probs[:, :, :, 0].gather(3, slots[:, :, None].expand(-1, -1, g.probs.shape[2], -1))  # (B, n, G, P)
            p = p.float()  # renormalized and summed in fp32, as the parallel form (received_attention) does
            received[:, g.heads] = (p / p.sum(-1, keepdim=True)).sum(2)  # over the group's query heads
        keep = self.observe(x, received)
        if keep is not None:
            for g in layer_cache.groups:
                g.drop(g.length - self.window, ~keep[:, g.heads])


@contextmanager
def judging(model: Transformer, cache: KVCache, gate: Gate, window: int):
    """Inside, every decode step (one token at a time) on a compact `cache` has the gate judge its new entries after
    `window` queries; yields the per-layer NewTokenGates (their kept/decided counts)."""
    check_new_tokens(gate, window)
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


def check_new_tokens(gate, window: int | None) -> None:
    """Refuse by name a policy that cannot judge decoded tokens, or no window of queries to judge them after."""
    if not isinstance(gate, Gate):
        raise KVNestError("gating new tokens needs a learned gate (--evict gate --gate CKPT)")
    if not gate.new_tokens:
        raise KVNestError("this gate was not trained on decoded tokens; train one with `python train.py --method "
                          "gate --window 32 --new-keep 0.5`")
    if not window or window < 1:
        raise KVNestError("gating new tokens judges each decoded token after `window` queries: pass a window >= 1 "
                          "(--window), e.g. 32")


def judged_hooks(model: Transformer, gate: Gate, window: int, on_logits) -> list:
    """Forward pre-hooks on every attention layer: from its input, the decoded-token logits (B, H_kv, T) of the
    tokens it is given (Gate.judged_logits), handed to on_logits(layer, z) before the layer attends."""
    def on_input(i, attn, x, cos, sin):
        q, _, k, _ = attn.qkv(x, cos, sin)
        on_logits(i, gate.judged_logits(i, x.float(), q.detach(), k.detach(), window))
    return attention_hooks(model, on_input, before=True)


def judged_forward(model: Transformer, tokens: torch.Tensor, pos: int, cache: KVCache, gate: Gate, window: int,
                   context_flags: list, train: bool = False) -> tuple[torch.Tensor, list]:
    """`judging` in one forward, for training: the continuation tokens (B, T) at [pos, pos + T) over a soft `cache`
    whose pos context slots are weighed by context_flags (per layer, (B, H_kv, pos)). Each layer judges every
    decoded token from all its window's queries at once, before attending, and weighs its slot by the flag
    (train: straight-through, or a relaxation): query i reads decoded token j if keep_j or i - j < window, the
    masks of one decode step at a time. The context's last window - 1 entries must be kept (a prefill with
    Protocol(window=window) keeps them), since the window's rule reaches them too here. Returns (logits (B, T, V),
    flags of the decoded tokens per layer)."""
    check_new_tokens(gate, window)
    if window > 1 and any(bool((f[..., f.shape[-1] - window + 1:] < 1).any()) for f in context_flags):
        raise KVNestError(f"the context's last {window - 1} entries must be kept under a decoded-token window of "
                          f"{window}; prefill with Protocol(window={window})")
    flags = [None] * len(model.layers)

    def on_logits(i, z):
        flags[i] = flags_from_scores([z], None, False, train)[0]
        cache.layers[i].soften(torch.cat([context_flags[i], flags[i]], -1), window)

    handles = judged_hooks(model, gate, window, on_logits)
    try:
        return model(tokens, pos, cache), flags
    finally:
        for h in handles:
            h.remove()


def judged(flags: list, window: int) -> list:
    """The flags (B, H_kv, T) of the decoded tokens that were judged: all but the last window - 1, which fewer than
    `window` queries have seen."""
    return [f[..., : f.shape[-1] - window + 1] for f in flags]


@torch.no_grad()
def calibrate_new_tokens(model: Transformer, gate: Gate, x: torch.Tensor, ctx_len: int, keep: float,
                         window: int) -> None:
    """Set each (layer, head) bias of the decoded-token head so that it keeps the fraction `keep` of the judged
    tokens of x (B, T) after its ctx_len context, every entry kept: the start point."""
    check_keep(keep)
    gate.c_new.zero_()
    cache = KVCache(model, x.shape[0], x.shape[1])
    model(x[:, :ctx_len], 0, cache)
    z = [None] * len(model.layers)
    handles = judged_hooks(model, gate, window, z.__setitem__)
    try:
        model(x[:, ctx_len:], ctx_len, cache)
    finally:
        for h in handles:
            h.remove()
    for i, zi in enumerate(judged(z, window)):
        gate.c_new[i] = -torch.quantile(zi.transpose(0, 1).flatten(1).float(), 1 - keep, dim=1)  # (H_kv,)


@torch.no_grad()
def calibrate_gate(model: Transformer, gate: Gate, context: torch.Tensor, keep: float) -> None:
    """Set each (layer, head) bias so that its flags keep the fraction `keep` of this context: the start point."""
    check_keep(keep)
    gate.c.zero_()
    for i, z in enumerate(context_scores(model, context, gate)):
        gate.c[i] = -torch.quantile(z.transpose(0, 1).flatten(1).float(), 1 - keep, dim=1)  # (H_kv,)


@torch.no_grad()
def calibrate_knots(model: Transformer, gate: Gate, context: torch.Tensor) -> None:
    """Set each knot's bias offsets to one shift of all its (layer, head) logits, so that the flags z >= 0 keep
    the knot's fraction of this context while the heads' shares of it stay the gate's: the start point."""
    gate.c_keep.zero_()
    z = torch.stack(context_scores(model, context, gate), 1).flatten()  # every (layer, head, token) logit
    for i, keep in enumerate(gate.keeps):
        gate.c_keep[i] = -torch.quantile(z.float(), 1 - keep)


FIELDS = ("gate_heads", "gate_dim", "obs", "pool", "sinks", "new_tokens", "keeps")  # recorded beside the weights
EARLIER = {"obs": 32, "pool": 7, "sinks": 4, "new_tokens": False, "keeps": ()}  # before a field was recorded


def save_gate(path, gate: Gate, meta: dict, extra: dict | None = None) -> None:
    save_checkpoint(path, {**gate.state_dict(), **(extra or {})},
                    dict(meta, kvnest="gate", **{f: getattr(gate, f) for f in FIELDS}))


def load_gate(path, model: Transformer, **expected) -> tuple[Gate, dict, dict]:
    """The gate, metadata and extra tensors (optimizer state) of a checkpoint made for this model; `expected`
    fields (e.g. obs=32) must be those it was trained with."""
    tensors, meta = load_checkpoint(path, model, "gate", "python train.py --method gate")
    fields = {**EARLIER, **{f: meta[f] for f in FIELDS if f in meta}}
    fields["keeps"] = tuple(fields["keeps"]) if isinstance(fields["keeps"], list) else fields["keeps"]
    differ = {f: v for f, v in expected.items() if fields.get(f) != v}
    if differ:
        raise KVNestError(f"{path} was trained with " + ", ".join(f"{f}={fields.get(f)}" for f in differ) +
                          ", not " + ", ".join(f"{f}={v}" for f, v in differ.items()) + "; train a gate with them")
    valid = {"new_tokens": lambda v: isinstance(v, bool),
             "keeps": lambda v: isinstance(v, tuple) and all(type(k) is float and 0 < k <= 1 for k in v) and
             list(v) == sorted(set(v))}
    for f, v in fields.items():
        if not valid.get(f, lambda v: type(v) is int and v >= (0 if f == "sinks" else 1))(v):
            raise KVNestError(f"{path}: gate field {f}={v!r} is not valid; the checkpoint is damaged, "
                              f"train again")
    a = model.args
    gate = Gate(a.n_layers, a.n_kv_heads, a.dim, **fields)
    load_into(gate, tensors, path)
    return gate.to(model.inv_freq.device), meta, tensors


def gate_overhead(gate: Gate, model: Transformer) -> float:
    """Gate parameters as a fraction of the model's."""
    model_params = {p.data_ptr(): p.numel() for p in model.parameters()}  # tied embeddings count once
    return sum(p.numel() for p in gate.parameters()) / sum(model_params.values())
