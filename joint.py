"""One byte budget for both axes: a greedy search for each (layer, KV head)'s key rank, value rank and keep ratio.

A plan (plan.py) spends a fraction of the full cache's bytes on both axes at once. The search, in the spirit of
search.py's (MatryoshkaKV section 3.3), starts from the full cache. Each round it lowers every unit by one step in
turn (a key or a value rank by --rank-step, a keep ratio by --keep-step; one at a time, others unchanged) and
measures the continuation KL on calibration windows, with eval.py's eviction protocol: the context is prefilled
into the compressed cache, evicted after the prefill by the policy at the plan's per-head keep ratios, and the
continuation is scored against the full cache. Moves save different numbers of bytes (a keep step saves a share of
a head's entries, a rank step a share of each kept entry), so they are ranked by the KL they add per byte saved,

    cost = (KL(plan with the move) - KL(plan)) / (budget(plan) - budget(plan with the move)),

and the --per-round cheapest are applied in that order. The path is nested: every budget of --record on the way is
recorded (the first plan at or below it). With --shortlist N the search is lazy after its first round: it measures
again only the units just moved and the cheapest of the others by their last cost, N in all (a cost measured at a
larger plan stands in for the rest); that makes a round N candidates instead of every unit.

A move at layer l changes nothing before l, and eviction after the prefill changes nothing in the context's later
layers. So the protocol runs layer by layer (the context through layer l, its scores, flags and compaction, then
the continuation through layer l), and each candidate restarts from the inputs of its own layer.

The closing table scores, on the eval windows and at each recorded budget, the plan beside each axis alone at the
same bytes: eviction alone (the policy keeping that fraction, a gate with one threshold over all heads, as eval.py
scores it) and MatryoshkaKV alone (uniform ranks, and the ranks of --ranks if given).

    python joint.py --projections runs/matryoshka.safetensors --policy gate --gate runs/gate.safetensors
"""
from dataclasses import replace
from pathlib import Path

import torch
from tqdm import tqdm

from assets import load_mix, mixed_windows
from compress import load_projections, load_ranks, uniform_ranks
from errors import KVNestError, Parser, count, ratio, ratios, run_cli
from eval import eval_windows, plot_curves, score_evictions
from evict import Protocol, baseline, layer_scores
from flags import add_model_flags, model_from_flags
from gate import load_gate
from losses import kl_and_top1
from model import KVCache, LayerCache, Transformer
from plan import POLICIES, Plan, save_plans
from search import plot_ranks

UNITS = ("k", "v", "keep")  # what a move lowers: a key rank, a value rank, a keep ratio


class LayerRunner:
    """eval.score_evictions' protocol on calibration windows (N, T) (context ctx_len, then the continuation), run
    layer by layer, so that a plan that differs from the recorded one from layer l on restarts there."""

    def __init__(self, model: Transformer, full, policy, windows: torch.Tensor, ctx_len: int):
        self.model, self.full, self.policy, self.ctx = model, full, policy, ctx_len
        self.x = windows.to(model.inv_freq.device)
        self.cos, self.sin = model.rope(0, self.x.shape[1] - 1, model.lm_head.weight.dtype)
        self.ref = model(self.x[:, :-1])[:, ctx_len - 1:]  # (N, T - ctx_len, V): the full cache's predictions
        self.rope = None if full is None or not full.pre_rope else KVCache(model, 1, 1, full).rope
        L = model.args.n_layers  # the recorded plan's: hidden states entering each layer (context, continuation),
        self.inputs, self.caches, self.last = [None] * L, [None] * L, None  # caches of the context, its last output

    def layer(self, i: int, h_ctx: torch.Tensor, h_cont: torch.Tensor, plan: Plan, features,
              record: bool = False) -> tuple:
        """One layer of the protocol: (B, ctx, dim), (B, T - 1 - ctx, dim) in, the same out."""
        m, c, p = self.model, self.ctx, self.model.lm_head.weight
        block, a, size = m.layers[i], m.args, self.x.shape[1] - 1
        cache = LayerCache(h_ctx.shape[0], size, a.n_kv_heads, a.head_dim, p.dtype, p.device,
                           None if features is None else features.layer(i))
        cos, sin = self.cos[:c], self.sin[:c]
        if plan.evicts:  # scored from the layer's input, as evict.prefill's hooks do after the prefill
            scores = layer_scores(block.attn, i, block.input_layernorm(h_ctx), cos, sin, self.policy, plan.keep,
                                  Protocol())
        h_ctx = block(h_ctx, 0, cos, sin, cache, self.rope)
        if plan.evicts:
            cache.compact(self.policy.flags([scores], plan.keep[i: i + 1], True, False)[0], size - c)
        if record:
            self.caches[i] = (cache, [g.length.clone() for g in cache.groups])
        return h_ctx, block(h_cont, c, self.cos[c:], self.sin[c:], cache, self.rope)

    def continuation(self, i: int, h_cont: torch.Tensor) -> torch.Tensor:
        """Layer i's continuation over the recorded plan's cache of the context (its lengths set back first)."""
        cache, lengths = self.caches[i]
        for g, n in zip(cache.groups, lengths):
            g.length.copy_(n)  # the continuation's entries are written again over the last candidate's
        c = self.ctx
        return self.model.layers[i](h_cont, c, self.cos[c:], self.sin[c:], cache, self.rope)

    def kl(self, plan: Plan, start: int = 0, record: bool = False, same_context_after: int | None = None) -> float:
        """Continuation KL(full || plan), recomputing layers from `start` on (record: this plan becomes the
        recorded one). same_context_after: the plan's context equals the recorded plan's in the layers after this
        one (a keep move there: eviction after the prefill changes only the continuation), whose caches of the
        context are then reused; only the continuation runs through them."""
        m, c, features = self.model, self.ctx, plan.features(self.full)
        h = (m.embed_tokens(self.x[:, :c]), m.embed_tokens(self.x[:, c:-1])) if start == 0 else self.inputs[start]
        for i in range(start, m.args.n_layers):
            if record:
                self.inputs[i] = h
            if same_context_after is not None and i > same_context_after:
                h = (None, self.continuation(i, h[1]))
            else:
                h = self.layer(i, *h, plan, features, record)
        if record:
            self.last = h[0][:, -1:]
        last = self.last if h[0] is None else h[0][:, -1:]  # the context's last position: the first prediction
        logits = m.lm_head(m.norm(torch.cat([last, h[1]], 1)))  # (N, T - ctx_len, V)
        return kl_and_top1(self.ref, logits)[0].mean().item()


def lowered(plan: Plan, unit: str, layer: int, head: int, rank_step: int, keep_step: float) -> Plan | None:
    """The plan with one unit one step down; None at its floor (rank_step, keep_step)."""
    if unit == "keep":
        keep = plan.keep.clone()
        keep[layer, head] = round(float(keep[layer, head]) - keep_step, 6)
        return None if keep[layer, head] < keep_step - 1e-6 else replace(plan, keep=keep)
    ranks = getattr(plan, f"rank_{unit}").clone()
    ranks[layer, head] -= rank_step
    return None if ranks[layer, head] < rank_step else replace(plan, **{f"rank_{unit}": ranks})


@torch.no_grad()
def joint_search(model: Transformer, full, policy, policy_name: str, windows: torch.Tensor, ctx_len: int,
                 target: float, record=(0.5, 0.25, 0.125), rank_step: int = 8, keep_step: float = 0.125,
                 per_round: int | None = None, shortlist: int | None = None) -> dict:
    """Plans from the full cache down to `target`, one per budget in `record` on the way and the target:
    {budget: (Plan, {"kl": calibration KL, "budget": its exact budget})}. full: compress.Matryoshka at full rank
    (None: ranks stay at head_dim, only keep ratios move). per_round: default 64, or half the units if fewer.
    shortlist: after the first round, measure again only the units whose last cost is among the `shortlist`
    cheapest and the units just moved (lazy greedy: a cost measured at a larger plan stands for the others);
    None: every unit every round."""
    a, s = model.args, model.lm_head.weight.element_size()
    D = a.head_dim
    if not 1 <= rank_step <= D or not 0 < keep_step < 1:
        raise KVNestError(f"rank step {rank_step} must be in [1, {D}] and keep step {keep_step} in (0, 1)")
    plan = Plan.full(model, policy_name, "post_rope" if full is None else full.key_mode)
    units = [(u, i, h) for u in (UNITS if full is not None else UNITS[2:]) for i in range(a.n_layers)
             for h in range(a.n_kv_heads)]
    per_round = per_round or min(64, max(1, len(units) // 2))
    if not 1 <= per_round < len(units):
        raise KVNestError(f"{per_round} moves per round: pass 1 to {len(units) - 1} (this search has {len(units)} "
                          f"units; as many would move every unit each round)")
    floor = Plan(*(torch.full_like(plan.rank_k, rank_step if full is not None else D),) * 2,
                 torch.full_like(plan.keep, keep_step), policy_name, plan.key_mode).budget(D, s)
    if target < floor:
        raise KVNestError(f"budget {target} is below {floor:.4f}, the plan with every rank and keep at its lowest "
                          f"step; raise --budget or lower --rank-step/--keep-step")
    if shortlist is not None and not per_round <= shortlist <= len(units):
        raise KVNestError(f"a shortlist of {shortlist} units: pass {per_round} (the moves per round) to "
                          f"{len(units)} (every unit)")
    runner, found, costs = LayerRunner(model, full, policy, windows, ctx_len), {}, {}  # unit -> its last cost
    wanted = sorted({b for b in record if target <= b <= 1} | {target}, reverse=True)
    kl = runner.kl(plan, 0, record=True)
    bar = tqdm(total=round(1000 * (1 - target)), desc="joint search (per mille of the bytes saved)")
    while wanted:
        budget = plan.budget(D, s)
        while wanted and budget <= wanted[0] + 1e-9:
            found[wanted.pop(0)] = (plan, {"kl": kl, "budget": budget})
        if not wanted:
            break
        fresh = [u for u in units if u not in costs]  # never measured, or moved last round
        stale = sorted(costs, key=costs.get)  # cheapest first
        measure = set(fresh + (stale if shortlist is None else stale[:max(0, shortlist - len(fresh))]))
        candidates = []
        for unit, layer, head in tqdm([u for u in units if u in measure], desc=f"candidates at {budget:.1%}",
                                      leave=False):
            new = lowered(plan, unit, layer, head, rank_step, keep_step)
            saved = 0 if new is None else budget - new.budget(D, s)  # a first eviction of pre-RoPE keys may cost
            if saved > 0:
                after = layer if unit == "keep" else None  # a keep move changes no context
                cost = (runner.kl(new, layer, same_context_after=after) - kl) / saved
                costs[unit, layer, head] = cost
                candidates.append((cost, unit, layer, head))
            elif new is None:  # at its floor: never measured again
                units = [u for u in units if u != (unit, layer, head)]
            else:  # saves nothing now (a first rank cut adds positions to every evicting pre-RoPE head): last
                costs[unit, layer, head] = float("inf")
        if not candidates:
            raise KVNestError(f"the search stopped at budget {budget:.4f}: no move saves bytes; raise --budget")
        candidates.sort()  # cheapest first; ties keep the fixed unit order, so the search is deterministic
        for _, unit, layer, head in candidates[:per_round]:
            del costs[unit, layer, head]  # measured again next round
            plan = lowered(plan, unit, layer, head, rank_step, keep_step)
            if plan.budget(D, s) <= wanted[0] + 1e-9:
                break  # a recorded budget is reached: record it before lowering more
        kl = runner.kl(plan, 0, record=True)
        bar.n = min(bar.total, round(1000 * (1 - plan.budget(D, s))))
        bar.set_postfix(budget=f"{plan.budget(D, s):.4f}", kl=f"{kl:.4f}")
    bar.close()
    return found


def compare(model: Transformer, windows: torch.Tensor, ctx_len: int, policy, found: dict, full,
            ranks: str | None) -> dict:
    """{budget: {setting: eval.score_evictions' result with "bytes", the share of the full cache's bytes}} for the
    plan, eviction alone and MatryoshkaKV alone (uniform ranks; searched with `ranks`) at each budget. full: the
    bases at full rank the search used (None: no projections)."""
    a, s = model.args, model.lm_head.weight.element_size()
    full_bytes = KVCache(model, 1, ctx_len).nbytes()
    cells, runs = [], []
    for budget, (plan, _) in found.items():
        cells.append((budget, "eviction alone", None))
        runs.append((policy, budget, True, None))
        mats = {"MatryoshkaKV alone, uniform": uniform_ranks(model, budget)} if full is not None else {}
        if ranks and full is not None:
            mats["MatryoshkaKV alone, searched"] = load_ranks(ranks, model, budget)
        for name, (rk, rv) in mats.items():
            alone = replace(Plan.full(model, plan.policy, plan.key_mode), rank_k=rk, rank_v=rv)
            cells.append((budget, name, alone))
            runs.append((None, 1.0, None, alone.features(full)))
        cells.append((budget, "joint plan", plan))
        runs.append((policy if plan.evicts else None, plan.keep, True, plan.features(full)))
    scored, _ = score_evictions(model, windows, runs, ctx_len, desc="closing table")
    out = {}
    for (budget, name, p), r in zip(cells, scored):
        r["bytes"] = r["keep"] if p is None else p.nbytes(ctx_len, 1, a.head_dim, s) / full_bytes
        out.setdefault(budget, {})[name] = r
    return out


def write_results(path: Path, found: dict, results: dict | None, meta: dict, target: float, D: int) -> str:
    """The plans (JSON), a heatmap PNG of each, a markdown table (plan summary; with results, the comparison) and a
    PNG of KL by bytes."""
    save_plans(path, found, meta, target)
    lines = ["| budget | calibration KL | mean keep | mean K rank | mean V rank | heads evicting | heads compressed |",
             "|---|---|---|---|---|---|---|"]
    for b, (p, extra) in found.items():
        plot_ranks(p.rank_k.tolist(), p.rank_v.tolist(), b, path.with_name(f"{path.stem}_{b:g}.png"),
                   p.keep.tolist(), f"Joint plan ({p.policy})")
        lines.append(f"| {b:.1%} | {extra['kl']:.4f} | {p.keep.mean():.3f} | {p.rank_k.float().mean():.1f} | "
                     f"{p.rank_v.float().mean():.1f} | {int((p.keep < 1).sum())} | "
                     f"{int(((p.rank_k < D) | (p.rank_v < D)).sum())} |")
    if results:
        names = list(next(iter(results.values())))
        lines += ["", f"| bytes | {' | '.join(names)} |", "|---" * (len(names) + 1) + "|"]
        for b, row in results.items():
            cells = [f"{r['perplexity']:.3f} ({r['kl']:.4f}; {r['bytes']:.1%})" for r in row.values()]
            lines.append(f"| {b:.1%} | {' | '.join(cells)} |")
        lines.append("\nCells: continuation perplexity (KL to the full cache; bytes as a share of the full cache's).")
        plot_curves({n: {row[n]["bytes"]: row[n]["kl"] for row in results.values()} for n in names},
                    "share of the full cache's bytes", "KL(full || compressed)",
                    f"One budget for both axes ({next(iter(found.values()))[0].policy})",
                    path.with_suffix(".png"), invert_x=True, log_y=True)
    table = "\n".join(lines)
    path.with_suffix(".md").write_text(table + "\n")
    return table


def main(argv=None):
    p = Parser(description="Greedy search of one byte budget over both axes: per (layer, KV head) key rank, "
               "value rank and keep ratio; writes the plans as JSON and a table against each axis alone.")
    add_model_flags(p)
    p.add_argument("--projections", help="MatryoshkaKV checkpoint from train.py (without: only keep ratios move)")
    p.add_argument("--policy", choices=POLICIES, default="snapkv", help="the eviction policy that ranks entries")
    p.add_argument("--gate", help="gate checkpoint from `python train.py --method gate`, with --policy gate")
    p.add_argument("--budget", type=ratio, default=0.125, help="target share of the full cache's bytes, in (0, 1]")
    p.add_argument("--record", type=ratios, default=[0.5, 0.25, 0.125], help="budgets recorded on the way")
    p.add_argument("--data", nargs="+", help="calibration .txt/.jsonl files, FILE or FILE:WEIGHT as train.py "
                   "takes them (default: the train half of pydoc topics)")
    p.add_argument("--calib-windows", type=count, default=1, help="calibration windows, shared by the "
                   "--data sources' weights (at least one from each)")
    p.add_argument("--seq-len", type=lambda t: count(t, 3), default=512, help="tokens of each window")
    p.add_argument("--ctx-len", type=count, default=384, help="context tokens of each window; the rest is scored")
    p.add_argument("--calib-len", type=lambda t: count(t, 3), help="tokens of each calibration window (default "
                   "--seq-len; shorter windows search faster)")
    p.add_argument("--calib-ctx", type=count, help="context tokens of each calibration window (default --ctx-len)")
    p.add_argument("--rank-step", type=count, default=None, help="rank decrement (default head_dim / 8)")
    p.add_argument("--keep-step", type=ratio, default=0.125, help="keep ratio decrement, in (0, 1)")
    p.add_argument("--per-round", type=count, default=None, help="moves applied per round (1: the exact greedy; "
                   "default 64, or half the units if fewer; fewer than the units: 3 x L x H_kv with projections)")
    p.add_argument("--shortlist", type=count, help="after the first round, measure only this many units, the "
                   "cheapest at their last measurement, and those just moved (default: every unit every round)")
    p.add_argument("--ranks", help="search.py ranks file: adds MatryoshkaKV alone at searched ranks to the table")
    p.add_argument("--windows", type=count, default=8, help="eval windows of the closing table")
    p.add_argument("--no-table", action="store_true", help="skip the closing table")
    p.add_argument("--out", default="runs/plan.json")
    args = p.parse_args(argv)
    if (args.policy == "gate") != (args.gate is not None):
        raise KVNestError("--gate is the policy of --policy gate; pass both or neither")
    if args.ranks and not args.projections:
        raise KVNestError("--ranks are MatryoshkaKV ranks for --projections; pass --projections too")
    args.calib_len, args.calib_ctx = args.calib_len or args.seq_len, args.calib_ctx or args.ctx_len
    for ctx, n in (("ctx_len", "seq_len"), ("calib_ctx", "calib_len")):
        if not getattr(args, ctx) < getattr(args, n) - 1:
            raise KVNestError(f"--{ctx.replace('_', '-')} {getattr(args, ctx)} must leave continuation tokens in "
                              f"--{n.replace('_', '-')} {getattr(args, n)}")
    model, tok, folder = model_from_flags(args)
    if max(args.seq_len, args.calib_len) > model.args.max_seq_len:
        raise KVNestError(f"--seq-len/--calib-len {max(args.seq_len, args.calib_len)} exceeds the model's context "
                          f"of {model.args.max_seq_len}")
    policy = load_gate(args.gate, model)[0] if args.gate else baseline(args.policy)
    proj = load_projections(args.projections, model)[0] if args.projections else None
    with torch.no_grad():
        full = None if proj is None else proj.features(*uniform_ranks(model, 1.0))
    sources = [(tok.encode(text), w) for text, w in load_mix(args.data, "train")]
    calib = mixed_windows(sources, args.calib_len, args.calib_windows)
    step = args.rank_step or max(1, model.args.head_dim // 8)
    found = joint_search(model, full, policy, args.policy, calib, args.calib_ctx, args.budget, args.record, step,
                         args.keep_step, args.per_round, args.shortlist)
    results = None
    if not args.no_table:
        windows = eval_windows(tok, None, args.windows, args.seq_len)
        results = compare(model, windows, args.ctx_len, policy, found, full, args.ranks)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"model": model.fingerprint(), "base_model": folder, "projections": args.projections, "gate": args.gate,
            "rank_step": step, "keep_step": args.keep_step, "per_round": args.per_round,
            "shortlist": args.shortlist,
            "calibration": f"{len(calib)} x {args.calib_len} ({args.calib_ctx} context)"}
    print(write_results(out, found, results, meta, args.budget, model.args.head_dim))
    print(f"wrote {out}, {out.with_suffix('.md')}" + ("" if results is None else f", {out.with_suffix('.png')}"))


if __name__ == "__main__":
    run_cli(main)
