"""KV eviction: where it happens, what it keeps, and the baselines every learned policy must beat.

A policy scores the context entries of each layer and KV head; flags keep the best of them, and an evicted entry
is invisible to every later query and leaves the cache. Attention follows the flags multiplicatively (model.attend),
which stays differentiable at flag 0, so a learned policy trains through straight-through flags (gate.py):

    a_ij = w_ij exp(s_ij) / sum_l w_il exp(s_il)

Two protocols. After the prefill (as kvpress does): the context is prefilled with full attention; then each
(layer, KV head) keeps its flagged context entries, and the continuation sees those plus its own tokens.
Inside the prefill (as Attention-Gate does): each layer flags its context before attending, and every context
query already sees only w_ij = [j <= i] (keep_j + (1 - keep_j) [i - j < window]): the kept entries, itself and an
optional recent window. `keep` is the kept fraction of the context entries; `sinks` and `window` force the first and
the last entries kept. Flags either weigh the cache's slots (soft: training and scoring) or compact it, so that it
holds only the kept entries (model.LayerCache.compact): its bytes are then the kept fraction.

Policies are small dataclasses with one method, `score(layer, x, q, k, keep)`; `prefill` attaches any of them to
the model by forward hooks on its attention layers, and works with any cache, compressed (compress.py) or not.
Baselines (each keeps n = round(T * keep) entries per (layer, KV head)): StreamingLLM (Xiao et al., 2023: sinks +
most recent), H2O (Zhang et al., 2023: most recent n / 2, then accumulated attention), SnapKV (Li et al., 2024:
last `obs` always, then the last `obs` queries' attention, max-pooled), Random.
"""
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from errors import KVNestError, check_ratio
from model import KVCache, Transformer, group_by


def check_keep(keep) -> None:
    """keep: one ratio for every (layer, KV head), or a tensor (L, H_kv) of ratios, one per head (a joint plan,
    plan.py)."""
    for k in keep.flatten().tolist() if torch.is_tensor(keep) else [keep]:
        check_ratio(k, "keep ratio", "0.5 (the kept fraction of the context)")


def layer_keep(keep, layer: int):
    """The keep ratio of one layer: the float itself, or that layer's row (H_kv,) of per-head ratios."""
    return keep[layer] if torch.is_tensor(keep) else keep


def kept_count(T: int, keep) -> list | int:
    """Entries kept of T: round(T * keep), at least 1; a list per head for a row of per-head ratios."""
    if torch.is_tensor(keep):
        return [kept_count(T, k) for k in keep.tolist()]
    return max(1, round(T * keep))


def group_sum(p: torch.Tensor, n_kv: int) -> torch.Tensor:
    """Sum the query heads of each KV group: (B, H, ...) -> (B, H_kv, ...)."""
    return p.unflatten(1, (n_kv, -1)).sum(2)


def received_attention(q: torch.Tensor, k: torch.Tensor, n_kv: int, obs: int | None, chunk: int = 512,
                       band: int | None = None):
    """Causal attention probabilities received by each key, summed over queries (all, or the last `obs`) and the
    group's query heads; with `band`, each query's softmax is over its last `band` keys only. q (B, H, T, D),
    k (B, H_kv, T, D) -> (B, H_kv, T)."""
    B, H, T, D = q.shape
    k = k.repeat_interleave(H // n_kv, dim=1)  # (B, H, T, D)
    total = q.new_zeros(B, H, T, dtype=torch.float32)
    for start in range(max(0, T - obs) if obs else 0, T, chunk):  # a context shorter than obs: all
        qi = q[:, :, start: start + chunk]  # (B, H, c, D)
        s = (qi @ k.transpose(-1, -2)).float() / math.sqrt(D)  # (B, H, c, T)
        rows = torch.arange(start, start + qi.shape[2], device=q.device)[:, None]
        keys = torch.arange(T, device=q.device)[None, :]
        hidden = (keys > rows) | (keys <= rows - band) if band else keys > rows
        s = s.masked_fill(hidden, float("-inf"))
        total += s.softmax(-1).sum(2)
    return group_sum(total, n_kv)


class Policy:
    """Scores context entries (higher = keep); by default flags keep the top n = round(T * keep) per (layer,
    KV head). A learned policy (gate.py's Gate) overrides `flags`."""
    exact = True

    def score(self, layer: int, x: torch.Tensor, q: torch.Tensor, k: torch.Tensor, keep) -> torch.Tensor:
        """(B, T, dim) layer input, q (B, H, T, D) and k (B, H_kv, T, D) after RoPE, the layer's keep (a float or
        per head, (H_kv,)) -> scores (B, H_kv, T)."""
        raise NotImplementedError

    def flags(self, scores: list, keep, exact: bool, train) -> list:
        """Keep masks (B, H_kv, T) from the scores of some layers; keep a float, or (layers, H_kv) per head; train:
        False, True or a relaxation (flags_from_scores)."""
        return flags_from_scores(scores, keep, exact, train)


@dataclass
class StreamingLLM(Policy):
    sinks: int = 4  # first entries always kept ("attention sinks"); then the most recent

    def score(self, layer, x, q, k, keep):
        B, H_kv, T, _ = k.shape
        s = torch.arange(T, device=k.device, dtype=torch.float32).expand(B, H_kv, T).clone()
        s[..., : self.sinks] = float("inf")
        return s


@dataclass
class H2O(Policy):
    recent: float = 0.5  # share of the kept entries that are the most recent; the rest by accumulated attention

    def score(self, layer, x, q, k, keep):
        s = received_attention(q, k, k.shape[1], None)
        T = k.shape[2]
        n = torch.tensor(kept_count(T, keep), dtype=torch.float64)  # () or (H_kv,)
        recent = (n * self.recent).floor().long()  # the most recent entries to keep, per head
        return s.masked_fill(torch.arange(T) >= (T - recent)[..., None].to(s.device), float("inf"))


@dataclass
class SnapKV(Policy):
    obs: int = 32  # the last `obs` queries observe, and their own entries are always kept
    pool: int = 7  # max-pooling kernel along positions

    def score(self, layer, x, q, k, keep):
        s = F.max_pool1d(received_attention(q, k, k.shape[1], self.obs), self.pool, stride=1, padding=self.pool // 2)
        s[..., -self.obs:] = float("inf")
        return s


@dataclass
class RandomPolicy(Policy):
    seed: int = 0

    def score(self, layer, x, q, k, keep):
        g = torch.Generator().manual_seed(self.seed * 1000 + layer)
        return torch.rand(k.shape[:3], generator=g).to(k.device)


BASELINES = {"streaming": StreamingLLM, "h2o": H2O, "snapkv": SnapKV, "random": RandomPolicy}


def baseline(name: str) -> Policy:
    if name not in BASELINES:
        raise KVNestError(f"unknown eviction method {name!r}; use one of {', '.join(BASELINES)} or gate")
    return BASELINES[name]()


def flags_from_scores(scores: list, keep, exact: bool, train=False) -> list:
    """Keep masks (B, H_kv, T) per layer. exact: the top round(T * keep) per (layer, head), keep a float or
    (layers, H_kv) per head; else the gate's own threshold z >= 0. Training (train) uses the straight-through
    estimator (train=True; forward: hard flags; backward: d sigmoid(z)) or a relaxation, a callable from logits
    to soft flags in [0, 1] (gate.GumbelSigmoid)."""
    if not exact:
        if callable(train):
            return [train(z) for z in scores]
        hard = [(z >= 0).float() for z in scores]
        if not train:
            return hard
        return [h + (torch.sigmoid(z) - torch.sigmoid(z).detach()) for h, z in zip(hard, scores)]  # = h exactly
    return [top_flags(s, kept_count(s.shape[-1], layer_keep(keep, i))) for i, s in enumerate(scores)]


def top_flags(s: torch.Tensor, n) -> torch.Tensor:
    """1 at the top n scores of each head (B, H_kv, T): n an int, or a list per head."""
    if isinstance(n, int):
        return torch.zeros_like(s).scatter_(-1, s.topk(n, dim=-1).indices, 1.0)
    out = torch.empty_like(s)
    for m, heads in group_by(n):
        out[:, heads] = top_flags(s[:, heads], m)
    return out


def protect(scores: torch.Tensor, sinks: int, window: int) -> torch.Tensor:
    """Force the first `sinks` and the last `window` entries kept: their scores (B, H_kv, T) become +inf, above
    those a policy itself set to +inf."""
    if not sinks and not window:
        return scores
    forced = torch.zeros(scores.shape[-1], dtype=torch.bool, device=scores.device)
    forced[:sinks] = True
    forced[max(0, scores.shape[-1] - window):] = True
    return scores.clamp(max=torch.finfo(scores.dtype).max).masked_fill(forced, float("inf"))


def check_evictable(model: Transformer) -> None:
    if model.args.sliding_window:
        raise KVNestError("eviction with a sliding-window (Mistral) model is not supported; use a full-attention model")


@dataclass(frozen=True)
class Protocol:
    """Where eviction happens (see the module docstring): after the prefill or inside it; the first `sinks` and the
    last `window` context entries forced kept (inside: each query also sees its own last `window`)."""
    inside: bool = False
    sinks: int = 0
    window: int = 0

    def check(self) -> None:
        if self.sinks < 0 or self.window < 0:
            raise KVNestError(f"sinks ({self.sinks}) and window ({self.window}) must be >= 0")


def layer_scores(attn, layer: int, x: torch.Tensor, cos, sin, policy: Policy, keep, protocol: Protocol,
                 train=False) -> torch.Tensor:
    """A policy's scores (B, H_kv, T) of one layer's context from the attention's input x (B, T, dim), with the
    protocol's forced entries; keep: the model's (a float or (L, H_kv))."""
    q, _, k, _ = attn.qkv(x, cos, sin)  # recomputed, as kvpress does: the layer's code stays untouched
    with torch.set_grad_enabled(bool(train)):  # only the gate's own graph, for its training
        return protect(policy.score(layer, x, q.detach(), k.detach(), layer_keep(keep, layer)), protocol.sinks,
                       protocol.window)


def attention_hooks(model: Transformer, on_input, before: bool) -> list:
    """Forward (pre-)hooks on every attention layer that hand on_input(layer, attn, x, cos, sin) the layer's input
    x (B, T, dim) and its RoPE tables; before: ahead of the layer's attention, else after it."""
    def hook(i):
        def fn(attn, args, *output):
            x, _, cos, sin = args[:4]  # the attention's forward(x, pos, cos, sin, cache, ...)
            on_input(i, attn, x, cos, sin)
        return fn
    register = "register_forward_pre_hook" if before else "register_forward_hook"
    return [getattr(layer.attn, register)(hook(i)) for i, layer in enumerate(model.layers)]


def scoring_hooks(model: Transformer, on_scores, policy: Policy, keep, protocol: Protocol, train,
                  before: bool) -> list:
    """Hooks that score every layer's context from its input and hand on_scores(layer, scores) the result.
    before: ahead of the layer's attention (eviction inside the prefill)."""
    return attention_hooks(model, lambda i, attn, x, cos, sin: on_scores(
        i, layer_scores(attn, i, x, cos, sin, policy, keep, protocol, train)), before)


def prefill(model: Transformer, context: torch.Tensor, cache: KVCache, policy: Policy, keep,
            protocol: Protocol = Protocol(), exact: bool | None = None, compact: bool = True,
            train=False) -> tuple[torch.Tensor, list]:
    """Prefill the context (B, T_ctx) into an empty `cache` and evict, after the prefill or inside it. Returns
    (context logits, flags per layer (B, H_kv, T_ctx)); continue with model(tokens, T_ctx, cache). compact: the
    cache keeps only the flagged entries (and room for cache.size - T_ctx more); else its slots are weighed by the
    flags (differentiable with train: True, straight-through, or a relaxation). exact defaults to the policy's own
    rule (top-n per head for baselines, the threshold z >= 0 for the gate); an exact gate keeps the top n over all
    layers and heads after the prefill, over the heads of each layer inside it. keep: a float, or (L, H_kv) ratios,
    one per head (a joint plan, plan.py: then every policy, the gate too, keeps each head's own top n)."""
    check_keep(keep)
    check_evictable(model)
    protocol.check()
    exact = policy.exact if exact is None else exact
    recorded = [None] * len(model.layers)

    def on_scores(i, z):
        layer = keep[i: i + 1] if torch.is_tensor(keep) else keep  # (1, H_kv) per head
        recorded[i] = policy.flags([z], layer, exact, train)[0] if protocol.inside else z
        if protocol.inside:
            cache.layers[i].soften(recorded[i], protocol.window)

    handles = scoring_hooks(model, on_scores, policy, keep, protocol, train, before=protocol.inside)
    try:
        with torch.set_grad_enabled(bool(train) and protocol.inside):  # inside: the gate trains through the prefill too
            logits = model(context, 0, cache)
    finally:
        for h in handles:
            h.remove()
    flags = recorded if protocol.inside else policy.flags(recorded, keep, exact, train)
    for layer_cache, f in zip(cache.layers, flags):
        if compact:
            layer_cache.compact(f.detach(), cache.size - context.shape[1])
        else:
            layer_cache.soften(f, protocol.window)
    return logits, flags


@torch.no_grad()
def context_scores(model: Transformer, context: torch.Tensor, policy: Policy, keep: float = 1.0) -> list:
    """A policy's scores (B, H_kv, T) of every layer over a full-attention prefill of the context (B, T)."""
    scores = [None] * len(model.layers)
    handles = scoring_hooks(model, scores.__setitem__, policy, keep, Protocol(), False, before=False)
    try:
        model(context)
    finally:
        for h in handles:
            h.remove()
    return scores


def kept_fraction(flags: list) -> float:
    return float(torch.stack([f.detach().float().mean() for f in flags]).mean())
