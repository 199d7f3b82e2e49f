"""Passkey retrieval at long context: does a method keep the one sentence that matters?

A five-digit key is hidden at a random depth of filler text (Mohtashami & Jaggi, 2023, "Landmark Attention"):

    <filler> The pass key is 71432. Remember it. 71432 is the pass key. <filler> ... What is the pass key? The pass key is

The document (everything before the question) is prefilled with full attention and its cache is evicted to the
kept fraction (eviction after prefill); the question and the answer are then decoded one token at a time from the
compact cache, so evicted entries are really gone. Accuracy = the fraction of samples whose greedy answer starts
with the key.

    python passkey.py --length 4096 --keep 0.25 --samples 5 --gate runs/gate.safetensors
    python passkey.py --length 4096 --keep 0.25 --projections runs/matryoshka.safetensors --budget 0.5   # both axes
"""
import json
import random

import torch
from tqdm import tqdm

from assets import Tokenizer
from errors import KVNestError, Parser, count, ratio, run_cli
from evict import BASELINES, baseline
from flags import add_model_flags, features_from_args, model_from_flags
from gate import load_gate
from haystack import FILLER
from kernels import Decoder
from model import Transformer

QUESTION = " What is the pass key? The pass key is"


def make_sample(tok: Tokenizer, length: int, rng: random.Random) -> tuple[list, list, str]:
    """(document ids, question ids, key) for a prompt of about `length` tokens with the key at a random depth."""
    key = str(rng.randint(10000, 99999))
    needle = tok.encode(f" The pass key is {key}. Remember it. {key} is the pass key. ")
    question = tok.encode(QUESTION)
    filler = tok.encode(" ".join(FILLER) + " ")  # the filler of haystack.py's needle tasks
    n = length - len(needle) - len(question)
    if n < len(filler):
        raise KVNestError(f"--length {length} is too short for a passkey prompt; use at least 100 tokens")
    body = (filler * (n // len(filler) + 1))[:n]
    depth = rng.randint(0, n // len(filler)) * len(filler)  # at a sentence boundary
    return body[:depth] + needle + body[depth:], question, key


@torch.no_grad()
def retrieve(model: Transformer, tok: Tokenizer, doc: list, question: list, policy, keep: float, features=None,
             new_tokens: int = 8) -> str:
    """Evict the document's cache to `keep` (policy None: keep it all), then decode the question one token at a time
    and a greedy answer from what is left. features (compress.Matryoshka) compress every entry too."""
    dec = Decoder(model, len(question) + new_tokens, features, policy, keep, exact=True, compile=False)
    device = model.inv_freq.device
    logits, pos = dec(torch.tensor([doc], device=device), 0), len(doc)
    for t in question:  # one decode step per question token: the cache grows by one entry each
        logits, pos = dec(torch.tensor([[t]], device=device), pos), pos + 1
    answer = []
    for _ in range(new_tokens):
        answer.append(int(logits[0, -1].argmax()))
        logits, pos = dec(torch.tensor([answer[-1:]], device=device), pos), pos + 1
    return tok.decode(answer)


def main(argv=None):
    p = Parser(description="Passkey retrieval accuracy for the full cache and eviction methods.")
    add_model_flags(p)
    p.add_argument("--length", type=lambda s: count(s, 100), default=4096, help="prompt tokens (the default model "
                   "has 8192)")
    p.add_argument("--keep", type=ratio, default=0.25)
    p.add_argument("--samples", type=count, default=5)
    p.add_argument("--methods", default="streaming,h2o,snapkv,random", help="comma-separated baselines (or none)")
    p.add_argument("--gate", help="gate checkpoint to include")
    p.add_argument("--projections", help="MatryoshkaKV checkpoint: compress every method's cache too")
    p.add_argument("--budget", type=ratio, help="MatryoshkaKV budget with --projections")
    p.add_argument("--ranks", help="per-head ranks JSON from search.py, with --projections")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    methods = [m for m in args.methods.split(",") if m and m != "none"]
    unknown = sorted(set(methods) - set(BASELINES))
    if unknown:
        raise KVNestError(f"--methods: unknown {', '.join(unknown)}; choose from {', '.join(BASELINES)} (the gate "
                          f"comes with --gate)")
    model, tok, _ = model_from_flags(args)
    if args.length > model.args.max_seq_len:
        raise KVNestError(f"--length {args.length} exceeds the model's context of {model.args.max_seq_len}")
    features = features_from_args(model, args)
    rng = random.Random(args.seed)
    samples = [make_sample(tok, args.length, rng) for _ in range(args.samples)]
    runs = {"full cache": (None, 1.0)}
    runs.update({m: (baseline(m), args.keep) for m in methods})
    if args.gate:
        runs["gate"] = (load_gate(args.gate, model)[0], args.keep)
    acc = {}
    for name, (policy, keep) in tqdm(runs.items(), desc="passkey"):
        hits = [retrieve(model, tok, d, q, policy, keep, features).strip().startswith(key) for d, q, key in samples]
        acc[name] = sum(hits) / len(hits)
    if args.json:
        print(json.dumps({"length": args.length, "keep": args.keep, "samples": args.samples, "accuracy": acc}))
    else:
        print(f"| method | passkey accuracy ({args.samples} samples, {args.length} tokens, keep {args.keep:.1%}) |")
        print("|---|---|")
        for name, a in acc.items():
            print(f"| {name} | {a:.0%} |")


if __name__ == "__main__":
    run_cli(main)
