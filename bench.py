"""Decode speed, KV bytes and peak memory of every cache kind against the full cache, measured side by side in one
run with the compiled decode step of kernels.py.

For each context x batch, each kind's caches are filled as after a prefill (random entries: speed does not depend
on the values, nor on the weights, so `--shape` may name a randomly initialised LLaMA-2-7B or Mistral-7B), then
--steps one-token steps are timed after two warm-up (compiling) steps; the kinds take turns, --rounds times, and
each keeps its fastest round (the table's spread: how much slower its slowest was). Kinds:
  full            the full cache
  matryoshka      MatryoshkaKV at --budget, keys after RoPE: attention in the compressed space
  matryoshka-pre  the same with keys before RoPE: keys rebuilt and rotated every step (Palu's way)
  eviction        --keep of the context entries per (layer, KV head) in compact buffers (a gate or a baseline)
  both            eviction, then MatryoshkaKV on the kept entries
  both-pre        the same with keys before RoPE (each kept entry's position is stored for its rotation)
Bandwidth counts the weights once plus the cache bytes the step actually reads; on CUDA it is also given as a
fraction of the device's peak (the roofline). Capacity: the largest context per batch whose cache fits beside the
weights, from each kind's bytes per token and the memory free on the device.

    python bench.py --contexts 1024,4096,16384,32768 --batches 1,8,32
"""
import argparse
import gc
import time
from pathlib import Path

import torch

from assets import add_model_flags, model_from_flags
from compress import Projections, compress, set_ranks, uniform_ranks
from evict import SnapKV
from kernels import Decoder
from model import KVNestError, ModelArgs, Transformer, run_cli

KINDS = ("full", "matryoshka", "matryoshka-pre", "eviction", "both", "both-pre")
SHAPES = {"llama2-7b": ModelArgs(dim=4096, n_layers=32, n_heads=32, n_kv_heads=32, head_dim=128, hidden_dim=11008,
                                 vocab_size=32000, rope_theta=1e4, tie_embeddings=False),
          "mistral-7b": ModelArgs(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, head_dim=128, hidden_dim=14336,
                                  vocab_size=32000, rope_theta=1e6, tie_embeddings=False)}
PEAK_GBPS = {"H100": 3350, "H200": 4800, "A100": 2039}  # HBM bandwidth by device name (SXM parts)


def random_model(shape: str, dtype, device) -> Transformer:
    with torch.device(device):
        return Transformer(SHAPES[shape]).to(dtype).eval().requires_grad_(False)


def weight_bytes(model: Transformer) -> int:
    """Bytes of the weights one step reads: every parameter once (the embedding table only when lm_head is it)."""
    seen = {p.data_ptr(): p.nbytes for p in model.parameters()}
    if not model.args.tie_embeddings:
        seen.pop(model.embed_tokens.weight.data_ptr())
    return sum(seen.values())


def set_kind(model: Transformer, plain: list, kind: str, budget: float) -> None:
    """Put the layers of a kind in place: the plain attention, or MatryoshkaKV at a uniform budget (identity bases:
    their values do not change the speed)."""
    for layer, attn in zip(model.layers, plain):
        layer.attn = attn
    if kind in ("matryoshka", "matryoshka-pre", "both", "both-pre"):
        a, p = model.args, model.lm_head.weight
        eye = torch.eye(a.head_dim, device=p.device).expand(a.n_layers, a.n_kv_heads, a.head_dim, a.head_dim)
        compress(model, Projections(eye, eye, "pre_rope" if kind.endswith("-pre") else "post_rope"))
        set_ranks(model, *uniform_ranks(model, budget))


def make_decoder(model, plain, kind, budget, keep, max_new, compile=True, bucket=64) -> Decoder:
    set_kind(model, plain, kind, budget)
    evicts = kind in ("eviction", "both", "both-pre")
    return Decoder(model, max_new, policy=SnapKV() if evicts else None, keep=keep if evicts else 1.0,
                   bucket=bucket, compile=compile)


def reset_peak(device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    else:  # Linux: writing 5 to clear_refs resets the peak resident set size (VmHWM)
        Path("/proc/self/clear_refs").write_text("5")


def proc_kib(path: str, field: str) -> int:
    """A `field: N kB` line of a Linux /proc file, in bytes."""
    return int(next(line.split()[1] for line in Path(path).read_text().splitlines() if line.startswith(field))) * 1024


def peak_bytes(device) -> int:
    return torch.cuda.max_memory_allocated() if device.type == "cuda" else proc_kib("/proc/self/status", "VmHWM")


def free_bytes(device) -> int:
    return torch.cuda.mem_get_info()[0] if device.type == "cuda" else proc_kib("/proc/meminfo", "MemAvailable")


@torch.no_grad()
def measure(dec: Decoder, batch: int, context: int, steps: int) -> tuple[float, int]:
    """(seconds per step, cache bytes read per step) after two warm-up steps."""
    device = dec.model.lm_head.weight.device
    tok = torch.zeros(batch, 1, dtype=torch.long, device=device)
    dec.fill_random(batch, context)
    for i in range(2):
        dec(tok, context + i)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    for i in range(steps):
        dec(tok, context + 2 + i)
    sync()
    return (time.perf_counter() - t0) / steps, dec.bytes_read()


def workspace(model: Transformer, kind: str, batch: int, context: int) -> int:
    """Memory a step needs beside the cache: pre-RoPE keys are rebuilt at full width, one layer at a time, and
    rotated with an fp32 cos/sin table of every slot."""
    a = model.args
    keys = batch * context * a.n_kv_heads * a.head_dim * model.lm_head.weight.element_size()
    return (keys + context * a.head_dim * 4) * kind.endswith("-pre")


def bytes_per_token(model, plain, kind, budget, keep) -> float:
    """Cache bytes per context token (batch 1) of a kind: the growth of its cache tensors from 512 to 1024 tokens."""
    dec = make_decoder(model, plain, kind, budget, keep, max_new=1, compile=False, bucket=1)
    sizes = []
    for context in (512, 1024):
        dec.fill_random(1, context)
        sizes.append(dec.nbytes())
    return (sizes[1] - sizes[0]) / 512


def bytes_per_token_of(model: Transformer, budget: float, keep: float, kinds=KINDS) -> dict:
    """{kind: cache bytes per context token at batch 1}."""
    plain = [layer.attn for layer in model.layers]
    per_token = {k: bytes_per_token(model, plain, k, budget, keep) for k in kinds}
    set_kind(model, plain, "full", 1.0)
    return per_token


def bench(model: Transformer, contexts: list, batches: list, steps: int, budget: float, keep: float,
          per_token: dict, compile: bool = True, rounds: int = 3) -> list:
    """One dict per (kind in per_token, context, batch): seconds per step, cache bytes, bytes read, peak memory;
    fits=False where the cache would not fit. Each (context, batch) times its kinds in turn, `rounds` times over,
    and keeps each kind's fastest round (step_s) and its slowest (slowest_s): on a shared machine the fastest is
    the least disturbed, and interleaving gives every kind the same chances."""
    from tqdm import tqdm
    device = model.lm_head.weight.device
    plain = [layer.attn for layer in model.layers]
    kinds, weights, rows = list(per_token), weight_bytes(model), {}
    budget_bytes = 0.9 * free_bytes(device)
    grid = [(c, b, r, k) for c in contexts for b in batches for r in range(rounds) for k in kinds]
    for context, batch, _, kind in (bar := tqdm(grid, desc="bench")):
        row = rows.setdefault((context, batch, kind), {"kind": kind, "context": context, "batch": batch,
                                                       "fits": False})
        if per_token[kind] * batch * (context + steps + 65) + workspace(model, kind, batch, context) < budget_bytes:
            reset_peak(device)
            dec = make_decoder(model, plain, kind, budget, keep, steps + 2, compile)
            dt, read = measure(dec, batch, context, steps)
            row.update(fits=True, step_s=min(dt, row.get("step_s", dt)), slowest_s=max(dt, row.get("slowest_s", dt)),
                       kv_bytes=dec.nbytes(), read_bytes=read, weight_bytes=weights,
                       peak_bytes=max(peak_bytes(device), row.get("peak_bytes", 0)))
            del dec
            gc.collect()
        bar.write(f"{kind} {context} x {batch}: {row.get('step_s', 0):.4f} s per step (fastest so far)")
    set_kind(model, plain, "full", 1.0)
    return list(rows.values())


def capacity(per_token: dict, batches: list, device) -> dict:
    """{kind: {batch: largest context}} whose cache fits in the free memory beside the weights (10% margin)."""
    free = 0.9 * free_bytes(device)
    return {k: {b: int(free // (bytes * b)) for b in batches} for k, bytes in per_token.items()}


def table(rows: list, device) -> str:
    peak = next((v for k, v in PEAK_GBPS.items() if device.type == "cuda" and k in torch.cuda.get_device_name()),
                None)
    head = "| kind | context | batch | tokens/s | x full | KV MiB | x full | peak MiB | GB/s | spread |"
    lines = [head + (" roofline |" if peak else ""), "|---" * (10 + bool(peak)) + "|"]
    full = {(r["context"], r["batch"]): r for r in rows if r["kind"] == "full" and r["fits"]}
    for r in rows:
        if not r["fits"]:
            lines.append(f"| {r['kind']} | {r['context']} | {r['batch']} | does not fit |" + " |" * (6 + bool(peak)))
            continue
        tps, f = r["batch"] / r["step_s"], full.get((r["context"], r["batch"]))
        ratio = (lambda a, b: f"{a / b:.2f}") if f else (lambda a, b: "-")
        gbps = (r["weight_bytes"] + r["read_bytes"]) / r["step_s"] / 1e9
        line = (f"| {r['kind']} | {r['context']} | {r['batch']} | {tps:.1f} | "
                f"{ratio(f['step_s'], r['step_s']) if f else '-'} | {r['kv_bytes'] / 2**20:.1f} | "
                f"{ratio(r['kv_bytes'], f['kv_bytes']) if f else '-'} | {r['peak_bytes'] / 2**20:.0f} | {gbps:.1f} | "
                f"{r['slowest_s'] / r['step_s'] - 1:.0%} |")
        lines.append(line + (f" {gbps / peak:.0%} |" if peak else ""))
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description="Compiled decode tokens/s, KV bytes and peak memory per cache kind.")
    add_model_flags(p)
    p.add_argument("--shape", choices=sorted(SHAPES), help="a randomly initialised model of this shape instead")
    p.add_argument("--contexts", default="1024,4096,16384,32768")
    p.add_argument("--batches", default="1,8,32")
    p.add_argument("--kinds", default=",".join(KINDS))
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--rounds", type=int, default=3, help="times each kind in turn this often; the fastest counts")
    p.add_argument("--budget", type=float, default=0.5)
    p.add_argument("--keep", type=float, default=0.5)
    p.add_argument("--eager", action="store_true", help="time the same step uncompiled")
    args = p.parse_args(argv)
    kinds = args.kinds.split(",")
    if set(kinds) - set(KINDS):
        raise KVNestError(f"unknown kinds {sorted(set(kinds) - set(KINDS))}; choose from {', '.join(KINDS)}")
    if args.rounds < 1:
        raise KVNestError(f"--rounds {args.rounds}: time each kind at least once (--rounds 1 or more)")
    torch._dynamo.config.recompile_limit = 64  # one graph per kind and batch size, each new decoder re-guards
    if args.shape:
        model = random_model(args.shape, getattr(torch, args.dtype), args.device)
    else:
        model = model_from_flags(args)[0]
    contexts, batches = ([int(x) for x in s.split(",")] for s in (args.contexts, args.batches))
    per_token = bytes_per_token_of(model, args.budget, args.keep, kinds)
    rows = bench(model, contexts, batches, args.steps, args.budget, args.keep, per_token, not args.eager,
                 args.rounds)
    device = model.lm_head.weight.device
    name = args.shape or "default model"
    print(f"\n{name}, {device.type}, {args.dtype}, {'eager' if args.eager else 'compiled'}, budget {args.budget}, "
          f"keep {args.keep}\n\n{table(rows, device)}\n")
    cap = capacity(per_token, batches, device)
    print("| largest context that fits | " + " | ".join(f"batch {b}" for b in batches) + " |")
    print("|---" * (len(batches) + 1) + "|")
    for kind, per_batch in cap.items():
        print(f"| {kind} | " + " | ".join(f"{per_batch[b]:,}" for b in batches) + " |")


if __name__ == "__main__":
    run_cli(main)
