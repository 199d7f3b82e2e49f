"""Evaluate a model, plain or with a MatryoshkaKV-compressed cache, on held-out text.

Protocol (fixed so numbers compare across runs): tokenize the eval half of the default text (or --data) as one
string with no BOS, take the first --windows non-overlapping windows of --seq-len tokens, and score the
seq_len - 1 next-token predictions of each window:
    perplexity = exp(mean NLL),  KL = mean_t KL(p_full(.|x_<t) || p_method(.|x_<t)),
    top-1 agreement = fraction of positions where both pick the same most likely token.
The full model on the default data gives perplexity 17.07 (6 x 512 tokens, fp32).

    python eval.py                                          # the full model
    python eval.py --projections runs/matryoshka.safetensors --budget 0.5
    python eval.py --projections runs/matryoshka.safetensors --ranks runs/ranks.json --budget 0.5
    python eval.py --projections runs/matryoshka.safetensors --ranks runs/ranks.json --sweep

Eviction (evict.py, gate.py) follows its own protocol: each of 8 windows of 512 tokens is a 384-token context,
evicted after the prefill (or inside it), and a 128-token continuation, whose predictions are scored against the
full cache.

    python eval.py --evict h2o --keep 0.25
    python eval.py --evict gate --gate runs/gate.safetensors --keep 0.5 --protocol inside
    python eval.py --evict gate --gate runs/gate.safetensors --keep 0.5 --gate-new --window 32
    python eval.py --evict gate --gate runs/gate.safetensors --keep 0.5
    python eval.py --evict-sweep --gate runs/gate.safetensors
    python eval.py --evict snapkv --keep 0.5 --projections runs/matryoshka.safetensors --budget 0.5   # both axes
"""
import argparse
import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from assets import add_model_flags, load_text, model_from_flags, token_windows
from model import KVNestError, Transformer, run_cli

SWEEP_BUDGETS = (1.0, 0.75, 0.625, 0.5, 0.375, 0.25)


def kl_and_top1(ref_logits: torch.Tensor, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-position KL(ref || method) summed over the vocabulary, and top-1 agreement. (..., V) -> (...), (...)"""
    ref_logp, logp = F.log_softmax(ref_logits.float(), -1), F.log_softmax(logits.float(), -1)
    kl = (ref_logp.exp() * (ref_logp - logp)).sum(-1).clamp(min=0)  # KL >= 0; rounding can dip below
    return kl, (ref_logits.argmax(-1) == logits.argmax(-1)).float()


class Tally:
    """Running sums over scored positions: NLL of the targets, KL to the reference, top-1 agreement."""

    def __init__(self):
        self.nll = self.kl = self.top1 = 0.0
        self.n = 0

    def add(self, ref: torch.Tensor, logits: torch.Tensor, targets: torch.Tensor) -> None:
        """ref, logits (N, V); targets (N,)."""
        kl, top1 = kl_and_top1(ref, logits)
        self.nll += F.cross_entropy(logits, targets, reduction="sum").item()
        self.kl, self.top1, self.n = self.kl + kl.sum().item(), self.top1 + top1.sum().item(), self.n + len(targets)

    def result(self) -> dict:
        return {"perplexity": math.exp(self.nll / self.n), "kl": self.kl / self.n, "top1": self.top1 / self.n}


@torch.no_grad()
def score(model: Transformer, windows: torch.Tensor, compare: bool = True, desc: str | None = None) -> dict:
    """Perplexity of `model` on windows (N, T); with `compare`, also KL and top-1 agreement against the
    full-cache model (the same model under compress.full_cache)."""
    from compress import full_cache
    nll, kl, top1, n = 0.0, 0.0, 0.0, 0
    device = model.inv_freq.device
    for w in tqdm(windows, desc=desc, leave=False, disable=desc is None):
        w = w[None].to(device)
        logits = model(w)[0, :-1].float()  # (T-1, V)
        nll += F.cross_entropy(logits, w[0, 1:], reduction="sum").item()
        if compare:
            with full_cache(model):
                ref = model(w)[0, :-1]
            k, t = kl_and_top1(ref, logits)
            kl, top1 = kl + k.sum().item(), top1 + t.sum().item()
        n += logits.shape[0]
    out = {"perplexity": float(torch.tensor(nll / n).exp()), "tokens": n}
    if compare:
        out.update(kl=kl / n, top1=top1 / n)
    return out


def cache_bytes(model: Transformer, seq_len: int) -> int:
    """Bytes of the cache tensors the model allocates for one sequence of seq_len tokens."""
    model.setup_cache(1, seq_len)
    try:
        return model.cache_bytes()
    finally:
        model.clear_cache()


def eval_windows(tokenizer, data: str | None, windows: int, seq_len: int) -> torch.Tensor:
    return token_windows(tokenizer.encode(load_text(data, "eval")), seq_len, windows)


def matryoshka_sweep(model, windows, projections: str, ranks: str | None, out_dir: Path) -> str:
    """Perplexity and KL against budget for PCA-uniform, trained-uniform and trained-searched ranks; writes
    sweep.md and sweep.png into out_dir and returns the markdown table."""
    from compress import compress, load_projections, load_ranks, set_ranks, uniform_ranks
    proj, _, _ = load_projections(projections, model)
    pca = type(proj)(proj.U0_k, proj.U0_v, proj.key_mode).to(proj.U0_k.device)
    rows = {}
    for budget in tqdm(SWEEP_BUDGETS, desc="sweep"):
        runs = {"PCA, uniform": (pca, uniform_ranks(model, budget)),
                "trained, uniform": (proj, uniform_ranks(model, budget))}
        if ranks and budget < 1:
            runs["trained, searched"] = (proj, load_ranks(ranks, model, budget))
        for name, (p, (rk, rv)) in runs.items():
            compress(model, p)
            set_ranks(model, rk, rv)
            rows.setdefault(budget, {})[name] = score(model, windows)
    names = list(rows[SWEEP_BUDGETS[-1]])
    full = rows[1.0]["PCA, uniform"]["perplexity"]
    lines = [f"| budget | {' | '.join(f'{n}: ppl (x full, KL)' for n in names)} |", "|---" * (len(names) + 1) + "|"]
    for b, r in rows.items():
        cells = [f"{r[n]['perplexity']:.2f} ({r[n]['perplexity'] / full:.2f}x, {r[n]['kl']:.3f})" if n in r else "-"
                 for n in names]
        lines.append(f"| {b:.1%} | {' | '.join(cells)} |")
    table = "\n".join(lines)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "sweep.md").write_text(table + "\n")
    plot_curves({n: {b: r[n]["perplexity"] for b, r in rows.items() if n in r} for n in names},
                "KV cache budget (kept fraction)", "eval perplexity", f"MatryoshkaKV (full model {full:.2f})",
                out_dir / "sweep.png", invert_x=True, log_y=True)
    return table


def plot_curves(curves: dict, xlabel: str, ylabel: str, title: str, path: Path, invert_x=False, log_y=False):
    """One line per method: curves = {name: {x: y}}. Written as a PNG."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, pts in curves.items():
        xs = sorted(pts)
        ax.plot(xs, [pts[x] for x in xs], marker="o", label=name)
    ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
    if invert_x:
        ax.invert_xaxis()
    if log_y:
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


EVICT_KEEPS = (0.75, 0.5, 0.25, 0.125)


def score_eviction(model: Transformer, windows: torch.Tensor, policy, keep: float, ctx_len: int = 384,
                   exact: bool | None = None, protocol=None) -> dict:
    """One eviction method at one keep ratio; see score_evictions."""
    return score_evictions(model, windows, [(policy, keep, exact)], ctx_len, protocol)[0][0]


@torch.no_grad()
def score_evictions(model: Transformer, windows: torch.Tensor, runs: list, ctx_len: int = 384, protocol=None,
                    desc: str | None = None) -> tuple[list, float]:
    """Each window (N, T) is a context of ctx_len tokens and a continuation. For each run (policy, keep, exact),
    scores the continuation's T - ctx_len predictions (logits at positions ctx_len - 1 ... T - 2): perplexity,
    KL(full || evicted), top-1 agreement, the achieved kept fraction of the context entries, and with
    protocol.gate_new the kept fraction of the judged decoded tokens (their cache then really shrinks: the
    continuation runs from the compact cache). The full cache's reference runs once per window for all runs.
    Returns ([result per run], the full cache's continuation perplexity)."""
    from evict import Protocol, kept_fraction, prefill_and_evict, restore_full
    protocol = protocol or Protocol()
    tallies = [Tally() for _ in runs]
    sums = [dict(keep=0.0, new_kept=0, new_decided=0) for _ in runs]
    full_nll, n = 0.0, 0
    for w in tqdm(windows, desc=desc, leave=False, disable=desc is None):
        w = w[None].to(model.inv_freq.device)
        restore_full(model)
        ref = model(w[:, :-1])[0, ctx_len - 1:].float()  # (T - ctx_len, V)
        full_nll += F.cross_entropy(ref, w[0, ctx_len:], reduction="sum").item()
        for (policy, keep, exact), tally, t in zip(runs, tallies, sums):
            ctx_logits, flags = prefill_and_evict(model, w[:, :ctx_len], policy, keep, exact,
                                                  compact=protocol.gate_new, max_new=w.shape[1] - ctx_len,
                                                  protocol=protocol)
            logits = torch.cat([ctx_logits[0, -1:], model(w[:, ctx_len:-1], ctx_len)[0]]).float()
            tally.add(ref, logits, w[0, ctx_len:])
            t["keep"] += kept_fraction(flags)
            if protocol.gate_new:
                for layer in model.layers:
                    t["new_kept"] += layer.attn.cache.new_tokens.kept
                    t["new_decided"] += layer.attn.cache.new_tokens.decided
        n += len(ref)
    restore_full(model)
    results = []
    for tally, t in zip(tallies, sums):
        out = dict(tally.result(), keep=t["keep"] / len(windows))
        if protocol.gate_new:
            out["new_tokens_keep"] = t["new_kept"] / max(t["new_decided"], 1)
        results.append(out)
    return results, math.exp(full_nll / n)


@torch.no_grad()
def score_both(model: Transformer, plain: list, windows: torch.Tensor, policy, keep: float, ctx_len: int = 384,
               exact: bool | None = None) -> dict:
    """Both axes at once, exactly as kernels.Decoder decodes them: a full-attention prefill of the context, eviction
    to `keep`, the kept entries compressed by the model's MatryoshkaKV layers, then the continuation fed one token
    at a time, each new entry compressed too. Scored as score_evictions does, against the model with its `plain`
    (uncompressed) attention layers."""
    from kernels import Decoder
    compressed, tally = [layer.attn for layer in model.layers], Tally()
    for w in tqdm(windows, desc="both", leave=False):
        w = w[None].to(model.inv_freq.device)
        for layer, attn in zip(model.layers, plain):
            layer.attn = attn
        ref = model(w[:, :-1])[0, ctx_len - 1:].float()  # (T - ctx_len, V)
        for layer, attn in zip(model.layers, compressed):
            layer.attn = attn
        dec = Decoder(model, w.shape[1] - ctx_len, policy, keep, exact, compile=False)
        logits = [dec(w[:, :ctx_len], 0)[0, -1]]
        logits += [dec(w[:, t: t + 1], t)[0, -1] for t in range(ctx_len, w.shape[1] - 1)]
        tally.add(ref, torch.stack(logits).float(), w[0, ctx_len:])  # (T - ctx_len, V)
    return tally.result()


def eviction_table(model: Transformer, windows: torch.Tensor, gates: dict, keeps: list, ctx_len: int = 384,
                   methods=("streaming", "h2o", "snapkv", "random"), protocol=None) -> tuple[str, dict]:
    """Markdown rows: continuation perplexity (KL) of every method at every keep ratio; gates are scored at the
    exact keep ratio (one threshold over all layers and heads; over each layer's heads inside the prefill).
    Returns (table, {method: {keep: result}})."""
    from evict import Protocol, baseline
    protocol = protocol or Protocol()
    cells = [(name, keep, (baseline(name, keep), keep, None)) for keep in keeps for name in methods]
    cells += [(name, keep, (g, keep, True)) for keep in keeps for name, g in gates.items()]
    scored, full = score_evictions(model, windows, [run for _, _, run in cells], ctx_len, protocol,
                                   desc="eviction table")
    results = {}
    for (name, keep, _), r in zip(cells, scored):
        results.setdefault(name, {})[keep] = r
    names = list(results)
    lines = [f"| keep | {' | '.join(names)} |", "|---" * (len(names) + 1) + "|"]
    for keep in keeps:
        lines.append(f"| {keep:.1%} | " + " | ".join(f"{results[n][keep]['perplexity']:.3f} "
                                                      f"({results[n][keep]['kl']:.4f})" for n in names) + " |")
    where = "inside the prefill (gates: one threshold per layer)" if protocol.inside else \
        "after the prefill (gates: one threshold over all layers)"
    note = (f"\nContinuation perplexity (KL to the full cache); {len(windows)} windows, {ctx_len}-token context, "
            f"eviction {where}, {protocol.sinks} forced sinks, recent window {protocol.window}; baselines keep "
            f"the same number per (layer, KV head). Full cache: {full:.3f}.")
    return "\n".join(lines) + note, results


def eviction_main(args, model, tok) -> None:
    """--evict METHOD / --evict-sweep: continuation perplexity and KL after evicting the context's cache."""
    from evict import Protocol, baseline
    from gate import load_gate
    protocol = Protocol(args.protocol == "inside", args.sinks, args.window, args.gate_new)
    if args.projections and (args.evict_sweep or protocol != Protocol()):
        raise KVNestError("--projections with --evict scores one method after the prefill, as kernels.py decodes; "
                          "drop --evict-sweep, --protocol inside, --sinks, --window and --gate-new")
    windows = eval_windows(tok, args.data, args.windows or 8, args.seq_len)
    gate = load_gate(args.gate, model)[0] if args.gate else None
    if args.evict == "gate" and gate is None:
        raise KVNestError("--evict gate needs --gate (a checkpoint from `python train.py --method gate`)")
    if args.evict_sweep:
        table, results = eviction_table(model, windows, {"gate": gate} if gate else {}, list(EVICT_KEEPS),
                                        args.ctx_len, protocol=protocol)
        out_dir = Path(args.out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        name = "evict_sweep" if args.protocol == "after" else "evict_sweep_inside"
        (out_dir / f"{name}.md").write_text(table + "\n")
        plot_curves({n: {k: r["kl"] for k, r in res.items()} for n, res in results.items()}, "kept fraction of the "
                    "context", "KL(full || evicted)", f"Eviction {args.protocol} the prefill", out_dir / f"{name}.png",
                    invert_x=True, log_y=True)
        print(table)
        return
    policy = gate if args.evict == "gate" else baseline(args.evict, args.keep)
    exact = None if args.gate_threshold else True
    if args.projections:  # both axes: evict the context, compress what is kept and what is decoded
        from compress import budget_of, compress_from_flags
        plain = [layer.attn for layer in model.layers]
        budget = budget_of(*compress_from_flags(model, args.projections, args.budget, args.ranks),
                           model.args.head_dim)
        result = dict(budget=budget, **score_both(model, plain, windows, policy, args.keep, args.ctx_len, exact))
    else:
        result = score_eviction(model, windows, policy, args.keep, args.ctx_len, exact, protocol)
    result = dict(method=args.evict, protocol=args.protocol, requested_keep=args.keep, **result)
    print(json.dumps(result, indent=2) if args.json else "  ".join(
        f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in result.items()))


def main(argv=None):
    p = argparse.ArgumentParser(description="Perplexity, KL to the full cache and cache bytes on held-out text.")
    add_model_flags(p)
    p.add_argument("--data", help=".txt or .jsonl file to evaluate on (default: the eval half of pydoc topics)")
    p.add_argument("--windows", type=int, default=None, help="windows to score (default 6; 8 with eviction)")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--projections", help="MatryoshkaKV checkpoint from train.py")
    p.add_argument("--budget", type=float, help="kept fraction of the cache, in (0, 1]")
    p.add_argument("--ranks", help="per-head ranks JSON from search.py")
    p.add_argument("--sweep", action="store_true", help="table and plot over budgets (needs --projections)")
    p.add_argument("--out-dir", default="runs", help="where --sweep writes sweep.md and sweep.png")
    p.add_argument("--evict", choices=["streaming", "h2o", "snapkv", "random", "gate"], help="evict the context")
    p.add_argument("--evict-sweep", action="store_true", help="every eviction method at keep 75/50/25/12.5%%")
    p.add_argument("--keep", type=float, default=0.5, help="kept fraction of the context with --evict")
    p.add_argument("--gate", help="gate checkpoint from `python train.py --method gate`")
    p.add_argument("--gate-threshold", action="store_true", help="evict by the gate's own threshold (z >= 0) "
                   "instead of at exactly --keep; the achieved keep is reported")
    p.add_argument("--ctx-len", type=int, default=384, help="context tokens of each window with --evict")
    p.add_argument("--protocol", choices=["after", "inside"], default="after",
                   help="evict after a full-attention prefill (kvpress) or inside it (Attention-Gate)")
    p.add_argument("--sinks", type=int, default=0, help="first context entries always kept")
    p.add_argument("--window", type=int, default=0, help="last context entries always kept (inside the prefill: "
                   "each query's recent window; with --gate-new: how many queries see a new token before it is judged)")
    p.add_argument("--gate-new", action="store_true", help="gate decoded tokens too (needs --evict gate, --window)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    args = p.parse_args(argv)
    model, tok, folder = model_from_flags(args)
    if args.evict or args.evict_sweep:
        return eviction_main(args, model, tok)
    windows = eval_windows(tok, args.data, args.windows or 6, args.seq_len)
    if args.sweep:
        if not args.projections:
            raise KVNestError("--sweep needs --projections (a checkpoint from train.py)")
        print(matryoshka_sweep(model, windows, args.projections, args.ranks, Path(args.out_dir)))
        return
    full_bytes = cache_bytes(model, args.seq_len)
    result = {"model": folder, "windows": len(windows), "seq_len": args.seq_len}
    if args.projections:
        from compress import budget_of, compress_from_flags
        rank_k, rank_v = compress_from_flags(model, args.projections, args.budget, args.ranks)
        result.update(method="matryoshka", budget=budget_of(rank_k, rank_v, model.args.head_dim))
    result.update(score(model, windows, compare=bool(args.projections), desc="eval"))
    result.update(cache_bytes=cache_bytes(model, args.seq_len), full_cache_bytes=full_bytes)
    result["cache_ratio"] = result["cache_bytes"] / full_bytes
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print("  ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in result.items()))


if __name__ == "__main__":
    run_cli(main)
