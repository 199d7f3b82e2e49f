"""Evaluate a model, plain or with a compressed cache (either axis or both), on held-out text.

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
full cache. With --projections too, the cache is compressed as well (both axes at once).

    python eval.py --evict h2o --keep 0.25
    python eval.py --evict gate --gate runs/gate.safetensors --keep 0.5 --protocol inside
    python eval.py --evict gate --gate runs/gate.safetensors --keep 0.5 --gate-new --window 32
    python eval.py --evict-sweep --gate runs/gate.safetensors
    python eval.py --evict snapkv --keep 0.5 --projections runs/matryoshka.safetensors --budget 0.5   # both axes
    python eval.py --plan runs/plan.json --budget 0.25 --projections runs/matryoshka.safetensors   # joint.py's plan
"""
import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from assets import load_text, token_windows
from errors import INSTALL_TRANSFORMERS, KVNestError, Parser, count, run_cli
from flags import (add_compression_flags, add_model_flags, add_protocol_flags, compression_from_flags,
                   model_from_flags, protocol_from_flags)
from losses import kl_and_top1
from model import KVCache, Transformer

SWEEP_BUDGETS = (1.0, 0.75, 0.625, 0.5, 0.375, 0.25)
EVICT_KEEPS = (0.75, 0.5, 0.25, 0.125)


class Tally:
    """Running sums over scored positions: NLL of the targets, KL to the reference, top-1 agreement."""

    def __init__(self):
        self.nll = self.kl = self.top1 = 0.0
        self.n = 0

    def add(self, ref: torch.Tensor, logits: torch.Tensor, targets: torch.Tensor) -> None:
        """ref, logits (N, V); targets (N,)."""
        kl, top1 = kl_and_top1(ref, logits)
        self.nll += F.cross_entropy(logits.float(), targets, reduction="sum").item()
        self.kl, self.top1, self.n = self.kl + kl.sum().item(), self.top1 + top1.sum().item(), self.n + len(targets)

    def result(self) -> dict:
        return {"perplexity": math.exp(self.nll / self.n), "kl": self.kl / self.n, "top1": self.top1 / self.n}


@torch.no_grad()
def score(model: Transformer, windows: torch.Tensor, features=None, desc: str | None = None) -> dict:
    """Perplexity of the model with a cache built with `features` (compress.Matryoshka; None: the full cache) on
    windows (N, T); with features, also KL and top-1 agreement against the full cache."""
    tally, device = Tally(), model.inv_freq.device
    for w in tqdm(windows, desc=desc, leave=False, disable=desc is None):
        w = w[None].to(device)
        ref = model(w)[0, :-1]  # (T-1, V)
        logits = ref if features is None else model(w, 0, KVCache(model, 1, w.shape[1], features))[0, :-1]
        tally.add(ref, logits, w[0, 1:])
    out = dict(tally.result(), tokens=tally.n)
    return out if features is not None else {"perplexity": out["perplexity"], "tokens": tally.n}


def eval_windows(tokenizer, data: str | None, windows: int, seq_len: int) -> torch.Tensor:
    return token_windows(tokenizer.encode(load_text(data, "eval")), seq_len, windows)


def matryoshka_sweep(model, windows, projections: str, ranks: str | None, out_dir: Path) -> str:
    """Perplexity and KL against budget for PCA-uniform, trained-uniform and trained-searched ranks; writes
    sweep.md and sweep.png into out_dir and returns the markdown table."""
    from compress import load_projections, load_ranks, uniform_ranks
    proj, _, _ = load_projections(projections, model)
    pca, rows = proj.pca(), {}
    for budget in tqdm(SWEEP_BUDGETS, desc="sweep"):
        runs = {"PCA, uniform": (pca, uniform_ranks(model, budget)),
                "trained, uniform": (proj, uniform_ranks(model, budget))}
        if ranks and budget < 1:
            runs["trained, searched"] = (proj, load_ranks(ranks, model, budget))
        for name, (p, (rk, rv)) in runs.items():
            rows.setdefault(budget, {})[name] = score(model, windows, p.features(rk, rv))
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


def score_eviction(model: Transformer, windows: torch.Tensor, policy, keep: float, ctx_len: int = 384,
                   exact: bool | None = None, protocol=None, features=None, compact: bool = False,
                   gate_new: bool = False) -> dict:
    """One eviction method at one keep ratio; see score_evictions."""
    return score_evictions(model, windows, [(policy, keep, exact)], ctx_len, protocol, features, compact,
                           gate_new=gate_new)[0][0]


@torch.no_grad()
def score_evictions(model: Transformer, windows: torch.Tensor, runs: list, ctx_len: int = 384, protocol=None,
                    features=None, compact: bool = False, desc: str | None = None,
                    gate_new: bool = False) -> tuple[list, float]:
    """Each window (N, T) is a context of ctx_len tokens and a continuation. For each run (policy, keep, exact) or
    (policy, keep, exact, its own features), the context is prefilled into a cache (compressed by `features`, if
    given) and evicted; the continuation's
    T - ctx_len predictions (logits at positions ctx_len - 1 ... T - 2) are scored: perplexity, KL(full ||
    method), top-1 agreement, and the achieved kept fraction of the context entries. compact: the cache holds only
    the kept entries (else its slots are weighed by the flags: the same numbers, tested). gate_new: the gate also
    judges every decoded token after protocol.window queries (gate.judging), the continuation is fed one token at a
    time from the compact cache, and the kept fraction of the judged tokens is reported. The full cache's
    reference runs once per window for all runs. Returns ([result per run], the full cache's perplexity there)."""
    from evict import Protocol, kept_fraction, prefill
    from gate import judging
    protocol = protocol or Protocol()
    tallies, kept, new = [Tally() for _ in runs], [0.0] * len(runs), [[0, 0] for _ in runs]
    full_nll, n = 0.0, 0
    for w in tqdm(windows, desc=desc, leave=False, disable=desc is None):
        w = w[None].to(model.inv_freq.device)
        ref = model(w[:, :-1])[0, ctx_len - 1:].float()  # (T - ctx_len, V)
        full_nll += F.cross_entropy(ref, w[0, ctx_len:], reduction="sum").item()
        for i, ((policy, keep, exact, *own), tally) in enumerate(zip(runs, tallies)):
            cache = KVCache(model, 1, w.shape[1] - 1, own[0] if own else features)
            if policy is None:  # no eviction: the features alone
                ctx_logits, flags = model(w[:, :ctx_len], 0, cache), None
            else:
                ctx_logits, flags = prefill(model, w[:, :ctx_len], cache, policy, keep, protocol, exact,
                                            compact or gate_new)
            if gate_new:
                logits = [ctx_logits[0, -1:]]
                with judging(model, cache, policy, protocol.window) as judges:
                    logits += [model(w[:, t: t + 1], t, cache)[0] for t in range(ctx_len, w.shape[1] - 1)]
                logits = torch.cat(logits).float()
                new[i] = [new[i][0] + sum(j.kept for j in judges), new[i][1] + sum(j.decided for j in judges)]
            else:
                logits = torch.cat([ctx_logits[0, -1:], model(w[:, ctx_len:-1], ctx_len, cache)[0]]).float()
            tally.add(ref, logits, w[0, ctx_len:])
            kept[i] += 1.0 if flags is None else kept_fraction(flags)
        n += len(ref)
    results = [dict(t.result(), keep=k / len(windows)) for t, k in zip(tallies, kept)]
    if gate_new:
        for r, (n_kept, n_decided) in zip(results, new):
            r["new_tokens_keep"] = n_kept / max(n_decided, 1)
    return results, math.exp(full_nll / n)


@torch.no_grad()
def score_transformers(folder, model: Transformer, windows: torch.Tensor, ctx_len: int | None, **compression) -> dict:
    """score (ctx_len None) or score_eviction's protocol run by transformers' own model of the folder with hf.py's
    compress_cache(**compression) attached; the reference is kvnest's full cache, as there."""
    try:
        from transformers import AutoModelForCausalLM
        from hf import compress_cache
    except ImportError:
        raise KVNestError(f"--transformers needs transformers: {INSTALL_TRANSFORMERS}") from None
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=model.lm_head.weight.dtype).to(model.inv_freq.device)
    tally, start = Tally(), ctx_len or 1
    with compress_cache(hf.eval(), **compression) as attached:
        for w in tqdm(windows, desc="eval through transformers", leave=False):
            w = w[None].to(model.inv_freq.device)
            logits = hf(w[:, :start]).logits[0, -1:]  # a new cache: (1, V), the prediction of the first scored token
            logits = torch.cat([logits, hf(w[:, start:-1], **attached.cache_kwargs()).logits[0]]).float()
            tally.add(model(w[:, :-1])[0, start - 1:].float(), logits, w[0, start:])
    return tally.result()


def eviction_table(model: Transformer, windows: torch.Tensor, gates: dict, keeps: list, ctx_len: int = 384,
                   methods=("streaming", "h2o", "snapkv", "random"), protocol=None, features=None) -> tuple:
    """Markdown rows: continuation perplexity (KL) of every method at every keep ratio; gates are scored at the
    exact keep ratio (one threshold over all layers and heads; over each layer's heads inside the prefill).
    Returns (table, {method: {keep: result}})."""
    from evict import Protocol, baseline
    protocol = protocol or Protocol()
    cells = [(name, keep, (baseline(name), keep, None)) for keep in keeps for name in methods]
    cells += [(name, keep, (g, keep, True)) for keep in keeps for name, g in gates.items()]
    scored, full = score_evictions(model, windows, [run for _, _, run in cells], ctx_len, protocol, features,
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
    if features is not None:
        note += f" Features compressed to a budget of {features.budget():.1%}."
    return "\n".join(lines) + note, results


def eviction_main(args, model, tok, features, policy, keep, plan, protocol) -> None:
    """--evict METHOD / --evict-sweep: continuation perplexity and KL after evicting the context's cache."""
    if (args.gate_threshold or args.gate_new) and args.evict != "gate" and not args.plan:
        raise KVNestError(f"--{'gate-threshold' if args.gate_threshold else 'gate-new'} acts with the gate; pass "
                          f"--evict gate")
    if args.seq_len <= args.ctx_len + 1:
        raise KVNestError(f"--ctx-len {args.ctx_len} leaves no continuation in --seq-len {args.seq_len}; lower it")
    if args.gate_new:
        from gate import check_new_tokens
        check_new_tokens(policy, args.window)
    windows = eval_windows(tok, args.data, args.windows or 8, args.seq_len)
    if args.evict_sweep:
        table, results = eviction_table(model, windows, {"gate": policy} if policy else {}, list(EVICT_KEEPS),
                                        args.ctx_len, protocol=protocol, features=features)
        out_dir = Path(args.out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        name = "evict_sweep" if args.protocol == "after" else "evict_sweep_inside"
        (out_dir / f"{name}.md").write_text(table + "\n")
        plot_curves({n: {k: r["kl"] for k, r in res.items()} for n, res in results.items()}, "kept fraction of the "
                    "context", "KL(full || evicted)", f"Eviction {args.protocol} the prefill", out_dir / f"{name}.png",
                    invert_x=True, log_y=True)
        print(table)
        return
    result = score_eviction(model, windows, policy, keep, args.ctx_len, None if args.gate_threshold else True,
                            protocol, features, gate_new=args.gate_new)
    if plan is not None:  # each head its own keep ratio and ranks: the plan's share of the full cache's bytes
        size = model.lm_head.weight.element_size()
        result = dict(method="plan", policy=plan.policy, protocol=args.protocol, requested_keep=float(
            plan.keep.mean()), **result, budget=plan.budget(model.args.head_dim, size))
    else:
        result = dict(method=args.evict, protocol=args.protocol, requested_keep=keep, **result)
        if features is not None:
            result["budget"] = features.budget()
    report(result, args.json)


def report(result: dict, as_json: bool) -> None:
    """Print a result as `key=value` pairs or JSON; a non-finite figure is an error, not a number."""
    if not all(math.isfinite(v) for v in result.values() if isinstance(v, float)):
        raise KVNestError(f"the model's predictions are not finite (perplexity {result.get('perplexity')}); are its "
                          f"weights damaged?")
    print(json.dumps(result, indent=2) if as_json else "  ".join(
        f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in result.items()))


def main(argv=None):
    p = Parser(description="Perplexity, KL to the full cache and cache bytes on held-out text.")
    add_model_flags(p)
    p.add_argument("--data", help=".txt or .jsonl file to evaluate on (default: the eval half of pydoc topics)")
    p.add_argument("--windows", type=count, default=None, help="windows to score (default 6; 8 with eviction)")
    p.add_argument("--seq-len", type=lambda s: count(s, 2), default=512)
    add_compression_flags(p, sweep=True)
    p.add_argument("--sweep", action="store_true", help="table and plot over budgets (needs --projections)")
    p.add_argument("--out-dir", default="runs", help="where --sweep and --evict-sweep write their table and plot")
    p.add_argument("--gate-threshold", action="store_true", help="evict by the gate's own threshold (z >= 0) "
                   "instead of at exactly --keep; the achieved keep is reported")
    p.add_argument("--ctx-len", type=count, default=384, help="context tokens of each window with --evict")
    add_protocol_flags(p)
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument("--transformers", action="store_true", help="score through transformers' own model with "
                   "hf.py's compress_cache attached (needs transformers): the same figures, from its forward")
    args = p.parse_args(argv)
    protocol = protocol_from_flags(p, args, also=("gate_threshold", "ctx_len"))
    unsupported = [f for f in ("sweep", "evict_sweep", "gate_threshold", "gate_new") if getattr(args, f)]
    if args.transformers and unsupported:
        raise KVNestError(f"--transformers scores one setting, its decoded tokens all kept; drop "
                          f"--{unsupported[0].replace('_', '-')}")
    if args.plan and (args.sweep or args.gate_threshold):
        raise KVNestError(f"--plan sets each head's ranks and exact keep; drop --"
                          f"{'sweep' if args.sweep else 'gate-threshold'}")
    model, tok, folder = model_from_flags(args)
    if args.seq_len > model.args.max_seq_len:
        raise KVNestError(f"--seq-len {args.seq_len} exceeds the model's context of {model.args.max_seq_len}")
    if args.sweep:
        if not args.projections or args.budget is not None or args.evict or args.evict_sweep:
            raise KVNestError("--sweep scores --projections at every budget (with --ranks if given); pass "
                              "--projections and drop --budget, --evict and --evict-sweep")
        windows = eval_windows(tok, args.data, args.windows or 6, args.seq_len)
        print(matryoshka_sweep(model, windows, args.projections, args.ranks, Path(args.out_dir)))
        return
    features, policy, keep, _, plan = compression_from_flags(model, args)
    if args.transformers:
        evicts = bool(args.evict or args.plan)  # eviction's protocol: a context, then its continuation
        windows = eval_windows(tok, args.data, args.windows or (8 if evicts else 6), args.seq_len)
        compression = dict(projections=args.projections, budget=args.budget, gate=args.gate)
        if args.plan:
            compression["plan"] = args.plan
        else:
            compression.update(ranks=args.ranks, policy=args.evict, keep=keep if args.evict else None,
                               exact=True if args.evict else None)
        if policy is not None:
            compression.update(inside=protocol.inside, sinks=protocol.sinks, window=protocol.window or None)
        result = score_transformers(folder, model, windows, args.ctx_len if evicts else None, **compression)
        return report(dict(through="transformers + hf.py", **result), args.json)
    if args.evict or args.evict_sweep or args.plan:
        return eviction_main(args, model, tok, features, policy, keep, plan, protocol)
    windows = eval_windows(tok, args.data, args.windows or 6, args.seq_len)
    result = {"model": folder, "windows": len(windows), "seq_len": args.seq_len}
    if features is not None:
        result.update(method="matryoshka", budget=features.budget())
    result.update(score(model, windows, features, desc="eval"))
    full_bytes = KVCache(model, 1, args.seq_len).nbytes()
    result.update(cache_bytes=KVCache(model, 1, args.seq_len, features).nbytes(), full_cache_bytes=full_bytes)
    result["cache_ratio"] = result["cache_bytes"] / full_bytes
    report(result, args.json)


if __name__ == "__main__":
    run_cli(main)
