"""The fast decode path: the model's own forward, compiled with torch.compile, one token per step, over the static
cache of model.py, which holds only what is kept.

A decode step reads every weight once plus the cache entries it attends to. For a small model at long context the
cache dominates, so bytes saved are time saved, but only when the step reads just the kept bytes:

  1. The cache holds only kept data. MatryoshkaKV heads keep r_k key and r_v value features, and heads that share
     (r_k, r_v) share one buffer (model.HeadGroup: no head is padded to the largest rank). After eviction
     (LayerCache.compact) a buffer holds only the kept entries, and heads that keep different counts go to
     different groups.
  2. Buffers are sized to what they will hold: the prompt's (kept) entries plus room for `max_new` tokens. A step
     reads each whole buffer, as gpt-fast does, and masks the free slots.
  3. Attention runs in the compressed space (keys after RoPE, Lin et al. 2024): q_c = U_k[:, :r_k]^T RoPE(q), scores
     q_c k_c^T / sqrt(D), then y = U_v[:, :r_v] softmax(.) v_c + b, so no key or value is decompressed. Keys projected
     before RoPE are rebuilt, U_k[:, :r_k] k_c, and rotated inside the score computation (model.rotated_scores).

There is no second copy of the model here: `Decoder` stands in for the model in `model.generate`. At position 0 it
prefills the prompt eagerly into a fresh cache (evicting with evict.prefill when given a policy); then every step is
`model.forward(token, pos, cache)`, compiled once (fullgraph; the position is a tensor and the cache sizes are
symbolic, so one graph serves every step, context and batch size of a cache kind).

    dec = Decoder(model, max_new=64, features=mat, policy=SnapKV(), keep=0.5)   # compile=True by default
    for tok in generate(dec, prompt, 64): ...
"""
import torch

from errors import KVNestError
from evict import Protocol, prefill
from model import KVCache, Transformer

# Sizes of module buffers may vary between compiled calls (caches of another context or batch): one graph with
# symbolic sizes then serves them all, instead of one recompile each (dynamo's default keeps them static). Each
# layer structure and dtype is still a graph of its own (of the one Block.forward), and one process may decode many
# (bench.py runs every kind): allow more than dynamo's default of 8.
COMPILE_CONFIG = dict(force_parameter_static_shapes=False, force_nn_module_property_static_shapes=False,
                      recompile_limit=64)


def compiled_forward(model: Transformer):
    """model.forward for decode steps with its decoder block compiled once and reused by every layer (regional
    compilation: one graph for all layers of one cache structure, so compiling does not grow with depth); the
    embedding and the head stay eager, one lookup and one matmul. CUDA graphs on a GPU (reduce-overhead)."""
    cuda = model.inv_freq.is_cuda
    block = torch.compile(type(model.layers[0]).forward, fullgraph=True, dynamic=True,
                          mode="reduce-overhead" if cuda else None)

    def forward(tokens: torch.Tensor, pos: torch.Tensor, cache: KVCache) -> torch.Tensor:
        x = model.embed_tokens(tokens)  # (B, 1, dim)
        cos, sin = model.rope(pos, 1, x.dtype)
        for layer, layer_cache in zip(model.layers, cache.layers):
            x = block(layer, x, pos, cos, sin, layer_cache, cache.rope)
        return model.lm_head(model.norm(x))
    return forward


def dynamic_sizes(cache: KVCache) -> KVCache:
    """Mark every size of the cache's buffers dynamic before the first compile: one graph then serves every context,
    batch, rank and kept count of a layer structure, instead of a static first graph and a recompile."""
    for layer in cache.layers:
        for group in layer.groups:
            for t in (group.k, group.v, group.length, group.pos):
                if t is not None:
                    torch._dynamo.maybe_mark_dynamic(t, list(range(t.dim())))
    return cache


class Decoder:
    """decoder(prompt, 0) prefills into a new cache and returns the prompt's logits; decoder(token, pos) runs one
    decode step. features (compress.Matryoshka) compress the cache; a policy (evict.py, gate.py) evicts the prompt to
    `keep` after the prefill (exact and protocol as in evict.prefill)."""

    def __init__(self, model: Transformer, max_new: int, features=None, policy=None, keep: float = 1.0,
                 exact: bool | None = None, compile: bool = True, protocol: Protocol = Protocol()):
        self.model, self.max_new, self.features = model, max_new, features
        self.policy, self.keep, self.exact, self.protocol = policy, keep, exact, protocol
        self.step = compiled_forward(model) if compile else None
        self.cache, self.ctx, self.t = None, 0, 0

    @torch.no_grad()
    def __call__(self, tokens: torch.Tensor, pos: int) -> torch.Tensor:
        """(B, T) tokens at position pos -> logits (B, T, vocab)."""
        if pos == 0:
            B, self.ctx = tokens.shape
            self.cache, self.t = KVCache(self.model, B, self.ctx + self.max_new, self.features), 0
            if self.policy is None:
                logits = self.model(tokens, 0, self.cache)
            else:
                logits = prefill(self.model, tokens, self.cache, self.policy, self.keep, self.protocol, self.exact)[0]
            dynamic_sizes(self.cache)
            return logits
        if tokens.shape[1] != 1 or pos != self.ctx + self.t:
            raise KVNestError(f"the decoder runs one token at the next position ({self.ctx + self.t}), got "
                              f"{tokens.shape[1]} at {pos}")
        if self.t >= self.max_new:
            raise KVNestError(f"the decoder's caches hold {self.max_new} new tokens; raise max_new")
        self.t += 1
        if self.step is None:
            return self.model(tokens, pos, self.cache)
        with torch._dynamo.config.patch(**COMPILE_CONFIG):
            logits = self.step(tokens, torch.tensor(pos, device=tokens.device), self.cache)
        return logits.clone()  # a CUDA graph reuses its output memory

    def resume(self, cache: KVCache, ctx: int) -> None:
        """Decode on from a cache that holds a prefill of `ctx` tokens made elsewhere (bench.py fills one)."""
        self.cache, self.ctx, self.t = dynamic_sizes(cache), ctx, 0

    def nbytes(self) -> int:
        """Bytes of the cache tensors."""
        return self.cache.nbytes()
