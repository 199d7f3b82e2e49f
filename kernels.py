"""The fast decode path: one token per step, compiled with torch.compile, over static caches that hold only what
is kept, and read only up to what has been written.

A decode step reads every weight once plus the cache entries it attends to. For a small model at long context the
cache dominates, so bytes saved are time saved, but only when the step reads just the kept bytes. Three rules:

  1. The cache holds only kept data. MatryoshkaKV heads keep r_k key and r_v value features, and heads that share
     (r_k, r_v) share one static buffer (a `HeadGroup`, so no head is padded to the largest rank). After eviction
     a buffer holds only kept entries, and heads that keep different counts go to different groups.
  2. A step reads a prefix of each buffer: the `base` entries of the prefill plus the decoded ones, rounded up to
     `bucket` tokens, never the whole preallocated length. Entries past a sequence's `length` in the prefix are
     masked. Rounding keeps the number of shapes small: one graph with a symbolic length on CPU, and on CUDA one
     captured CUDA graph per bucket.
  3. Attention runs in the compressed space (keys after RoPE, Lin et al. 2024):

         q_c = U_k[:, :r_k]^T RoPE(q)          scores = q_c k_c^T / sqrt(D)          y_c = softmax(scores) v_c
         o_proj(U_v[:, :r_v] y_c + b) = W_fold y_c + bias                     (W_fold, bias: compress.fold_values)

     so nothing is decompressed. Keys projected before RoPE cannot do this: they are rebuilt, U_k[:, :r_k] k_c,
     at every step (the Palu way), and rotated inside the score computation (`rotated_scores`, with a cos/sin table
     computed once), so the rotated keys are never written; `bench.py` measures the cost.

Kinds: the full cache; MatryoshkaKV (a model after compress.compress, with its ranks); eviction by a gate or a
baseline policy (eviction after a full-attention prefill, as evict.py does); and both (the kept entries are then
compressed; pre-RoPE keys keep their positions). The prefill runs eagerly through the model's own modules, so a
kind decodes exactly as its eager path does: `Decoder` takes the place of the model in `model.generate`.

    dec = Decoder(model, max_new=64)                   # compile=True: the step is compiled, fullgraph
    for tok in generate(dec, prompt, 64): ...
"""
import math

import torch
import torch.nn as nn

from model import KVNestError, Transformer, apply_rope, rope_cos_sin


# Sizes of module buffers may vary between compiled calls (caches of another context or batch): one graph with
# symbolic sizes then serves them all, instead of one recompile each (dynamo's default keeps them static).
DYNAMIC_BUFFERS = dict(force_parameter_static_shapes=False, force_nn_module_property_static_shapes=False)


def round_up(n: int, step: int) -> int:
    return -(-n // step) * step


class HeadGroup(nn.Module):
    """KV heads of one layer that share a key rank, a value rank and a buffer: the unit of the compiled step.

    Buffers: k (B, n, S, r_k), v (B, n, S, r_v); length (B, n), the entries each sequence holds per head. The first
    `base` slots came from the prefill (base = the most any sequence holds), then decoded tokens follow.
    U_k (n, D, r_k), U_v (n, D, r_v), b_v (n, D) compress new entries (None: the full cache); W_o (dim, n * G * r_v)
    maps the group's attention output straight to the model dimension (U_v^T folded into o_proj). Slot j holds
    position j, except after eviction; then pre-RoPE keys, rotated at every step, need pos (B, n, S): each slot's
    position."""

    def __init__(self, heads: list, k, v, length, W_o, U_k=None, U_v=None, b_v=None, pre_rope=False, window=None,
                 pos=None):
        super().__init__()
        self.base, self.pre_rope, self.window = int(length.max()), pre_rope, window
        self.register_buffer("heads", torch.tensor(heads, device=k.device), persistent=False)
        for name, t in (("k", k), ("v", v), ("length", length), ("W_o", W_o), ("U_k", U_k), ("U_v", U_v),
                        ("b_v", b_v), ("pos", pos)):
            self.register_buffer(name, t, persistent=False)

    def forward(self, q, k, v, pos, L: int, rope) -> torch.Tensor:
        """Append the new entry, attend over the first L slots (base + a bucket). q (B, H_kv, G, D) after RoPE; k, v
        (B, H_kv, D) the new key (after RoPE, or before it in pre_rope mode) and value; pos (0-d) its position;
        rope: the (cos, sin) tables of every position, (S, D/2) each, for pre-RoPE keys. -> (B, dim)"""
        B, D = q.shape[0], q.shape[-1]
        q, k, v = (t.index_select(1, self.heads) for t in (q, k, v))  # (B, n, G, D), (B, n, D), (B, n, D)
        if self.U_k is not None:
            k = torch.einsum("bnd,ndr->bnr", k, self.U_k)  # (B, n, r_k)
            v = torch.einsum("bnd,ndr->bnr", v - self.b_v, self.U_v)  # (B, n, r_v)
        seq = torch.arange(B, device=q.device)[:, None]  # (B, 1)
        head = torch.arange(self.k.shape[1], device=q.device)[None, :]  # (1, n)
        self.k.index_put_((seq, head, self.length), k)  # slot length[b, i] of sequence b, head i; in place
        self.v.index_put_((seq, head, self.length), v)
        if self.pos is not None:
            self.pos.index_put_((seq, head, self.length), pos)
        self.length.add_(1)
        K, V = self.k[:, :, :L], self.v[:, :, :L]  # (B, n, L, r_k), (B, n, L, r_v): the prefix, not the buffer
        if self.pre_rope:  # rebuild the keys, then rotate them inside the dot product
            angles = [t[:L] if self.pos is None else t[self.pos[:, :, :L]] for t in rope]  # (L | B, n, L, D/2)
            s = rotated_scores(q, K @ self.U_k.transpose(-1, -2), *angles) / math.sqrt(D)
        else:
            if self.U_k is not None:
                q = q @ self.U_k  # (B, n, G, r_k): the query in the compressed space
            s = (q @ K.transpose(-1, -2)).float() / math.sqrt(D)  # (B, n, G, L)
        slot = torch.arange(L, device=q.device)
        empty = slot >= self.length[:, :, None]  # (B, n, L)
        if self.window:  # Mistral: without eviction slot j holds position j
            empty = empty | (slot <= pos - self.window)
        p = s.masked_fill(empty[:, :, None], float("-inf")).softmax(-1).to(V.dtype)
        return (p @ V).reshape(B, -1) @ self.W_o.T  # (B, n, G, r_v) -> (B, dim)

    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes + (0 if self.pos is None else self.pos.nbytes)

    def bytes_read(self, L: int) -> int:
        """Cache bytes one step reads: the prefix of L slots of k, v (and pos)."""
        return L * self.nbytes() // self.k.shape[2]


def rotated_scores(q, K, cos, sin) -> torch.Tensor:
    """q . RoPE(K) for rebuilt pre-RoPE keys, without writing the rotated keys: with halves
    (x_1, x_2) of the rotate-half layout and angles a_f, q . RoPE(k) = sum_f cos a_f (q_1 k_1 + q_2 k_2)
    + sin a_f (q_2 k_1 - q_1 k_2). q (B, n, G, D), K (B, n, L, D), cos/sin (L, D/2) or per sequence and head
    (B, n, L, D/2) -> (B, n, G, L) in fp32."""
    q1, q2 = q.float()[:, :, None].chunk(2, -1)  # (B, n, 1, G, D/2)
    k1, k2 = K.float()[:, :, :, None].chunk(2, -1)  # (B, n, L, 1, D/2)
    cos, sin = cos[..., None, :], sin[..., None, :]  # (L, 1, D/2) or (B, n, L, 1, D/2)
    s = (cos * (q1 * k1 + q2 * k2) + sin * (q2 * k1 - q1 * k2)).sum(-1)  # (B, n, L, G): each key read once
    return s.transpose(-1, -2)


def unrotate(k: torch.Tensor, pos: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """Keys after RoPE back to before it: rotate each by minus its position's angle. k (B, n, D), pos (B, n)."""
    cos, sin = (t.view(*pos.shape, -1) for t in rope_cos_sin(inv_freq, pos.flatten()))  # (B, n, D)
    return apply_rope(k, cos, -sin)


def matryoshka_state(attn) -> dict | None:
    """A compressed layer's bases, ranks and o_proj with U_v^T and the offset folded in (W_o (dim, sum G * r_v),
    o_bias (dim,)), or None for a full-cache layer."""
    from compress import MatryoshkaAttention, fold_values
    if not isinstance(attn, MatryoshkaAttention):
        return None
    state = {"U_k": attn.U_k.detach(), "U_v": attn.U_v.detach(), "b_v": attn.b_v.detach(),
             "rank_k": attn.rank_k.tolist(), "rank_v": attn.rank_v.tolist(), "key_mode": attn.key_mode}
    state["W_o"], state["o_bias"] = fold_values(attn.o_proj.weight, state["U_v"], state["b_v"], state["rank_v"],
                                                attn.n_heads)
    return state


def pack(per_head: list, heads: list, S: int) -> torch.Tensor:
    """One static buffer (B, n, S, ...) holding the given heads' left-aligned entries (B, T_h, ...), zeros after."""
    first = per_head[heads[0]]
    buf = first.new_zeros(first.shape[0], len(heads), S, *first.shape[2:])
    for i, h in enumerate(heads):
        buf[:, i, : per_head[h].shape[1]] = per_head[h]
    return buf


def make_groups(attn, mat: dict | None, k_c: list, v_c: list, length, room: int, pos: list | None = None) -> list:
    """Pack one layer's kept entries into HeadGroups. k_c, v_c: per KV head (B, T_h, r) entries, left-aligned
    per sequence (the compressed features for a compressed layer); length (B, H_kv) entries held; pos: per KV
    head (B, T_h) positions of the entries after eviction (kept for pre-RoPE keys), None when slot j holds
    position j. Heads share a group when they share r_k, r_v and the most entries any sequence holds (after
    eviction heads keep different counts), so that no head reads slots it does not hold."""
    H_kv, D, G = attn.n_kv_heads, attn.head_dim, attn.n_heads // attn.n_kv_heads
    W = mat["W_o"] if mat else attn.o_proj.weight  # (dim, sum over query heads of r_v)
    rank_k, rank_v = (mat["rank_k"], mat["rank_v"]) if mat else ([D] * H_kv, [D] * H_kv)
    held = length.max(0).values.tolist()  # (H_kv,) the most entries any sequence holds per head
    keys = [(rank_k[h], rank_v[h], held[h]) for h in range(H_kv)]
    widths = [G * rank_v[h] for h in range(H_kv)]
    starts = [sum(widths[:h]) for h in range(H_kv)]  # each head's first column in W
    groups = []
    for key in dict.fromkeys(keys):
        heads = [h for h in range(H_kv) if keys[h] == key]
        n_len = length[:, heads]  # (B, n)
        S = int(n_len.max()) + room
        bufs = [pack(k_c, heads, S), pack(v_c, heads, S)]  # (B, n, S, r_k), (B, n, S, r_v)
        W_o = W if len(heads) == H_kv else torch.cat([W[:, starts[h]: starts[h] + widths[h]] for h in heads], 1)
        U = {}
        if mat is not None:
            U = {"U_k": torch.stack([mat["U_k"][h, :, : mat["rank_k"][h]] for h in heads]),
                 "U_v": torch.stack([mat["U_v"][h, :, : mat["rank_v"][h]] for h in heads]),
                 "b_v": mat["b_v"][heads], "pre_rope": mat["key_mode"] == "pre_rope"}
            if U["pre_rope"] and pos is not None:
                U["pos"] = pack(pos, heads, S)  # (B, n, S)
        groups.append(HeadGroup(heads, *bufs, n_len.clone(), W_o, window=attn.window, **U))  # W_o (dim, n*G*r_v)
    return groups


class Decoder(nn.Module):
    """Stands in for the model in `model.generate`: decoder(prompt, 0) prefills eagerly and builds the static
    caches, decoder(token, pos) runs one compiled decode step. The kind follows the model: plain layers give the
    full cache, compressed ones (compress.compress + set_ranks) MatryoshkaKV; a `policy` evicts to `keep` after the
    prefill (evict.prefill_and_evict; exact as there)."""

    def __init__(self, model: Transformer, max_new: int, policy=None, keep: float = 1.0, exact=None,
                 bucket: int = 256, compile: bool = True):
        super().__init__()
        self.model, self.max_new, self.bucket = model, max_new, bucket
        self.policy, self.keep, self.exact = policy, keep, exact
        self.layer_state = [matryoshka_state(layer.attn) for layer in model.layers]
        if policy is not None:
            from evict import check_evictable
            check_evictable(model)
        self.groups, self.t, self.ctx = nn.ModuleList(), 0, 0
        self.register_buffer("o_bias", torch.zeros(model.args.n_layers, model.args.dim,
                                                   device=model.inv_freq.device), persistent=False)
        for i, m in enumerate(self.layer_state):
            if m is not None:
                self.o_bias[i] = m["o_bias"]
        self.register_buffer("rope_cos", None, persistent=False)  # (S, D/2) angles of every slot, for pre-RoPE
        self.register_buffer("rope_sin", None, persistent=False)
        cuda = model.inv_freq.is_cuda  # the plain function, not a bound method: no cycle keeps the caches alive
        self.step = (torch.compile(Decoder.eager_step, fullgraph=True, dynamic=True,
                                   mode="reduce-overhead" if cuda else None) if compile else Decoder.eager_step)

    def forward(self, tokens: torch.Tensor, pos: int) -> torch.Tensor:
        """(B, T) tokens at position pos -> logits (B, T, vocab): a prefill at pos 0, else one decode step."""
        if pos == 0:
            return self.prefill(tokens)
        if tokens.shape[1] != 1 or pos != self.ctx + self.t:
            raise KVNestError(f"the decoder runs one token at the next position ({self.ctx + self.t}), got "
                              f"{tokens.shape[1]} at {pos}")
        if self.t >= self.max_new:
            raise KVNestError(f"the decoder's caches hold {self.max_new} new tokens; raise max_new")
        self.t += 1
        pos_t = torch.tensor(pos, device=tokens.device)
        with torch._dynamo.config.patch(**DYNAMIC_BUFFERS):
            logits = self.step(self, tokens, pos_t, self.read_lengths())
        return logits.clone()[:, None]  # clone: a CUDA graph reuses its output memory

    def room(self) -> int:
        """Slots after the prefill entries: max_new rounded up to a bucket, plus one spare that keeps every read a
        strict prefix of its buffer (a prefix as long as the buffer would be contiguous: another graph)."""
        return round_up(self.max_new, self.bucket) + 1

    def read_lengths(self) -> list:
        """The prefix each group reads this step: its prefill entries plus the decoded ones, rounded up to a bucket.
        Plain ints, so that one compiled graph (with symbolic lengths) serves every context and step."""
        tb = min(round_up(max(self.t, 1), self.bucket), round_up(self.max_new, self.bucket))
        return [g.base + tb for layer in self.groups for g in layer]

    @torch.no_grad()
    def prefill(self, tokens: torch.Tensor) -> torch.Tensor:
        """Run the prompt eagerly through the model's own modules, then pack what each layer keeps."""
        model, (B, T) = self.model, tokens.shape
        room, self.ctx, self.t = self.room(), T, 0
        if self.policy is None:
            model.setup_cache(B, T)
            logits = model(tokens, 0)
            per_layer = [self.cached_entries(layer.attn, m, B, T) for layer, m in zip(model.layers, self.layer_state)]
            model.clear_cache()
        else:
            logits, per_layer = self.evicted_entries(tokens)
        self.groups = nn.ModuleList(
            nn.ModuleList(make_groups(layer.attn, m, k_c, v_c, length, room, pos))
            for layer, m, (k_c, v_c, length, pos) in zip(model.layers, self.layer_state, per_layer))
        self.rope_table()
        return logits

    def rope_table(self) -> None:
        """cos and sin of the angles of every position up to the last decoded one, computed once: pre-RoPE layers
        rotate their rebuilt keys with them. Left None when no layer needs them."""
        if any(g.pre_rope for layer in self.groups for g in layer):
            positions = torch.arange(self.ctx + self.room(), device=self.o_bias.device)
            half = self.model.args.head_dim // 2  # the rotate-half layout repeats each angle: keep one copy
            self.rope_cos, self.rope_sin = (t[:, :half].contiguous()  # (S, D/2)
                                            for t in rope_cos_sin(self.model.inv_freq, positions))

    def cached_entries(self, attn, mat, B, T):
        """Per KV head (B, T, r) keys and values from the model's cache after an eager prefill."""
        if mat is None:
            k_c, v_c = list(attn.cache.k[:, :, :T].unbind(1)), list(attn.cache.v[:, :, :T].unbind(1))
        else:  # MatryoshkaCache: [(heads, (B, n, S, r))] per rank, for K and for V
            per_head = [{}, {}]
            for out, groups in zip(per_head, (attn.cache.k, attn.cache.v)):
                for heads, buf in groups:
                    for i, h in enumerate(heads.tolist()):
                        out[h] = buf[:, i, :T]
            k_c, v_c = ([d[h] for h in range(attn.n_kv_heads)] for d in per_head)
        return k_c, v_c, torch.full((B, attn.n_kv_heads), T, device=attn.o_proj.weight.device), None

    def evicted_entries(self, tokens):
        """Full-attention prefill and eviction into evict.py's CompactCache (no room), then each head's kept entries,
        compressed if the layer is. Pre-RoPE layers keep the positions of the entries: their keys are rotated back
        to before RoPE, compressed, and rotated again at every step."""
        from evict import prefill_and_evict, restore_full
        model = self.model
        originals = [layer.attn for layer in model.layers]
        try:
            logits, flags = prefill_and_evict(model, tokens, self.policy, self.keep, self.exact, compact=True)
            per_layer = []
            for layer, m, keep in zip(model.layers, self.layer_state, flags):
                kept = layer.attn.cache  # per head (B, n_h, D) keys (after RoPE) and values, left-aligned
                k_c, v_c, pos = list(kept.k), list(kept.v), None
                if m is not None and m["key_mode"] == "pre_rope":
                    # a stable sort puts each sequence's kept positions first, in order: (B, n_h) per head
                    order = (~keep.bool()).byte().argsort(dim=-1, stable=True)  # (B, H_kv, T)
                    pos = [order[:, h, : k.shape[1]] for h, k in enumerate(k_c)]
                    k_c = [unrotate(k, p, model.inv_freq) for k, p in zip(k_c, pos)]
                if m is not None:  # compress what is kept
                    k_c = [k @ m["U_k"][h, :, : m["rank_k"][h]] for h, k in enumerate(k_c)]
                    v_c = [(v - m["b_v"][h]) @ m["U_v"][h, :, : m["rank_v"][h]] for h, v in enumerate(v_c)]
                per_layer.append((k_c, v_c, torch.stack(kept.length, 1), pos))
        finally:
            restore_full(model)
            for layer, attn in zip(model.layers, originals):
                layer.attn = attn
        return logits, per_layer

    @torch.no_grad()
    def fill_random(self, batch: int, context: int, seed: int = 0) -> None:
        """Caches as after a prefill of `context` tokens, with random entries, for benchmarks: speed does not depend
        on the values. Eviction keeps round(context * keep) entries per head, as the baselines do."""
        a, p = self.model.args, self.model.lm_head.weight
        g = torch.Generator(device=p.device).manual_seed(seed)
        n = max(1, round(context * self.keep)) if self.policy is not None else context
        kept_at = (torch.arange(n, device=p.device) * context // n).expand(batch, n)  # (B, n) spread evenly
        self.ctx, self.t, self.groups = context, 0, nn.ModuleList()
        for layer, m in zip(self.model.layers, self.layer_state):
            entries = [[torch.randn(batch, 1, r, generator=g, device=p.device, dtype=p.dtype).expand(batch, n, r)
                        for r in (m[f"rank_{kind}"] if m else [a.head_dim] * a.n_kv_heads)] for kind in "kv"]
            length = torch.full((batch, a.n_kv_heads), n, device=p.device)
            pos = [kept_at] * a.n_kv_heads if self.policy is not None else None
            self.groups.append(nn.ModuleList(make_groups(layer.attn, m, *entries, length, self.room(), pos)))
        self.rope_table()

    def eager_step(self, tokens: torch.Tensor, pos: torch.Tensor, reads: list) -> torch.Tensor:
        """One decode step: tokens (B, 1) at position pos (a 0-d tensor), group g reading reads[g] slots ->
        logits (B, vocab)."""
        m, a = self.model, self.model.args
        B, G, D = tokens.shape[0], a.n_heads // a.n_kv_heads, a.head_dim
        x = m.embed_tokens(tokens[:, 0])  # (B, dim)
        cos, sin = (t[0].to(x.dtype) for t in rope_cos_sin(m.inv_freq, pos[None]))  # (D,)
        rope = None if self.rope_cos is None else (self.rope_cos, self.rope_sin)
        reads = iter(reads)
        for layer, groups, bias in zip(m.layers, self.groups, self.o_bias):
            attn, h = layer.attn, layer.input_layernorm(x)
            q = apply_rope(attn.q_proj(h).view(B, a.n_kv_heads, G, D), cos, sin)  # (B, H_kv, G, D)
            k = attn.k_proj(h).view(B, a.n_kv_heads, D)  # (B, H_kv, D)
            if not groups[0].pre_rope:
                k = apply_rope(k, cos, sin)
            v = attn.v_proj(h).view(B, a.n_kv_heads, D)
            out = bias.to(x.dtype)
            for g in groups:
                out = out + g(q, k, v, pos, next(reads), rope)
            x = x + out
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        return m.lm_head(m.norm(x))  # (B, vocab)

    def nbytes(self) -> int:
        """Bytes of the cache tensors (keys and values of every group)."""
        return sum(g.nbytes() for layer in self.groups for g in layer)

    def bytes_read(self) -> int:
        """Cache bytes the last step read (its prefixes)."""
        groups = [g for layer in self.groups for g in layer]
        return sum(g.bytes_read(L) for g, L in zip(groups, self.read_lengths()))


def policy_from_flags(model: Transformer, evict: str | None, gate: str | None, keep: float) -> tuple:
    """(policy, keep, exact) for the scripts' --evict/--gate/--keep flags; a gate is held to the exact keep ratio
    over all layers and heads, as eval.py scores it."""
    if evict is None:
        return None, 1.0, None
    from evict import baseline, check_keep
    from gate import load_gate
    check_keep(keep)
    if evict != "gate":
        return baseline(evict, keep), keep, None
    if gate is None:
        raise KVNestError("--evict gate needs --gate, a checkpoint from `python train.py --method gate`")
    return load_gate(gate, model)[0], keep, True
