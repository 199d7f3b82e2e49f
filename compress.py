"""MatryoshkaKV: trainable orthogonal projections that cut the feature dimension of the KV cache.

Lin et al., 2024, "MatryoshkaKV: Adaptive KV Compression via Trainable Orthogonal Projection". For every layer and
every KV head h (shared by its group of G query heads, so a GQA cache shrinks for real) there are two orthogonal
D x D bases, U_k and U_v. A head keeps the first `rank` columns of each (ranks are per layer, head, and K or V):

    cached key      k_c = U_k[:, :r]^T k                  (r numbers instead of D)
    attention       q^T U_k[:, :r] k_c / sqrt(D)          = q^T P_k k,  P_k = U_k[:, :r] U_k[:, :r]^T
    cached value    v_c = U_v[:, :r]^T (v - b)            b: a trained value offset, starting at zero
    output          o   = U_v[:, :r] (sum_j a_j v_c_j) + b

A key offset is not needed: it would add q^T (I - P_k) mu to every score of a query, which softmax ignores.
The bases are U = U_0 cayley(A) with cayley(A) = (I - A)(I + A)^{-1} and A = W - W^T skew-symmetric, so U stays
orthogonal for any W, and U = U_0, the PCA basis, at W = 0. Cutting a basis to its first r columns is the
Matryoshka nesting: training with randomly drawn r makes every prefix a good basis, and a search then picks each
head's rank under a global budget = sum of ranks / (2 * n_layers * H_kv * D) = cache bytes / full cache bytes.

Keys are projected after RoPE (key_mode "post_rope", the paper's) or before it ("pre_rope", as Palu does): then
the cache holds pre-RoPE features, and each read rebuilds keys U_k[:, :r] k_c and rotates them.

This file makes the bases (`Projections`: PCA, the Cayley parameters, checkpoints) and the feature transform a cache
is built with (`Matryoshka`: bases cut to ranks); model.py's cache stores and reads the compressed entries.

    mat = load_projections("runs/matryoshka.safetensors", model)[0].features(*uniform_ranks(model, 0.5))
    logits = model(tokens, 0, KVCache(model, batch=1, size=512, features=mat))
"""
import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from checkpoints import load_checkpoint, load_into, made_for, save_checkpoint
from errors import KVNestError, check_ratio
from model import Transformer, apply_rope, rope_cos_sin

KEY_MODES = ("post_rope", "pre_rope")


def cayley(W: torch.Tensor) -> torch.Tensor:
    """(I - A)(I + A)^{-1} with A = W - W^T: orthogonal for any W. (..., D, D)"""
    A = W - W.transpose(-1, -2)
    eye = torch.eye(W.shape[-1], dtype=W.dtype, device=W.device).expand_as(A)
    return torch.linalg.solve(eye + A, eye - A)  # the two factors commute


@dataclass
class Matryoshka:
    """The feature transform a KVCache is built with: bases U_k, U_v (L, H_kv, D, D), value offsets b_v (L, H_kv, D)
    and ranks (L, H_kv) for K and V; each (layer, head) stores the first `rank` coordinates of its basis."""
    U_k: torch.Tensor
    U_v: torch.Tensor
    b_v: torch.Tensor
    rank_k: torch.Tensor
    rank_v: torch.Tensor
    key_mode: str = "post_rope"

    def layer(self, i: int) -> tuple:
        """(U_k per head (D, r_k), U_v per head (D, r_v), b_v (H_kv, D), pre_rope) of layer i: what model.py reads."""
        cut = lambda U, r: [U[i, h, :, : int(r[i, h])] for h in range(U.shape[1])]  # noqa: E731
        return cut(self.U_k, self.rank_k), cut(self.U_v, self.rank_v), self.b_v[i], self.pre_rope

    @property
    def pre_rope(self) -> bool:
        return self.key_mode == "pre_rope"

    def budget(self) -> float:
        return budget_of(self.rank_k, self.rank_v, self.U_k.shape[-1])


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

    def features(self, rank_k: torch.Tensor, rank_v: torch.Tensor) -> Matryoshka:
        """The bases cut to ranks (L, H_kv), inside autograd (training calls this every step)."""
        L, H_kv, D, _ = self.U0_k.shape
        for name, r in (("K", rank_k), ("V", rank_v)):
            if tuple(r.shape) != (L, H_kv):
                raise KVNestError(f"{name} ranks have shape {tuple(r.shape)}, the model needs ({L}, {H_kv}); use a "
                                  f"ranks file made for it")
            if int(r.min()) < 1 or int(r.max()) > D:
                raise KVNestError(f"{name} rank {int(r.max()) if int(r.max()) > D else int(r.min())} is outside "
                                  f"[1, head_dim={D}]; choose ranks between 1 and {D}")
        return Matryoshka(*self.bases(), self.b_v, rank_k.cpu(), rank_v.cpu(), self.key_mode)

    def pca(self) -> "Projections":
        """The PCA start of these projections (W = 0, b = 0)."""
        return Projections(self.U0_k, self.U0_v, self.key_mode).to(self.U0_k.device)


def uniform_ranks(model: Transformer, budget: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The same rank round(budget * D) for every head, K and V."""
    check_ratio(budget, "budget")
    a = model.args
    r = torch.full((a.n_layers, a.n_kv_heads), max(1, round(budget * a.head_dim)), dtype=torch.long)
    return r, r.clone()


def budget_of(rank_k: torch.Tensor, rank_v: torch.Tensor, head_dim: int) -> float:
    return float(rank_k.sum() + rank_v.sum()) / (2 * rank_k.numel() * head_dim)


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
        for w in windows:
            model(w[None].to(model.inv_freq.device))
    finally:
        for h in handles:
            h.remove()
    bases = [torch.linalg.eigh(moments[kind])[1].flip(-1).float() for kind in "kv"]  # descending eigenvalues
    return Projections(*bases, key_mode=key_mode).to(model.inv_freq.device)


def save_projections(path, proj: Projections, meta: dict, extra: dict | None = None) -> None:
    """Atomically write the bases (and optional extra tensors such as optimizer state) with JSON metadata."""
    save_checkpoint(path, {**proj.state_dict(), **(extra or {})}, dict(meta, kvnest="matryoshka",
                                                                       key_mode=proj.key_mode))


def load_projections(path, model: Transformer) -> tuple[Projections, dict, dict]:
    """Projections, metadata and any extra tensors of a checkpoint made for this model; refuses any other."""
    tensors, meta = load_checkpoint(path, model, "matryoshka", "python train.py")
    a = model.args
    shape = (a.n_layers, a.n_kv_heads, a.head_dim, a.head_dim)
    proj = Projections(torch.zeros(shape), torch.zeros(shape), meta.get("key_mode"))
    load_into(proj, tensors, path)
    return proj.to(model.inv_freq.device), meta, tensors


def read_entry(path, model: Transformer, budget: float | None, what: str, script: str) -> tuple[dict, dict, str]:
    """(the file's JSON, its entry for `budget` (or for the file's target), that entry's key) of a file of budget
    entries made for this model by `python script` (search.py's ranks, joint.py's plans)."""
    if not Path(path).is_file():
        raise KVNestError(f"{what} {path} does not exist; make one with `python {script}`")
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        entries, target = data["budgets"], data["target"]
    except (ValueError, KeyError, TypeError):  # ValueError: not UTF-8 or not JSON
        entries = target = None
    if not isinstance(entries, dict) or not all(isinstance(e, dict) for e in entries.values()):
        raise KVNestError(f"{what} {path} is not a {script} file (an object with 'model', 'budgets' and "
                          f"'target'); make it again with `python {script}`")
    if not made_for(data.get("model"), model):
        raise KVNestError(f"{what} {path} was made for another model; run {script} for this model")
    key = f"{budget:g}" if budget is not None else target
    if key not in entries:
        raise KVNestError(f"{what} {path} has no entry for budget {key}; it has {', '.join(entries)}")
    return data, entries[key], key


def read_tables(entry: dict, names: str, model: Transformer, ok, values: str, where: str) -> list:
    """entry[name] for each name as an (n_layers, H_kv) tensor, every value passing ok(value); else one line."""
    a, out = model.args, []
    for name in names:
        rows = entry.get(name)
        if not (isinstance(rows, list) and len(rows) == a.n_layers and all(
                isinstance(row, list) and len(row) == a.n_kv_heads and all(ok(x) for x in row) for row in rows)):
            raise KVNestError(f"{where}: {' and '.join(map(repr, names))} must each be {a.n_layers} lists of "
                              f"{a.n_kv_heads} {values}")
        out.append(torch.tensor(rows))
    return out


def load_ranks(path, model: Transformer, budget: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Ranks from a search.py JSON file: the entry for `budget` (or the file's target entry)."""
    _, entry, key = read_entry(path, model, budget, "ranks file", "search.py")
    rank_k, rank_v = read_tables(entry, "kv", model, lambda x: type(x) is int, "whole numbers; make it again with "
                                 "`python search.py`", f"ranks file {path}, budget {key}")
    return rank_k, rank_v


def features_from_flags(model: Transformer, projections: str, budget: float | None, ranks: str | None):
    """What the scripts' --projections/--budget/--ranks flags mean: the Matryoshka features to build caches with."""
    proj, _, _ = load_projections(projections, model)
    if budget is None and ranks is None:
        raise KVNestError("--projections needs --budget (uniform ranks) or --ranks (a search.py file)")
    rank_k, rank_v = load_ranks(ranks, model, budget) if ranks else uniform_ranks(model, budget)
    with torch.no_grad():
        return proj.features(rank_k, rank_v)
