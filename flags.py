"""The flags the scripts share: which model (--model, --dtype, --device) and which compressed cache (--projections,
--budget, --ranks for the feature axis; --evict, --gate, --keep for the token axis; --protocol, --sinks, --window,
--gate-new for where eviction happens). Each is read in one place, and
a flag that would have no effect in a combination is an error, never silently ignored."""
from typing import NamedTuple

import torch

from assets import Tokenizer, default_model_folder
from errors import KVNestError, ratio, size
from evict import Protocol, baseline
from plan import POLICIES, plan_compression
from weights import load_model


def add_model_flags(parser) -> None:
    parser.add_argument("--model", help="Hugging Face model folder (default: the embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")


def model_from_flags(args) -> tuple:
    """(model, tokenizer, folder) named by --model (or the default model), in --dtype on --device."""
    check_device(args.device, args.dtype)
    folder = args.model or default_model_folder()
    return load_model(folder, getattr(torch, args.dtype), args.device), Tokenizer(folder), str(folder)


def check_device(device: str, dtype: str) -> None:
    """--device names a device this machine has, and --dtype runs there (a small matmul is tried in each)."""
    try:
        kind = torch.device(device).type
    except RuntimeError:
        raise KVNestError(f"--device {device} is not a device name; pass cpu or cuda") from None
    if kind == "cuda" and not torch.cuda.is_available():
        raise KVNestError(f"--device {device}: this machine has no CUDA GPU; pass --device cpu")
    if kind == "cuda" and dtype == "bfloat16" and not torch.cuda.is_bf16_supported(including_emulation=False):
        raise KVNestError("--dtype bfloat16: this GPU has no bfloat16 arithmetic; pass --dtype float16 or float32")
    for name in ("float32", dtype):
        try:
            a = torch.ones(8, 8, dtype=getattr(torch, name), device=device)
            (a @ a).sum().item()
        except (RuntimeError, AssertionError) as e:  # a backend not built in, a dtype it cannot multiply
            why = str(e).split(". ")[0].splitlines()[0][:120]
            if name == "float32":
                raise KVNestError(f"--device {device} does not run here ({why}); pass --device cpu") from None
            raise KVNestError(f"--dtype {dtype} does not run on --device {device} ({why}); pass --dtype float32") \
                from None


def add_compression_flags(p, sweep: bool = False) -> None:
    """--projections/--budget/--ranks and --evict/--gate/--keep; with sweep, --evict-sweep too (every method)."""
    p.add_argument("--projections", help="MatryoshkaKV checkpoint (train.py) for compressed features")
    p.add_argument("--budget", type=ratio, help="MatryoshkaKV budget in (0, 1], with --projections")
    p.add_argument("--ranks", help="per-head ranks JSON from search.py, with --projections and --budget")
    p.add_argument("--evict", choices=POLICIES, help="evict the context's cache after (or inside) the prefill")
    p.add_argument("--gate", help="gate checkpoint from `python train.py --method gate`, with --evict gate")
    p.add_argument("--keep", type=ratio, help="kept fraction of the context's cache with --evict (default 0.5)")
    p.add_argument("--plan", help="joint plan from joint.py: each head's ranks and keep ratio, and the policy (with "
                   "the --projections it was searched with, --gate for a gate plan; --budget picks the entry)")
    if sweep:
        p.add_argument("--evict-sweep", action="store_true", help="every eviction method (and --gate) at keep "
                       "75/50/25/12.5%%")


def add_protocol_flags(p) -> None:
    """--protocol, --sinks, --window, --gate-new: where --evict (or --plan) evicts, as evict.Protocol says."""
    p.add_argument("--protocol", choices=["after", "inside"], default="after",
                   help="evict after a full-attention prefill (kvpress) or inside it (Attention-Gate)")
    p.add_argument("--sinks", type=size, default=0, help="first context entries always kept")
    p.add_argument("--window", type=size, default=0, help="last context entries always kept (inside the prefill: "
                   "each query's recent window; with --gate-new: how many queries see a new token before it is judged)")
    p.add_argument("--gate-new", action="store_true", help="gate decoded tokens too (needs --evict gate, --window)")


PROTOCOL_FLAGS = ("protocol", "sinks", "window", "gate_new")


def protocol_from_flags(p, args, also: tuple = ()) -> Protocol:
    """The Protocol of add_protocol_flags' flags; they (and the script's eviction flags `also`) act with --evict,
    --evict-sweep or --plan only."""
    given = [f for f in PROTOCOL_FLAGS + also if getattr(args, f) != p.get_default(f)]
    if given and not (args.evict or getattr(args, "evict_sweep", False) or args.plan):
        raise KVNestError(f"--{given[0].replace('_', '-')} acts with --evict, --evict-sweep or --plan; pass one")
    return Protocol(args.protocol == "inside", args.sinks, args.window)


class Compression(NamedTuple):
    """The compressed cache the flags ask for."""
    features: object  # Matryoshka features of --projections (None: every feature)
    policy: object  # the eviction policy: a Gate, a baseline, or None (no eviction)
    keep: object  # kept fraction of the context: a float, or (L, H_kv) per head from --plan
    exact: bool | None  # True: exactly the top n kept (evict.flags_from_scores); None: the policy's own rule
    plan: object  # the Plan of --plan, else None


def compression_from_flags(model, args) -> Compression:
    """The Compression that the flags of add_compression_flags ask for. A gate is held to the exact keep ratio over
    all layers and heads, as eval.py scores it; with --evict-sweep the policy is the gate (if any)."""
    sweep = getattr(args, "evict_sweep", False)
    if args.plan:
        return plan_from_flags(model, args, sweep)
    if args.evict is None and not sweep and (args.keep is not None or args.gate):
        raise KVNestError("--keep and --gate act with --evict; pass --evict too")
    if sweep and (args.evict or args.keep is not None):
        raise KVNestError("--evict-sweep scores every method at every keep ratio; drop --evict and --keep")
    if args.gate and args.evict not in ("gate", None):
        raise KVNestError(f"--gate is the policy of --evict gate, not of --evict {args.evict}; drop one of them")
    features = features_from_args(model, args)
    keep = 0.5 if args.keep is None else args.keep
    if args.evict not in ("gate", None):
        return Compression(features, baseline(args.evict), keep, None, None)
    if args.evict == "gate" and args.gate is None:
        raise KVNestError("--evict gate needs --gate, a checkpoint from `python train.py --method gate`")
    if args.gate is None:
        return Compression(features, None, 1.0, None, None)
    from gate import load_gate
    return Compression(features, load_gate(args.gate, model)[0], keep, True, None)


def features_from_args(model, args):
    """The Matryoshka features of --projections with --budget or --ranks (None without --projections)."""
    from compress import features_from_flags
    if args.projections is None and (args.budget is not None or args.ranks):
        raise KVNestError("--budget and --ranks choose ranks for --projections; pass --projections too")
    return features_from_flags(model, args.projections, args.budget, args.ranks) if args.projections else None


def plan_from_flags(model, args, sweep: bool) -> Compression:
    """The Compression of --plan: its ranks cut --projections' bases, its policy (--gate
    for a gate) keeps each head's own top n."""
    given = [f for f, v in (("ranks", args.ranks), ("keep", args.keep), ("evict", args.evict),
                            ("evict-sweep", sweep)) if v not in (None, False)]
    if given:
        raise KVNestError(f"--{given[0]} is set by --plan (each head's ranks, keep ratio and the policy); drop it")
    plan, features, policy = plan_compression(model, args.plan, args.budget, args.projections, args.gate)
    return Compression(features, policy, plan.keep if policy else 1.0, True if policy else None, plan)
