"""Distil KV compression into a frozen model: `python train.py` trains MatryoshkaKV on the default model and text,
`python train.py --method gate` trains Attention-Gate eviction (gate.py explains that method).

MatryoshkaKV (Lin et al., 2024). Teacher = the frozen model with its full cache; student = the same weights with
the projections of compress.py, whose ranks are drawn afresh each step, per (layer, KV head) and for K and V
separately, uniformly from {D/8, 2D/8, ..., D} (the Matryoshka strategy: every prefix of a basis must work).
`--ranks RANKS` trains at the fixed ranks of a search.py file instead, and `--init PROJ` starts from trained
projections rather than PCA: together they fine-tune nested projections for one plan (its other budgets are not
trained and may lose).
Only the projections train (the Cayley parameters W and the value offset b), on

    loss = kl_weight * mean_t KL(p_teacher || p_student) + ce_weight * mean_t CE(x_{t+1}, p_student)

(the paper uses 0.25 KL + 0.75 CE; KL alone is the default here, see README). The loop is distill.py's: AdamW,
linear warm-up then cosine decay, gradient clipping, bf16 autocast on CUDA; every step's windows and ranks come
from a generator seeded by (seed, step), so `--resume` continues exactly where an uninterrupted run would be.
Checkpoints are safetensors with JSON metadata, written atomically; at the end a budget table compares PCA with
the trained projections.

Attention-Gate (Zeng et al., 2024): only the gate trains, on the same loss over the continuation of each window
after its context was evicted by the gate's straight-through flags, plus keep_weight * (kept - keep)^2.
`--keeps 0.125,0.25,0.5,0.75` trains one gate for every keep, the Matryoshka idea on the token axis: each step
draws a keep ratio from the list, the gate gets it as an input (per-keep offsets of its weights, gate.py, each
knot's bias calibrated to its keep at the start), and the penalty pulls toward the drawn keep. `--init GATE` starts
such a run from a gate trained at one keep and trains only the per-keep offsets. (eval.py scores a gate at exact
keep ratios: one threshold over all layers and heads.)
`--protocol inside` evicts inside the prefill (the paper's protocol); `--sft pairs.jsonl` trains on prompt/answer
pairs instead of text windows: the prompt is evicted and the loss is on the answer. `--new-keep K` also trains the
gate's decoded-token head: every continuation token is judged after --window queries, in one forward
(gate.judged_forward), evicted ones leave the later queries' view, and keep_weight * (kept - K)^2 pulls the kept
fraction of the judged tokens toward K. `--gumbel TAU` trains with Gumbel-sigmoid flags (gate.GumbelSigmoid) in
place of straight-through ones.
"""
import statistics
from pathlib import Path

import torch
from tqdm import tqdm

from assets import data_weight, load_mix, load_pairs, mixed_windows
from compress import (KEY_MODES, Projections, budget_of, load_projections, load_ranks, pca_projections,
                      save_projections, uniform_ranks)
from distill import autocast_for, fit, sample_batch
from errors import KVNestError, Parser, count, nonnegative, positive, ratio, ratios, run_cli, size
from eval import SWEEP_BUDGETS, eval_windows, eviction_table, score, score_evictions
from evict import Protocol, prefill
from flags import add_model_flags, model_from_flags
from gate import (FIELDS, Gate, GumbelSigmoid, calibrate_gate, calibrate_knots, calibrate_new_tokens, judged,
                  judged_forward, load_gate, save_gate)
from losses import distill_loss
from model import KVCache, Transformer

# Flags that define what is trained; a resumed run must agree on them.
RUN_FLAGS = ("method", "key_mode", "seq_len", "batch", "lr", "warmup", "clip", "kl_weight", "ce_weight",
             "rank_step", "seed", "steps", "calib_windows", "data", "keep", "keep_weight", "ctx_len",
             "protocol", "sft", "keeps", "window", "new_keep", "gumbel", "init", "ranks")


def sample_ranks(model: Transformer, step: int, gen: torch.Generator) -> torch.Tensor:
    """Ranks drawn uniformly from {step, 2 step, ..., D} per (layer, KV head). (L, H_kv)"""
    a = model.args
    return step * torch.randint(1, a.head_dim // step + 1, (a.n_layers, a.n_kv_heads), generator=gen)


def check_resume(out: Path, meta: dict, cfg: dict, extra: dict) -> int:
    """The step to continue from, after checking that the run-defining flags agree with the checkpoint's (`extra`:
    its optimizer tensors, there from step 1 on)."""
    old, step = meta.get("config"), meta.get("step")
    if not isinstance(old, dict) or not isinstance(step, int) or not 0 <= step <= cfg["steps"] or (
            step > 0 and not extra):
        raise KVNestError(f"--resume with {out}: it lacks a valid config, step (0 to {cfg['steps']}) or optimizer "
                          f"state; the checkpoint is damaged, train again without --resume")
    old = {"window": 0, "new_keep": None, "gumbel": None, "init": None, "ranks": None, **old,  # older runs
           **{k: same_file(old.get(k), cfg[k]) for k in ("data", "sft", "init", "ranks")}}
    differ = ", ".join(f"{k}={old.get(k)}" for k in RUN_FLAGS if old.get(k) != cfg.get(k))
    if differ:
        raise KVNestError(f"--resume with {out}: the checkpoint was trained with {differ}; pass the same flags")
    return step


def same_file(recorded, given):
    """`given` where both name the same files (one path relative, one absolute; lists of FILE:WEIGHT entry by
    entry), else `recorded`."""
    if isinstance(recorded, list) and isinstance(given, list) and len(recorded) == len(given):
        return given if all(same_file(r, g) == g for r, g in zip(recorded, given)) else recorded
    if isinstance(recorded, str) and isinstance(given, str):
        (r, rw), (g, gw) = data_weight(recorded), data_weight(given)
        if rw == gw and Path(r).resolve() == Path(g).resolve():
            return given
    return recorded


def train_matryoshka(model: Transformer, sources: list, cfg: dict, out: Path, meta_extra: dict,
                     resume: bool = False, calib: torch.Tensor | None = None, **fit_kw) -> Projections:
    """Run (or continue) MatryoshkaKV distillation on windows of the sources, (token ids, weight) pairs; returns
    the trained projections and leaves `out` written. Ranks are drawn every step, or with cfg["ranks"] fixed to
    that file's; the projections start from PCA on `calib`, or from those of cfg["init"]."""
    start, extra = 0, {}
    if resume and out.exists():
        proj, meta, extra = load_projections(out, model)
        start = check_resume(out, meta, cfg, extra)
    elif cfg["init"]:
        proj = load_projections(cfg["init"], model)[0]
        if proj.key_mode != cfg["key_mode"]:
            raise KVNestError(f"--init {cfg['init']} projects keys {proj.key_mode}; pass --key-mode {proj.key_mode}")
    else:
        proj = pca_projections(model, calib, cfg["key_mode"])
    fixed = load_ranks(cfg["ranks"], model) if cfg["ranks"] else None  # (L, H_kv) each, K and V
    meta = dict(meta_extra, model=model.fingerprint(), config=cfg)

    def step_loss(step, gen):
        x = sample_batch(sources, cfg["batch"], cfg["seq_len"], gen).to(model.inv_freq.device)
        inputs, targets = x[:, :-1], x[:, 1:]
        ranks = fixed or (sample_ranks(model, cfg["rank_step"], gen), sample_ranks(model, cfg["rank_step"], gen))
        with torch.no_grad(), autocast_for(model):
            teacher = model(inputs)
        with autocast_for(model):
            student = model(inputs, 0, KVCache(model, *inputs.shape, proj.features(*ranks)))
            return distill_loss(teacher, student, targets, cfg["kl_weight"], cfg["ce_weight"]), inputs.numel()

    def save(step, opt_tensors):
        save_projections(out, proj, dict(meta, step=step), opt_tensors)

    fit(proj, ["W_k", "W_v", "b_v"], step_loss, save, cfg, start, extra, desc="train matryoshka", **fit_kw)
    return proj


def gate_protocol(cfg: dict) -> Protocol:
    """The eviction protocol a gate run trains under, and its closing table scores."""
    return Protocol(inside=cfg["protocol"] == "inside", window=cfg["window"])


def train_gate(model: Transformer, sources: list | None, cfg: dict, out: Path, meta_extra: dict,
               resume: bool = False, pairs: list | None = None, **fit_kw) -> Gate:
    """Run (or continue) Attention-Gate training on windows of the sources ((ids, weight) pairs; each window a
    ctx_len-token context, then its continuation) or, for supervised fine-tuning, on one (prompt, answer) pair of
    token lists per step (the prompt is the context). The context is evicted after the prefill (or inside it:
    cfg["protocol"]) by the gate's flags (straight-through, or Gumbel-sigmoid with cfg["gumbel"]); the
    continuation's predictions, from the context's last one on, are distilled from the full model; and
    keep_weight * (kept fraction - keep)^2 pulls the kept fraction toward --keep (with cfg["keeps"], toward the keep
    drawn for the step)."""
    def sample(gen):
        """(B, T + 1) tokens and the context length."""
        if pairs is None:
            return sample_batch(sources, cfg["batch"], cfg["seq_len"], gen), cfg["ctx_len"]
        prompt, answer = pairs[int(torch.randint(len(pairs), (1,), generator=gen))]
        return torch.tensor([prompt + answer]), len(prompt)

    start, extra, keeps, new_keep, window = 0, {}, cfg.get("keeps"), cfg.get("new_keep"), cfg["window"]
    a = model.args
    if resume and out.exists():
        gate, meta, extra = load_gate(out, model)
        start = check_resume(out, meta, cfg, extra)
    else:
        calib, ctx = sample(torch.Generator().manual_seed(cfg["seed"]))
        calib = calib[:, :-1].to(model.inv_freq.device)
        if cfg.get("init"):  # a trained gate, and a keep input whose weight offsets start at zero
            base = load_gate(cfg["init"], model)[0]
            if base.keeps:
                raise KVNestError(f"--init {cfg['init']} already has a keep input; start from a gate trained at one "
                                  f"keep")
            fields = {f: getattr(base, f) for f in FIELDS if f != "keeps"}
            gate = Gate(a.n_layers, a.n_kv_heads, a.dim, keeps=keeps, **fields).to(model.inv_freq.device)
            offsets = {k: v for k, v in gate.state_dict().items() if k.endswith("_keep")}  # zeros
            gate.load_state_dict({**base.state_dict(), **offsets})  # strict: every other tensor is the base's
        else:
            gate = Gate(a.n_layers, a.n_kv_heads, a.dim, seed=cfg["seed"], new_tokens=new_keep is not None,
                        keeps=keeps or ()).to(model.inv_freq.device)
            calibrate_gate(model, gate, calib[:, :ctx], statistics.median(keeps) if keeps else cfg["keep"])
        if keeps:
            calibrate_knots(model, gate, calib[:, :ctx])
        if new_keep is not None:
            calibrate_new_tokens(model, gate, calib, ctx, new_keep, window)
    meta = dict(meta_extra, keep=keeps or cfg["keep"], model=model.fingerprint(), config=cfg)

    protocol = gate_protocol(cfg)

    def step_loss(step, gen):
        x, ctx = sample(gen)
        x = x.to(model.inv_freq.device)
        keep = keeps[int(torch.randint(len(keeps), (1,), generator=gen))] if keeps else cfg["keep"]
        train = GumbelSigmoid(cfg["gumbel"], gen) if cfg["gumbel"] else True  # else: straight-through
        with torch.no_grad(), autocast_for(model):
            teacher = model(x[:, :-1])[:, ctx - 1:]  # (B, T - ctx + 1, V)
        cache = KVCache(model, x.shape[0], x.shape[1] - 1)
        with autocast_for(model):
            ctx_logits, flags = prefill(model, x[:, :ctx], cache, gate, keep, exact=False, compact=False,
                                        train=train, protocol=protocol)
            if new_keep is None:
                rest = model(x[:, ctx:-1], ctx, cache)
            else:
                rest, new_flags = judged_forward(model, x[:, ctx:-1], ctx, cache, gate, window, flags, train)
            student = torch.cat([ctx_logits[:, -1:], rest], 1)
        kept = torch.stack([f.mean() for f in flags]).mean()
        loss = distill_loss(teacher, student, x[:, ctx:], cfg["kl_weight"], cfg["ce_weight"])
        loss = loss + cfg["keep_weight"] * (kept - keep) ** 2
        if new_keep is not None:
            kept_new = torch.stack([f.mean() for f in judged(new_flags, window)]).mean()
            loss = loss + cfg["keep_weight"] * (kept_new - new_keep) ** 2
        return loss, student.shape[0] * student.shape[1]

    def save(step, opt_tensors):
        save_gate(out, gate, dict(meta, step=step), opt_tensors)

    knots = ["w_keep", "u_keep", "c_keep"] if keeps else []
    names = knots if cfg.get("init") else (["w", "u", "c", "wq", "wk"] + knots +
                                           (["w_new", "u_new", "c_new"] if gate.new_tokens else []))
    for name, p in gate.named_parameters():
        p.requires_grad_(name in names)  # the rest stays as --init trained it
    fit(gate, names, step_loss, save, cfg, start, extra, desc="train gate", **fit_kw)
    return gate


def budget_table(model: Transformer, proj: Projections, windows: torch.Tensor, ranks: str | None = None,
                 init: str | None = None) -> str:
    """Markdown: eval perplexity and KL, PCA against trained (and against the --init projections), at uniform
    ranks over the sweep budgets, or at the fixed ranks of a --ranks run."""
    runs = {"PCA": proj.pca(), **({"start (--init)": load_projections(init, model)[0]} if init else {}),
            "trained": proj}
    if ranks:
        fixed = load_ranks(ranks, model)
        rows = {f"{budget_of(*fixed, model.args.head_dim):.1%}, {ranks}": fixed}
    else:
        rows = {f"{budget:.1%}": uniform_ranks(model, budget) for budget in SWEEP_BUDGETS}
    lines = [f"| budget | {' | '.join(f'{name} ppl (KL)' for name in runs)} |", "|---" * (len(runs) + 1) + "|"]
    for label, r in tqdm(rows.items(), desc="budget table"):
        cells = []
        for p in runs.values():
            with torch.no_grad():
                s = score(model, windows, p.features(*r))
            cells.append(f"{s['perplexity']:.2f} ({s['kl']:.3f})")
        lines.append(f"| {label} | {' | '.join(cells)} |")
    return "\n".join(lines)


def gate_table(model: Transformer, gate: Gate, windows: torch.Tensor, cfg: dict) -> str:
    """Markdown: the gate against the baselines at its keep ratios, under its protocol; with decoded tokens
    judged too, a line for them (eval.py --gate-new at the first keep)."""
    keeps, protocol = cfg["keeps"] or [cfg["keep"]], gate_protocol(cfg)
    table = eviction_table(model, windows, {"gate": gate}, keeps, cfg["ctx_len"], protocol=protocol)[0]
    if cfg["new_keep"] is None:
        return table
    r = score_evictions(model, windows, [(gate, keeps[0], True)], cfg["ctx_len"], protocol, desc="decoded tokens",
                        gate_new=True)[0][0]
    return table + (f"\n\nDecoded tokens judged too (context keep {keeps[0]:.1%}): {r['new_tokens_keep']:.1%} of "
                    f"them kept, perplexity {r['perplexity']:.3f} (KL {r['kl']:.4f}).")


DEFAULTS = {  # per method: what `python train.py [--method gate]` runs on a 2-core CPU in about half an hour
    "matryoshka": dict(steps=400, batch=2, seq_len=256, lr=1e-3),
    "gate": dict(steps=300, batch=1, seq_len=511, lr=5e-3),
}


def main(argv=None):
    p = Parser(description="Train KV compression by distillation from the full-cache model: MatryoshkaKV "
               "projections (default) or Attention-Gate eviction gates.")
    add_model_flags(p)
    p.add_argument("--method", default="matryoshka", choices=list(DEFAULTS))
    p.add_argument("--data", nargs="+", help="training .txt/.jsonl files, each FILE or FILE:WEIGHT (the share of "
                   "windows drawn from it; 'default' names the train half of pydoc topics, the default)")
    p.add_argument("--eval-data", help="text for the closing table (default: the eval half)")
    p.add_argument("--out", help="checkpoint path (default runs/<method>.safetensors)")
    p.add_argument("--resume", action="store_true", help="continue from --out if it exists")
    for name, kind in (("steps", count), ("batch", count), ("seq_len", lambda s: count(s, 2)), ("lr", positive)):
        p.add_argument(f"--{name.replace('_', '-')}", type=kind, default=None,
                       help=" / ".join(f"{m}: {d[name]}" for m, d in DEFAULTS.items()) + " by default")
    p.add_argument("--warmup", type=nonnegative, default=0.05, help="warm-up fraction of the steps, in [0, 1)")
    p.add_argument("--clip", type=positive, default=1.0, help="gradient norm clip")
    p.add_argument("--kl-weight", type=nonnegative, default=1.0)
    p.add_argument("--ce-weight", type=nonnegative, default=0.0, help="LM cross-entropy weight (paper: 0.75, KL 0.25)")
    p.add_argument("--key-mode", default="pre_rope", choices=KEY_MODES, help="matryoshka: project keys before or "
                   "after RoPE")
    p.add_argument("--rank-step", type=count, default=None, help="matryoshka: ranks are drawn from multiples of "
                   "this (default head_dim / 8)")
    p.add_argument("--calib-windows", type=count, default=8, help="matryoshka: 512-token windows for the PCA start")
    p.add_argument("--keep", type=ratio, default=0.5, help="gate: target kept fraction of the context")
    p.add_argument("--keep-weight", type=nonnegative, default=10.0, help="gate: weight of (kept - keep)^2")
    p.add_argument("--keeps", type=ratios, help="gate: one gate for every keep: a keep ratio drawn per step from "
                   "this list (e.g. 0.125,0.25,0.5,0.75) and given to the gate as an input (replaces --keep)")
    p.add_argument("--init", help="matryoshka: start from these trained projections instead of PCA; gate, with "
                   "--keeps: start from this gate trained at one keep and train only the keep input's offsets")
    p.add_argument("--ranks", help="matryoshka: train at the fixed ranks of this search.py file (its target "
                   "budget) instead of drawing ranks each step")
    p.add_argument("--ctx-len", type=count, default=384, help="gate: context tokens of each window")
    p.add_argument("--protocol", choices=["after", "inside"], default="after",
                   help="gate: evict after a full-attention prefill or inside it (the paper's protocol)")
    p.add_argument("--window", type=size, default=0, help="gate: the last W context entries are forced "
                   "kept; inside the prefill each context query also sees its own last W (eval.py --window)")
    p.add_argument("--new-keep", type=ratio, help="gate: also train its decoded-token head: each continuation "
                   "token is judged after --window queries, and this is the kept fraction to aim at (eval.py "
                   "--gate-new)")
    p.add_argument("--gumbel", type=positive, help="gate: train with Gumbel-sigmoid flags at this temperature "
                   "(DMS's relaxation; e.g. 0.5) instead of straight-through ones; the kept fraction is penalized "
                   "in expectation")
    p.add_argument("--sft", help="gate: supervised fine-tuning on a .jsonl of {\"prompt\", \"answer\"} pairs (the "
                   "prompt is evicted, the loss is on the answer; one pair per step; format prompts yourself)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--save-every", type=count, default=50)
    p.add_argument("--no-table", action="store_true", help="skip the closing table")
    args = p.parse_args(argv)
    for name, value in DEFAULTS[args.method].items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    args.out = Path(args.out or f"runs/{args.method}.safetensors")
    for spec in args.data or []:
        data_weight(spec)  # a bad weight is refused before the model loads
    if args.warmup >= 1:
        raise KVNestError(f"--warmup {args.warmup} must be in [0, 1): the fraction of the steps that warm up")
    if args.kl_weight == args.ce_weight == 0:
        raise KVNestError("--kl-weight and --ce-weight are both 0: nothing to train on; give one a weight")
    if args.out.parent.exists() and not args.out.parent.is_dir():
        raise KVNestError(f"--out {args.out}: {args.out.parent} is a file, not a folder")
    given = [f for f in ("key_mode", "rank_step", "calib_windows", "ranks") if getattr(args, f) != p.get_default(f)]
    gate_only = ("keep", "keep_weight", "ctx_len", "protocol", "sft", "keeps", "window", "new_keep", "gumbel")
    given = given if args.method == "gate" else [f for f in gate_only if getattr(args, f) != p.get_default(f)]
    given = given or (["keep"] if args.keeps and args.keep != p.get_default("keep") else [])
    if given:
        raise KVNestError(f"--{given[0].replace('_', '-')} does not act with --method {args.method}"
                          f"{' --keeps' if given[0] == 'keep' and args.keeps else ''}; drop it")
    for flag, other, why in (("rank_step", "ranks", "fixes the ranks"), ("calib_windows", "init", "replaces PCA")):
        if args.method == "matryoshka" and getattr(args, other) and getattr(args, flag) != p.get_default(flag):
            raise KVNestError(f"--{flag.replace('_', '-')} does not act with --{other} (it {why}); drop it")
    if args.method == "gate" and args.init and not args.keeps:
        raise KVNestError("--init starts one gate for every keep from a gate trained at one: give --keeps too")
    if args.method == "gate" and args.init and args.new_keep is not None:
        raise KVNestError("--init trains only the keep input's offsets, not the decoded-token head: drop --new-keep")
    if args.new_keep is not None and args.window < 1:
        raise KVNestError("--new-keep needs --window >= 1 (how many queries see a decoded token before it is "
                          "judged), e.g. --window 32")
    if args.new_keep is not None and args.sft:
        raise KVNestError("--new-keep trains on text windows (--data), not on --sft pairs; drop one")
    if args.new_keep is not None and args.seq_len - args.ctx_len < args.window:
        raise KVNestError(f"--new-keep: the {args.seq_len - args.ctx_len} continuation tokens of --seq-len "
                          f"{args.seq_len} are fewer than --window {args.window}, so none is judged")
    model, tok, folder = model_from_flags(args)
    D, context = model.args.head_dim, model.args.max_seq_len
    if not args.sft and args.seq_len + 1 > context:
        raise KVNestError(f"--seq-len {args.seq_len} plus its target token exceeds the model's context of {context}")
    args.rank_step = args.rank_step or max(1, D // 8)
    if args.rank_step > D:
        raise KVNestError(f"--rank-step {args.rank_step} is outside [1, head_dim={D}]")
    cfg = {k: getattr(args, k) for k in RUN_FLAGS}
    cfg["data"] = args.data[0] if args.data and len(args.data) == 1 else args.data  # one file: as recorded before
    pairs = [(tok.encode(q), tok.encode(a)) for q, a in load_pairs(args.sft)] if args.sft else None
    if pairs and any(not q or len(a) < 2 or len(q) + len(a) > context for q, a in pairs):
        raise KVNestError(f"{args.sft}: every prompt needs at least 1 token, every answer at least 2, and each pair "
                          f"at most the model's context of {context}")
    sources = None if pairs else [(torch.tensor(tok.encode(text)), w) for text, w in load_mix(args.data, "train")]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    meta, fit_kw = {"base_model": folder}, {"save_every": args.save_every}
    window = min(512, context)  # calibration and closing-table windows
    if args.method == "matryoshka":
        calib = None if args.init else mixed_windows(sources, window, args.calib_windows)  # for the PCA start
        proj = train_matryoshka(model, sources, cfg, args.out, meta, args.resume, calib, **fit_kw)
        table = None if args.no_table else budget_table(model, proj, eval_windows(tok, args.eval_data, 6, window),
                                                        args.ranks, args.init)
    else:
        if not args.ctx_len < args.seq_len - 1:
            raise KVNestError(f"--ctx-len {args.ctx_len} must leave continuation tokens in --seq-len {args.seq_len}")
        gate = train_gate(model, sources, cfg, args.out, meta, args.resume, pairs, **fit_kw)
        table = None if args.no_table else gate_table(model, gate, eval_windows(
            tok, args.eval_data, 8, args.seq_len + 1), cfg)
    print(f"saved {args.out}")
    if table:
        args.out.with_suffix(".md").write_text(table + "\n")
        print(table)


if __name__ == "__main__":
    run_cli(main)
