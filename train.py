"""Distil KV compression into a frozen model: `python train.py` trains MatryoshkaKV on the default model and text.

MatryoshkaKV (Lin et al., 2024). Teacher = the frozen model with its full cache; student = the same weights with
the projections of compress.py, whose ranks are drawn afresh each step, per (layer, KV head) and for K and V
separately, uniformly from {D/8, 2D/8, ..., D} (the Matryoshka strategy: every prefix of a basis must work).
Only the projections train (the Cayley parameters W and the value offset b), on

    loss = kl_weight * mean_t KL(p_teacher || p_student) + ce_weight * mean_t CE(x_{t+1}, p_student)

(the paper uses 0.25 KL + 0.75 CE; KL alone is the default here, see README). AdamW, linear warm-up then cosine
decay, gradient clipping, bf16 autocast on CUDA. Every step's windows and ranks come from a generator seeded by
(seed, step), so `--resume` continues exactly where an uninterrupted run would be. Checkpoints are safetensors
with JSON metadata, written atomically; at the end a budget table compares PCA with the trained projections.
"""
import argparse
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from assets import load_text, token_windows
from compress import (KEY_MODES, Projections, compress, full_cache, load_projections, pca_projections,
                      save_projections, set_bases, set_ranks, uniform_ranks)
from eval import SWEEP_BUDGETS, eval_windows, kl_and_top1, score
from model import KVNestError, Transformer, add_model_flags, model_from_flags, run_cli

# Flags that define what is trained; a resumed run must agree on them.
RUN_FLAGS = ("method", "key_mode", "seq_len", "batch", "lr", "warmup", "clip", "kl_weight", "ce_weight",
             "rank_step", "seed", "steps", "calib_windows", "data")


def lr_at(step: int, steps: int, lr: float, warmup: float) -> float:
    """Linear warm-up over the first `warmup` fraction of steps, then cosine decay to zero."""
    n_warm = max(1, round(warmup * steps))
    if step < n_warm:
        return lr * (step + 1) / n_warm
    return lr * 0.5 * (1 + math.cos(math.pi * (step - n_warm) / max(1, steps - n_warm)))


def distill_loss(teacher: torch.Tensor, student: torch.Tensor, targets: torch.Tensor, kl_w: float, ce_w: float):
    """kl_w * KL(teacher || student) + ce_w * CE, each averaged over positions. logits (B, T, V), targets (B, T)."""
    loss = student.new_zeros(())
    if kl_w:
        loss = loss + kl_w * kl_and_top1(teacher, student)[0].mean()
    if ce_w:
        loss = loss + ce_w * F.cross_entropy(student.flatten(0, 1).float(), targets.flatten())
    return loss


def sample_batch(ids: torch.Tensor, batch: int, seq_len: int, gen: torch.Generator) -> torch.Tensor:
    """`batch` random windows of seq_len + 1 tokens (inputs and next-token targets). (B, T+1)"""
    if len(ids) <= seq_len + 1:
        raise KVNestError(f"training text has {len(ids)} tokens, too few for windows of {seq_len}; pass more text")
    starts = torch.randint(0, len(ids) - seq_len - 1, (batch,), generator=gen)
    return torch.stack([ids[s: s + seq_len + 1] for s in starts.tolist()])


def sample_ranks(model: Transformer, step: int, gen: torch.Generator) -> torch.Tensor:
    """Ranks drawn uniformly from {step, 2 step, ..., D} per (layer, KV head). (L, H_kv)"""
    a = model.args
    return step * torch.randint(1, a.head_dim // step + 1, (a.n_layers, a.n_kv_heads), generator=gen)


def optimizer_tensors(opt: torch.optim.Optimizer, names: list) -> dict:
    """AdamW state as flat tensors for the checkpoint."""
    out = {}
    for name, p in zip(names, opt.param_groups[0]["params"]):
        for k, v in opt.state.get(p, {}).items():
            out[f"opt.{name}.{k}"] = torch.as_tensor(v)
    return out


def load_optimizer_tensors(opt: torch.optim.Optimizer, names: list, tensors: dict) -> None:
    for name, p in zip(names, opt.param_groups[0]["params"]):
        state = {k.split(".")[-1]: v.to(p.device) for k, v in tensors.items() if k.startswith(f"opt.{name}.")}
        if state:
            state["step"] = state["step"].float().cpu()
            opt.state[p] = state


def train_matryoshka(model: Transformer, ids: torch.Tensor, cfg: dict, out: Path, meta_extra: dict,
                     resume: bool = False, calib: torch.Tensor | None = None, save_every: int = 50,
                     stop_after: int | None = None) -> Projections:
    """Run (or continue) MatryoshkaKV distillation; returns the trained projections and leaves `out` written.
    `stop_after` ends the run early after that step, with a checkpoint, as an interruption would."""
    start, extra = 0, {}
    if resume and out.exists():
        proj, meta, extra = load_projections(out, model)
        old = meta["config"]
        differ = ", ".join(f"{k}={old.get(k)}" for k in RUN_FLAGS if old.get(k) != cfg.get(k))
        if differ:
            raise KVNestError(f"--resume with {out}: the checkpoint was trained with {differ}; pass the same flags")
        start = meta["step"]
    else:
        proj = pca_projections(model, calib, cfg["key_mode"])
    compress(model, proj)
    names = ["W_k", "W_v", "b_v"]
    opt = torch.optim.AdamW([getattr(proj, n) for n in names], lr=cfg["lr"], weight_decay=0.0)
    load_optimizer_tensors(opt, names, extra)
    meta = dict(meta_extra, model=model.fingerprint(), config=cfg)

    def save(step: int) -> None:
        save_projections(out, proj, dict(meta, step=step), optimizer_tensors(opt, names))

    device, steps = model.inv_freq.device, cfg["steps"]
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
    bar = tqdm(range(start, steps), initial=start, total=steps, desc="train matryoshka")
    t0, tokens = time.perf_counter(), 0
    for step in bar:
        gen = torch.Generator().manual_seed(cfg["seed"] * 1_000_003 + step)
        x = sample_batch(ids, cfg["batch"], cfg["seq_len"], gen).to(device)
        inputs, targets = x[:, :-1], x[:, 1:]
        set_ranks(model, sample_ranks(model, cfg["rank_step"], gen), sample_ranks(model, cfg["rank_step"], gen))
        with torch.no_grad(), full_cache(model), autocast:
            teacher = model(inputs)
        for group in opt.param_groups:
            group["lr"] = lr_at(step, steps, cfg["lr"], cfg["warmup"])
        set_bases(model, proj)
        with autocast:
            loss = distill_loss(teacher, model(inputs), targets, cfg["kl_weight"], cfg["ce_weight"])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(proj.parameters(), cfg["clip"])
        opt.step()
        tokens += inputs.numel()
        bar.set_postfix(loss=f"{loss.item():.4f}", tok_s=f"{tokens / (time.perf_counter() - t0):.0f}")
        if (step + 1) % save_every == 0 or step + 1 in (steps, stop_after):
            save(step + 1)
        if step + 1 == stop_after:
            break
    set_bases(model, proj)
    return proj


def budget_table(model: Transformer, proj: Projections, windows: torch.Tensor) -> str:
    """Markdown: eval perplexity and KL at uniform ranks over the sweep budgets, PCA against trained."""
    pca = Projections(proj.U0_k, proj.U0_v, proj.key_mode).to(proj.U0_k.device)
    lines = ["| budget | PCA ppl (KL) | trained ppl (KL) |", "|---|---|---|"]
    for budget in tqdm(SWEEP_BUDGETS, desc="budget table"):
        cells = []
        for p in (pca, proj):
            compress(model, p)
            set_ranks(model, *uniform_ranks(model, budget))
            s = score(model, windows)
            cells.append(f"{s['perplexity']:.2f} ({s['kl']:.3f})")
        lines.append(f"| {budget:.1%} | {' | '.join(cells)} |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description="Train KV compression (MatryoshkaKV projections) by distillation.")
    add_model_flags(p)
    p.add_argument("--method", default="matryoshka", choices=["matryoshka"])
    p.add_argument("--data", help="training .txt/.jsonl (default: the train half of pydoc topics)")
    p.add_argument("--eval-data", help="text for the closing budget table (default: the eval half)")
    p.add_argument("--out", default="runs/matryoshka.safetensors", help="checkpoint path")
    p.add_argument("--resume", action="store_true", help="continue from --out if it exists")
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=float, default=0.05, help="warm-up fraction of the steps")
    p.add_argument("--clip", type=float, default=1.0, help="gradient norm clip")
    p.add_argument("--kl-weight", type=float, default=1.0)
    p.add_argument("--ce-weight", type=float, default=0.0, help="LM cross-entropy weight (paper: 0.75, KL 0.25)")
    p.add_argument("--key-mode", default="pre_rope", choices=KEY_MODES, help="project keys before or after RoPE")
    p.add_argument("--rank-step", type=int, default=None, help="ranks are drawn from multiples of this "
                   "(default head_dim / 8)")
    p.add_argument("--calib-windows", type=int, default=8, help="512-token windows for the PCA start")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--save-every", type=int, default=50)
    p.add_argument("--no-table", action="store_true", help="skip the closing budget table")
    args = p.parse_args(argv)
    model, tok, folder = model_from_flags(args)
    D = model.args.head_dim
    args.rank_step = args.rank_step or max(1, D // 8)
    if not 1 <= args.rank_step <= D:
        raise KVNestError(f"--rank-step {args.rank_step} is outside [1, head_dim={D}]")
    if args.steps < 1 or args.batch < 1 or args.seq_len < 2:
        raise KVNestError("--steps, --batch must be >= 1 and --seq-len >= 2")
    cfg = {k: getattr(args, k) for k in RUN_FLAGS}
    ids = torch.tensor(tok.encode(load_text(args.data, "train")))
    calib = token_windows(ids.tolist(), 512, args.calib_windows)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    proj = train_matryoshka(model, ids, cfg, out, {"base_model": folder}, args.resume, calib, args.save_every)
    print(f"saved {out}")
    if not args.no_table:
        table = budget_table(model, proj, eval_windows(tok, args.eval_data, 6, 512))
        out.with_suffix(".md").write_text(table + "\n")
        print(table)
        print(json.dumps({"checkpoint": str(out), "table": str(out.with_suffix(".md"))}))


if __name__ == "__main__":
    run_cli(main)
