"""Greedy budget search for MatryoshkaKV: give each (layer, KV head, K or V) its own rank under a global budget.

MatryoshkaKV (Lin et al., 2024), section 3.3. Start from full ranks. Each round, lower every unit's rank by one step
in turn (one candidate at a time, others unchanged), measure KL(full || compressed) on calibration text, and keep
the `per_round` lowerings that raise it least, applied in that order. Stop once

    budget = sum of ranks / (2 * n_layers * H_kv * head_dim)

reaches the target. `--per-round 1` is the paper's exact greedy; larger values (the batched variant) evaluate the
candidates once for several decrements and run many times faster. The path is nested, so one search records the
ranks at every budget of the sweep it passes (each hit exactly: decrements are applied one by one).

A candidate at layer l changes nothing before l, so its forward restarts from the cached input of layer l.

The batched greedy ranks each decrement by its cost alone; at low ranks the costs compound and it misses better
ranks. `--refine N` then runs N rounds of swap refinement at the target: one rank step moves from one unit to
another (the bytes stay the same) where that lowers the calibration KL; with `--refine-check N`, only where it
lowers the KL on N held-out windows of the same mix too. With `--start RANKS` it refines the ranks of an earlier
search at --budget instead of searching anew.

    python search.py --projections runs/matryoshka.safetensors --budget 0.25   # writes runs/ranks.json + PNGs
    python search.py --projections runs/matryoshka.safetensors --budget 0.25 --refine 3   # + swap refinement
"""
import json
from dataclasses import replace
from pathlib import Path

import torch
from tqdm import tqdm

from assets import load_mix, mixed_windows
from compress import Projections, budget_of, load_projections, load_ranks
from errors import KVNestError, Parser, check_ratio, count, ratio, run_cli, size
from eval import SWEEP_BUDGETS
from flags import add_model_flags, model_from_flags
from losses import kl_and_top1
from model import KVCache, Transformer


class SuffixRunner:
    """Forward passes over fixed calibration windows under ranks that change one unit at a time.

    `ranks` ({"k", "v"}: (n_layers, H_kv) each) are the current ranks, changed in place."""

    def __init__(self, model: Transformer, proj: Projections, windows: torch.Tensor, ranks: dict):
        self.model, self.x, self.ranks = model, windows.to(model.inv_freq.device), ranks
        N, T = windows.shape
        self.cos, self.sin = model.rope(0, T, model.lm_head.weight.dtype)
        self.ref = model(self.x)  # (N, T, V) full-cache logits
        self.inputs = [None] * model.args.n_layers  # input of each layer under the current ranks
        D = model.args.head_dim
        self.full = proj.features(*(torch.full((model.args.n_layers, model.args.n_kv_heads), D),) * 2)  # bases once

    def shift(self, changes: list, sign: int = 1) -> None:
        for kind, layer, head, d in changes:  # changes: [(kind, layer, head, rank delta)]
            self.ranks[kind][layer, head] += sign * d

    def measure(self, changes: list = (), keep: bool = False) -> float:
        """KL(full || compressed) with `changes` applied; they stay applied, with the layer inputs they give, only
        if `keep`. Layers before the first changed one reuse their inputs."""
        self.shift(changes)
        cache = KVCache(self.model, *self.x.shape, replace(self.full, rank_k=self.ranks["k"], rank_v=self.ranks["v"]))
        m, start = self.model, min((c[1] for c in changes), default=0)
        h = m.embed_tokens(self.x) if start == 0 else self.inputs[start]
        for i in range(start, m.args.n_layers):
            if keep:
                self.inputs[i] = h
            h = m.layers[i](h, 0, self.cos, self.sin, cache.layers[i], cache.rope)
        if not keep:
            self.shift(changes, -1)
        return kl_and_top1(self.ref, m.lm_head(m.norm(h)))[0].mean().item()


def check_per_round(model: Transformer, per_round: int) -> None:
    units = 2 * model.args.n_layers * model.args.n_kv_heads  # a K and a V rank per (layer, KV head)
    if not 1 <= per_round < units:
        raise KVNestError(f"{per_round} decrements per round: pass 1 to {units - 1} (this model has {units} ranks; "
                          f"{units} or more would lower every rank each round, i.e. uniform ranks)")


@torch.no_grad()
def greedy_search(model: Transformer, proj: Projections, windows: torch.Tensor, target: float, step: int,
                  per_round: int, record: tuple = SWEEP_BUDGETS, min_rank: int | None = None) -> dict:
    """Ranks of `proj` at every budget in `record` down to `target` (both included): {budget: {"k", "v", "kl"}}."""
    check_ratio(target, "budget")
    a, D = model.args, model.args.head_dim
    if not 1 <= step <= D:
        raise KVNestError(f"rank step {step} is outside [1, head_dim={D}]")
    min_rank = step if min_rank is None else min_rank
    if not 1 <= min_rank <= D:
        raise KVNestError(f"minimum rank {min_rank} is outside [1, head_dim={D}]")
    check_per_round(model, per_round)
    ranks = {"k": torch.full((a.n_layers, a.n_kv_heads), D), "v": torch.full((a.n_layers, a.n_kv_heads), D)}
    total = 2 * a.n_layers * a.n_kv_heads * D
    floor = 2 * a.n_layers * a.n_kv_heads * min_rank / total
    if target < floor:
        raise KVNestError(f"budget {target} is below {floor:.3f}, the budget at the minimum rank {min_rank}; "
                          f"raise --budget or lower --min-rank")
    wanted = sorted({b for b in record if target <= b <= 1} | {target}, reverse=True)
    runner, found = SuffixRunner(model, proj, windows, ranks), {}
    kl = runner.measure(keep=True)
    bar = tqdm(total=round((1 - target) * total / step), desc="search")
    while wanted:
        budget = budget_of(ranks["k"], ranks["v"], D)
        while wanted and budget <= wanted[0] + 1e-9:
            found[wanted.pop(0)] = {"k": ranks["k"].tolist(), "v": ranks["v"].tolist(), "kl": kl}
        if not wanted:
            break
        candidates = []
        for kind in "kv":
            for layer in range(a.n_layers):
                for head in range(a.n_kv_heads):
                    if ranks[kind][layer, head] - step >= min_rank:
                        candidates.append((runner.measure([(kind, layer, head, -step)]), kind, layer, head))
        if not candidates:
            break
        candidates.sort()  # smallest KL first; ties keep the fixed unit order, so the search is deterministic
        for _, kind, layer, head in candidates[:per_round]:
            ranks[kind][layer, head] -= step
            bar.update(1)
            if budget_of(ranks["k"], ranks["v"], D) <= wanted[0] + 1e-9:
                break  # a recorded budget is hit exactly: record it before lowering more
        kl = runner.measure(keep=True)
        bar.set_postfix(budget=f"{budget_of(ranks['k'], ranks['v'], D):.3f}", kl=f"{kl:.4f}")
    bar.close()
    return found


@torch.no_grad()
def swap_refine(model: Transformer, proj: Projections, windows: torch.Tensor, entry: dict, step: int,
                min_rank: int, rounds: int, tries: int = 16, check: torch.Tensor | None = None) -> dict:
    """Local search at the bytes of `entry` ({"k", "v"}): move one rank step from one unit to another.

    The batched greedy ranks each decrement by what it costs alone, and those costs compound at low ranks. Each
    round here measures every unit one step up and one step down (the others unchanged), predicts the change of a
    swap (one unit up, another down; the bytes stay the same) as the sum of the two, and measures the `tries`
    best predicted swaps in that order on the current ranks, keeping each one that lowers the KL. With `check`
    (held-out windows), a swap is kept only if it lowers the KL on them too: a swap that fits the calibration
    tokens alone is dropped. It stops after `rounds` rounds or a round that keeps none, so the KL it returns is
    never above the entry's. Returns {"k", "v", "kl", "start"}, where "start" holds the entry's ranks and their
    KL; with `check`, both also hold "check_kl", the KL on the check windows."""
    D, L, H = model.args.head_dim, model.args.n_layers, model.args.n_kv_heads
    ranks = {"k": torch.tensor(entry["k"]), "v": torch.tensor(entry["v"])}
    runners = [SuffixRunner(model, proj, windows, ranks)]
    if check is not None:  # its own copy of the ranks, moved in step with the calibration's
        runners.append(SuffixRunner(model, proj, check, {k: r.clone() for k, r in ranks.items()}))
    measure = runners[0].measure
    kls = [r.measure(keep=True) for r in runners]  # current KL on the calibration (and the check windows)
    units = [(k, l, h) for k in "kv" for l in range(L) for h in range(H)]
    names = ["kl", "check_kl"][:len(runners)]
    start = dict(k=entry["k"], v=entry["v"], **dict(zip(names, kls)))
    bar = tqdm(range(rounds), desc="swap refine")
    for _ in bar:
        kl = kls[0]
        up = sorted((measure([(*u, step)]) - kl, u) for u in units if ranks[u[0]][u[1:]] + step <= D)
        down = sorted((measure([(*u, -step)]) - kl, u) for u in units if ranks[u[0]][u[1:]] - step >= min_rank)
        pairs = sorted((gu + gd, a, b) for gu, a in up for gd, b in down if a != b and gu + gd < 0)
        moved, measured, kept = set(), 0, 0
        for _, a, b in pairs:
            if measured == tries:
                break
            if a in moved or b in moved:  # its prediction is stale: one of its units moved this round
                continue
            swap, measured, tried = [(*a, step), (*b, -step)], measured + 1, []
            for r, old in zip(runners, kls):  # the check windows only once the calibration agrees
                tried.append((r, r.inputs[:], r.measure(swap, keep=True)))
                if tried[-1][2] >= old:
                    break
            if len(tried) == len(runners) and all(new < old for (_, _, new), old in zip(tried, kls)):
                kls, kept = [new for _, _, new in tried], kept + 1
                moved |= {a, b}
            else:  # not kept: back to the ranks and layer inputs before it
                for r, saved, _ in tried:
                    r.shift(swap, -1)
                    r.inputs = saved
        bar.set_postfix(kl=f"{kls[0]:.4f}", kept=kept)
        if not kept:
            break
    return dict(k=ranks["k"].tolist(), v=ranks["v"].tolist(), **dict(zip(names, kls)), start=start)


def write_results(found: dict, path: Path, meta: dict, target: float) -> None:
    """ranks JSON (what eval.py and model.py read), a markdown summary, and one heatmap PNG per budget."""
    data = dict(meta, target=f"{target:g}", budgets={f"{b:g}": v for b, v in found.items()})
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    tmp.replace(path)
    lines = ["| budget | calibration KL | mean K rank | mean V rank | K ranks by layer (heads) | V ranks by layer |",
             "|---|---|---|---|---|---|"]
    for b, e in found.items():
        k, v = torch.tensor(e["k"]).float(), torch.tensor(e["v"]).float()
        fmt = lambda r: " ".join("/".join(str(x) for x in row) for row in r)  # noqa: E731
        lines.append(f"| {b:.1%} | {e['kl']:.4f} | {k.mean():.1f} | {v.mean():.1f} | {fmt(e['k'])} | {fmt(e['v'])} |")
        plot_ranks(e["k"], e["v"], b, path.with_name(f"{path.stem}_{b:g}.png"))
    lines += [f"\nSwap refinement at {b:.1%}: calibration KL {e['start']['kl']:.4f} -> {e['kl']:.4f}"
              + (f", check windows' KL {e['start']['check_kl']:.4f} -> {e['check_kl']:.4f}" if "check_kl" in e
                 else "") for b, e in found.items() if "start" in e]
    path.with_suffix(".md").write_text("\n".join(lines) + "\n")


def plot_ranks(rank_k: list, rank_v: list, budget: float, path: Path, keep: list | None = None,
               title: str = "MatryoshkaKV searched ranks") -> None:
    """Heatmaps of K and V ranks per layer and KV head (and of keep ratios, for a joint plan)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    panels = [(rank_k, "K ranks"), (rank_v, "V ranks")] + ([(keep, "keep ratio")] if keep is not None else [])
    fig, axes = plt.subplots(1, len(panels), figsize=(3 * len(panels), 8), sharey=True)
    top = max(max(r) for r in rank_k + rank_v)
    for ax, (table, name) in zip(axes, panels):
        im = ax.imshow(table, aspect="auto", cmap="viridis", vmin=0, vmax=1 if table is keep else top)
        for (layer, head), r in ((divmod(i, len(table[0])), r) for i, r in enumerate(sum(table, []))):
            ax.text(head, layer, f"{r:g}", ha="center", va="center", fontsize=6, color="w")
        ax.set(title=name, xlabel="KV head", xticks=range(len(table[0])))
        if table is keep:
            fig.colorbar(im, ax=ax, shrink=0.6, label="keep")
    axes[0].set_ylabel("layer")
    fig.colorbar(im if keep is None else axes[0].images[0], ax=axes[:2], shrink=0.6, label="rank")
    fig.suptitle(f"{title}, budget {budget:.1%}")
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    p = Parser(description="Greedy per-head rank search for MatryoshkaKV under a budget.")
    add_model_flags(p)
    p.add_argument("--projections", required=True, help="MatryoshkaKV checkpoint from train.py")
    p.add_argument("--budget", type=ratio, default=0.25, help="target budget in (0, 1]; the sweep budgets above "
                   "it are recorded on the way")
    p.add_argument("--data", nargs="+", help="calibration .txt/.jsonl files, FILE or FILE:WEIGHT as train.py "
                   "takes them (default: the train half of pydoc topics)")
    p.add_argument("--calib-windows", type=count, default=1, help="calibration windows, shared by the "
                   "--data sources' weights (at least one from each)")
    p.add_argument("--calib-len", type=count, default=256)
    p.add_argument("--step", type=count, default=None, help="rank decrement (default head_dim / 8)")
    p.add_argument("--min-rank", type=count, default=None, help="lowest rank a head may get (default: --step)")
    p.add_argument("--per-round", type=count, default=None, help="decrements per round (1 = the exact greedy; "
                   "default 64, or half the model's K and V ranks if fewer; at most their number minus 1)")
    p.add_argument("--refine", type=size, default=0, help="rounds of swap refinement at --budget after the "
                   "greedy or from --start (each measures every rank one step up and down: about two greedy "
                   "rounds; 0 = none)")
    p.add_argument("--refine-tries", type=count, default=16, help="swaps measured per refinement round")
    p.add_argument("--refine-check", type=size, default=0, help="held-out windows of the --data mix (those after "
                   "the calibration's): a swap is kept only if it lowers their KL too (0 = no check)")
    p.add_argument("--start", help="a search.py ranks file: refine its ranks at --budget instead of a new greedy "
                   "search (with --refine; they may come from other projections)")
    p.add_argument("--out", default="runs/ranks.json")
    args = p.parse_args(argv)
    model, tok, folder = model_from_flags(args)
    if args.calib_len > model.args.max_seq_len:
        raise KVNestError(f"--calib-len {args.calib_len} exceeds the model's context of {model.args.max_seq_len}")
    if args.refine_tries != p.get_default("refine_tries") and not args.refine:
        raise KVNestError("--refine-tries sets the swap refinement: pass --refine N (rounds) too, or drop it")
    if args.refine_check and not args.refine:
        raise KVNestError("--refine-check checks the swap refinement: pass --refine N (rounds) too, or drop it")
    if args.start and not args.refine:
        raise KVNestError("--start names ranks to refine: pass --refine N (rounds) too")
    if args.start and args.per_round is not None:
        raise KVNestError("--per-round sets the greedy search, which --start skips: drop one of them")
    args.per_round = args.per_round or min(64, model.args.n_layers * model.args.n_kv_heads)
    check_per_round(model, args.per_round)
    proj, _, _ = load_projections(args.projections, model)
    sources = [(tok.encode(text), w) for text, w in load_mix(args.data, "train")]
    windows = mixed_windows(sources, args.calib_len, args.calib_windows)
    check = mixed_windows(sources, args.calib_len, args.refine_check, skip=args.calib_windows) \
        if args.refine_check else None
    step = args.step or max(1, model.args.head_dim // 8)
    with torch.no_grad():
        if args.start:
            found = {args.budget: dict(zip("kv", (r.tolist() for r in load_ranks(args.start, model, args.budget))))}
        else:
            found = greedy_search(model, proj, windows, args.budget, step, args.per_round, min_rank=args.min_rank)
        if args.refine > 0:
            found[args.budget] = swap_refine(model, proj, windows, found[args.budget], step, args.min_rank or step,
                                             args.refine, args.refine_tries, check)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"model": model.fingerprint(), "base_model": folder, "projections": args.projections, "step": step,
            "per_round": None if args.start else args.per_round, "start": args.start, "refine": args.refine,
            "calibration": f"{len(windows)} x {args.calib_len}",
            "check": f"{len(check)} x {args.calib_len}" if check is not None else None}
    write_results(found, out, meta, args.budget)
    print(out.with_suffix(".md").read_text())
    print(f"wrote {out}, {out.with_suffix('.md')} and {len(found)} heatmaps")


if __name__ == "__main__":
    run_cli(main)
