"""Out of domain: how MatryoshkaKV's projections hold on text of other kinds than they were trained on.

Projections are fitted to their training text; a compressor that people copy into their projects must hold on
theirs. For each text (the eval half of the default text, and held-out kinds such as corpus.py's licence, standard
library and matplotlib docstrings), this scores eval.py's protocol (the first 6 windows of 512 tokens, perplexity
and KL to the full cache) at each budget for the PCA start, the trained projections at uniform ranks and, with
--ranks, at searched ranks, and reports each against the full model on the same text:

    python domains.py --projections runs/matryoshka.safetensors --ranks runs/ranks.json \\
        --texts default runs/corpus/license.txt runs/corpus/stdlib.txt runs/corpus/matplotlib.txt

Writes domains.md (a table), domains.json and domains.png (x full perplexity per text and budget) to --out-dir.
How the projections move with their training text (several runs, each trained on another mix): score each run, then
put them side by side, one column per run, labelled by the mix it was trained on:

    python domains.py --compare runs/pydoc runs/mix runs/mix_p75 --out-dir runs/mixes
"""
import json
from pathlib import Path

from tqdm import tqdm

from assets import data_weight
from compress import Projections, load_projections, load_ranks, uniform_ranks
from errors import KVNestError, Parser, count, ratios, run_cli
from eval import eval_windows, score
from flags import add_model_flags, model_from_flags

SETTINGS = ("PCA, uniform", "trained, uniform", "trained, searched")


def domain_scores(model, tok, proj: Projections, ranks: str | None, texts: list, budgets: list,
                  windows: int = 6, seq_len: int = 512) -> dict:
    """{text: {"full": perplexity, budget: {setting: score}}} over the given texts and budgets."""
    pca, out = proj.pca(), {}
    for text in tqdm(texts, desc="texts"):
        w = eval_windows(tok, text, windows, seq_len)
        out[text] = {"full": score(model, w)["perplexity"]}
        for budget in budgets:
            uniform = uniform_ranks(model, budget)
            runs = {SETTINGS[0]: (pca, uniform), SETTINGS[1]: (proj, uniform)}
            if ranks:
                runs[SETTINGS[2]] = (proj, load_ranks(ranks, model, budget))
            out[text][budget] = {name: score(model, w, p.features(*r)) for name, (p, r) in runs.items()}
    return out


def cell_text(cell: dict, full: float) -> str:
    """One table cell: perplexity (x the full model's, KL)."""
    return f"{cell['perplexity']:.2f} ({cell['perplexity'] / full:.2f}x, {cell['kl']:.3f})"


def domain_table(scores: dict) -> str:
    """Markdown: one row per text and budget; cells perplexity (x full, KL)."""
    names = [s for s in SETTINGS if any(s in cell for row in scores.values() for b, cell in row.items()
                                        if b != "full")]
    lines = [f"| text | full | budget | {' | '.join(names)} |", "|---" * (len(names) + 3) + "|"]
    for text, row in scores.items():
        full = row["full"]
        for budget, cell in ((b, c) for b, c in row.items() if b != "full"):
            vals = [cell_text(cell[n], full) for n in names]
            lines.append(f"| {Path(text).name} | {full:.2f} | {budget:.1%} | {' | '.join(vals)} |")
    return "\n".join(lines)


def trained_on(meta: dict) -> str:
    """The training mix of a train.py checkpoint in words: each source's share of windows, and the steps."""
    data = meta.get("config", {}).get("data") or ["default"]
    pairs = [data_weight(spec) for spec in ([data] if isinstance(data, str) else data)]
    total = sum(w for _, w in pairs)
    mix = " + ".join(f"{Path(path).stem} {w / total:.0%}" for path, w in pairs)
    return f"{mix}, {meta.get('step')} steps"


def read_run(run_dir: str) -> tuple[str, dict]:
    """(training mix, scores) of an earlier `domains.py --out-dir run_dir`."""
    path = Path(run_dir) / "domains.json"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        label, scores = data["trained_on"], data["scores"]
    except (OSError, ValueError, KeyError, TypeError):
        raise KVNestError(f"{path} is not a domains.py result; make it with `python domains.py --projections "
                          f"CKPT --out-dir {run_dir}`") from None
    return label, {text: {k if k == "full" else float(k): v for k, v in row.items()} for text, row in scores.items()}


def compare_table(runs: dict, setting: str) -> str:
    """Markdown: one row per text and budget, one column per run (`setting`); runs = {label: scores}."""
    first = next(iter(runs.values()))
    lines = [f"| text | full | budget | {' | '.join(runs)} |", "|---" * (len(runs) + 3) + "|"]
    for text, row in first.items():
        for budget in (b for b in row if b != "full"):
            cells = [cell_text(s[text][budget][setting], s[text]["full"]) for s in runs.values()]
            lines.append(f"| {Path(text).name} | {row['full']:.2f} | {budget:.1%} | {' | '.join(cells)} |")
    return "\n".join(lines)


def compare_plot(runs: dict, path: Path, setting: str) -> None:
    """x full perplexity (`setting`) per run, one panel per budget and one line per text."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    first = next(iter(runs.values()))
    budgets = [b for b in next(iter(first.values())) if b != "full"]
    width = max(5.0, 1.4 * len(runs))  # room for each run's label of several lines
    fig, axes = plt.subplots(1, len(budgets), figsize=(width * len(budgets), 4), squeeze=False)
    for ax, budget in zip(axes[0], budgets):
        for text in first:
            ys = [s[text][budget][setting]["perplexity"] / s[text]["full"] for s in runs.values()]
            ax.plot(range(len(runs)), ys, marker="o", label=Path(text).name)
        labels = [label.replace(" + ", "\n+ ").replace(", ", "\n").replace(" (", "\n(") for label in runs]
        ax.set_xticks(range(len(runs)), labels, fontsize=7)
        ax.set(ylabel="perplexity / full model's", title=f"{setting} ranks, budget {budget:.1%}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def compare(run_dirs: list, out: Path, setting: str = SETTINGS[1]) -> str:
    """Earlier domains.py runs side by side (`setting`): compare.md, compare.png in `out`; returns the table."""
    if len(set(run_dirs)) < len(run_dirs):
        raise KVNestError("--compare: a run is named twice; pass each once")
    labels, scores = zip(*(read_run(d) for d in run_dirs))
    if len(set(labels)) < len(labels):  # runs trained on the same mix: told apart by their folders
        labels = [f"{label} ({d})" for label, d in zip(labels, run_dirs)]
    runs = dict(zip(labels, scores))
    keys = [{(t, b) for t, row in scores.items() for b in row} for scores in runs.values()]
    if any(k != keys[0] for k in keys):
        raise KVNestError("--compare: the runs scored different texts or budgets; score each with the same "
                          "--texts and --budgets")
    if any(setting not in cell for s in runs.values() for row in s.values() for b, cell in row.items()
           if b != "full"):
        raise KVNestError(f"--compare: a run has no '{setting}' column; score each run with --ranks, or drop "
                          f"--column")
    table = compare_table(runs, setting)
    out.mkdir(parents=True, exist_ok=True)
    (out / "compare.md").write_text(table + "\n")
    compare_plot(runs, out / "compare.png", setting)
    return table


def plot(scores: dict, path: Path) -> None:
    """x full perplexity of the trained projections (searched if given) per text, one line per text."""
    from eval import plot_curves
    curves = {}
    for text, row in scores.items():
        pts = {b: c.get(SETTINGS[2], c[SETTINGS[1]])["perplexity"] / row["full"]
               for b, c in row.items() if b != "full"}
        curves[Path(text).name] = {**pts, 1.0: 1.0}
    plot_curves(curves, "KV cache budget (kept fraction)", "perplexity / full model's",
                "MatryoshkaKV by kind of text", path, invert_x=True)


def main(argv=None):
    p = Parser(description="Perplexity of MatryoshkaKV against the full model on several kinds of text: the eval "
               "half and held-out kinds (PCA start, trained uniform, trained searched).")
    add_model_flags(p)
    p.add_argument("--projections", help="checkpoint of python train.py")
    p.add_argument("--ranks", help="ranks JSON of python search.py for the searched column")
    p.add_argument("--texts", nargs="+", default=["default"], help="texts to score; 'default' is the eval half")
    p.add_argument("--budgets", type=ratios, default=[0.5, 0.25], help="comma-separated budgets (default 0.5,0.25)")
    p.add_argument("--windows", type=count, default=6)
    p.add_argument("--seq-len", type=lambda s: count(s, 2), default=512)
    p.add_argument("--compare", nargs="+", metavar="RUN_DIR", help="instead of scoring: earlier runs' --out-dir "
                   "side by side (one column per training mix) in compare.md and compare.png")
    p.add_argument("--column", choices=("uniform", "searched"), help="with --compare: the trained projections "
                   "at uniform ranks (the default) or at the ranks of each run's --ranks")
    p.add_argument("--out-dir", default="runs", help="where domains.md, .json and .png go")
    args = p.parse_args(argv)
    if args.compare:
        scoring = [f"--{k.replace('_', '-')}" for k in vars(args)
                   if k not in ("compare", "out_dir", "column") and getattr(args, k) != p.get_default(k)]
        if scoring:
            raise KVNestError(f"--compare reads earlier results; {' '.join(scoring)} would score anew: drop it")
        column = {"uniform": SETTINGS[1], "searched": SETTINGS[2]}[args.column or "uniform"]
        print(compare(args.compare, Path(args.out_dir), column))
        return
    if args.column:
        raise KVNestError("--column picks what --compare shows; pass --compare RUN_DIR... or drop it")
    if not args.projections:
        raise KVNestError("pass --projections CKPT (a python train.py checkpoint) to score, or --compare RUN_DIR...")
    if max(args.budgets) >= 1:
        raise KVNestError(f"--budgets {args.budgets}: pass budgets below 1 (at 1 every setting is the full model)")
    model, tok, _ = model_from_flags(args)
    if args.seq_len > model.args.max_seq_len:
        raise KVNestError(f"--seq-len {args.seq_len} exceeds the model's context of {model.args.max_seq_len}")
    proj, meta, _ = load_projections(args.projections, model)
    scores = domain_scores(model, tok, proj, args.ranks, args.texts, args.budgets, args.windows, args.seq_len)
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    table = domain_table(scores)
    (out / "domains.md").write_text(table + "\n")
    record = {"projections": args.projections, "trained_on": trained_on(meta),
              "scores": {t: {str(b): c for b, c in r.items()} for t, r in scores.items()}}
    (out / "domains.json").write_text(json.dumps(record, indent=1) + "\n")
    plot(scores, out / "domains.png")
    print(table)


if __name__ == "__main__":
    run_cli(main)
