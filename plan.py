"""One byte budget for both axes: a joint plan gives every (layer, KV head) a key rank, a value rank and a keep ratio.

MatryoshkaKV (compress.py) cuts the features of every entry; eviction (evict.py, gate.py) cuts entries. A plan says
how much of each, per head: head (l, h) keeps n_lh = max(1, round(T keep_lh)) of a context's T entries, each stored
as r_k key and r_v value coordinates. Its cache then holds, in a cache dtype of s bytes,

    bytes_lh = (n_lh + room) ((r_k + r_v) s + 8 [pre-RoPE keys, n_lh < T])

The last term is the int64 position each kept entry needs when keys stored before RoPE are rotated at read time
(model.HeadGroup.pos); a head that keeps everything needs none. A plan's `budget` is its share of the full cache's
bytes (L H_kv 2 D s per token), with keep_lh in place of n_lh / T:

    budget = sum_lh keep_lh (r_k + r_v + 8 / s [pre-RoPE, keep_lh < 1]) / (L H_kv 2 D)

A plan with every rank at D stores entries as they are (no bases); one with every keep at 1 evicts nothing. Plans
are written by joint.py's search as JSON (one entry per budget, like search.py's ranks files) and read by the
scripts' --plan flag (flags.py): eval.py scores them, generate.py and kernels.Decoder decode from them, bench.py
times them, and hf.py's compress_cache(plan=...) runs a transformers model over them.
"""
import json
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from compress import Matryoshka, load_projections, read_entry, read_tables, uniform_ranks
from errors import KVNestError
from evict import BASELINES, baseline
from model import Transformer

POLICIES = (*BASELINES, "gate")
POSITION_BYTES = 8  # an int64 per kept entry of a pre-RoPE head that evicts


@dataclass
class Plan:
    """Per (layer, KV head): ranks rank_k, rank_v (L, H_kv) and keep ratios keep (L, H_kv, float64); the eviction
    policy that ranks the entries (an evict.py baseline or "gate"); the key mode of the bases it was made for."""
    rank_k: torch.Tensor
    rank_v: torch.Tensor
    keep: torch.Tensor
    policy: str
    key_mode: str = "pre_rope"

    @classmethod
    def full(cls, model: Transformer, policy: str, key_mode: str) -> "Plan":
        a = model.args
        D = torch.full((a.n_layers, a.n_kv_heads), a.head_dim)
        return cls(D, D.clone(), torch.ones(D.shape, dtype=torch.float64), policy, key_mode)

    def compressed(self, head_dim: int) -> bool:
        return bool((self.rank_k < head_dim).any() or (self.rank_v < head_dim).any())

    @property
    def evicts(self) -> bool:
        return bool((self.keep < 1).any())

    def positions(self, head_dim: int, kept_all: torch.Tensor) -> torch.Tensor:
        """(L, H_kv) 1 where a head stores its entries' positions: pre-RoPE bases and some entry evicted."""
        pre = self.key_mode == "pre_rope" and self.compressed(head_dim)
        return (~kept_all).double() * pre

    def budget(self, head_dim: int, itemsize: int) -> float:
        """The plan's share of the full cache's bytes, for contexts long enough that n_lh / T = keep_lh."""
        extra = POSITION_BYTES / itemsize * self.positions(head_dim, self.keep >= 1)
        return float((self.keep * (self.rank_k + self.rank_v + extra)).sum()) / (2 * self.keep.numel() * head_dim)

    def nbytes(self, context: int, batch: int, head_dim: int, itemsize: int, room: int = 0) -> int:
        """The exact bytes of the cache tensors after a prefill of `context` tokens, with `room` more slots."""
        n = (context * self.keep).round().clamp(min=1).long()  # n_lh, as evict.kept_count rounds
        pos = POSITION_BYTES * self.positions(head_dim, n == context).long()
        return int((batch * (n + room) * ((self.rank_k + self.rank_v) * itemsize + pos)).sum())

    def features(self, full: Matryoshka | None):
        """The Matryoshka features to build caches with, from the bases at full rank (`full`); None when every
        rank is head_dim: entries are then stored as they are."""
        if full is None or not self.compressed(full.U_k.shape[-1]):
            return None
        return replace(full, rank_k=self.rank_k.clone(), rank_v=self.rank_v.clone())

    def entry(self) -> dict:
        return {"k": self.rank_k.tolist(), "v": self.rank_v.tolist(), "keep": self.keep.tolist()}


def save_plans(path: Path, plans: dict, meta: dict, target: float) -> None:
    """Write {budget: (Plan, extra dict)} as JSON atomically, with the model's fingerprint and the run in meta."""
    first = next(iter(plans.values()))[0]
    data = dict(meta, policy=first.policy, key_mode=first.key_mode, target=f"{target:g}",
                budgets={f"{b:g}": dict(p.entry(), **extra) for b, (p, extra) in plans.items()})
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    tmp.replace(path)


def load_plan(path, model: Transformer, budget: float | None = None) -> Plan:
    """The plan for `budget` (or the file's target) from a joint.py file made for this model."""
    data, entry, key = read_entry(path, model, budget, "plan", "joint.py")
    where, fix = f"plan {path}, budget {key}", "; make it again with `python joint.py`"
    D = model.args.head_dim
    rank_k, rank_v = read_tables(entry, "kv", model, lambda x: type(x) is int and 1 <= x <= D,
                                 f"whole numbers in [1, {D}]{fix}", where)
    keep, = read_tables(entry, ["keep"], model, lambda x: type(x) in (int, float) and 0 < x <= 1,
                        f"fractions in (0, 1]{fix}", where)
    policy, key_mode = data.get("policy"), data.get("key_mode")
    if policy not in POLICIES or key_mode not in ("pre_rope", "post_rope"):
        raise KVNestError(f"plan {path} names no valid policy ({policy!r}) or key mode ({key_mode!r}){fix}")
    return Plan(rank_k, rank_v, keep.double(), policy, key_mode)


def plan_compression(model: Transformer, path, budget: float | None, projections, gate) -> tuple:
    """(Plan, features, policy) of the plan in `path` for `budget`: its ranks cut the bases of `projections` (the
    checkpoint it was searched with), its policy (the `gate` checkpoint for a gate plan) keeps each head's own top
    n. The files must be the ones the plan needs, no more."""
    plan = load_plan(path, model, budget)
    if plan.compressed(model.args.head_dim) != bool(projections):
        raise KVNestError(f"plan {path} " + ("cuts ranks: pass the projections it was searched with"
                          if projections is None else "keeps every rank: drop the projections"))
    if (plan.policy == "gate" and plan.evicts) != bool(gate):
        raise KVNestError(f"plan {path} evicts with {plan.policy if plan.evicts else 'nothing'}: "
                          + ("pass its gate checkpoint" if gate is None else "drop the gate"))
    full = None
    if projections:
        proj = load_projections(projections, model)[0]
        if proj.key_mode != plan.key_mode:
            raise KVNestError(f"plan {path} was searched for keys {plan.key_mode}, the projections hold "
                              f"{proj.key_mode}; pass the projections it was searched with")
        with torch.no_grad():
            full = proj.features(*uniform_ranks(model, 1.0))
    if not plan.evicts:
        return plan, plan.features(full), None
    from gate import load_gate
    policy = load_gate(gate, model)[0] if gate else baseline(plan.policy)
    return plan, plan.features(full), policy
