"""A LLaMA / Mistral decoder in one file, with the one KV cache every path of kvnest uses. Imports only torch;
weights.py loads a Hugging Face folder into it.

The model is the standard pre-norm decoder (Touvron et al., 2023, "LLaMA"):

    h   = x + o_proj(Attention(RoPE(q), RoPE(k), v))      with grouped-query attention (GQA)
    out = h + down_proj(silu(gate_proj(norm(h))) * up_proj(norm(h)))

Every norm is RMSNorm, and each of the H_kv key/value heads is shared by a group of G = n_heads / n_kv_heads query
heads. Mistral adds a sliding window: a query at position i sees keys j with i - window < j <= i.

Attention, written once (`attention`), reads a static preallocated cache (`KVCache`): per layer, the KV heads are in
groups (`HeadGroup`), each one buffer of B x n heads x S slots. What the two compression axes change is only what
a group stores and which of its slots a query may read:
  * features: a group may store its entries in a basis, k_c = U_k^T k and v_c = U_v^T (v - b), with r <= D columns
    (MatryoshkaKV; compress.py makes the bases). Heads of one rank share a group, so none is padded.
  * tokens: a group may weigh its slots by keep flags (soft, differentiable: for training and scoring), or hold only
    the kept entries (`LayerCache.compact`: real eviction; evict.py and gate.py decide what is kept).
The same `Transformer.forward(tokens, pos, cache)` runs a prefill (T tokens), a decode step (T = 1, eagerly or
compiled, kernels.py) or, with no cache, the plain forward from position 0.
"""
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


class ModelError(ValueError):
    """A sequence that does not fit the cache or the model: a one-line message that names the problem and the fix."""


@dataclass
class ModelArgs:
    dim: int = 576
    n_layers: int = 30
    n_heads: int = 9
    n_kv_heads: int = 3
    head_dim: int = 64
    hidden_dim: int = 1536
    vocab_size: int = 49152
    norm_eps: float = 1e-5
    rope_theta: float = 1e5
    rope_scaling: dict | None = None  # {"rope_type": "llama3" | "linear", "factor": ..., ...}
    max_seq_len: int = 8192
    tie_embeddings: bool = True
    sliding_window: int | None = None
    bos_id: int | None = 1
    eos_ids: tuple = (2,)


def rope_frequencies(args: ModelArgs) -> torch.Tensor:
    """Inverse frequencies theta^(-2i/D) of rotary embeddings, with llama3 or linear scaling applied. (D/2,)"""
    inv = 1.0 / args.rope_theta ** (torch.arange(0, args.head_dim, 2, dtype=torch.float64) / args.head_dim)
    s = args.rope_scaling
    if s and s["rope_type"] == "linear":
        inv = inv / s["factor"]
    elif s and s["rope_type"] == "llama3":
        old, lo, hi = s["original_max_position_embeddings"], s["low_freq_factor"], s["high_freq_factor"]
        wavelen = 2 * math.pi / inv
        scaled = torch.where(wavelen > old / lo, inv / s["factor"], inv)
        smooth = (old / wavelen - lo) / (hi - lo)
        smoothed = (1 - smooth) * scaled / s["factor"] + smooth * scaled
        medium = (wavelen >= old / hi) & (wavelen <= old / lo)
        inv = torch.where(medium, smoothed, scaled)
    return inv.float()


def rope_cos_sin(inv_freq: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables for the given positions. (T, D), in the rotate-half layout of HF checkpoints."""
    angles = positions.float()[:, None] * inv_freq[None, :]  # (T, D/2)
    angles = torch.cat([angles, angles], dim=-1)  # (T, D)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (x_i, x_{i+D/2}) by the position's angle. x: (..., T, D), cos/sin: (..., T, D)."""
    x1, x2 = x.chunk(2, dim=-1)
    return (x * cos + torch.cat([-x2, x1], dim=-1) * sin).to(x.dtype)


def attention(s: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """The attention equation, the only place kvnest writes it (a HeadGroup then sums the values, y_i = sum_j a_ij v_j):

        a_ij = w_ij exp(s_ij) / sum_l w_il exp(s_il)

    s (..., T, S) scores q_i . k_j / sqrt(D) in fp32; w (..., T, S) weights: 0/1 visibility (then a is the masked
    softmax), or keep flags in [0, 1] that carry a straight-through gradient (evict.py), which must reach the
    flags also where they are 0. -> a (..., T, S) in fp32"""
    w = w.to(s.dtype)
    top = s.masked_fill(w == 0, float("-inf")).amax(-1, keepdim=True).detach()  # over the visible keys
    p = torch.exp((s - top).clamp(max=0)) * w  # hidden scores can neither overflow nor shift the visible ones
    return p / p.sum(-1, keepdim=True)


def rotated_scores(q: torch.Tensor, K: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """q . RoPE(K) without writing the rotated keys: with halves (x_1, x_2) of the rotate-half layout and angles
    a_f, q . RoPE(k) = sum_f cos a_f (q_1 k_1 + q_2 k_2) + sin a_f (q_2 k_1 - q_1 k_2). q (B, n, G, T, D),
    K (B, n, S, D), cos/sin (S, D/2) or (B, n, S, D/2) -> (B, n, G, T, S) in fp32."""
    q1, q2 = q.float()[:, :, :, :, None].chunk(2, -1)  # (B, n, G, T, 1, D/2)
    k1, k2 = K.float()[:, :, None, None].chunk(2, -1)  # (B, n, 1, 1, S, D/2)
    if cos.dim() == 4:
        cos, sin = cos[:, :, None, None], sin[:, :, None, None]  # (B, n, 1, 1, S, D/2)
    return (cos * (q1 * k1 + q2 * k2) + sin * (q2 * k1 - q1 * k2)).sum(-1)  # each key read once


CHUNK = 1024  # queries attended at once in a long prefill: the (T, S) scores of all of them would not fit


class HeadGroup(nn.Module):
    """KV heads of one layer that share a static buffer: k (B, n, S, r_k), v (B, n, S, r_v), and length (B, n), the
    entries each sequence holds per head. New entries go to the next free slots. Optional:
      U_k (n, D, r_k), U_v (n, D, r_v), b_v (n, D): entries stored in these bases (None: as they are); pre_rope:
      keys stored before RoPE, rebuilt U_k k_c and rotated when read (else after RoPE, scored in the basis);
      pos (B, n, S): each slot's position once compaction dropped pre-RoPE keys (else slot j holds position j);
      keep (B, n, S) soft flags and `recent`: a query at slot i reads slot j with weight keep_j + (1 - keep_j)
      [i - j < recent] (evict.py's eviction inside the prefill; keep_j = 1 for anything written later)."""

    def __init__(self, heads: list, k, v, length, U_k=None, U_v=None, b_v=None, pre_rope=False, pos=None):
        super().__init__()
        self.pre_rope, self.keep, self.recent, self.observe, self.probs = pre_rope, None, 0, False, None
        self.register_buffer("heads", torch.tensor(heads, device=k.device), persistent=False)
        for name, t in (("k", k), ("v", v), ("length", length), ("U_k", U_k), ("U_v", U_v), ("b_v", b_v),
                        ("pos", pos)):
            self.register_buffer(name, t, persistent=False)

    def write(self, k: torch.Tensor, v: torch.Tensor, pos) -> None:
        """Store new entries k, v (B, n, T, D), at positions [pos, pos + T), in the next free slots of each sequence
        and head."""
        if self.U_k is not None:
            k = k @ self.U_k.to(k.dtype)  # (B, n, T, r_k)
            v = (v - self.b_v.to(v.dtype)[:, None]) @ self.U_v.to(v.dtype)  # (B, n, T, r_v)
        B, n, T = k.shape[:3]
        slots = self.length[..., None] + torch.arange(T, device=k.device)  # (B, n, T)
        seq, head = torch.arange(B, device=k.device)[:, None, None], torch.arange(n, device=k.device)[None, :, None]
        index, k, v = (seq, head, slots), k.to(self.k.dtype), v.to(self.v.dtype)
        if torch.is_grad_enabled():  # training: a new buffer, as autograd may have saved the old one
            self.k, self.v = self.k.index_put(index, k), self.v.index_put(index, v)
        else:
            self.k.index_put_(index, k)  # in place: a decode step writes only its entries
            self.v.index_put_(index, v)
        if self.pos is not None:
            self.pos.index_put_((seq, head, slots), (pos + torch.arange(T, device=k.device)).expand(B, n, T))
        self.length.add_(T)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pos, window, rope) -> torch.Tensor:
        """Write the new entries, then attend. q (B, n, G, T, D) after RoPE; k (B, n, T, D) before RoPE for pre_rope
        groups, after it otherwise; v (B, n, T, D); pos: the first new position; rope: (cos, sin) of every position,
        (P, D/2) each, for pre-RoPE keys. -> (B, n, G, T, D). Long prefills attend in chunks of CHUNK queries."""
        first = self.length.clone()  # (B, n): the slot of the first new entry
        self.write(k, v, pos)
        T = q.shape[3]
        return torch.cat([self.read(q[:, :, :, t: t + CHUNK], first + t, pos + t, window, rope)
                          for t in range(0, T, CHUNK)], 3)

    def read(self, q: torch.Tensor, first: torch.Tensor, pos, window, rope) -> torch.Tensor:
        """Attention of T queries whose own entries sit at slots first + [0, T) (first (B, n)), at positions
        pos + [0, T): scores, weights w_ij, the equation, the values. q (B, n, G, T, D) -> (B, n, G, T, D)"""
        T, S, D = q.shape[3], self.k.shape[2], q.shape[-1]
        slot, t = torch.arange(S, device=q.device), torch.arange(T, device=q.device)[:, None]
        query_slot = first[..., None, None] + t  # (B, n, T, 1)
        w = slot <= query_slot  # (B, n, T, S): held entries up to the query's own
        if window:  # Mistral; eviction is refused with a window, so slot j holds position j
            w = w & (slot > pos + t - window)
        if self.keep is not None:
            near = ((query_slot - slot) < max(self.recent, 1)).float()
            keep = torch.cat([self.keep, self.keep.new_ones(*self.keep.shape[:2], S - self.keep.shape[-1])], -1)
            w = w * (keep[:, :, None] + (1 - keep[:, :, None]) * near)
        if self.pre_rope:  # rebuild the keys, then rotate them: inside the dot product for one query
            K = self.k @ self.U_k.to(self.k.dtype).transpose(-1, -2)  # (B, n, S, D)
            cos, sin = (r[:S] if self.pos is None else r[self.pos] for r in rope)  # (S | B, n, S, D/2)
            if T == 1:
                s = rotated_scores(q, K, cos, sin)
            else:  # many queries: rotate each key once, then one product
                cos, sin = (torch.cat([c, c], -1).to(K.dtype) for c in (cos, sin))
                s = (q.flatten(2, 3) @ apply_rope(K, cos, sin).transpose(-1, -2)).float().unflatten(2, q.shape[2:4])
        else:  # the G x T queries of a KV head in one product with its keys: no key is copied per query head
            q = q if self.U_k is None else q @ self.U_k.to(q.dtype)[:, None]  # (B, n, G, T, r_k): the basis
            s = (q.flatten(2, 3) @ self.k.transpose(-1, -2)).float().unflatten(2, q.shape[2:4])  # (B, n, G, T, S)
        a = attention(s / math.sqrt(D), w[:, :, None])  # (B, n, G, T, S)
        if self.observe:  # gate.py judges decoded tokens by the attention they receive
            self.probs = a
        y = (a.to(self.v.dtype).flatten(2, 3) @ self.v).unflatten(2, a.shape[2:4])  # (B, n, G, T, r_v)
        if self.U_v is not None:
            y = y @ self.U_v.to(y.dtype).transpose(-1, -2)[:, None] + self.b_v.to(y.dtype)[:, None, None]
        return y

    def drop(self, slot: torch.Tensor, gone: torch.Tensor) -> None:
        """Remove the entry at slot (B, n) where gone (B, n): the later entries move one slot left."""
        for b, i in gone.nonzero().tolist():
            s, n = int(slot[b, i]), int(self.length[b, i])
            for buf in (self.k, self.v) if self.pos is None else (self.k, self.v, self.pos):
                buf[b, i, s: n - 1] = buf[b, i, s + 1: n].clone()
            self.length[b, i] -= 1

    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes + (0 if self.pos is None else self.pos.nbytes)


def group_by(keys: list) -> list:
    """[(key, [heads with that key])] in order of first appearance."""
    return [(key, [h for h, x in enumerate(keys) if x == key]) for key in dict.fromkeys(keys)]


class LayerCache(nn.Module):
    """One layer's groups. `features` (None: the full cache) is (U_k, U_v, b_v, pre_rope): per KV head the bases
    U_k[h] (D, r_k) and U_v[h] (D, r_v), the value offsets b_v (H_kv, D); heads with equal ranks share a group."""

    def __init__(self, batch: int, size: int, n_kv: int, D: int, dtype, device, features=None):
        super().__init__()
        U_k, U_v, b_v, pre_rope = features or ([None] * n_kv, [None] * n_kv, None, False)
        ranks = [(D, D) if u is None else (u.shape[-1], w.shape[-1]) for u, w in zip(U_k, U_v)]
        self.groups = nn.ModuleList()
        for (r_k, r_v), heads in group_by(ranks):
            zeros = lambda *shape, t=dtype: torch.zeros(batch, len(heads), *shape, dtype=t, device=device)  # noqa
            on = dict(device=device, dtype=dtype)  # the bases follow the cache: (n, D, r_k), (n, D, r_v), (n, D)
            bases = [] if features is None else [*(torch.stack([U[h] for h in heads]).to(**on) for U in (U_k, U_v)),
                                                 b_v[heads].to(**on)]
            self.groups.append(HeadGroup(heads, zeros(size, r_k), zeros(size, r_v), zeros(t=torch.long), *bases,
                                         pre_rope=pre_rope))

    def forward(self, q, k, k_rope, v, pos, window, rope) -> torch.Tensor:
        """q (B, H_kv, G, T, D), k before and after RoPE and v (B, H_kv, T, D) -> (B, H_kv, G, T, D)."""
        if len(self.groups) == 1 and len(self.groups[0].heads) == k.shape[1]:
            g = self.groups[0]
            return g(q, k if g.pre_rope else k_rope, v, pos, window, rope)
        y = q.new_empty(q.shape)
        for g in self.groups:
            y[:, g.heads] = g(q[:, g.heads], (k if g.pre_rope else k_rope)[:, g.heads], v[:, g.heads], pos, window,
                              rope)
        return y

    def soften(self, flags: torch.Tensor, recent: int = 0) -> None:
        """Weigh the first slots by keep flags (B, H_kv, T_ctx) (differentiable; see HeadGroup)."""
        for g in self.groups:
            g.keep, g.recent = flags[:, g.heads], recent

    def compact(self, flags: torch.Tensor, room: int) -> None:
        """Real eviction: keep only the entries flagged in the first T_ctx slots (B, H_kv, T_ctx), left-aligned per
        sequence and head, plus `room` free slots. Heads then group by (ranks, most entries any sequence holds)."""
        groups, self.groups = list(self.groups), nn.ModuleList()
        for g in groups:
            f = flags[:, g.heads].bool()  # (B, n, T_ctx)
            held = f.sum(-1)  # (B, n)
            for n_max, heads in group_by(held.max(0).values.tolist()):
                order = (~f[:, heads]).byte().argsort(dim=-1, stable=True)[..., :n_max]  # kept slots first, in order
                take = lambda buf: buf.gather(2, order[..., None].expand(-1, -1, -1, buf.shape[-1]))  # noqa: E731
                pad = lambda t: F.pad(t, (0, 0, 0, room))  # noqa: E731
                part = lambda t: None if t is None else t[heads]  # noqa: E731
                kept_all = g.pos is None and bool(f[:, heads].all())  # slot j still holds position j
                pos = None if not g.pre_rope or kept_all else F.pad(
                    order if g.pos is None else g.pos[:, heads].gather(2, order), (0, room))  # each entry's position
                self.groups.append(HeadGroup(g.heads[heads].tolist(), pad(take(g.k[:, heads])),
                                             pad(take(g.v[:, heads])), held[:, heads].clone(), part(g.U_k),
                                             part(g.U_v), part(g.b_v), g.pre_rope, pos))

    def nbytes(self) -> int:
        return sum(g.nbytes() for g in self.groups)


class KVCache(nn.Module):
    """The static cache of a whole model for `batch` sequences of up to `size` tokens: one LayerCache per layer.
    `features` (compress.py's Matryoshka) gives each layer's (U_k, U_v, b_v, pre_rope) by `features.layer(i)`, and
    says whether keys are stored before RoPE (`features.pre_rope`)."""

    def __init__(self, model: "Transformer", batch: int, size: int, features=None, dtype=None):
        super().__init__()
        a, p = model.args, model.lm_head.weight
        self.layers = nn.ModuleList(LayerCache(batch, size, a.n_kv_heads, a.head_dim, dtype or p.dtype, p.device,
                                               None if features is None else features.layer(i))
                                    for i in range(a.n_layers))
        self.size, self.rope = size, None
        if features is not None and features.pre_rope:  # one (cos, sin) table for every rebuilt key
            cos, sin = rope_cos_sin(model.inv_freq, torch.arange(max(size, a.max_seq_len), device=p.device))
            self.rope = (cos[:, : a.head_dim // 2].contiguous(), sin[:, : a.head_dim // 2].contiguous())

    def nbytes(self) -> int:
        return sum(layer.nbytes() for layer in self.layers)


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.n_kv_heads, args.head_dim
        self.window = args.sliding_window
        self.q_proj = nn.Linear(args.dim, args.n_heads * args.head_dim, bias=False)
        self.k_proj = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=False)
        self.v_proj = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=False)
        self.o_proj = nn.Linear(args.n_heads * args.head_dim, args.dim, bias=False)

    def qkv(self, x: torch.Tensor, cos, sin) -> tuple:
        """q (B, H, T, D) after RoPE; k (B, H_kv, T, D) before and after RoPE; v (B, H_kv, T, D)."""
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, H, T, D)
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, H_kv, T, D)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, H_kv, T, D)
        return apply_rope(q, cos, sin), k, apply_rope(k, cos, sin), v

    def forward(self, x, pos, cos, sin, cache: LayerCache, rope=None) -> torch.Tensor:
        B, T, _ = x.shape
        q, k, k_rope, v = self.qkv(x, cos, sin)
        q = q.view(B, self.n_kv_heads, -1, T, self.head_dim)  # (B, H_kv, G, T, D): each KV head's query group
        y = cache(q, k, k_rope, v, pos, self.window, rope)  # (B, H_kv, G, T, D)
        return self.o_proj(y.reshape(B, -1, T, self.head_dim).transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.gate_proj = nn.Linear(args.dim, args.hidden_dim, bias=False)
        self.up_proj = nn.Linear(args.dim, args.hidden_dim, bias=False)
        self.down_proj = nn.Linear(args.hidden_dim, args.dim, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps, self.weight = eps, nn.Parameter(torch.ones(dim))

    def forward(self, x):
        xf = x.float()
        return self.weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)


class Block(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.input_layernorm = RMSNorm(args.dim, args.norm_eps)
        self.attn = Attention(args)
        self.post_attention_layernorm = RMSNorm(args.dim, args.norm_eps)
        self.mlp = MLP(args)

    def forward(self, x, pos, cos, sin, cache: LayerCache, rope=None):
        h = x + self.attn(self.input_layernorm(x), pos, cos, sin, cache, rope)
        return h + self.mlp(self.post_attention_layernorm(h))


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.embed_tokens = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(Block(args) for _ in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.lm_head = nn.Linear(args.dim, args.vocab_size, bias=False)
        self.register_buffer("inv_freq", rope_frequencies(args), persistent=False)
        self.digest = None

    def fingerprint(self) -> dict:
        """What a checkpoint must match to be applied: shapes, a checksum of the first layer's key weights, and the
        digest of every weight as stored, when a loader set one (weights.py does)."""
        a, w = self.args, self.layers[0].attn.k_proj.weight
        out = {"n_layers": a.n_layers, "n_kv_heads": a.n_kv_heads, "head_dim": a.head_dim, "dim": a.dim,
               "vocab_size": a.vocab_size, "k_proj_checksum": float(f"{float(w.double().abs().sum()):.3g}")}
        return out if self.digest is None else dict(out, digest=self.digest)

    def rope(self, pos, T: int, dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin (T, D) of positions [pos, pos + T); pos an int, or a 0-d tensor in a compiled step."""
        cos, sin = rope_cos_sin(self.inv_freq, pos + torch.arange(T, device=self.inv_freq.device))
        return cos.to(dtype), sin.to(dtype)

    def forward(self, tokens: torch.Tensor, pos=0, cache: KVCache | None = None) -> torch.Tensor:
        """tokens (B, T) at absolute positions [pos, pos+T) -> logits (B, T, vocab). Without a cache: the plain
        forward from position 0 (over a full cache of exactly T slots, dropped afterwards)."""
        if cache is None:
            if not isinstance(pos, int) or pos != 0:
                raise ModelError("an uncached forward starts at position 0; pass a KVCache to decode")
            cache = KVCache(self, tokens.shape[0], tokens.shape[1])
        if isinstance(pos, int) and pos + tokens.shape[1] > self.args.max_seq_len:
            raise ModelError(f"{pos + tokens.shape[1]} tokens exceed the model's context of {self.args.max_seq_len}; "
                             f"pass a shorter sequence")
        if isinstance(pos, int) and pos + tokens.shape[1] > cache.size:
            raise ModelError(f"sequence of {pos + tokens.shape[1]} tokens exceeds the cache of {cache.size}; pass "
                             f"a larger max length (or a shorter prompt)")
        x = self.embed_tokens(tokens)  # (B, T, dim)
        cos, sin = self.rope(pos, tokens.shape[1], x.dtype)
        for layer, layer_cache in zip(self.layers, cache.layers):
            x = layer(x, pos, cos, sin, layer_cache, cache.rope)
        return self.lm_head(self.norm(x))


@torch.no_grad()
def generate(step, prompt: torch.Tensor, max_new_tokens: int, temperature: float = 0.0, stop_ids=()):
    """Yield (B,) next tokens, one decode step at a time (greedy at temperature 0). step(tokens, pos) -> logits:
    the model with its cache, e.g. `lambda t, p: model(t, p, cache)`; at pos 0 it prefills the (B, T) prompt."""
    logits, pos = step(prompt, 0), prompt.shape[1]
    for _ in range(max_new_tokens):
        last = logits[:, -1].float()
        if temperature > 0:
            nxt = torch.multinomial(F.softmax(last / temperature, dim=-1), 1)[:, 0]
        else:
            nxt = last.argmax(-1)
        yield nxt
        if bool(torch.isin(nxt, torch.tensor(list(stop_ids), device=nxt.device)).all()):
            return
        logits, pos = step(nxt[:, None], pos), pos + 1
