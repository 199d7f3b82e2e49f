"""Passkey retrieval at long context: does a method keep the one sentence that matters?

A five-digit key is hidden at a random depth of filler text (Mohtashami & Jaggi, 2023, "Landmark Attention"):

    <filler> The pass key is 71432. Remember it. 71432 is the pass key. <filler> ... What is the pass key? The pass key is

The document (everything before the question) is prefilled with full attention and its cache is evicted to the
kept fraction (eviction after prefill); the question and the answer are then decoded one token at a time from the
compact cache, so evicted entries are really gone. Accuracy = the fraction of samples whose greedy answer starts
with the key.

    python passkey.py --length 4096 --keep 0.25 --samples 5 --gate runs/gate.safetensors
"""
import argparse
import json
import random

import torch
from tqdm import tqdm

from assets import Tokenizer, add_model_flags, model_from_flags
from evict import StreamingLLM, baseline, prefill_and_evict, restore_full
from gate import load_gate
from model import KVNestError, Transformer, run_cli

FILLER = ("The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. ")
QUESTION = " What is the pass key? The pass key is"


def make_sample(tok: Tokenizer, length: int, rng: random.Random) -> tuple[list, list, str]:
    """(document ids, question ids, key) for a prompt of about `length` tokens with the key at a random depth."""
    key = str(rng.randint(10000, 99999))
    needle = tok.encode(f" The pass key is {key}. Remember it. {key} is the pass key. ")
    question = tok.encode(QUESTION)
    filler = tok.encode(FILLER)
    n = length - len(needle) - len(question)
    if n < len(filler):
        raise KVNestError(f"--length {length} is too short for a passkey prompt; use at least 100 tokens")
    body = (filler * (n // len(filler) + 1))[:n]
    depth = rng.randint(0, n // len(filler)) * len(filler)  # at a sentence boundary
    return body[:depth] + needle + body[depth:], question, key


@torch.no_grad()
def retrieve(model: Transformer, tok: Tokenizer, doc: list, question: list, policy, keep: float,
             new_tokens: int = 8) -> str:
    """Evict the document's cache to `keep`, then decode the question and a greedy answer from the compact cache."""
    device = model.inv_freq.device
    ctx = torch.tensor([doc], device=device)
    prefill_and_evict(model, ctx, policy, keep, exact=True, compact=True, max_new=len(question) + new_tokens)
    pos, answer = len(doc), []
    logits = None
    for t in question:  # one decode step per question token: the compact cache grows by one entry each
        logits = model(torch.tensor([[t]], device=device), pos)
        pos += 1
    for _ in range(new_tokens):
        nxt = int(logits[0, -1].argmax())
        answer.append(nxt)
        logits = model(torch.tensor([[nxt]], device=device), pos)
        pos += 1
    restore_full(model)
    return tok.decode(answer)


def main(argv=None):
    p = argparse.ArgumentParser(description="Passkey retrieval accuracy for the full cache and eviction methods.")
    add_model_flags(p)
    p.add_argument("--length", type=int, default=4096, help="prompt tokens (the default model has 8192)")
    p.add_argument("--keep", type=float, default=0.25)
    p.add_argument("--samples", type=int, default=5)
    p.add_argument("--methods", default="streaming,h2o,snapkv,random", help="comma-separated baselines")
    p.add_argument("--gate", help="gate checkpoint to include")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    model, tok, _ = model_from_flags(args)
    if args.length > model.args.max_seq_len:
        raise KVNestError(f"--length {args.length} exceeds the model's context of {model.args.max_seq_len}")
    rng = random.Random(args.seed)
    samples = [make_sample(tok, args.length, rng) for _ in range(args.samples)]
    runs = {"full cache": (StreamingLLM(), 1.0)}
    runs.update({m: (baseline(m, args.keep), args.keep) for m in args.methods.split(",") if m})
    if args.gate:
        runs["gate"] = (load_gate(args.gate, model)[0], args.keep)
    acc = {}
    for name, (policy, keep) in tqdm(runs.items(), desc="passkey"):
        hits = [retrieve(model, tok, d, q, policy, keep).strip().startswith(key) for d, q, key in samples]
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
