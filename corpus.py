"""Text of other kinds, from what a fresh machine installs: training data beyond the default text, and held-out
text that no run trains on.

MatryoshkaKV's projections fit their training text (README: at a 50% budget, 1.13x the full model's perplexity
on the eval half of pydoc topics, 2.2x on CPython's licence). The paper trains on RedPajama; nothing can be
downloaded here, so this module gathers English text that ships with installed packages, read as source (`ast`),
never imported:

- training kinds: the docstrings of numpy, torch, sympy and networkx (what `pip install -r requirements.txt`
  brings), mixed with the default text by `train.py --data default:1 runs/corpus/packages.txt:1`;
- held-out kinds, that no run trains on: matplotlib's docstrings (a package's documentation held out), CPython's
  standard library docstrings (another project's), and CPython's LICENSE.txt (legal text).

Each kind is a seeded sample of whole docstrings (at least `MIN_CHARS` characters, duplicates dropped) up to a
number of characters, so that the first windows of a file cover many documents. Versions differ between machines:
`manifest.json` records each package's version and the characters taken.

    python corpus.py                     # -> runs/corpus/{packages,matplotlib,stdlib,license}.txt, manifest.json
"""
import ast
import importlib.metadata
import importlib.util
import json
import random
import sysconfig
from pathlib import Path

from tqdm import tqdm

from errors import KVNestError, Parser, count, run_cli

TRAIN_PACKAGES = ("numpy", "torch", "sympy", "networkx")
HELD_OUT_PACKAGE = "matplotlib"
MIN_CHARS = 200  # shorter docstrings are mostly one-line summaries
SKIP = {"tests", "test", "testing", "site-packages", "idlelib", "lib2to3"}  # test suites, other trees


def docstrings(root: Path, desc: str) -> list[str]:
    """The docstrings (modules, classes, functions) of every .py file under root, outside test folders."""
    out, seen = [], set()
    files = [f for f in sorted(root.rglob("*.py")) if not SKIP & set(f.relative_to(root).parts[:-1])]
    for f in tqdm(files, desc=desc, leave=False):
        try:
            tree = ast.parse(f.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue  # a file this Python cannot parse contributes nothing
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc and len(doc) >= MIN_CHARS and doc not in seen:
                    seen.add(doc)
                    out.append(doc)
    return out


def sample(docs: list[str], chars: int, seed: int) -> str:
    """Whole documents in a seeded random order, up to `chars` characters, joined by blank lines."""
    order = list(range(len(docs)))
    random.Random(seed).shuffle(order)
    picked, total = [], 0
    for i in order:
        if total >= chars:
            break
        picked.append(docs[i])
        total += len(docs[i])
    return "\n\n".join(picked)


def package_root(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or spec.origin is None:
        raise KVNestError(f"package {name} is not installed; pip install -r requirements.txt")
    return Path(spec.origin).parent


def build(out: Path, chars: int, seed: int = 0) -> dict:
    """Write the training and held-out files under `out`; returns the manifest (also written as manifest.json)."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    licence = stdlib / "LICENSE.txt"
    if not licence.is_file():  # checked before minutes of parsing, not after
        raise KVNestError(f"{licence} is missing from this Python; the licence kind needs CPython's LICENSE.txt")
    kinds = {}
    parts = [sample(docstrings(package_root(p), p), chars, seed) for p in TRAIN_PACKAGES]
    kinds["packages"] = ("\n\n".join(parts), {p: importlib.metadata.version(p) for p in TRAIN_PACKAGES})
    kinds[HELD_OUT_PACKAGE] = (sample(docstrings(package_root(HELD_OUT_PACKAGE), HELD_OUT_PACKAGE), chars, seed),
                               {HELD_OUT_PACKAGE: importlib.metadata.version(HELD_OUT_PACKAGE)})
    kinds["stdlib"] = (sample(docstrings(stdlib, "stdlib"), chars, seed), {"python": stdlib.name})
    kinds["license"] = (licence.read_text(encoding="utf-8"), {"python": stdlib.name})
    out.mkdir(parents=True, exist_ok=True)
    manifest = {}
    for name, (text, versions) in kinds.items():
        (out / f"{name}.txt").write_text(text, encoding="utf-8")
        manifest[name] = dict(chars=len(text), versions=versions, held_out=name != "packages")
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest


def main(argv=None):
    p = Parser(description="Gather training text of other kinds (package docstrings) and held-out text "
               "(matplotlib's and the standard library's docstrings, CPython's licence) from installed files.")
    p.add_argument("--out", default="runs/corpus", help="folder for the .txt files and manifest.json")
    p.add_argument("--chars", type=count, default=400_000, help="characters per package and per held-out kind")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    for name, m in build(Path(args.out), args.chars, args.seed).items():
        print(f"{args.out}/{name}.txt: {m['chars']:,} characters{' (held out)' if m['held_out'] else ''}")


if __name__ == "__main__":
    run_cli(main)
