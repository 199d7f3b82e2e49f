"""MatryoshkaKV: trainable orthogonal projections that cut the feature dimension of the KV cache.

Lin et al., 2024, "MatryoshkaKV: Adaptive KV Compression via Trainable Orthogonal Projection". For every layer and
every KV head h (shared by its group of G query heads, so a GQA cache shrinks for real) there are two orthogonal
D x D bases, U_k and U_v. A head keeps the first `rank` columns of each (ranks are per layer, head, and K or V):

    cached key      k_c = U_k[:, :r]^T k                  (r numbers instead of D)
    attention       q^T U_k[:, :r] k_c / sqrt(D)          = q^T P_k k,  P_k = U_k[:, :r] U_k[:, :r]^T
    cached value    v_c = U_v[:, :r]^T (v - b)            b: a trained value offset, starting at zero
    output          o   = U_v[:, :r] (sum_j a_j v_c_j) + b  (U_v^T and b fold into o_proj: `fold_values`)

A key offset is not needed: it would add q^T (I - P_k) mu to every score of a query, which softmax ignores.
The bases are U = U_0 cayley(A) with cayley(A) = (I - A)(I + A)^{-1} and A = W - W^T skew-symmetric, so U stays
orthogonal for any W, and U = U_0, the PCA basis, at W = 0. Cutting a basis to its first r columns is the
Matryoshka nesting: training with randomly drawn r makes every prefix a good basis, and a search then picks each
head's rank under a global budget = sum of ranks / (2 * n_layers * H_kv * D) = cache bytes / full cache bytes.

Keys are projected after RoPE (key_mode "post_rope", the paper's) or before it ("pre_rope", as Palu does): then
the cache holds pre-RoPE features, and each step rebuilds keys U_k[:, :r] k_c and rotates them.
"""
import json
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn as nn

from assets import load_checkpoint, save_checkpoint
from model import Attention, KVNestError, Transformer, apply_rope, attention_mask, rope_cos_sin

KEY_MODES = ("post_rope", "pre_rope")


def cayley(W: torch.Tensor) -> torch.Tensor:
    """(I - A)(I + A)^{-1} with A = W - W^T: orthogonal for any W. (..., D, D)"""
    A = W - W.transpose(-1, -2)
    eye = torch.eye(W.shape[-1], dtype=W.dtype, device=W.device).expand_as(A)
    return torch.linalg.solve(eye + A, eye - A)  # the two factors commute


class Projections(nn.Module):
    """All bases of a model: U_0 (PCA, fixed), W (trained), and the value offset b. Shapes (L, H_kv, D[, D])."""

    def __init__(self, U0_k: torch.Tensor, U0_v: torch.Tensor, key_mode: str = "post_rope"):
        super().__init__()
        if key_mode not in KEY_MODES:
            raise KVNestError(f"unknown key mode {key_mode!r}; use one of {', '.join(KEY_MODES)}")
        self.key_mode = key_mode
        self.register_buffer("U0_k", U0_k.float().contiguous())
        self.register_buffer("U0_v", U0_v.float().contiguous())
        self.W_k = nn.Parameter(torch.zeros_like(self.U0_k))
        self.W_v = nn.Parameter(torch.zeros_like(self.U0_v))
        self.b_v = nn.Parameter(torch.zeros(U0_v.shape[:-1]))

    def bases(self) -> tuple[torch.Tensor, torch.Tensor]:
        """U_k, U_v: (L, H_kv, D, D), columns sorted from most to least important."""
        return self.U0_k @ cayley(self.W_k), self.U0_v @ cayley(self.W_v)


def query_heads(kv_heads: torch.Tensor, G: int) -> torch.Tensor:
    """Indices of the query heads that share the given KV heads (head h serves h*G ... h*G + G - 1). (n * G,)"""
    return (kv_heads[:, None] * G + torch.arange(G, device=kv_heads.device)).flatten()


def rank_masks(rank: torch.Tensor, D: int) -> torch.Tensor:
    """1 for the first rank[h] features of each head, 0 after. rank (H_kv,) -> (H_kv, 1, D)"""
    return (torch.arange(D, device=rank.device) < rank[:, None]).float()[:, None, :]


class MatryoshkaAttention(Attention):
    """Attention with K/V compressed to per-head ranks. Same weights as the base layer; swap in with `compress`."""

    def __init__(self, base: Attention, key_mode: str, inv_freq: torch.Tensor):
        self.share_weights(base)
        self.key_mode, self.inv_freq, self.bypass = key_mode, inv_freq, False
        D, H_kv = self.head_dim, self.n_kv_heads
        eye = torch.eye(D, device=inv_freq.device).expand(H_kv, D, D)
        self.U_k, self.U_v, self.b_v = eye, eye, torch.zeros(H_kv, D, device=inv_freq.device)
        self.rank_k = self.rank_v = torch.full((H_kv,), D, device=inv_freq.device)

    def new_cache(self, batch, max_len, dtype, device):
        return MatryoshkaCache(batch, max_len, self.rank_k.tolist(), self.rank_v.tolist(), dtype, device)

    def group(self, t: torch.Tensor, heads=None) -> torch.Tensor:
        """Repeat per-KV-head tensors (H_kv, ...) to their query heads (H, ...) (optionally for some KV heads)."""
        return (t if heads is None else t[heads]).repeat_interleave(self.n_heads // self.n_kv_heads, dim=0)

    def forward(self, x, pos, cos, sin):
        if self.bypass:  # the teacher: the base model's full-cache attention
            return super().forward(x, pos, cos, sin)
        B, T, _ = x.shape
        q, k, v = self.qkv(x)  # (B, H, T, D), (B, H_kv, T, D), (B, H_kv, T, D)
        q = apply_rope(q, cos, sin)
        if self.key_mode == "post_rope":
            k = apply_rope(k, cos, sin)
        U_k, U_v = self.U_k.to(x.dtype), self.U_v.to(x.dtype)
        k_c = k @ U_k  # (B, H_kv, T, D): all coordinates, most important first
        v_c = (v - self.b_v.to(x.dtype)[:, None]) @ U_v  # (B, H_kv, T, D)
        if self.cache is None:
            y = self.masked_attend(q, k_c, v_c, pos, cos, sin)
        else:
            y = self.cached_attend(q, *self.cache.update(pos, k_c, v_c), pos)
        y = y @ self.group(U_v).transpose(-1, -2) + self.group(self.b_v.to(x.dtype))[:, None]  # (B, H, T, D)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))

    def masked_attend(self, q, k_c, v_c, pos, cos, sin):
        """Training and uncached path: drop features past each head's rank by zeroing them. -> (B, H, T, D)"""
        D = self.head_dim
        k_c = k_c * rank_masks(self.rank_k, D).to(k_c.dtype)
        v_c = v_c * rank_masks(self.rank_v, D).to(v_c.dtype)
        if self.key_mode == "post_rope":
            return self.attend(q @ self.group(self.U_k).to(q.dtype), k_c, v_c, pos)  # scores in U_k's basis
        k = apply_rope(k_c @ self.U_k.to(k_c.dtype).transpose(-1, -2), cos, sin)  # rebuilt keys (B, H_kv, T, D)
        return self.attend(q, k, v_c, pos)

    def cached_attend(self, q, k_groups, v_groups, pos):
        """Attention over a cache that holds exactly r_h features per head, heads grouped by rank. -> (B,H,T,D)"""
        B, H, T, D = q.shape
        S = k_groups[0][1].shape[2]
        G = H // self.n_kv_heads
        scores = q.new_empty(B, H, T, S, dtype=torch.float32)
        if self.key_mode == "pre_rope":  # rotations of every cached position, for the rebuilt keys
            cos, sin = (t.to(q.dtype) for t in rope_cos_sin(self.inv_freq, torch.arange(S, device=q.device)))
        for heads, k_g in k_groups:  # k_g: (B, n, S, r)
            qh = query_heads(heads, G)
            r = k_g.shape[-1]
            if self.key_mode == "post_rope":
                q_g = q[:, qh] @ self.group(self.U_k, heads)[..., :r].to(q.dtype)  # (B, n*G, T, r)
                k_g = k_g.repeat_interleave(G, dim=1)  # (B, n*G, S, r)
            else:
                k_full = k_g @ self.U_k[heads, :, :r].transpose(-1, -2).to(k_g.dtype)  # (B, n, S, D)
                q_g, k_g = q[:, qh], apply_rope(k_full, cos, sin).repeat_interleave(G, 1)
            scores[:, qh] = (q_g @ k_g.transpose(-1, -2)).float() / D ** 0.5
        if T > 1 or self.window:
            visible = attention_mask(pos, T, S, self.window, q.device)
            scores = scores.masked_fill(~visible, float("-inf"))
        probs = scores.softmax(-1).to(q.dtype)
        y = q.new_zeros(B, H, T, D)
        for heads, v_g in v_groups:  # v_g: (B, n, S, r)
            qh = query_heads(heads, G)
            y[:, qh, :, : v_g.shape[-1]] = probs[:, qh] @ v_g.repeat_interleave(G, dim=1)  # (B, n*G, T, r)
        return y


class MatryoshkaCache(nn.Module):
    """Per layer: one static (B, n, S, r) buffer for each group of KV heads that share a rank, for K and for V."""

    def __init__(self, batch, max_len, rank_k: list, rank_v: list, dtype, device):
        super().__init__()
        self.max_len = max_len
        self.k = [(torch.tensor(h, device=device), torch.zeros(batch, len(h), max_len, r, dtype=dtype, device=device))
                  for r, h in heads_by_rank(rank_k)]
        self.v = [(torch.tensor(h, device=device), torch.zeros(batch, len(h), max_len, r, dtype=dtype, device=device))
                  for r, h in heads_by_rank(rank_v)]

    def update(self, pos, k_c, v_c):
        """Keep the first r features of the new (B, H_kv, T, D) entries; return every group's entries so far."""
        end = pos + k_c.shape[2]
        if end > self.max_len:
            raise KVNestError(f"sequence of {end} tokens exceeds the cache of {self.max_len}; pass a larger max length")
        out = []
        for groups, new in ((self.k, k_c), (self.v, v_c)):
            for heads, buf in groups:
                buf[:, :, pos:end] = new[:, heads, :, : buf.shape[-1]]
            out.append([(heads, buf[:, :, :end]) for heads, buf in groups])
        return out

    def nbytes(self) -> int:
        return sum(buf.nbytes for _, buf in self.k + self.v)


def heads_by_rank(ranks: list) -> list:
    """[(rank, [heads with that rank])], highest rank first."""
    return [(r, [h for h, x in enumerate(ranks) if x == r]) for r in sorted(set(ranks), reverse=True)]


def compress(model: Transformer, proj: Projections) -> Transformer:
    """Swap every attention layer of `model` for a MatryoshkaAttention (idempotent), then load `proj`'s bases."""
    for layer in model.layers:
        if not isinstance(layer.attn, MatryoshkaAttention):
            layer.attn = MatryoshkaAttention(layer.attn, proj.key_mode, model.inv_freq)
        layer.attn.key_mode = proj.key_mode
    set_bases(model, proj)
    return model


def set_bases(model: Transformer, proj: Projections) -> None:
    """Hand each layer its U_k, U_v and b (inside autograd, so training calls this every step)."""
    U_k, U_v = proj.bases()
    for i, layer in enumerate(model.layers):
        layer.attn.U_k, layer.attn.U_v, layer.attn.b_v = U_k[i], U_v[i], proj.b_v[i]


def set_ranks(model: Transformer, rank_k: torch.Tensor, rank_v: torch.Tensor) -> None:
    """rank_k, rank_v: (L, H_kv) integers in [1, head_dim]."""
    D = model.args.head_dim
    for name, r in (("K", rank_k), ("V", rank_v)):
        if tuple(r.shape) != (model.args.n_layers, model.args.n_kv_heads):
            raise KVNestError(f"{name} ranks have shape {tuple(r.shape)}, the model needs "
                              f"({model.args.n_layers}, {model.args.n_kv_heads}); use a ranks file made for it")
        if int(r.min()) < 1 or int(r.max()) > D:
            raise KVNestError(f"{name} rank {int(r.max()) if int(r.max()) > D else int(r.min())} is outside "
                              f"[1, head_dim={D}]; choose ranks between 1 and {D}")
    for i, layer in enumerate(model.layers):
        layer.attn.rank_k, layer.attn.rank_v = rank_k[i].to(model.inv_freq.device), rank_v[i].to(model.inv_freq.device)


def uniform_ranks(model: Transformer, budget: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The same rank round(budget * D) for every head, K and V."""
    check_budget(budget)
    a = model.args
    r = torch.full((a.n_layers, a.n_kv_heads), max(1, round(budget * a.head_dim)), dtype=torch.long)
    return r, r.clone()


def check_budget(budget: float) -> None:
    if not 0 < budget <= 1:
        raise KVNestError(f"budget {budget} is outside (0, 1]; pass the kept fraction of the cache, e.g. 0.5")


def budget_of(rank_k: torch.Tensor, rank_v: torch.Tensor, head_dim: int) -> float:
    return float(rank_k.sum() + rank_v.sum()) / (2 * rank_k.numel() * head_dim)


@contextmanager
def full_cache(model: Transformer):
    """Inside, every MatryoshkaAttention runs the base model's attention: the full-cache teacher."""
    swapped = [layer.attn for layer in model.layers if isinstance(layer.attn, MatryoshkaAttention)]
    for attn in swapped:
        attn.bypass = True
    try:
        yield model
    finally:
        for attn in swapped:
            attn.bypass = False


@torch.no_grad()
def pca_projections(model: Transformer, windows: torch.Tensor, key_mode: str = "post_rope") -> Projections:
    """PCA bases from calibration windows (N, T): eigenvectors of the uncentered second moment X^T X of keys
    (after or before RoPE) and of values, per (layer, KV head), sorted by descending eigenvalue."""
    a = model.args
    moments = {kind: torch.zeros(a.n_layers, a.n_kv_heads, a.head_dim, a.head_dim, dtype=torch.float64)
               for kind in "kv"}

    def hook(layer: int, kind: str):
        def fn(module, inputs, out):
            B, T, _ = out.shape
            x = out.view(B, T, a.n_kv_heads, a.head_dim).transpose(1, 2).float()  # (B, H_kv, T, D)
            if kind == "k" and key_mode == "post_rope":
                cos, sin = rope_cos_sin(model.inv_freq, torch.arange(T, device=x.device))
                x = apply_rope(x, cos, sin)
            moments[kind][layer] += torch.einsum("bhtd,bhte->hde", x, x).double().cpu()
        return fn

    handles = [m.register_forward_hook(hook(i, kind)) for i, layer in enumerate(model.layers)
               for kind, m in (("k", layer.attn.k_proj), ("v", layer.attn.v_proj))]
    try:
        with full_cache(model):
            for w in windows:
                model(w[None].to(model.inv_freq.device))
    finally:
        for h in handles:
            h.remove()
    bases = [torch.linalg.eigh(moments[kind])[1].flip(-1).float() for kind in "kv"]  # descending eigenvalues
    return Projections(*bases, key_mode=key_mode).to(model.inv_freq.device)


def fold_values(o_weight: torch.Tensor, U_v: torch.Tensor, b_v: torch.Tensor, rank_v: list, n_heads: int):
    """Fold U_v[:, :r]^T and b into o_proj: o_proj(U_v y_c + b) = W_fold y_c + bias, y_c the attention output in
    the compressed space, concatenated over query heads (sum of G * r_h features). o_weight: (dim, H * D)."""
    H_kv, D, _ = U_v.shape
    G = n_heads // H_kv
    W = o_weight.view(o_weight.shape[0], H_kv, G, D)  # (dim, H_kv, G, D)
    parts = [W[:, h, g] @ U_v[h, :, : rank_v[h]] for h in range(H_kv) for g in range(G)]  # (dim, r_h) each
    bias = torch.einsum("ohgd,hd->o", W, b_v)
    return torch.cat(parts, dim=1), bias


def save_projections(path, proj: Projections, meta: dict, extra: dict | None = None) -> None:
    """Atomically write the bases (and optional extra tensors such as optimizer state) with JSON metadata."""
    save_checkpoint(path, {**proj.state_dict(), **(extra or {})}, dict(meta, kvnest="matryoshka",
                                                                       key_mode=proj.key_mode))


def load_projections(path, model: Transformer) -> tuple[Projections, dict, dict]:
    """Projections, metadata and any extra tensors of a checkpoint made for this model; refuses any other."""
    tensors, meta = load_checkpoint(path, model, "matryoshka", "python train.py")
    proj = Projections(tensors.pop("U0_k"), tensors.pop("U0_v"), meta["key_mode"])
    proj.load_state_dict({k: tensors.pop(k) for k in ("W_k", "W_v", "b_v")}, strict=False)
    return proj.to(model.inv_freq.device), meta, tensors


def load_ranks(path, model: Transformer, budget: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Ranks from a search.py JSON file: the entry for `budget` (or the file's only/target entry)."""
    if not Path(path).is_file():
        raise KVNestError(f"ranks file {path} does not exist; make one with `python search.py`")
    data = json.loads(Path(path).read_text())
    if data.get("model") != model.fingerprint():
        raise KVNestError(f"ranks file {path} was made for another model; run search.py for this model")
    entries = data["budgets"]
    key = f"{budget:g}" if budget is not None else data["target"]
    if key not in entries:
        raise KVNestError(f"ranks file {path} has no entry for budget {key}; it has {', '.join(entries)}")
    return torch.tensor(entries[key]["k"]), torch.tensor(entries[key]["v"])


def compress_from_flags(model: Transformer, projections: str, budget: float | None, ranks: str | None):
    """What the scripts' --projections/--budget/--ranks flags mean: compress `model` in place, return ranks."""
    proj, _, _ = load_projections(projections, model)
    if budget is None and ranks is None:
        raise KVNestError("--projections needs --budget (uniform ranks) or --ranks (a search.py file)")
    rank_k, rank_v = load_ranks(ranks, model, budget) if ranks else uniform_ranks(model, budget)
    compress(model, proj)
    set_ranks(model, rank_k, rank_v)
    return rank_k, rank_v
