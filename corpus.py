"""Text of other kinds, from what a fresh machine installs: training data beyond the default text, and held-out
text that no run trains on.

MatryoshkaKV's projections fit their training text (README: at a 50% budget, 1.13x the full model's perplexity
on the eval half of pydoc topics, 2.2x on CPython's licence). The paper trains on RedPajama; nothing can be
downloaded here, so this module gathers English text that ships with installed packages, read as source (`ast`),
never imported:

- training kinds: the docstrings of numpy, torch, sympy and networkx (what `pip install -r requirements.txt`
  brings), mixed with the default text by `train.py --data default:1 runs/corpus/packages.txt:1`; and the licence
  files of every distribution that requirements.txt installs (`package_licenses.txt`: MIT, BSD, Apache and the
  like), leaving out any that shares more than `MAX_SHARED` of its `SHINGLE`-word runs with CPython's licence
  (typing_extensions ships that very text; matplotlib's is modelled on it);
- held-out kinds, that no run trains on: matplotlib's docstrings (a package's documentation held out), CPython's
  standard library docstrings (another project's), and CPython's LICENSE.txt (legal text; a kind the licence
  files train, but a document none of them shares).

Each kind is a seeded sample of whole documents (docstrings of at least `MIN_CHARS` characters, licence files;
duplicates dropped) up to a number of characters, so that the first windows of a file cover many documents.
Versions differ between machines: `manifest.json` records each package's version and the characters taken.

    python corpus.py   # -> runs/corpus/{packages,package_licenses,matplotlib,stdlib,license}.txt, manifest.json
"""
import ast
import importlib.metadata
import importlib.util
import json
import random
import re
import sysconfig
from pathlib import Path

from tqdm import tqdm

from errors import KVNestError, Parser, count, run_cli

TRAIN_PACKAGES = ("numpy", "torch", "sympy", "networkx")
HELD_OUT_PACKAGE = "matplotlib"
TRAIN_KINDS = ("packages", "package_licenses")
MIN_CHARS = 200  # shorter docstrings are mostly one-line summaries
SKIP = {"tests", "test", "testing", "site-packages", "idlelib", "lib2to3"}  # test suites, other trees
# LICENSE, LICENCE.md, COPYING, NOTICE.txt, LICENSE.APACHE, LICENSE_DEJAVU; not a module such as license.py
LICENCE_FILE = re.compile(r"(?!.*\.pyi?c?$)(LICEN[CS]E|COPYING|NOTICE)([-_.][A-Za-z0-9]+)?$", re.IGNORECASE)
SHINGLE, MAX_SHARED = 8, 0.01  # a licence sharing over 1% of its 8-word runs with CPython's is left out


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


def installed_with(requirements: Path) -> list[importlib.metadata.Distribution]:
    """The installed distributions that `pip install -r requirements` brings: its names and, recursively, what
    they require (extras left out), sorted by name."""
    def name(spec: str) -> str:
        return re.sub(r"[-_.]+", "-", re.match(r"[A-Za-z0-9._-]+", spec.strip()).group(0)).lower()
    lines = [s.strip() for s in requirements.read_text().splitlines()]
    todo = [name(s) for s in lines if s and not s.startswith(("#", "-"))]  # not comments or pip options
    found = {}
    while todo:
        n = todo.pop()
        if n in found:
            continue
        try:
            found[n] = importlib.metadata.distribution(n)
        except importlib.metadata.PackageNotFoundError:
            continue  # a platform-only requirement this machine skipped
        todo += [name(r) for r in found[n].requires or [] if "extra ==" not in r]
    return [found[n] for n in sorted(found)]


def shingles(words: list[str]) -> set[tuple[str, ...]]:
    """The runs of SHINGLE consecutive words (text.split(): whitespace and line breaks ignored)."""
    return {tuple(words[i:i + SHINGLE]) for i in range(len(words) - SHINGLE + 1)}


def licences(files: list[Path], held_out: str) -> list[str]:
    """The texts of the licence files, duplicates (up to whitespace) dropped, and any that shares more than
    MAX_SHARED of its word runs with the held-out licence left out."""
    out, seen, ref = [], set(), shingles(held_out.split())
    for f in files:
        text = f.read_text(encoding="utf-8", errors="replace")
        words = text.split()
        key, runs = " ".join(words), shingles(words)
        if key in seen or not runs or len(runs & ref) > MAX_SHARED * len(runs):
            continue
        seen.add(key)
        out.append(text)
    return out


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
    held_out_licence = licence.read_text(encoding="utf-8")  # held out; training licences must not share it
    kinds = {}
    parts = [sample(docstrings(package_root(p), p), chars, seed) for p in TRAIN_PACKAGES]
    kinds["packages"] = ("\n\n".join(parts), {p: importlib.metadata.version(p) for p in TRAIN_PACKAGES})
    dists = installed_with(Path(__file__).with_name("requirements.txt"))
    files = [Path(d.locate_file(f)) for d in dists for f in d.files or [] if LICENCE_FILE.match(f.name)]
    kinds["package_licenses"] = (sample(licences(files, held_out_licence), chars, seed),
                                 {d.metadata["Name"]: d.version for d in dists})
    kinds[HELD_OUT_PACKAGE] = (sample(docstrings(package_root(HELD_OUT_PACKAGE), HELD_OUT_PACKAGE), chars, seed),
                               {HELD_OUT_PACKAGE: importlib.metadata.version(HELD_OUT_PACKAGE)})
    kinds["stdlib"] = (sample(docstrings(stdlib, "stdlib"), chars, seed), {"python": stdlib.name})
    kinds["license"] = (held_out_licence, {"python": stdlib.name})
    out.mkdir(parents=True, exist_ok=True)
    manifest = {}
    for name, (text, versions) in kinds.items():
        (out / f"{name}.txt").write_text(text, encoding="utf-8")
        manifest[name] = dict(chars=len(text), versions=versions, held_out=name not in TRAIN_KINDS)
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest


def main(argv=None):
    p = Parser(description="Gather training text of other kinds (package docstrings and licences) and held-out "
               "text (matplotlib's and the standard library's docstrings, CPython's licence) from installed files.")
    p.add_argument("--out", default="runs/corpus", help="folder for the .txt files and manifest.json")
    p.add_argument("--chars", type=count, default=400_000,
                   help="characters per package, of licences and per held-out kind")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    for name, m in build(Path(args.out), args.chars, args.seed).items():
        print(f"{args.out}/{name}.txt: {m['chars']:,} characters{' (held out)' if m['held_out'] else ''}")


if __name__ == "__main__":
    run_cli(main)
