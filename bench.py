"""Decode speed and cache bytes of each cache kind, measured side by side in one run (eager PyTorch).

For every kind: prefill a context of random tokens (speed does not depend on the text), then time --steps
one-token decode steps and report tokens/s, the bytes of the cache tensors, and both as ratios to the full cache.
Kinds: the full cache; MatryoshkaKV at --budget with keys projected after RoPE (attention in the compressed
space) and before RoPE (keys rebuilt and rotated every step, as Palu does: the price of its better quality);
eviction to --keep with SnapKV scores into the compact cache.

    python bench.py --context 4096 --steps 32
"""
import argparse
import time

import torch

from compress import Projections, compress, set_ranks, uniform_ranks
from gate import SnapKV, prefill_and_evict, restore_full
from assets import add_model_flags, model_from_flags
from model import KVNestError, Transformer, run_cli


def time_decode(model: Transformer, steps: int, pos: int) -> float:
    """Seconds per decode step, after one warm-up step."""
    tok = torch.zeros(1, 1, dtype=torch.long, device=model.inv_freq.device)
    model(tok, pos)
    t0 = time.perf_counter()
    for i in range(steps):
        model(tok, pos + 1 + i)
    if tok.is_cuda:
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / steps


@torch.no_grad()
def bench(model: Transformer, context: int, steps: int, budget: float, keep: float) -> list:
    a = model.args
    x = torch.randint(0, a.vocab_size, (1, context), generator=torch.Generator().manual_seed(0))
    x = x.to(model.inv_freq.device)
    rows = []
    model.setup_cache(1, context + steps + 1)
    model(x, 0)
    rows.append(("full cache", time_decode(model, steps, context), model.cache_bytes()))
    model.clear_cache()
    originals = [layer.attn for layer in model.layers]
    eye = torch.eye(a.head_dim).expand(a.n_layers, a.n_kv_heads, a.head_dim, a.head_dim)
    for mode in ("post_rope", "pre_rope"):
        compress(model, Projections(eye, eye, mode).to(x.device))
        set_ranks(model, *uniform_ranks(model, budget))
        model.setup_cache(1, context + steps + 1)
        model(x, 0)
        rows.append((f"MatryoshkaKV {budget:.0%}, keys {mode.replace('_', ' ')}", time_decode(model, steps, context),
                     model.cache_bytes()))
        model.clear_cache()
    for layer, base in zip(model.layers, originals):
        layer.attn = base
    prefill_and_evict(model, x, SnapKV(), keep, compact=True, max_new=steps + 1)
    rows.append((f"eviction {keep:.0%} (SnapKV, compact)", time_decode(model, steps, context),
                 sum(layer.attn.cache.nbytes() for layer in model.layers)))
    restore_full(model)
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description="Decode tokens/s and KV bytes per cache kind, side by side.")
    add_model_flags(p)
    p.add_argument("--context", type=int, default=4096)
    p.add_argument("--steps", type=int, default=32)
    p.add_argument("--budget", type=float, default=0.5)
    p.add_argument("--keep", type=float, default=0.5)
    args = p.parse_args(argv)
    model, _, _ = model_from_flags(args)
    if args.context + args.steps + 1 > model.args.max_seq_len:
        raise KVNestError(f"--context {args.context} + --steps exceeds the model's {model.args.max_seq_len} tokens")
    rows = bench(model, args.context, args.steps, args.budget, args.keep)
    full_t, full_b = rows[0][1], rows[0][2]
    print(f"| cache ({args.context}-token context, batch 1, {args.device}, {args.dtype}, eager) | tokens/s | "
          f"x full | KV MiB | x full |")
    print("|---|---|---|---|---|")
    for name, t, b in rows:
        print(f"| {name} | {1 / t:.1f} | {full_t / t:.2f} | {b / 2**20:.1f} | {b / full_b:.3f} |")


if __name__ == "__main__":
    run_cli(main)
