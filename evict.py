"""KV eviction: where it happens, what it keeps, and the baselines every learned policy must beat.

A policy scores the context entries of each layer and KV head; flags keep the best of them, and an evicted entry
is invisible to every later query and leaves the cache. Attention follows the flags multiplicatively, which stays
differentiable at flag 0 (so a learned policy trains through straight-through flags, see gate.py):

    a_ij = w_ij exp(s_ij) / sum_l w_il exp(s_il)

Two protocols. After the prefill (as kvpress does): the context is prefilled with full attention, w_ij = [j <= i];
then each (layer, KV head) keeps its flagged context entries, and the continuation sees those plus its own tokens.
Inside the prefill (as Attention-Gate does): each layer flags its context before attending, and every context
query already sees only w_ij = [j <= i] max(keep_j, [i - j < window]): the kept entries, itself and an optional
recent window. `keep` is the kept fraction of the context entries; `sinks` and `window` force the first and the
last entries kept. After eviction a CompactCache holds only the kept entries: its bytes are the kept fraction.

Baselines (each keeps n = round(T * keep) entries per (layer, KV head)): StreamingLLM (Xiao et al., 2023: 4 sinks
+ most recent), H2O (Zhang et al., 2023: most recent n // 2, then accumulated attention), SnapKV (Li et al., 2024:
last 32 always, then the last 32 queries' attention, max-pooled with kernel 7), Random.
"""
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from model import Attention, KVNestError, Transformer, apply_rope

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
    for start in range(max(0, T - obs) if obs else 0, T, chunk):  # a context shorter than obs: all
        qi = q[:, :, start: start + chunk]  # (B, H, c, D)
        s = (qi @ k.transpose(-1, -2)).float() / math.sqrt(D)  # (B, H, c, T)
        rows = torch.arange(start, start + qi.shape[2], device=q.device)[:, None]
        s = s.masked_fill(torch.arange(T, device=q.device)[None, :] > rows, float("-inf"))
        total += s.softmax(-1).sum(2)
    return group_sum(total, n_kv)


class Policy:
    """Scores context entries (higher = keep); by default flags keep the top n = round(T * keep) per (layer,
    KV head). A learned policy (gate.py's Gate) overrides `flags` and can judge decoded tokens (`new_tokens`)."""
    exact = True

    def score(self, layer: int, x: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """(B, T, dim) layer input, q (B, H, T, D), k (B, H_kv, T, D) -> scores (B, H_kv, T)."""
        raise NotImplementedError

    def flags(self, scores: list, keep: float, exact: bool, train: bool) -> list:
        """Keep masks (B, H_kv, T) from the scores of some layers."""
        return flags_from_scores(scores, keep, exact, straight_through=train)

    def new_tokens(self, layer: int, window: int):
        raise KVNestError("gating new tokens needs a learned gate (--evict gate --gate CKPT)")


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


def baseline(name: str, keep: float) -> Policy:
    policies = {"streaming": StreamingLLM, "h2o": lambda: H2O(keep), "snapkv": SnapKV, "random": RandomPolicy}
    if name not in policies:
        raise KVNestError(f"unknown eviction method {name!r}; use one of {', '.join(policies)} or gate")
    return policies[name]()


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


def protect(scores: torch.Tensor, sinks: int, window: int) -> torch.Tensor:
    """Force the first `sinks` and the last `window` entries kept: their scores (B, H_kv, T) become +inf, above
    those a policy itself set to +inf."""
    if not sinks and not window:
        return scores
    forced = torch.zeros(scores.shape[-1], dtype=torch.bool, device=scores.device)
    forced[:sinks] = True
    forced[max(0, scores.shape[-1] - window):] = True
    return scores.clamp(max=torch.finfo(scores.dtype).max).masked_fill(forced, float("inf"))


def weighted_attend(q, k, v, w) -> torch.Tensor:
    """a_ij = w_ij exp(s_ij) / sum_l w_il exp(s_il) over the keys of each KV head; w (B, H_kv, T, S) may be
    straight-through flags, so the weights stay differentiable where they are 0. q (B, H, T, D), k/v (B, H_kv, S, D)
    -> (B, H, T, D)."""
    B, H, T, D = q.shape
    G = H // k.shape[1]
    s = (q @ k.repeat_interleave(G, 1).transpose(-1, -2)).float() / math.sqrt(D)  # (B, H, T, S)
    w = w.repeat_interleave(G, 1)  # (B, H, T, S)
    top = s.masked_fill(w.detach() == 0, float("-inf")).amax(-1, keepdim=True).detach()  # over visible only
    p = torch.exp((s - top).clamp(max=0)) * w  # hidden scores can neither overflow nor shift the visible ones
    return ((p / p.sum(-1, keepdim=True)).to(v.dtype) @ v.repeat_interleave(G, 1)).to(q.dtype)


def prefill_weights(flags: torch.Tensor, window: int) -> torch.Tensor:
    """Inside the prefill, w_ij = [j <= i] max(keep_j, [i - j < window]) (itself always): (B, H_kv, T) flags ->
    (B, H_kv, T, T)."""
    T = flags.shape[-1]
    i, j = torch.arange(T, device=flags.device)[:, None], torch.arange(T, device=flags.device)[None, :]
    near = ((i - j) < max(window, 1)).float()  # (T, T)
    return (flags[:, :, None, :] + (1 - flags[:, :, None, :]) * near) * (j <= i).float()


class EvictingAttention(Attention):
    """Attention whose context entries can be evicted. Same weights as the base layer; swap in with `evicting`.

    mode "full": the base attention. "prefill": attention over the context that records its keys, values and policy
    scores (protected by sinks/window); full causal, or with `select` set (scores -> flags) the flags of this layer
    inside the prefill. "continue": the continuation attends to the kept context entries (self.keep_mask,
    (B, H_kv, T_ctx)) and causally to itself; with a CompactCache set, to what the cache holds.
    """

    def __init__(self, base: Attention, layer: int):
        self.share_weights(base)
        self.layer, self.mode, self.policy, self.train_scores = layer, "full", None, False
        self.select, self.sinks, self.recent = None, 0, 0  # not self.window: Mistral's sliding window
        self.ctx_k = self.ctx_v = self.scores = self.keep_mask = None

    def forward(self, x, pos, cos, sin):
        if self.mode == "full":
            return super().forward(x, pos, cos, sin)
        B, T, _ = x.shape
        q, k, v = self.qkv(x)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if self.mode == "prefill":
            with torch.set_grad_enabled(self.train_scores):  # only the gate's own graph, for its training
                self.scores = protect(self.policy.score(self.layer, x, q, k), self.sinks, self.recent)
            if self.select is None:
                y = self.attend(q, k, v, 0)
            else:
                self.keep_mask = self.select(self.scores)  # (B, H_kv, T_ctx)
                y = weighted_attend(q, k, v, prefill_weights(self.keep_mask, self.recent))
            self.ctx_k, self.ctx_v = k, v  # (B, H_kv, T_ctx, D)
        elif self.cache is not None:
            y = self.cache.attend(q, k, v, x)
        else:
            Tc = self.ctx_k.shape[2]
            w_ctx = self.keep_mask[:, :, None, :].expand(B, -1, T, Tc)  # kept context entries
            w_new = torch.ones(T, T, device=x.device).tril().expand(B, self.n_kv_heads, T, T)  # causal on itself
            y = weighted_attend(q, torch.cat([self.ctx_k, k], 2), torch.cat([self.ctx_v, v], 2),
                                torch.cat([w_ctx, w_new], -1))
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


class CompactCache(nn.Module):
    """Real eviction: per KV head a static (B, n_h + max_new, D) buffer holding only the kept context entries (n_h:
    the most any sequence of the batch keeps for that head), then room for `max_new` decoded tokens. With
    `new_tokens` (gate.py's NewTokenGate), decoded tokens are judged too, and the evicted ones leave the buffer."""

    def __init__(self, k, v, keep_mask, max_new: int, new_tokens=None):
        super().__init__()
        B, H_kv, Tc, D = k.shape
        self.k, self.v, self.length, self.new_tokens = [], [], [], new_tokens
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

    def attend(self, q, k, v, x=None):
        """Append the T new entries, then attend: q (B, H, T, D) -> (B, H, T, D)."""
        B, H, T, D = q.shape
        if self.new_tokens is not None and T > 1:  # judged one by one: each waits for its own window
            return torch.cat([self.attend(q[:, :, t:t + 1], k[:, :, t:t + 1], v[:, :, t:t + 1], x[:, t:t + 1])
                              for t in range(T)], 2)
        G = H // len(self.k)
        rows = torch.arange(B, device=q.device)
        out, received = [], []
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
            p = s.masked_fill(~visible[:, None], float("-inf")).softmax(-1)  # (B, G, T, S)
            out.append(p.to(vb.dtype) @ vb[:, None, :S])  # (B, G, T, D)
            if self.new_tokens is not None:  # what the pending tokens (the last P held) received
                P = self.new_tokens.pending + 1
                idx = self.length[h][:, None] - P + torch.arange(P, device=q.device)  # (B, P)
                received.append(p.sum((1, 2)).gather(1, idx))
        if self.new_tokens is not None:
            keep = self.new_tokens.observe(x, torch.stack(received, 1))
            if keep is not None:
                self.drop_oldest_pending(keep)
        return torch.cat(out, 1)

    def drop_oldest_pending(self, keep: torch.Tensor) -> None:
        """Remove the oldest pending entry where keep (B, H_kv) is False: the newer ones shift left by one."""
        P = self.new_tokens.pending + 1  # still counting the one judged
        for h, (kb, vb) in enumerate(zip(self.k, self.v)):
            for b in (~keep[:, h]).nonzero()[:, 0].tolist():
                n = int(self.length[h][b])
                kb[b, n - P: n - 1], vb[b, n - P: n - 1] = kb[b, n - P + 1: n].clone(), vb[b, n - P + 1: n].clone()
                self.length[h][b] -= 1

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


@dataclass(frozen=True)
class Protocol:
    """Where eviction happens (see the module docstring): after the prefill or inside it; the first `sinks` and the
    last `window` context entries forced kept (inside: each query also sees its own last `window`); and with
    `gate_new`, decoded tokens judged by the gate after `window` queries (needs the compact cache)."""
    inside: bool = False
    sinks: int = 0
    window: int = 0
    gate_new: bool = False

    def check(self, compact: bool) -> None:
        if self.sinks < 0 or self.window < 0:
            raise KVNestError(f"sinks ({self.sinks}) and window ({self.window}) must be >= 0")
        if self.gate_new and not compact:
            raise KVNestError("gating new tokens evicts from the compact cache: pass compact=True")


def prefill_scores(model: Transformer, context: torch.Tensor, policy: Policy, train: bool = False,
                   protocol: Protocol = Protocol(), select=None):
    """Prefill of the context (B, T_ctx) that records each layer's keys, values and policy scores: full causal
    attention, or with `select` (scores -> flags) each layer's flags applied inside it.
    Returns (logits, [scores (B, H_kv, T_ctx) per layer])."""
    layers = evicting(model)
    for attn in layers:
        attn.mode, attn.cache, attn.train_scores = "prefill", None, train
        attn.select, attn.sinks, attn.recent = select, protocol.sinks, protocol.window
        object.__setattr__(attn, "policy", policy)  # a plain reference: a gate must not become a submodule
    with torch.set_grad_enabled(train and select is not None):  # inside: the gate trains through the prefill too
        logits = model(context)
    return logits, [attn.scores for attn in layers]


def prefill_and_evict(model: Transformer, context: torch.Tensor, policy: Policy, keep: float,
                      exact: bool | None = None, compact: bool = False, max_new: int = 0, train: bool = False,
                      protocol: Protocol = Protocol()):
    """Prefill the context (B, T_ctx) and evict, after it or inside it. Returns (context logits, flags per layer).
    Afterwards the model is in "continue" mode: call model(continuation, pos=T_ctx). exact defaults to the policy's
    own rule (top-n per head for baselines, the threshold z >= 0 for the gate); an exact gate keeps the top n over
    all layers and heads after the prefill, over the heads of each layer inside it."""
    check_keep(keep)
    protocol.check(compact)
    exact = policy.exact if exact is None else exact

    judges = [policy.new_tokens(i, protocol.window) if protocol.gate_new else None for i in range(len(model.layers))]
    inside = (lambda z: policy.flags([z], keep, exact, train)[0]) if protocol.inside else None
    logits, scores = prefill_scores(model, context, policy, train, protocol, inside)
    layers = evicting(model)
    flags = [attn.keep_mask for attn in layers] if protocol.inside else policy.flags(scores, keep, exact, train)
    for attn, f, judge in zip(layers, flags, judges):
        attn.mode, attn.keep_mask, attn.select = "continue", f, None
        if compact:
            attn.cache = CompactCache(attn.ctx_k, attn.ctx_v, f, max_new, judge)
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
