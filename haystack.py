"""Long-context retrieval tasks, generated from a seed: RULER's (Hsieh et al., 2024), written in code.

Nothing is downloaded. Each sample is deterministic from (task, length, seed), about `length` tokens long at any
length up to the model's context, and knows its expected answers:

  needle       a word-key/number pair hidden at a depth of repeated filler sentences; ask for the number
  needle_text  the same, hidden in real text (the eval half of the pydoc topics)
  multikey     four pairs with different keys; ask for one of them
  multivalue   four numbers for one key; ask for all of them
  vartrack     a chain of assignments VAR A = 12345, VAR B = A, ... spread over the filler; name every variable
               that holds the value
  words        a list of words in which ten appear far more often than the rest; name those ten

Each prompt is the default model's chat turn: the context, then the question and the start of the answer
(`prompt` cuts it after the context, so that the context can be compressed before the question is read). An
answer is scored as RULER does: the fraction of the expected strings found in it (0 or 1 for a single needle).
retrieval.py runs these tasks on every compression method.
"""
import functools
import hashlib
import inspect
import json
import random
import re
from dataclasses import dataclass

from assets import chatml, default_halves
from errors import KVNestError

TASKS = ("needle", "needle_text", "multikey", "multivalue", "vartrack", "words")
FILLER = ["The grass is green.", "The sky is blue.", "The sun is yellow.", "Here we go.", "There and back again."]
KEYS = ["apple", "river", "candle", "marble", "violin", "garden", "rocket", "pepper", "silver", "tiger", "window",
        "orange", "castle", "pencil", "forest", "bottle", "planet", "mirror", "ladder", "anchor"]
MAX_NEW = {"needle": 12, "needle_text": 12, "multikey": 12, "multivalue": 40, "vartrack": 28,
           "words": 40}  # answer tokens decoded per task


@dataclass
class Sample:
    context: str
    question: str
    prefix: str  # the start of the answer, as RULER's templates give it
    answers: list


@functools.cache
def sentences(haystack: str) -> list:
    """The haystack's sentences: the filler, or the eval half of the pydoc topics ("text")."""
    if haystack == "filler":
        return FILLER
    text = re.sub(r"\s+", " ", default_halves()[1])
    return [s.strip() + "." for s in text.split(". ") if len(s.split()) > 3]


def fill(tok, length: int, inserts: list, depths: list, haystack: str, rng: random.Random) -> str:
    """About `length` tokens of haystack sentences with the insert sentences at the given depths (fractions)."""
    pool, out, n = sentences(haystack), [], sum(len(tok.encode(" " + s)) for s in inserts)
    start = 0 if haystack == "filler" else rng.randrange(len(pool))
    while n < length:
        s = pool[(start + len(out)) % len(pool)]
        out.append(s)
        n += len(tok.encode(" " + s))
    for s, d in sorted(zip(inserts, depths), key=lambda p: -p[1]):
        out.insert(round(d * len(out)), s)
    return " ".join(out)


def build(task: str, tok, length: int, seed: int, depth: float | None = None) -> Sample:
    """One sample of `task` with a prompt of about `length` tokens, the same for the same seed (and needle depth)."""
    if task not in TASKS:
        raise KVNestError(f"unknown task {task!r}; choose from {', '.join(TASKS)}")
    rng = random.Random(f"{task}:{length}:{seed}")
    keys, values = rng.sample(KEYS, 4), [str(rng.randint(1_000_000, 9_999_999)) for _ in range(4)]
    needle = "One of the special magic numbers for {} is: {}."
    question = f"What is the special magic number for {keys[0]} mentioned in the provided text?"
    prefix = f"The special magic number for {keys[0]} mentioned in the provided text is"
    if task == "multivalue":
        question, prefix = (f"What are all the special magic numbers for {keys[0]} mentioned in the provided text?",
                            f"The special magic numbers for {keys[0]} mentioned in the provided text are")
    if task == "vartrack":
        names = ["".join(rng.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ") for _ in range(5)) for _ in range(4)]
        value = str(rng.randint(10000, 99999))
        question = f"Find all variables that are assigned the value {value} in the text above."
        prefix = (f"According to the chain of variable assignments in the text above, {len(names)} variables are "
                  f"assigned the value {value}, they are:")
    if task == "words":
        question = "What are the 10 most common words in the above list?"
        prefix = "The top 10 words that appear most often in the list are:"
    room = length - len(tok.encode(chatml(f"\n\n{question}") + prefix))  # tokens left for the context
    if room < 50:
        raise KVNestError(f"length {length} is too short for a retrieval prompt; use at least 200 tokens")
    if task in ("needle", "needle_text"):
        d = rng.random() if depth is None else depth
        context = fill(tok, room, [needle.format(keys[0], values[0])], [d], task[7:] or "filler", rng)
        return Sample(context, question, prefix, values[:1])
    if task in ("multikey", "multivalue"):
        named = keys if task == "multikey" else [keys[0]] * 4
        context = fill(tok, room, [needle.format(k, v) for k, v in zip(named, values)],
                       [rng.random() for _ in keys], "filler", rng)
        return Sample(context, question, prefix, values[:1] if task == "multikey" else values)
    if task == "vartrack":
        chain = [f"VAR {names[0]} = {value}."] + [f"VAR {b} = {a}." for a, b in zip(names, names[1:])]
        context = fill(tok, room, chain, sorted(rng.random() for _ in chain), "filler", rng)
        return Sample(context, question, prefix, names)
    vocab = sorted(set(re.findall(r"\b[a-z]{5,9}\b", default_halves()[1])))
    n = room // 4  # list items; each "12. word" is about 4 tokens, corrected once below
    for _ in range(2):
        words = rng.sample(vocab, 10 + n)
        common, times = words[:10], max(3, n // 25)  # ten words `times` times each, the rest once
        items = [w for w in common for _ in range(times)] + words[10: max(10, n - 10 * times + 10)]
        random.Random(seed).shuffle(items)
        context = " ".join(f"{i + 1}. {w}" for i, w in enumerate(items))
        n = max(40, round(n * room / len(tok.encode(context))))
    return Sample(context, question, prefix, common)


def prompt(tok, s: Sample) -> tuple[list, list]:
    """(context ids, question ids): the chat turn cut after the context, so that the context can be compressed
    before the question is read."""
    full = chatml(f"{s.context}\n\n{s.question}") + s.prefix
    context = full[: full.index(s.context) + len(s.context)]
    return tok.encode(context), tok.encode(full[len(context):])


def score(output: str, answers: list) -> float:
    """RULER's string_match_all: the fraction of the expected strings found in the output (case-insensitive)."""
    return sum(a.lower() in output.lower() for a in answers) / len(answers)


def samples_digest() -> str:
    """What makes and scores the samples (code, word lists, the pydoc haystack, which changes with Python)."""
    made = [inspect.getsource(f) for f in (sentences, fill, build, prompt, score)] + [FILLER, KEYS, MAX_NEW]
    return hashlib.sha256(json.dumps(made + [default_halves()[1]]).encode()).hexdigest()[:16]
