"""kvnest's KV compression inside a transformers model: the user's own `generate` runs over kvnest's cache.

    from hf import compress_cache
    with compress_cache(model, projections="runs/matryoshka.safetensors", budget=0.5,
                        policy="gate", gate="runs/gate.safetensors", keep=0.5):
        out = model.generate(**inputs, max_new_tokens=64)

`model` is a transformers LlamaForCausalLM or MistralForCausalLM. transformers computes q, k, v, RoPE, the MLPs and
the sampling; nothing of its code is copied here. Inside the block:

  - The attention product is kvnest's: an attention function registered with transformers' AttentionInterface
    writes each layer's new keys and values into model.py's LayerCache and attends there. MatryoshkaKV entries are
    stored and scored in their bases (k_c = U_k^T k, v_c = U_v^T (v - b)) as in kvnest's own decode, each head at
    its own rank with no padding; keys before RoPE come from a forward hook on k_proj.
  - `KVNestCache`, a transformers Cache, holds those LayerCaches. A forward pre-hook on the model puts a fresh one
    where generate put its own (empty) cache, and generate carries it from step to step.
  - After the prefill, a forward hook evicts the prompt with any policy of evict.py or the gate: each sequence and
    KV head keeps its flagged entries, and LayerCache.compact drops the rest from memory. With `inside`, each layer
    flags the prompt before attending, so later prompt queries already miss what it evicted (evict.Protocol;
    eval.py and generate.py --protocol inside), and the same entries leave the cache after the prefill.
  - `sinks` and `window` force the prompt's first and last entries kept; inside the prefill each query also sees
    its own last `window`. With `gate_new` and a gate trained on decoded tokens (train.py --new-keep), every
    decoded token is judged once `window` queries have seen it (gate.NewTokenGate, as generate.py --gate-new does).
  - Left padding: pad entries are invisible to every query of the prefill and compacted away after it; each
    sequence is scored and evicted as if it were alone.
  - A joint plan (joint.py; plan=, with the projections it was searched with) gives each KV head its own ranks
    and keep ratio, as the scripts' --plan does.

Checkpoints trained by train.py apply unchanged: `kvnest_view` makes a kvnest Transformer over the transformers
model's own tensors (no copy), fingerprinted with the digest of the weights stored in the folder it came from.
transformers is needed by this file only.
"""
import functools
import inspect
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.cache_utils import Cache, CacheLayerMixin

from compress import load_projections, load_ranks, uniform_ranks
from errors import KVNestError
from evict import baseline, check_evictable, check_keep, layer_keep, protect
from gate import NewTokenGate, check_new_tokens, load_gate
from model import KVCache, Transformer
from plan import plan_compression
from weights import (args_from_hf_config, assemble, kvnest_name, stored_tensors, tensor_digest, weight_files,
                     weights_digest)

ATTACHED = {}  # attention module -> (Attachment, layer index), while compress_cache is active


def kvnest_view(model) -> Transformer:
    """A kvnest Transformer holding the transformers model's tensors themselves, fingerprinted (for checkpoints)
    with the digest of the weights stored in the folder the model was loaded from."""
    args = args_from_hf_config(model.config.to_dict())
    folder = Path(model.name_or_path or "")
    digest = None
    if folder.is_dir() and (folder / "config.json").is_file():
        files = tuple((str(f), f.stat().st_mtime_ns, f.stat().st_size) for f in weight_files(folder))
        digest = stored_digest(folder, files)
    state = {kvnest_name(n): t.detach() for n, t in model.state_dict().items()}
    return assemble(args, state, digest, str(folder))


@functools.lru_cache(maxsize=8)
def stored_digest(folder: Path, files: tuple) -> str:
    """The digest of the weights stored in a folder, read once per version of its files (`files`: each one's path,
    modification time and size), not every time compress_cache is entered."""
    return weights_digest({n: tensor_digest(t) for n, t in stored_tensors(folder)})


class KVNestLayer(CacheLayerMixin):
    """transformers' view of one layer: the entries themselves live in the parent cache's LayerCache."""
    is_sliding = False

    def __init__(self, parent: "KVNestCache"):
        super().__init__()
        self.parent, self.is_initialized = parent, True

    def lazy_initialization(self, key_states, value_states) -> None:
        pass

    def update(self, key_states, value_states, *args, **kwargs):
        return key_states, value_states  # the attention function writes them, compressed, and reads the cache

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.parent.seen + query_length, 0

    def get_seq_length(self) -> int:
        return self.parent.seen

    def get_max_length(self) -> int:
        return -1


class KVNestCache(Cache):
    """model.py's KVCache as a transformers Cache. `seen`: tokens written so far, pads included (transformers'
    positions in the batch); `pads` (B,): each sequence's left padding; `free`: slots every buffer has left."""

    def __init__(self, n_layers: int):
        super().__init__(layers=[KVNestLayer(self) for _ in range(n_layers)])
        self.kv, self.seen, self.pads, self.padded, self.free = None, 0, None, False, 0

    def nbytes(self) -> int:
        """Bytes of the cache tensors."""
        return 0 if self.kv is None else self.kv.nbytes()

    def make_room(self, T: int) -> None:
        """Room for T more entries in every buffer. The prefill (and eviction) leaves none: buffers then grow by
        half the tokens seen, as a list grows, so that a long generation copies them a few times only."""
        if T <= self.free:
            return
        extra = max(T - self.free, self.seen // 2 + 16)
        for layer in self.kv.layers:
            for g in layer.groups:
                g.k, g.v = (F.pad(t, (0, 0, 0, extra)) for t in (g.k, g.v))  # (B, n, S + extra, r)
                if g.pos is not None:
                    g.pos = F.pad(g.pos, (0, extra))
        self.free += extra


@dataclass
class Attachment:
    """What compress_cache attached: the settings, the cache in use, and what one prefill records per layer."""
    view: Transformer
    features: object = None
    policy: object = None
    keep: object = 1.0  # a float, or (L, H_kv) per head from a plan
    exact: bool | None = None
    inside: bool = False  # evict inside the prefill (else after it)
    sinks: int = 0  # the prompt's first entries forced kept
    window: int = 0  # the prompt's last entries forced kept; inside: each query's recent window
    gate_new: bool = False  # decoded tokens judged after `window` queries
    cache: KVNestCache | None = None
    rotary: object = None  # the model's rotary embedding module
    name: str = "cache"  # the forward's argument for a cache ("past_key_values" before transformers 5.x renamed it)
    x: dict = field(default_factory=dict)  # layer -> attention input (B, T, dim), for the policy or the judges
    k_pre: dict = field(default_factory=dict)  # layer -> keys before RoPE (B, T, H_kv * D)
    scores: dict = field(default_factory=dict)  # layer -> scores (B, H_kv, T), or one (1, H_kv, T_b) per sequence
    kept: dict = field(default_factory=dict)  # layer -> keep flags (B, H_kv, T) chosen inside the prefill
    judges: list = field(default_factory=list)  # per layer, the NewTokenGate of the cache in use (gate_new)

    def cache_kwargs(self) -> dict:
        """What continues the cache in use: model(tokens, **attached.cache_kwargs())."""
        return {self.name: self.cache}

    def begin(self, cache: KVNestCache, tokens: torch.Tensor, mask: torch.Tensor | None) -> None:
        """Before a forward of tokens (B, T): a new cache for a prefill, room for T more after it."""
        self.cache, (B, T) = cache, tokens.shape
        self.T, self.x, self.k_pre, self.scores, self.kept = T, {}, {}, {}, {}
        if cache.seen + T > self.view.args.max_seq_len:
            raise KVNestError(f"{cache.seen + T} tokens exceed the model's context of {self.view.args.max_seq_len}; "
                              f"pass a shorter prompt or fewer new tokens")
        if cache.seen:
            if B != cache.kv.layers[0].groups[0].k.shape[0]:
                raise KVNestError(f"a batch of {B} continues a cache of another batch size; start a new generation")
            if self.gate_new and T != 1:
                raise KVNestError(f"decoded tokens are judged one per forward; {T} tokens continue the cache "
                                  f"(drop gate_new to feed several)")
            cache.make_room(T)
            return
        pads = torch.zeros(B, dtype=torch.long, device=tokens.device)
        if mask is not None and mask.dim() == 2 and not bool(mask.all()):
            if bool((mask[:, 1:] < mask[:, :-1]).any()):
                raise KVNestError("the attention mask is not left padding; pad prompts on the left "
                                  "(tokenizer.padding_side = 'left')")
            if self.view.args.sliding_window or (self.inside and self.window):
                what = "a sliding-window (Mistral) model" if self.view.args.sliding_window else \
                    "a recent window inside the prefill"
                raise KVNestError(f"left padding with {what} is not supported; generate one prompt at a time")
            pads = (mask == 0).sum(1)
        cache.kv, cache.pads, cache.padded = KVCache(self.view, B, T, self.features), pads, bool(pads.any())
        self.judges = [NewTokenGate(self.policy, i, self.window) for i in range(len(cache.kv.layers))] \
            if self.gate_new else []
        if cache.kv.rope is not None:  # keys before RoPE are rotated where read: with transformers' own angles
            cache.kv.rope = self.rope(len(cache.kv.rope[0]))
        if cache.padded:
            real = (torch.arange(T, device=pads.device) >= pads[:, None]).float()  # (B, T)
            for layer in cache.kv.layers:
                layer.soften(real[:, None].expand(-1, self.view.args.n_kv_heads, -1))  # pads unseen
                for g in layer.groups:
                    if g.pre_rope:  # each entry's position, counted from its own sequence's start
                        g.pos = torch.zeros_like(g.k[..., 0], dtype=torch.long)

    def rope(self, n: int) -> tuple:
        """cos, sin (n, D/2) of positions 0..n-1 as the model's rotary embedding computes them for its queries."""
        x = self.view.lm_head.weight[:1]  # the rotary embedding reads only its dtype and device
        cos, sin = self.rotary(x, torch.arange(n, device=x.device)[None])  # (1, n, D)
        D = cos.shape[-1]
        return cos[0, :, : D // 2].float().contiguous(), sin[0, :, : D // 2].float().contiguous()

    def attend(self, i: int, query, key, value) -> torch.Tensor:
        """Layer i's attention over the compressed cache. query (B, H, T, D) after RoPE, key after RoPE, value
        (B, H_kv, T, D) -> (B, T, H, D), as transformers' attention functions return."""
        cache, a = self.cache, self.view.args
        B, H, T, D = query.shape
        k = key if i not in self.k_pre else self.k_pre.pop(i).view(B, T, a.n_kv_heads, D).transpose(1, 2)
        pos = (cache.seen - cache.pads)[:, None, None] if cache.padded else cache.seen  # (B, 1, 1) if padded
        q = query.view(B, a.n_kv_heads, H // a.n_kv_heads, T, D)  # (B, H_kv, G, T, D)
        if self.policy is not None and cache.seen == 0:
            self.scores[i] = self.score(i, self.x.pop(i), query, key)
            if self.inside:  # flag the prompt before attending: its later queries miss what is evicted
                self.kept[i] = self.select([i])[0]
                cache.kv.layers[i].soften(self.kept[i], self.window)
        y = cache.kv.layers[i](q, k, key, value, pos, a.sliding_window, cache.kv.rope)  # (B, H_kv, G, T, D)
        if self.judges and cache.seen:
            self.judges[i].judge(self.x.pop(i), cache.kv.layers[i])
        return y.reshape(B, H, T, D).transpose(1, 2)

    def score(self, i: int, x, q, k):
        """The policy's scores of layer i: of the whole batch, or of each sequence without its padding (the first
        `sinks` and the last `window` entries forced kept)."""
        if not self.cache.padded:
            return protect(self.policy.score(i, x, q, k, layer_keep(self.keep, i)), self.sinks, self.window)
        return [protect(self.policy.score(i, x[b: b + 1, p:], q[b: b + 1, :, p:], k[b: b + 1, :, p:],
                                          layer_keep(self.keep, i)), self.sinks, self.window)
                for b, p in enumerate(self.cache.pads.tolist())]

    def end(self) -> None:
        """After a forward: evict after the prefill (and drop the pads)."""
        cache, T = self.cache, self.T
        if cache.seen == 0 and (self.policy is not None or cache.padded):
            for layer, f in zip(cache.kv.layers, self.flags(T)):
                layer.compact(f, 0)
                for g in layer.groups:
                    g.observe = self.gate_new  # each decode step's attention, for the judges
        cache.seen, cache.free = cache.seen + T, max(cache.free - T, 0)

    def flags(self, T: int) -> list:
        """Keep flags (B, H_kv, T) per layer after the prefill: the policy's (chosen inside it, or now over every
        layer), or every real entry."""
        L, H_kv, pads = self.view.args.n_layers, self.view.args.n_kv_heads, self.cache.pads
        if self.policy is None:
            return [(torch.arange(T, device=pads.device) >= pads[:, None])[:, None].expand(-1, H_kv, -1)] * L
        return [self.kept[i] for i in range(L)] if self.inside else self.select(range(L))

    def select(self, layers) -> list:
        """The policy's keep flags (B, H_kv, T) of `layers` from their scores, chosen over those layers together;
        each sequence its own, its pads never kept."""
        exact = self.policy.exact if self.exact is None else self.exact
        keep = self.keep[list(layers)] if torch.is_tensor(self.keep) else self.keep  # a plan's rows of those layers
        if not self.cache.padded:
            return self.policy.flags([self.scores[i] for i in layers], keep, exact, False)
        pads = self.cache.pads.tolist()
        per_seq = [self.policy.flags([self.scores[i][b] for i in layers], keep, exact, False)
                   for b in range(len(pads))]  # [b][layer] (1, H_kv, T - pad_b)
        return [torch.cat([F.pad(per_seq[b][j], (p, 0)) for b, p in enumerate(pads)]) for j in range(len(layers))]


def attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """The attention function registered as "kvnest" (the mask is kvnest's own: causal, padding, window)."""
    state, i = ATTACHED[module]
    return state.attend(i, query, key, value), None


AttentionInterface.register("kvnest", attention)


def settings(view: Transformer, projections=None, budget=None, ranks=None, plan=None, policy=None, gate=None,
             keep=None, exact=None, inside=False, sinks=None, window=None, gate_new=False) -> dict:
    """The features, policy, keep and protocol that compress_cache's arguments name, checked as the scripts check
    them."""
    for name, value, least, end, example in (("sinks", sinks, 0, "first", 4), ("window", window, 1, "last", 32)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < least):
            raise KVNestError(f"{name}={value!r}: pass a whole number >= {least} (the prompt's {end} entries always "
                              f"kept), e.g. {example}")
    out = compression(view, projections, budget, ranks, plan, policy, gate, keep, exact)
    if out.get("policy") is None:
        given = [n for n, v in (("sinks", sinks), ("window", window)) if v is not None]
        given += [n for n, v in (("inside", inside), ("gate_new", gate_new)) if v]
        if given:
            raise KVNestError(f"{given[0]} acts with a policy (or a plan that evicts); pass one")
        return out
    check_evictable(view)
    if gate_new:
        check_new_tokens(out["policy"], window)
    return dict(out, inside=bool(inside), sinks=sinks or 0, window=window or 0, gate_new=bool(gate_new))


def compression(view: Transformer, projections, budget, ranks, plan, policy, gate, keep, exact) -> dict:
    """The features, policy, keep and exact rule of a plan (joint.py), or of the MatryoshkaKV and eviction
    arguments."""
    if plan is not None:
        given = [n for n, v in (("ranks", ranks), ("policy", policy), ("keep", keep), ("exact", exact))
                 if v is not None]
        if given:
            raise KVNestError(f"{given[0]} is set by the plan (each head's ranks and keep ratio, and the policy); "
                              f"drop it")
        plan, features, policy = plan_compression(view, plan, budget, projections, gate)
        return dict(features=features, policy=policy, keep=plan.keep if policy else 1.0, exact=True)
    out = {"exact": exact}
    if projections is not None:
        if budget is None and ranks is None:
            raise KVNestError("projections need a budget (uniform ranks) or ranks (a search.py file)")
        proj = load_projections(projections, view)[0]
        with torch.no_grad():
            out["features"] = proj.features(*(load_ranks(ranks, view, budget) if ranks else
                                              uniform_ranks(view, budget)))
    elif budget is not None or ranks is not None:
        raise KVNestError("budget and ranks act with projections; pass projections too")
    if policy is None:
        given = [n for n, v in (("gate", gate), ("keep", keep)) if v is not None]
        if given:
            raise KVNestError(f"{given[0]} acts with a policy; pass policy too")
        return out
    check_keep(0.5 if keep is None else keep)
    if policy == "gate":
        if gate is None:
            raise KVNestError('policy="gate" needs gate=<checkpoint of train.py --method gate>')
        out["policy"] = load_gate(gate, view)[0]
        out["exact"] = True if exact is None else exact  # held to the keep ratio over all layers, as the scripts do
    elif gate is not None:
        raise KVNestError('gate acts with policy="gate"; drop it or pass policy="gate"')
    else:
        out["policy"] = baseline(policy) if isinstance(policy, str) else policy
    return dict(out, keep=0.5 if keep is None else keep)


@contextmanager
def compress_cache(model, projections=None, budget=None, ranks=None, policy=None, gate=None, keep=None,
                   exact=None, inside=False, sinks=None, window=None, gate_new=False, plan=None):
    """Run `model` (transformers Llama/Mistral) over kvnest's compressed cache inside the block. projections,
    budget, ranks: MatryoshkaKV (train.py, search.py files); plan: a joint.py file (each head's ranks and keep
    ratio, and the policy: with the projections it was searched with, its gate for a gate plan, budget picks the
    entry); policy ("streaming", "h2o", "snapkv", "random",
    "gate" with gate=<checkpoint>, or a Policy object) and keep: eviction of the prompt after the prefill (inside
    it with inside=True); sinks, window: the prompt's first and last entries always kept (inside: each query's
    recent window too); gate_new (a gate trained on decoded tokens): each decoded token judged after `window`
    queries."""
    view = kvnest_view(model)
    name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    state = Attachment(view, **settings(view, projections, budget, ranks, plan, policy, gate, keep, exact, inside,
                                        sinks, window, gate_new),
                       rotary=model.model.rotary_emb, name=name)
    layers = model.model.layers

    def before(_, args, kwargs):
        cache = kwargs.get(name)
        if not isinstance(cache, KVNestCache):
            if cache is not None and cache.get_seq_length() > 0:
                raise KVNestError("the model was given a cache that already holds tokens; start inside compress_cache")
            kwargs[name], kwargs["use_cache"] = KVNestCache(len(layers)), True
        tokens = kwargs.get("input_ids", args[0] if args else None)
        if tokens is None:
            raise KVNestError("compress_cache needs input_ids (not inputs_embeds)")
        state.begin(kwargs[name], tokens, kwargs.get("attention_mask"))
        return args, kwargs

    def attention_input(i):  # x, for the policy's scores in the prefill and the judges after it
        def hook(_, args):
            if state.policy is not None and (state.cache.seen == 0 or state.gate_new):
                state.x[i] = args[0]
        return hook

    def keys_before_rope(i):
        return lambda _, args, k: state.k_pre.__setitem__(i, k)

    pre_rope = state.features is not None and state.features.pre_rope
    handles = [model.register_forward_pre_hook(before, with_kwargs=True),
               model.register_forward_hook(lambda *_: state.end())]
    old = model.config._attn_implementation
    try:
        for i, layer in enumerate(layers):
            ATTACHED[layer.self_attn] = (state, i)
            handles.append(layer.self_attn.q_proj.register_forward_pre_hook(attention_input(i)))
            if pre_rope:
                handles.append(layer.self_attn.k_proj.register_forward_hook(keys_before_rope(i)))
        model.config._attn_implementation = "kvnest"
        yield state
    finally:
        model.config._attn_implementation = old
        for h in handles:
            h.remove()
        for layer in layers:
            ATTACHED.pop(layer.self_attn, None)
