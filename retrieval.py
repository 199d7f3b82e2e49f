"""Long-context retrieval: what a compressed cache forgets, measured on tasks generated from a seed.

Perplexity on a continuation averages over many easy predictions; retrieval asks for one fact from far back. The
tasks are RULER's, generated from a seed (haystack.py): a needle in filler and in real text, multi-key,
multi-value, variable tracking and common-word extraction.

The answer is decoded greedily from the (compressed) cache and scored by haystack.py's `score`. Two query
settings (`--query`; the eviction runs after the prefill, evict.py's default protocol, in both): query-agnostic
(the context alone is prefilled and compressed, then the question is read from the compressed cache: kvpress's
pipeline; a cache compressed once must serve any question) and query-aware (context and question are prefilled
together and then compressed: SnapKV's observation window sees the question).

    python retrieval.py --quick                        # 1k tokens, 2 samples per task: minutes on 2 cores
    python retrieval.py --lengths 4096,8192 --samples 50 --gate runs/gate.safetensors \\
        --projections runs/matryoshka.safetensors       # the full table (weeks on 2 cores: stop and rerun it,
                                                        # it resumes from its log, runs/retrieval_<digest>.jsonl)
    python retrieval.py --heatmap --lengths 1024,2048,4096 --gate runs/gate.safetensors   # depth x length
"""
import hashlib
import json
from pathlib import Path

import torch
from tqdm import tqdm

from compress import load_projections, uniform_ranks
from errors import KVNestError, Parser, count, integers, ratios, run_cli
from eval import plot_curves
from evict import BASELINES, Protocol, baseline, scoring_hooks
from flags import add_model_flags, model_from_flags
from gate import load_gate
from haystack import MAX_NEW, TASKS, Sample, build, prompt, samples_digest, score
from model import KVCache

COMPRESSIONS = (0.25, 0.5, 0.75, 0.875)
FAILED = 0.5  # a task the full cache scores below this is reported but left out of the averages


@torch.no_grad()
def answer_all(model, tok, s: Sample, runs: dict, aware: bool, max_new: int) -> dict:
    """{run: decoded answer}. runs = {name: (features, policy, keep)}. Runs with the same features share one
    prefill, which scores the prompt for every policy at once (evict.py's hooks); the cache is then repeated along
    the batch, one row per run, each row evicted by its own flags (LayerCache.compact keeps per row what its flags
    say), and the runs decode together as one batch."""
    ctx, question = prompt(tok, s)
    prefilled, rest = (ctx + question, []) if aware else (ctx, question)
    size, device, out = len(ctx) + len(question) + max_new, model.inv_freq.device, {}
    for features in {id(f): f for f, _, _ in runs.values()}.values():
        group = {n: (p, k) for n, (f, p, k) in runs.items() if f is features}
        scores = {n: [None] * model.args.n_layers for n, (p, _) in group.items() if p is not None}
        hooks = [h for n, (p, k) in group.items() if p is not None
                 for h in scoring_hooks(model, scores[n].__setitem__, p, k, Protocol(), False, before=False)]
        cache = KVCache(model, 1, size, features)
        try:
            logits = model(torch.tensor([prefilled], device=device), 0, cache)[:, -1:]
        finally:
            for h in hooks:
                h.remove()
        flags = [policy.flags(scores[n], keep, True, False) if policy is not None else None
                 for n, (policy, keep) in group.items()]  # [run][layer] (1, H_kv, T) or None: keep all
        for i, layer in enumerate(cache.layers):
            rows = [torch.ones(1, model.args.n_kv_heads, len(prefilled), device=device) if f is None else f[i]
                    for f in flags]
            for g in layer.groups:
                g.k, g.v, g.length = (t.expand(len(rows), *t.shape[1:]).clone() for t in (g.k, g.v, g.length))
            layer.compact(torch.cat(rows), size - len(prefilled))  # (R, H_kv, T): one row per run
        answers = decode(model, tok, cache, logits.expand(len(rows), -1, -1), rest, len(prefilled), max_new,
                         s.answers)
        out.update(zip(group, answers))
    return out


def decode(model, tok, cache, logits, rest: list, pos: int, max_new: int, answers: list) -> list:
    """Read the rest of the prompt (if any) in every row, then decode greedily up to max_new tokens; a row stops
    at the end of the turn, or once every answer is there (its score can then only stay 1). -> text per row"""
    R, device = logits.shape[0], model.inv_freq.device
    if rest:  # the question, read from the compressed cache
        logits = model(torch.tensor([rest] * R, device=device), pos, cache)
        pos += len(rest)
    ids, done, stop = [[] for _ in range(R)], [False] * R, set(model.args.eos_ids) | {tok.token_id("<|im_end|>")}
    for _ in range(max_new):
        nxt = logits[:, -1].argmax(-1).tolist()
        for r in range(R):
            if not done[r]:
                ids[r].append(nxt[r])
                done[r] = nxt[r] in stop or score(tok.decode(ids[r]), answers) == 1
        if all(done):
            break
        logits = model(torch.tensor(nxt, device=device)[:, None], pos, cache)
        pos += 1
    return [tok.decode(i) for i in ids]


def runs_for(model, compressions, methods, gate, projections) -> dict:
    """{name: (features, policy, keep)}: the full cache, then each method at each compression (the fraction of the
    cache's bytes removed). MatryoshkaKV cuts ranks to the budget 1 - c; both axes split it evenly, budget = keep =
    sqrt(1 - c), with SnapKV (or the gate, if given)."""
    runs = {"full": (None, None, 1.0)}
    proj = load_projections(projections, model)[0] if projections else None
    policies = {m: baseline(m) for m in methods}
    if gate:
        policies["gate"] = load_gate(gate, model)[0]
    for c in compressions:
        kept = 1 - c
        runs.update({f"{m} {c:.1%}": (None, p, kept) for m, p in policies.items()})
        if proj is not None:
            with torch.no_grad():
                runs[f"matryoshka {c:.1%}"] = (proj.features(*uniform_ranks(model, kept)), None, 1.0)
                both = proj.features(*uniform_ranks(model, kept ** 0.5))
            runs[f"both {c:.1%}"] = (both, policies.get("gate", baseline("snapkv")), kept ** 0.5)
    return runs


def evaluate(model, tok, tasks, lengths, samples: int, runs: dict, queries, seed: int,
             log: Path | None = None, settings: dict | None = None) -> dict:
    """{(length, query): {run: {task: mean score}}} over `samples` samples per task. With `log`, each sample's
    scores are appended to it as soon as they are known, and the samples it holds for the same `settings` are read
    back instead of decoded again: an interrupted run resumes where it stopped, a larger --samples adds samples."""
    done = read_log(log, settings) if log else {}
    results = {}
    cells = [(n, q, t, i) for n in lengths for q in queries for t in tasks for i in range(samples)]
    for length, query, task, i in tqdm(cells, desc="retrieval"):
        key = f"{length} {query} {task} {i}"
        if key not in done:
            s = build(task, tok, length, seed * 100_003 + i)
            answers = answer_all(model, tok, s, runs, query == "aware", MAX_NEW[task])
            done[key] = {name: score(text, s.answers) for name, text in answers.items()}
            if log:
                with open(log, "a") as f:
                    f.write(json.dumps({"sample": key, "scores": done[key]}) + "\n")
        for name, v in done[key].items():
            results.setdefault((length, query), {}).setdefault(name, {}).setdefault(task, []).append(v)
    return {k: {n: {t: sum(v) / len(v) for t, v in per.items()} for n, per in r.items()} for k, r in results.items()}


def read_log(log: Path, settings: dict) -> dict:
    """{"length query task i": {run: score}} from a sample log written for these settings (one JSON line each
    after a first line of settings); a new log if there is none. A last line cut short by an interruption is
    dropped."""
    if not log.exists():
        log.write_text(json.dumps({"settings": settings}) + "\n")
        return {}
    lines = log.read_text().split("\n")
    try:
        head, rows = json.loads(lines[0])["settings"], [json.loads(x) for x in lines[1:-1]]
    except (json.JSONDecodeError, KeyError, TypeError):
        head = rows = None
    if head != settings:
        raise KVNestError(f"{log} is not a sample log of these settings; pass --fresh to replace it")
    if lines[-1]:  # written up to a line's middle when the run was stopped: keep the whole lines
        tmp = log.with_suffix(".tmp")
        tmp.write_text("\n".join(lines[:-1]) + "\n")
        tmp.replace(log)
    return {r["sample"]: r["scores"] for r in rows}


def table(results: dict, tasks, samples: int) -> str:
    """Markdown: a block per (length, query), a row per run, the average over the tasks the full cache can do."""
    lines = []
    for (length, query), r in results.items():
        able = [t for t in tasks if r["full"][t] >= FAILED]
        failed = [t for t in tasks if t not in able]
        lines += [f"\n**{length} tokens, query-{query}** ({samples} samples per cell; average over "
                  f"{', '.join(able) or 'no task'}" + (f"; the full cache fails {', '.join(failed)}" if failed else "")
                  + ")\n",
                  f"| method | {' | '.join(tasks)} | average |", "|---" * (len(tasks) + 2) + "|"]
        for name, per in r.items():
            avg = f"{sum(per[t] for t in able) / len(able):.0%}" if able else "n/a"
            lines.append(f"| {name} | " + " | ".join(f"{per[t]:.0%}" for t in tasks) + f" | {avg} |")
    return "\n".join(lines)


def heatmap(model, tok, lengths, depths, runs: dict, samples: int, seed: int, out: Path) -> str:
    """Needle accuracy by depth x length for each run (query-agnostic): markdown and one PNG."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    grid = {n: torch.zeros(len(depths), len(lengths)) for n in runs}
    cells = [(j, length, i, d) for j, length in enumerate(lengths) for i, d in enumerate(depths) for _ in [0]]
    for j, length, i, d in tqdm(cells, desc="heatmap"):
        for k in range(samples):
            s = build("needle", tok, length, seed * 100_003 + k, depth=d)
            for name, text in answer_all(model, tok, s, runs, False, MAX_NEW["needle"]).items():
                grid[name][i, j] += score(text, s.answers) / samples
    fig, axes = plt.subplots(1, len(runs), figsize=(3.2 * len(runs), 3), squeeze=False)
    lines = []
    for ax, (name, g) in zip(axes[0], grid.items()):
        ax.imshow(g.numpy(), vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
        ax.set(title=name, xticks=range(len(lengths)), xticklabels=lengths, yticks=range(len(depths)),
               yticklabels=[f"{d:.0%}" for d in depths], xlabel="tokens", ylabel="depth")
        lines += [f"\n**{name}** (needle accuracy; rows: depth, columns: tokens)\n",
                  "| depth | " + " | ".join(map(str, lengths)) + " |", "|---" * (len(lengths) + 1) + "|"]
        lines += [f"| {d:.0%} | " + " | ".join(f"{v:.0%}" for v in g[i].tolist()) + " |" for i, d in enumerate(depths)]
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    return "\n".join(lines)


def main(argv=None):
    p = Parser(description="Long-context retrieval (RULER-style tasks generated from a seed) for the full cache "
               "and every compression method.")
    add_model_flags(p)
    p.add_argument("--tasks", default=",".join(TASKS), help=f"comma-separated, from {', '.join(TASKS)}")
    p.add_argument("--lengths", default="4096,8192", help="prompt tokens, comma-separated")
    p.add_argument("--samples", type=count, default=50, help="samples per task, length and query setting")
    p.add_argument("--methods", default=",".join(BASELINES), help="eviction baselines, comma-separated (or none)")
    p.add_argument("--gate", help="gate checkpoint (train.py --method gate) to include")
    p.add_argument("--projections", help="MatryoshkaKV checkpoint to include (alone and with eviction)")
    p.add_argument("--compressions", default=",".join(map(str, COMPRESSIONS)), help="fractions of the cache's "
                   "bytes removed, comma-separated")
    p.add_argument("--query", default="agnostic,aware", help="query-agnostic (the question after the "
                   "compression), query-aware (before it), comma-separated")
    p.add_argument("--quick", action="store_true", help="1024 tokens, 2 samples, compression 50%%")
    p.add_argument("--heatmap", action="store_true", help="needle accuracy by depth x length at 50%% compression")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out-dir", default="runs", help="tables, plots, and a log of every sample's scores per "
                   "setting (retrieval_<digest>.jsonl), read back by a later run of it: it resumes, or adds samples")
    p.add_argument("--fresh", action="store_true", help="discard the samples logged for these settings")
    args = p.parse_args(argv)
    given = [f for f in ("lengths", "samples", "compressions") if getattr(args, f) != p.get_default(f)]
    if args.quick and (given or args.heatmap):
        raise KVNestError(f"--quick sets --lengths, --samples and --compressions; drop "
                          f"{'--heatmap' if args.heatmap else '--' + given[0]}")
    unused = [f for f in ("projections", "tasks", "query", "compressions", "fresh")
              if getattr(args, f) != p.get_default(f)]
    if args.heatmap and unused:
        raise KVNestError(f"--heatmap scores the needle at 50% compression, query-agnostic; drop --{unused[0]}")
    if args.quick:
        args.lengths, args.samples, args.compressions = "1024", 2, "0.5"
    tasks = [t for t in args.tasks.split(",") if t]
    methods = [m for m in args.methods.split(",") if m and m != "none"]
    queries = [x for x in args.query.split(",") if x]
    for what, given, known in (("--tasks", tasks, TASKS), ("--methods", methods, BASELINES),
                               ("--query", queries, ("agnostic", "aware"))):
        if not given or set(given) - set(known):
            raise KVNestError(f"{what}: unknown {sorted(set(given) - set(known)) or 'empty'}; choose from "
                              f"{', '.join(known)}")
    try:
        compressions = ratios(args.compressions)
    except Exception:
        compressions = []
    if not compressions or max(compressions) >= 1:
        raise KVNestError(f"--compressions {args.compressions!r}: pass fractions in (0, 1), comma-separated")
    lengths = integers(args.lengths, "--lengths", least=200)
    model, tok, _ = model_from_flags(args)
    longest = max(lengths) + max(MAX_NEW[t] for t in tasks)
    if longest > model.args.max_seq_len:
        raise KVNestError(f"--lengths: {max(lengths)} tokens and the answer ({longest} in all) exceed the model's "
                          f"context of {model.args.max_seq_len}; pass shorter lengths")
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if args.heatmap:
        runs = runs_for(model, [0.5], methods, args.gate, None)
        text = heatmap(model, tok, lengths, [0.0, 0.25, 0.5, 0.75, 1.0], runs, args.samples, args.seed,
                       out / "retrieval_heatmap.png")
        (out / "retrieval_heatmap.md").write_text(text + "\n")
        return print(text)
    runs = runs_for(model, compressions, methods, args.gate, args.projections)
    digest = lambda f: f and hashlib.sha256(Path(f).read_bytes()).hexdigest()[:16]  # noqa: E731
    settings = {"model": model.fingerprint(), "dtype": args.dtype, "seed": args.seed, "runs": list(runs),
                "gate": digest(args.gate), "projections": digest(args.projections), "samples": samples_digest()}
    log = out / f"retrieval_{hashlib.sha256(json.dumps(settings).encode()).hexdigest()[:10]}.jsonl"  # its own
    if args.fresh:
        log.unlink(missing_ok=True)
    results = evaluate(model, tok, tasks, lengths, args.samples, runs, queries, args.seed, log, settings)
    text = table(results, tasks, args.samples)
    (out / "retrieval.md").write_text(text + "\n")
    (out / "retrieval.json").write_text(json.dumps({f"{n} {q}": r for (n, q), r in results.items()}, indent=1))
    for (length, query), r in results.items():
        able = [t for t in tasks if r["full"][t] >= FAILED] or tasks
        curves = {}
        for name, per in r.items():
            if name != "full":
                method, c = name.rsplit(" ", 1)
                curves.setdefault(method, {})[float(c[:-1]) / 100] = sum(per[t] for t in able) / len(able)
        plot_curves(curves, "compression (fraction of the cache removed)", "retrieval accuracy",
                    f"{length} tokens, query-{query}", out / f"retrieval_{length}_{query}.png")
    print(text)


if __name__ == "__main__":
    run_cli(main)
