"""Out of domain: how MatryoshkaKV's projections hold on text of other kinds than they were trained on.

Projections are fitted to their training text; a compressor that people copy into their projects must hold on
theirs. For each text (the eval half of the default text, and held-out kinds such as corpus.py's licence, standard
library and matplotlib docstrings), this scores eval.py's protocol (the first 6 windows of 512 tokens, perplexity
and KL to the full cache) at each budget for the PCA start, the trained projections at uniform ranks and, with
--ranks, at searched ranks, and reports each against the full model on the same text:

    python domains.py --projections runs/matryoshka.safetensors --ranks runs/ranks.json \\
        --texts default runs/corpus/license.txt runs/corpus/stdlib.txt runs/corpus/matplotlib.txt

Writes domains.md (a table), domains.json and domains.png (x full perplexity per text and budget) to --out-dir.
"""
import json
from pathlib import Path

from tqdm import tqdm

from compress import load_projections, load_ranks, uniform_ranks
from errors import KVNestError, Parser, count, ratios, run_cli
from eval import eval_windows, score
from flags import add_model_flags, model_from_flags

SETTINGS = ("PCA, uniform", "trained, uniform", "trained, searched")


def domain_scores(model, tok, projections: str, ranks: str | None, texts: list, budgets: list,
                  windows: int = 6, seq_len: int = 512) -> dict:
    """{text: {"full": perplexity, budget: {setting: score}}} over the given texts and budgets."""
    proj, _, _ = load_projections(projections, model)
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


def domain_table(scores: dict) -> str:
    """Markdown: one row per text and budget; cells perplexity (x full, KL)."""
    names = [s for s in SETTINGS if any(s in cell for row in scores.values() for b, cell in row.items()
                                        if b != "full")]
    lines = [f"| text | full | budget | {' | '.join(names)} |", "|---" * (len(names) + 3) + "|"]
    for text, row in scores.items():
        full = row["full"]
        for budget, cell in ((b, c) for b, c in row.items() if b != "full"):
            vals = [f"{cell[n]['perplexity']:.2f} ({cell[n]['perplexity'] / full:.2f}x, {cell[n]['kl']:.3f})"
                    for n in names]
            lines.append(f"| {Path(text).name} | {full:.2f} | {budget:.1%} | {' | '.join(vals)} |")
    return "\n".join(lines)


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
    p.add_argument("--projections", required=True, help="checkpoint of python train.py")
    p.add_argument("--ranks", help="ranks JSON of python search.py for the searched column")
    p.add_argument("--texts", nargs="+", default=["default"], help="texts to score; 'default' is the eval half")
    p.add_argument("--budgets", type=ratios, default=[0.5, 0.25], help="comma-separated budgets (default 0.5,0.25)")
    p.add_argument("--windows", type=count, default=6)
    p.add_argument("--seq-len", type=lambda s: count(s, 2), default=512)
    p.add_argument("--out-dir", default="runs", help="where domains.md, .json and .png go")
    args = p.parse_args(argv)
    if max(args.budgets) >= 1:
        raise KVNestError(f"--budgets {args.budgets}: pass budgets below 1 (at 1 every setting is the full model)")
    model, tok, _ = model_from_flags(args)
    if args.seq_len > model.args.max_seq_len:
        raise KVNestError(f"--seq-len {args.seq_len} exceeds the model's context of {model.args.max_seq_len}")
    scores = domain_scores(model, tok, args.projections, args.ranks, args.texts, args.budgets, args.windows,
                           args.seq_len)
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    table = domain_table(scores)
    (out / "domains.md").write_text(table + "\n")
    (out / "domains.json").write_text(json.dumps({t: {str(b): c for b, c in r.items()} for t, r in scores.items()},
                                                 indent=1) + "\n")
    plot(scores, out / "domains.png")
    print(table)


if __name__ == "__main__":
    run_cli(main)
