"""The distillation loop both methods of train.py train with: random windows of the training text, AdamW with a
linear warm-up then cosine decay, gradient clipping, a checkpoint every `save_every` steps with the optimizer's
state, and an exact resume: every step draws its windows (and ranks, or keep ratios) from a generator seeded by
(seed, step), so a resumed run repeats an uninterrupted one. A loss or weight that stops being finite ends the run
with the last good checkpoint kept.
"""
import math
import time

import torch
from tqdm import tqdm

from errors import KVNestError
from model import Transformer


def lr_at(step: int, steps: int, lr: float, warmup: float) -> float:
    """Linear warm-up over the first `warmup` fraction of steps, then cosine decay to zero."""
    n_warm = max(1, round(warmup * steps))
    if step < n_warm:
        return lr * (step + 1) / n_warm
    return lr * 0.5 * (1 + math.cos(math.pi * (step - n_warm) / max(1, steps - n_warm)))


def sample_batch(sources: list, batch: int, seq_len: int, gen: torch.Generator) -> torch.Tensor:
    """`batch` random windows of seq_len + 1 tokens (inputs and next-token targets), each from a source (ids,
    weight) drawn by weight (one source: no draw, so a single text samples as it always has). (B, T+1)"""
    short = [len(ids) for ids, _ in sources if len(ids) <= seq_len + 1]
    if short:
        raise KVNestError(f"training text has {short[0]} tokens, too few for windows of {seq_len}; pass more text")
    if len(sources) == 1:  # one text samples as it always has
        ids = sources[0][0]
        starts = torch.randint(0, len(ids) - seq_len - 1, (batch,), generator=gen).tolist()
        return torch.stack([ids[s: s + seq_len + 1] for s in starts])
    weights = torch.tensor([float(w) for _, w in sources])
    windows = []
    for i in torch.multinomial(weights, batch, True, generator=gen).tolist():
        ids = sources[i][0]
        start = int(torch.randint(0, len(ids) - seq_len - 1, (1,), generator=gen))
        windows.append(ids[start: start + seq_len + 1])
    return torch.stack(windows)


def optimizer_tensors(opt: torch.optim.Optimizer, names: list) -> dict:
    """AdamW state as flat tensors for the checkpoint."""
    out = {}
    for name, p in zip(names, opt.param_groups[0]["params"]):
        for k, v in opt.state.get(p, {}).items():
            out[f"opt.{name}.{k}"] = torch.as_tensor(v)
    return out


def load_optimizer_tensors(opt: torch.optim.Optimizer, names: list, tensors: dict) -> None:
    """AdamW state from a checkpoint's flat tensors: complete for every parameter, or (a fresh run) absent."""
    if not tensors:
        return
    for name, p in zip(names, opt.param_groups[0]["params"]):
        state = {k.split(".")[-1]: v.to(p.device) for k, v in tensors.items() if k.startswith(f"opt.{name}.")}
        if set(state) != {"step", "exp_avg", "exp_avg_sq"} or state["step"].numel() != 1 or any(
                state[k].shape != p.shape for k in ("exp_avg", "exp_avg_sq")):
            raise KVNestError(f"--resume: the checkpoint's optimizer state of {name} is incomplete or of the wrong "
                              f"shape; the checkpoint is damaged, train again without --resume")
        state["step"] = state["step"].float().cpu()
        opt.state[p] = state


def fit(module: torch.nn.Module, names: list, step_loss, save, cfg: dict, start: int = 0, extra: dict | None = None,
        save_every: int = 50, stop_after: int | None = None, desc: str = "train"):
    """AdamW on module's parameters `names` with warm-up + cosine lr and gradient clipping, from step `start`.
    step_loss(step, generator) -> (loss, tokens); every step's generator is seeded by (seed, step), so a resumed
    run repeats an uninterrupted one. save(step, optimizer tensors) writes the method's checkpoint (atomically)
    every `save_every` steps and at the end; `stop_after` ends early after that step, as an interruption would."""
    params = [getattr(module, n) for n in names]
    opt = torch.optim.AdamW(params, lr=cfg["lr"], weight_decay=0.0)
    load_optimizer_tensors(opt, names, extra or {})
    steps = cfg["steps"]
    bar = tqdm(range(start, steps), initial=start, total=steps, desc=desc)
    t0, tokens = time.perf_counter(), 0
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = lr_at(step, steps, cfg["lr"], cfg["warmup"])
        loss, n = step_loss(step, torch.Generator().manual_seed(cfg["seed"] * 1_000_003 + step))
        if not torch.isfinite(loss):
            raise KVNestError(f"the loss is {loss.item()} at step {step}; {desc} stopped and kept the last good "
                              f"checkpoint; lower --lr or check the data")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg["clip"])
        opt.step()
        if not all(bool(torch.isfinite(p).all()) for p in params):
            raise KVNestError(f"a weight became non-finite at step {step}; {desc} stopped and kept the last good "
                              f"checkpoint; lower --lr")
        tokens += n
        bar.set_postfix(loss=f"{loss.item():.4f}", tok_s=f"{tokens / (time.perf_counter() - t0):.0f}")
        if (step + 1) % save_every == 0 or step + 1 in (steps, stop_after):
            save(step + 1, optimizer_tensors(opt, names))
        if step + 1 == stop_after:
            break


def autocast_for(model: Transformer):
    """bf16 autocast on CUDA for the model's matmuls (training keeps fp32 weights there); nothing on the CPU."""
    return torch.autocast("cuda", dtype=torch.bfloat16, enabled=model.inv_freq.device.type == "cuda")
