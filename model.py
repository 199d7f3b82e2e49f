"""A LLaMA / Mistral decoder in one file: config, weights, a static KV cache and a generate CLI.

The model is the standard pre-norm decoder (Touvron et al., 2023, "LLaMA"):

    h   = x + o_proj(Attention(RoPE(q), RoPE(k), v))      with grouped-query attention (GQA)
    out = h + down_proj(silu(gate_proj(norm(h))) * up_proj(norm(h)))

where Attention(q, k, v) = softmax(q k^T / sqrt(head_dim) + mask) v, every norm is RMSNorm, and each of the H_kv
key/value heads is shared by a group of G = n_heads / n_kv_heads query heads. Mistral adds a sliding window: a
query at position i sees keys j with i - window < j <= i.

This file knows nothing of KV compression. The methods plug in through two seams:
  * `Attention` is a module that owns its cache (`attn.cache`) and makes it with `new_cache`; compress.py and
    evict.py swap each `layer.attn` for a subclass that projects or evicts, reusing the same weights.
  * `Transformer.forward(tokens, pos)` runs a prefill (T tokens) or a decode step (T = 1) at absolute position
    `pos`; with no cache set up it is the plain uncached forward from position 0.
"""
import argparse
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F


class KVNestError(Exception):
    """A user error with a one-line message that names the problem and the fix; scripts print it and exit 2."""


ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM"}  # model_type -> architecture


@dataclass
class ModelArgs:
    dim: int = 576
    n_layers: int = 30
    n_heads: int = 9
    n_kv_heads: int = 3
    head_dim: int = 64
    hidden_dim: int = 1536
    vocab_size: int = 49152
    norm_eps: float = 1e-5
    rope_theta: float = 1e5
    rope_scaling: dict | None = None  # {"rope_type": "llama3" | "linear", "factor": ..., ...}
    max_seq_len: int = 8192
    tie_embeddings: bool = True
    sliding_window: int | None = None
    bos_id: int | None = 1
    eos_ids: tuple = (2,)

    @classmethod
    def from_hf_config(cls, cfg: dict) -> "ModelArgs":
        """Read a Hugging Face config.json dict; refuse what this file does not implement, by name."""
        model_type = cfg.get("model_type")
        arch = (cfg.get("architectures") or [ARCHITECTURES.get(model_type, str(model_type))])[0]
        if model_type not in ARCHITECTURES or arch not in ARCHITECTURES.values():
            raise KVNestError(f"unsupported architecture {arch!r} (model_type {model_type!r}); kvnest supports "
                              f"{', '.join(ARCHITECTURES.values())}")
        missing = [k for k in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                               "vocab_size") if k not in cfg]
        if missing:
            raise KVNestError(f"config.json lacks {', '.join(missing)}; is it a complete Hugging Face config?")
        for key, ok in (("hidden_act", "silu"), ("attention_bias", False), ("mlp_bias", False),
                        ("pretraining_tp", 1)):
            if cfg.get(key, ok) != ok:
                raise KVNestError(f"unsupported config field {key}={cfg[key]!r}; kvnest supports only {key}={ok!r}")
        rope = dict(cfg.get("rope_parameters") or {})  # transformers >= 5 keeps theta and scaling here
        scaling = cfg.get("rope_scaling") or ({k: v for k, v in rope.items() if k != "rope_theta"} or None)
        if scaling is not None:
            kind = scaling.get("rope_type", scaling.get("type"))
            if kind == "default":
                scaling = None
            elif kind not in ("llama3", "linear"):
                raise KVNestError(f"unsupported rope scaling {kind!r}; kvnest supports 'llama3' and 'linear'")
            else:
                scaling = dict(scaling, rope_type=kind)
        eos = cfg.get("eos_token_id", 2)
        n_heads = cfg["num_attention_heads"]
        window = cfg.get("sliding_window") if model_type == "mistral" else None
        return cls(dim=cfg["hidden_size"], n_layers=cfg["num_hidden_layers"], n_heads=n_heads,
                   n_kv_heads=cfg.get("num_key_value_heads", n_heads),
                   head_dim=cfg.get("head_dim") or cfg["hidden_size"] // n_heads,
                   hidden_dim=cfg["intermediate_size"], vocab_size=cfg["vocab_size"],
                   norm_eps=cfg.get("rms_norm_eps", 1e-5), rope_theta=rope.get("rope_theta", cfg.get("rope_theta",
                   1e4)), rope_scaling=scaling, max_seq_len=cfg.get("max_position_embeddings", 4096),
                   tie_embeddings=cfg.get("tie_word_embeddings", False), sliding_window=window,
                   bos_id=cfg.get("bos_token_id"), eos_ids=tuple(eos if isinstance(eos, list) else [eos]))


def rope_frequencies(args: ModelArgs) -> torch.Tensor:
    """Inverse frequencies theta^(-2i/D) of rotary embeddings, with llama3 or linear scaling applied. (D/2,)"""
    inv = 1.0 / args.rope_theta ** (torch.arange(0, args.head_dim, 2, dtype=torch.float64) / args.head_dim)
    s = args.rope_scaling
    if s and s["rope_type"] == "linear":
        inv = inv / s["factor"]
    elif s and s["rope_type"] == "llama3":
        old, lo, hi = s["original_max_position_embeddings"], s["low_freq_factor"], s["high_freq_factor"]
        wavelen = 2 * math.pi / inv
        scaled = torch.where(wavelen > old / lo, inv / s["factor"], inv)
        smooth = (old / wavelen - lo) / (hi - lo)
        smoothed = (1 - smooth) * scaled / s["factor"] + smooth * scaled
        medium = (wavelen >= old / hi) & (wavelen <= old / lo)
        inv = torch.where(medium, smoothed, scaled)
    return inv.float()


def rope_cos_sin(inv_freq: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables for the given positions. (T, D), in the rotate-half layout of HF checkpoints."""
    angles = positions.float()[:, None] * inv_freq[None, :]  # (T, D/2)
    angles = torch.cat([angles, angles], dim=-1)  # (T, D)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (x_i, x_{i+D/2}) by the position's angle. x: (B, H, T, D), cos/sin: (T, D)."""
    x1, x2 = x.chunk(2, dim=-1)
    return (x * cos + torch.cat([-x2, x1], dim=-1) * sin).to(x.dtype)


def attention_mask(pos: int, T: int, S: int, window: int | None, device) -> torch.Tensor:
    """Boolean (T, S) mask, True = visible: query pos+t sees key j iff j <= pos+t and pos+t - j < window."""
    q = torch.arange(pos, pos + T, device=device)[:, None]
    k = torch.arange(S, device=device)[None, :]
    visible = k <= q
    return visible & (q - k < window) if window else visible


class KVCache(nn.Module):
    """Static preallocated cache in (B, H_kv, S, D) layout; `update` writes T new entries at `pos`."""

    def __init__(self, batch: int, n_kv_heads: int, max_len: int, head_dim: int, dtype, device):
        super().__init__()
        shape = (batch, n_kv_heads, max_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, pos: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v (B, H_kv, T, D) at [pos, pos+T) and return all entries so far, (B, H_kv, pos+T, D)."""
        end = pos + k.shape[2]
        if end > self.k.shape[2]:
            raise KVNestError(f"sequence of {end} tokens exceeds the cache of {self.k.shape[2]}; "
                              f"pass a larger max length (or a shorter prompt)")
        self.k[:, :, pos:end] = k
        self.v[:, :, pos:end] = v
        return self.k[:, :, :end], self.v[:, :, :end]

    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.n_kv_heads, args.head_dim
        self.window = args.sliding_window
        self.q_proj = nn.Linear(args.dim, args.n_heads * args.head_dim, bias=False)
        self.k_proj = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=False)
        self.v_proj = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=False)
        self.o_proj = nn.Linear(args.n_heads * args.head_dim, args.dim, bias=False)
        self.cache = None

    def share_weights(self, base: "Attention") -> None:
        """Start a subclass instance (compress.py, evict.py) that reuses `base`'s weights and shape."""
        nn.Module.__init__(self)
        self.n_heads, self.n_kv_heads, self.head_dim, self.window = (base.n_heads, base.n_kv_heads,
                                                                     base.head_dim, base.window)
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = base.q_proj, base.k_proj, base.v_proj, base.o_proj
        self.cache = None

    def new_cache(self, batch: int, max_len: int, dtype, device) -> nn.Module:
        return KVCache(batch, self.n_kv_heads, max_len, self.head_dim, dtype, device)

    def qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Project and split into heads: q (B, H, T, D), k and v (B, H_kv, T, D), before RoPE."""
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, H, T, D)
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, H_kv, T, D)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, H_kv, T, D)
        return q, k, v

    def attend(self, q, k, v, pos: int, scale: float | None = None) -> torch.Tensor:
        """softmax(q k^T * scale + mask) v over the keys so far; the KV heads are shared by their query groups.

        q: (B, H, T, Dq), k: (B, H_kv, S, Dq), v: (B, H_kv, S, Dv) -> (B, H, T, Dv). scale defaults to
        1/sqrt(head_dim) of the base model, also when the features were compressed to Dq < head_dim.
        """
        T, S = q.shape[2], k.shape[2]
        scale = 1 / math.sqrt(self.head_dim) if scale is None else scale
        if pos == 0 and T == S and not self.window:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=True)
        mask = None if T == 1 and not self.window else attention_mask(pos, T, S, self.window, q.device)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=True)

    def forward(self, x: torch.Tensor, pos: int, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        q, k, v = self.qkv(x)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if self.cache is not None:
            k, v = self.cache.update(pos, k, v)  # (B, H_kv, pos+T, D)
        elif pos != 0:
            raise KVNestError("an uncached forward starts at position 0; call setup_cache() to decode")
        y = self.attend(q, k, v, pos)  # (B, H, T, D)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.gate_proj = nn.Linear(args.dim, args.hidden_dim, bias=False)
        self.up_proj = nn.Linear(args.dim, args.hidden_dim, bias=False)
        self.down_proj = nn.Linear(args.hidden_dim, args.dim, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps, self.weight = eps, nn.Parameter(torch.ones(dim))

    def forward(self, x):
        xf = x.float()
        return self.weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)


class Block(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.input_layernorm = RMSNorm(args.dim, args.norm_eps)
        self.attn = Attention(args)
        self.post_attention_layernorm = RMSNorm(args.dim, args.norm_eps)
        self.mlp = MLP(args)

    def forward(self, x, pos, cos, sin):
        h = x + self.attn(self.input_layernorm(x), pos, cos, sin)
        return h + self.mlp(self.post_attention_layernorm(h))


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.embed_tokens = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(Block(args) for _ in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.lm_head = nn.Linear(args.dim, args.vocab_size, bias=False)
        self.register_buffer("inv_freq", rope_frequencies(args), persistent=False)

    def setup_cache(self, batch: int, max_len: int) -> None:
        """Give every attention layer a fresh cache of its own kind for `batch` sequences of `max_len` tokens."""
        if max_len > self.args.max_seq_len:
            raise KVNestError(f"max length {max_len} exceeds the model's context of {self.args.max_seq_len} tokens")
        p = self.lm_head.weight
        for layer in self.layers:
            layer.attn.cache = layer.attn.new_cache(batch, max_len, p.dtype, p.device)

    def clear_cache(self) -> None:
        for layer in self.layers:
            layer.attn.cache = None

    def cache_bytes(self) -> int:
        return sum(layer.attn.cache.nbytes() for layer in self.layers)

    def fingerprint(self) -> dict:
        """Shapes plus a checksum of the first layer's key weights: what a checkpoint must match to be applied."""
        a, w = self.args, self.layers[0].attn.k_proj.weight
        return {"n_layers": a.n_layers, "n_kv_heads": a.n_kv_heads, "head_dim": a.head_dim, "dim": a.dim,
                "vocab_size": a.vocab_size, "k_proj_checksum": float(f"{float(w.double().abs().sum()):.3g}")}

    def forward(self, tokens: torch.Tensor, pos: int = 0) -> torch.Tensor:
        """tokens (B, T) at absolute positions [pos, pos+T) -> logits (B, T, vocab)."""
        cos, sin = rope_cos_sin(self.inv_freq, torch.arange(pos, pos + tokens.shape[1], device=tokens.device))
        x = self.embed_tokens(tokens)  # (B, T, dim)
        for layer in self.layers:
            x = layer(x, pos, cos.to(x.dtype), sin.to(x.dtype))
        return self.lm_head(self.norm(x))


def load_model(path, dtype=torch.float32, device="cpu") -> Transformer:
    """Load a Hugging Face folder (config.json + model.safetensors or shards with an index), no transformers."""
    from safetensors import safe_open
    from safetensors import SafetensorError

    folder = Path(path)
    if not folder.is_dir():
        raise KVNestError(f"model folder {folder} does not exist; pass --model a Hugging Face model folder")
    if not (folder / "config.json").is_file():
        raise KVNestError(f"{folder} has no config.json; pass a Hugging Face model folder")
    args = ModelArgs.from_hf_config(json.loads((folder / "config.json").read_text()))
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        files = sorted({folder / f for f in json.loads(index.read_text())["weight_map"].values()})
    else:
        files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise KVNestError(f"{folder} has no *.safetensors weights; convert the checkpoint to safetensors first")
    state = {}
    for file in files:
        try:
            with safe_open(file, framework="pt", device=str(device)) as f:
                for name in f.keys():
                    state[name.removeprefix("model.").replace("self_attn.", "attn.")] = f.get_tensor(name).to(dtype)
        except (SafetensorError, OSError) as e:
            raise KVNestError(f"cannot read {file} ({str(e).splitlines()[0]}); the file is damaged or truncated, "
                              f"download or convert it again") from None
    if args.tie_embeddings or "lm_head.weight" not in state:
        state["lm_head.weight"] = state["embed_tokens.weight"]
    with torch.device("meta"):
        model = Transformer(args)
    missing = sorted(set(model.state_dict()) - set(state))
    if missing:
        raise KVNestError(f"weights in {folder} lack {len(missing)} tensors (first: {missing[0]}); "
                          f"is this a complete {args.n_layers}-layer LLaMA/Mistral checkpoint?")
    model.load_state_dict(state, strict=False, assign=True)
    model.inv_freq = rope_frequencies(args).to(device)
    return model.eval().requires_grad_(False)


@torch.no_grad()
def generate(model: Transformer, prompt: torch.Tensor, max_new_tokens: int, temperature: float = 0.0,
             stop_ids=()):
    """Prefill the (B, T) prompt, then yield (B,) next tokens, one decode step at a time (greedy at T = 0).
    The caller sets up the cache (model.setup_cache, or a compressed cache swapped in by compress.py/evict.py)."""
    logits, pos = model(prompt, 0), prompt.shape[1]
    for _ in range(max_new_tokens):
        last = logits[:, -1].float()
        if temperature > 0:
            nxt = torch.multinomial(F.softmax(last / temperature, dim=-1), 1)[:, 0]
        else:
            nxt = last.argmax(-1)
        yield nxt
        if bool(torch.isin(nxt, torch.tensor(list(stop_ids), device=nxt.device)).all()):
            return
        logits, pos = model(nxt[:, None], pos), pos + 1


def main(argv=None) -> None:
    from assets import add_model_flags, chatml, model_from_flags
    p = argparse.ArgumentParser(description="Generate text with a LLaMA/Mistral model (optionally compressed KV).")
    add_model_flags(p)
    p.add_argument("--prompt", required=True)
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the default model's ChatML template")
    p.add_argument("--max-new-tokens", type=int, default=100)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--max-len", type=int, default=None, help="cache length (default: prompt + new tokens)")
    p.add_argument("--projections", help="MatryoshkaKV checkpoint (train.py) for a compressed cache")
    p.add_argument("--budget", type=float, help="MatryoshkaKV budget in (0, 1] with --projections")
    p.add_argument("--ranks", help="per-head ranks JSON from search.py, with --projections")
    p.add_argument("--evict", choices=["streaming", "h2o", "snapkv", "random", "gate"], help="evict the prompt")
    p.add_argument("--gate", help="gate checkpoint from `python train.py --method gate`, with --evict gate")
    p.add_argument("--keep", type=float, default=0.5, help="kept fraction of the prompt's cache with --evict")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="decode with the compiled step of kernels.py (default: on CUDA)")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    model, tok, _ = model_from_flags(args)
    if args.projections:
        from compress import compress_from_flags
        compress_from_flags(model, args.projections, args.budget, args.ranks)
    ids = tok.encode(chatml(args.prompt) if args.chat else args.prompt)
    max_len = args.max_len or len(ids) + args.max_new_tokens
    if len(ids) >= max_len or max_len > model.args.max_seq_len:
        raise KVNestError(f"prompt of {len(ids)} tokens plus {args.max_new_tokens} new does not fit a cache of "
                          f"{min(max_len, model.args.max_seq_len)}; raise --max-len or shorten the prompt")
    compiled = args.device.startswith("cuda") if args.compile is None else args.compile
    if compiled or args.evict:  # kernels.Decoder stands in for the model: static caches, one step at a time
        from kernels import Decoder, policy_from_flags
        policy = policy_from_flags(model, args.evict, args.gate, args.keep)
        runner = Decoder(model, max_len - len(ids), *policy, compile=compiled)
    else:
        runner = model
        model.setup_cache(1, max_len)
    stop = set(model.args.eos_ids) | {tok.token_id("<|im_end|>")} - {None}
    out, shown, t0 = [], "", time.perf_counter()
    for nxt in generate(runner, torch.tensor([ids], device=args.device), args.max_new_tokens, args.temperature, stop):
        if int(nxt[0]) in stop:
            break
        out.append(int(nxt[0]))
        text = tok.decode(out)
        print(text[len(shown):], end="", flush=True)
        shown = text
    dt = time.perf_counter() - t0
    kv = runner.nbytes() if runner is not model else model.cache_bytes()
    print(f"\n[{len(out)} tokens in {dt:.2f}s: {len(out) / dt:.1f} tokens/s, KV cache {kv / 2**20:.2f} MiB]",
          file=sys.stderr)


def run_cli(main_fn) -> None:
    """Run a script's main, turning a KVNestError into one line on stderr and exit status 2."""
    try:
        main_fn()
    except KVNestError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    import model  # the importable module: its KVNestError is the one assets.py and the methods raise
    model.run_cli(model.main)
