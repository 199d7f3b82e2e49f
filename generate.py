"""Generate text with a LLaMA/Mistral model, its KV cache optionally compressed along either axis or both.

    python generate.py --chat --prompt "What is the capital of France?" --max-new-tokens 20
    python generate.py --prompt "..." --projections runs/matryoshka.safetensors --budget 0.5   # MatryoshkaKV
    python generate.py --prompt "..." --evict gate --gate runs/gate.safetensors --keep 0.5   # evict the prompt
    python generate.py --prompt "..." --evict gate --gate runs/gate_new.safetensors --window 32 --gate-new   # + new
    python generate.py --prompt "..." --evict gate --gate G --protocol inside --window 32   # evict inside the prefill
    python generate.py --prompt "..." --compile      # kernels.py's compiled step (default on CUDA)
    python generate.py --prompt "..." --plan runs/plan.json --projections runs/matryoshka.safetensors   # joint.py

Text streams as it is decoded; the tokens/s and the cache's size follow on stderr.
"""
import itertools
import sys
import time
from contextlib import nullcontext
from typing import Iterable, Iterator

import torch

from assets import chatml
from errors import KVNestError, Parser, count, number, run_cli
from flags import (add_compression_flags, add_model_flags, add_protocol_flags, compression_from_flags,
                   model_from_flags, protocol_from_flags)
from gate import judging
from kernels import Decoder
from model import generate


def stream(tok, tokens: Iterable[int], out: list) -> Iterator[str]:
    """The text of `tokens` piece by piece as they arrive (each appended to `out`). A character spread over several
    tokens (an emoji is 4 bytes of byte-level BPE) decodes to U+FFFD until its last byte: wait for it."""
    shown = ""
    for t in tokens:
        out.append(t)
        text = tok.decode(out)
        if not text.endswith("\ufffd"):
            yield text[len(shown):]
            shown = text
    yield tok.decode(out)[len(shown):]


def main(argv=None) -> None:
    p = Parser(description="Generate text with a LLaMA/Mistral model (optionally compressed KV).")
    add_model_flags(p)
    p.add_argument("--prompt", required=True)
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the default model's ChatML template")
    p.add_argument("--max-new-tokens", type=count, default=100)
    p.add_argument("--temperature", type=number, default=0.0, help="0: greedy; above 0: sampled")
    p.add_argument("--max-len", type=count, default=None, help="cache length (default: prompt + new tokens)")
    add_compression_flags(p)
    p.add_argument("--compile", action="store_true", default=None, help="decode with kernels.py's compiled step "
                   "(default: on CUDA)")
    p.add_argument("--no-compile", dest="compile", action="store_false", help="decode eagerly")
    add_protocol_flags(p)
    args = p.parse_args(argv)
    if args.temperature < 0:
        raise KVNestError(f"--temperature {args.temperature} is below 0; pass 0 (greedy) or more")
    torch.manual_seed(0)
    model, tok, _ = model_from_flags(args)
    features, policy, keep, exact, _ = compression_from_flags(model, args)
    protocol = protocol_from_flags(p, args)  # a prompt's last W entries stay, as a new token's last W queries
    ids = tok.encode(chatml(args.prompt) if args.chat else args.prompt)
    if not ids:
        raise KVNestError("the prompt is empty once tokenized; pass some text")
    max_len = len(ids) + args.max_new_tokens if args.max_len is None else args.max_len
    if len(ids) >= max_len or max_len > model.args.max_seq_len:
        raise KVNestError(f"prompt of {len(ids)} tokens plus {args.max_new_tokens} new does not fit a cache of "
                          f"{min(max_len, model.args.max_seq_len)}; raise --max-len or shorten the prompt")
    if args.gate_new and args.compile:
        raise KVNestError("--gate-new decodes eagerly (its hooks judge every step); drop --compile")
    if args.gate_new:
        from gate import check_new_tokens
        check_new_tokens(policy, args.window)
    compiled = not args.gate_new and (args.device.startswith("cuda") if args.compile is None else args.compile)
    runner = Decoder(model, max_len - len(ids), features, policy, keep, exact, compiled, protocol)
    if compiled:
        print("kvnest: compiling the decoder block for the decode step (once per layer structure; cached on disk)",
              file=sys.stderr)
    stop = set(model.args.eos_ids) | {tok.token_id("<|im_end|>")} - {None}
    out, t0 = [], time.perf_counter()
    prompt = torch.tensor([ids], device=args.device)
    first = runner(prompt, 0)  # the prefill, and the eviction of the prompt
    judges = judging(model, runner.cache, policy, args.window) if args.gate_new else nullcontext([])
    with judges as judges:
        tokens = generate(lambda t, pos: first if pos == 0 else runner(t, pos), prompt, args.max_new_tokens,
                          args.temperature, stop)
        for piece in stream(tok, itertools.takewhile(lambda t: t not in stop, (int(t[0]) for t in tokens)), out):
            print(piece, end="", flush=True)
    dt = time.perf_counter() - t0
    held = sum(int(g.length.sum()) for layer in runner.cache.layers for g in layer.groups)
    judged = f", {sum(j.kept for j in judges)} of {sum(j.decided for j in judges)} judged new entries kept" if \
        judges else ""
    print(f"\n[{len(out)} tokens in {dt:.2f}s: {len(out) / dt:.1f} tokens/s, KV cache {runner.nbytes() / 2**20:.2f} "
          f"MiB allocated, {held} entries held{judged}]", file=sys.stderr)


if __name__ == "__main__":
    run_cli(main)
