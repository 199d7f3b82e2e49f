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
  plan            with --plan: a joint plan of joint.py (each head its own ranks and kept count), entry --budget
  transformers    with --peer: transformers' LlamaForCausalLM/MistralForCausalLM of the same model, StaticCache
Bandwidth counts the weights once plus the cache bytes the step actually reads; on CUDA it is also given as a
fraction of the device's peak (the roofline). Capacity: the largest context per batch whose cache fits beside the
weights, from each kind's bytes per token and the memory free on the device.

    python bench.py --contexts 1024,4096,16384,32768 --batches 1,8,32
"""
import gc
import inspect
import time
from pathlib import Path

import torch

from compress import Projections, uniform_ranks
from errors import INSTALL_TRANSFORMERS, KVNestError, Parser, count, integers, ratio, run_cli
from evict import kept_count, layer_keep
from flags import add_model_flags, check_device, model_from_flags
from kernels import Decoder
from model import KVCache, ModelArgs, Transformer
from plan import load_plan

KINDS = ("full", "matryoshka", "matryoshka-pre", "eviction", "both", "both-pre")
PEER = "transformers"  # --peer: transformers' own decode of the same model with its StaticCache
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


def kind_setup(model: Transformer, kind: str, budget: float, keep: float, plan=None) -> tuple:
    """(features, keep) of a kind: MatryoshkaKV features (identity bases: their values do not change the speed) at a
    uniform budget for the compressed kinds, at the plan's ranks for `plan`, else None; the kept fraction (a float,
    or per head (L, H_kv) for a plan), or None for kinds that keep every entry."""
    a, p = model.args, model.lm_head.weight
    compressed = kind in ("matryoshka", "matryoshka-pre", "both", "both-pre", "plan")
    key_mode = plan.key_mode if kind == "plan" else "pre_rope" if kind.endswith("-pre") else "post_rope"
    features = None
    if compressed:
        eye = torch.eye(a.head_dim, device=p.device).expand(a.n_layers, a.n_kv_heads, a.head_dim, a.head_dim)
        with torch.no_grad():
            features = Projections(eye, eye, key_mode).to(p.device).features(*uniform_ranks(
                model, 1.0 if kind == "plan" else budget))
    if kind == "plan":
        return plan.features(features), plan.keep if plan.evicts else None
    return features, keep if kind in ("eviction", "both", "both-pre") else None


def filled_cache(model: Transformer, kind: str, batch: int, context: int, room: int, budget: float, keep: float,
                 seed: int = 0, plan=None) -> KVCache:
    """A cache of a kind as after a prefill of `context` tokens, with random entries (speed does not depend on the
    values), and room for `room` more. Eviction keeps round(context * keep) entries per head (a plan: each head its
    own count), spread evenly, as the baselines keep a fixed count."""
    features, keep = kind_setup(model, kind, budget, keep, plan)
    cache = KVCache(model, batch, context + room, features)
    if keep is not None:
        for i, layer in enumerate(cache.layers):  # on a CPU the zeroed full buffers were never touched
            n = kept_count(context, layer_keep(keep, i))
            flags = torch.zeros(batch, model.args.n_kv_heads, context, device=model.inv_freq.device)
            for h, m in enumerate(n if isinstance(n, list) else [n] * model.args.n_kv_heads):
                flags[:, h, torch.arange(m) * context // m] = 1
            layer.compact(flags, room)
    g = torch.Generator(device=model.inv_freq.device).manual_seed(seed)
    for layer in cache.layers:
        for group in layer.groups:
            for buf in (group.k, group.v):
                buf.copy_(torch.randn(*buf.shape[:2], 1, buf.shape[-1], generator=g, device=buf.device))
            if keep is None:
                group.length.fill_(context)
    return cache


def peer_model(model: Transformer, folder: str | None):
    """transformers' own LlamaForCausalLM / MistralForCausalLM of the same model: loaded from the folder, or with
    random weights of the same shape (speed does not depend on the values). transformers is needed only here."""
    try:
        from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig
    except ImportError:
        raise KVNestError(f"--peer needs transformers: {INSTALL_TRANSFORMERS}") from None
    p, a = model.lm_head.weight, model.args
    if folder is not None:
        return AutoModelForCausalLM.from_pretrained(folder, dtype=p.dtype).to(p.device).eval()
    cls = MistralConfig if a.n_kv_heads < a.n_heads and a.rope_theta == 1e6 else LlamaConfig
    cfg = cls(hidden_size=a.dim, intermediate_size=a.hidden_dim, num_hidden_layers=a.n_layers,
              num_attention_heads=a.n_heads, num_key_value_heads=a.n_kv_heads, head_dim=a.head_dim,
              vocab_size=a.vocab_size, rope_theta=a.rope_theta, tie_word_embeddings=a.tie_embeddings,
              max_position_embeddings=max(a.max_seq_len, 32768))
    with torch.device(p.device):
        return AutoModelForCausalLM.from_config(cfg, dtype=p.dtype).eval()


@torch.no_grad()
def measure_peer(peer, batch: int, context: int, steps: int, compile: bool) -> tuple[float, int]:
    """(seconds per step, cache bytes) of transformers' decode with its StaticCache of context + steps + 2 slots,
    one token per step at positions context, context + 1, ... (the cache's contents do not change the speed);
    compiled as transformers' docs recommend (fullgraph, reduce-overhead on CUDA) unless --eager."""
    from transformers import StaticCache
    device = next(peer.parameters()).device
    cache = StaticCache(config=peer.config, max_cache_len=context + steps + 2)
    name = "cache" if "cache" in inspect.signature(peer.forward).parameters else "past_key_values"  # renamed in 5.x
    step = peer.forward
    if compile:
        step = torch.compile(peer.forward, fullgraph=True, mode="reduce-overhead" if device.type == "cuda" else None)
    tok = torch.zeros(batch, 1, dtype=torch.long, device=device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    t0 = 0.0
    for i in range(2 + steps):
        if i == 2:
            sync()
            t0 = time.perf_counter()
        pos = torch.tensor([context + i], device=device)
        step(input_ids=tok, cache_position=pos, position_ids=pos.expand(batch, 1), use_cache=True, **{name: cache})
    sync()
    kv = sum(t.nbytes for layer in cache.layers for t in (layer.keys, layer.values))
    return (time.perf_counter() - t0) / steps, kv


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
def measure(dec: Decoder, cache: KVCache, batch: int, context: int, steps: int) -> float:
    """Seconds per step after two warm-up steps."""
    device = dec.model.lm_head.weight.device
    tok = torch.zeros(batch, 1, dtype=torch.long, device=device)
    dec.resume(cache, context)
    for i in range(2):
        dec(tok, context + i)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    for i in range(steps):
        dec(tok, context + 2 + i)
    sync()
    return (time.perf_counter() - t0) / steps


def workspace(model: Transformer, kind: str, batch: int, context: int) -> int:
    """Memory a step needs beside the cache: pre-RoPE keys are rebuilt at full width, one layer at a time, and
    rotated with an fp32 cos/sin table of every slot."""
    a = model.args
    keys = batch * context * a.n_kv_heads * a.head_dim * model.lm_head.weight.element_size()
    return (keys + context * a.head_dim * 4) * kind.endswith("-pre")


def bytes_per_token_of(model: Transformer, budget: float, keep: float, kinds=KINDS, plan=None) -> dict:
    """{kind: cache bytes per context token at batch 1}: the growth of its cache tensors from 512 to 1024 tokens."""
    sizes = {k: [filled_cache(model, k, 1, c, 0, budget, keep, plan=plan).nbytes() for c in (512, 1024)]
             for k in kinds}
    return {k: (b - a) / 512 for k, (a, b) in sizes.items()}


def bench(model: Transformer, contexts: list, batches: list, steps: int, budget: float, keep: float,
          per_token: dict, compile: bool = True, rounds: int = 3, peer=None, plan=None) -> list:
    """One dict per (kind in per_token, context, batch): seconds per step, cache bytes, bytes read, peak memory;
    fits=False where the cache would not fit. Each (context, batch) times its kinds in turn, `rounds` times over,
    and keeps each kind's fastest round (step_s) and its slowest (slowest_s): on a shared machine the fastest is
    the least disturbed, and interleaving gives every kind the same chances."""
    from tqdm import tqdm
    device = model.lm_head.weight.device
    kinds, weights, rows = list(per_token), weight_bytes(model), {}
    budget_bytes = 0.9 * free_bytes(device)
    grid = [(c, b, r, k) for c in contexts for b in batches for r in range(rounds) for k in kinds]
    for context, batch, _, kind in (bar := tqdm(grid, desc="bench")):
        row = rows.setdefault((context, batch, kind), {"kind": kind, "context": context, "batch": batch,
                                                       "fits": False})
        if per_token[kind] * batch * (context + steps + 2) + workspace(model, kind, batch, context) < budget_bytes:
            if kind == PEER:
                reset_peak(device)
                dt, kv = measure_peer(peer, batch, context, steps, compile)
            else:
                cache = filled_cache(model, kind, batch, context, steps + 2, budget, keep, plan=plan)
                reset_peak(device)
                decoder = Decoder(model, steps + 2, compile=compile)
                dt, kv = measure(decoder, cache, batch, context, steps), cache.nbytes()
                del cache
            row.update(fits=True, step_s=min(dt, row.get("step_s", dt)), slowest_s=max(dt, row.get("slowest_s", dt)),
                       kv_bytes=kv, read_bytes=kv, weight_bytes=weights,
                       peak_bytes=max(peak_bytes(device), row.get("peak_bytes", 0)))
            gc.collect()
        bar.write(f"{kind} {context} x {batch}: {row.get('step_s', 0):.4f} s per step (fastest so far)")
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
    p = Parser(description="Compiled decode tokens/s, KV bytes and peak memory per cache kind.")
    add_model_flags(p)
    p.add_argument("--shape", choices=sorted(SHAPES), help="a randomly initialised model of this shape instead")
    p.add_argument("--contexts", default="1024,4096,16384,32768")
    p.add_argument("--batches", default="1,8,32")
    p.add_argument("--kinds", default=",".join(KINDS))
    p.add_argument("--steps", type=count, default=8)
    p.add_argument("--rounds", type=count, default=3, help="times each kind in turn this often; the fastest counts")
    p.add_argument("--budget", type=ratio, default=0.5)
    p.add_argument("--keep", type=ratio, default=0.5)
    p.add_argument("--eager", action="store_true", help="time the same step uncompiled")
    p.add_argument("--plan", help="joint.py plan to time as the kind 'plan' (its entry for --budget): e.g. --budget "
                   "0.25 --keep 0.25 --plan runs/plan.json times it beside each axis alone at the same bytes")
    p.add_argument("--peer", action="store_true", help="add transformers' own decode of the same model (StaticCache, "
                   "compiled unless --eager) as a row of every cell")
    args = p.parse_args(argv)
    kinds = args.kinds.split(",") + (["plan"] if args.plan and "plan" not in args.kinds.split(",") else [])
    if set(kinds) - set(KINDS) - ({"plan"} if args.plan else set()):
        raise KVNestError(f"unknown kinds {sorted(set(kinds) - set(KINDS))}; choose from {', '.join(KINDS)} "
                          f"(and plan, with --plan)")
    contexts, batches = (integers(text, flag) for text, flag in ((args.contexts, "--contexts"),
                                                                 (args.batches, "--batches")))
    folder = None
    if args.shape:
        check_device(args.device, args.dtype)
        model = random_model(args.shape, getattr(torch, args.dtype), args.device)
    else:
        model, _, folder = model_from_flags(args)
    plan = None
    if args.plan:
        plan = load_plan(args.plan, model, args.budget)
    per_token = bytes_per_token_of(model, args.budget, args.keep, kinds, plan)
    peer = None
    if args.peer:
        peer = peer_model(model, None if args.shape else folder)
        per_token[PEER] = bytes_per_token_of(model, args.budget, args.keep, ["full"])["full"]
    rows = bench(model, contexts, batches, args.steps, args.budget, args.keep, per_token, not args.eager,
                 args.rounds, peer, plan)
    device = model.lm_head.weight.device
    name = args.shape or "default model"
    print(f"\n{name}, {device.type}, {args.dtype}, {'eager' if args.eager else 'compiled'}, budget {args.budget}, "
          f"keep {args.keep}\n\n{table(rows, device)}\n")
    cap = capacity({k: v for k, v in per_token.items() if k != PEER}, batches, device)
    print("| largest context that fits | " + " | ".join(f"batch {b}" for b in batches) + " |")
    print("|---" * (len(batches) + 1) + "|")
    for kind, per_batch in cap.items():
        print(f"| {kind} | " + " | ".join(f"{per_batch[b]:,}" for b in batches) + " |")


if __name__ == "__main__":
    run_cli(main)
