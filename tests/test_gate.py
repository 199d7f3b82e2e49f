"""Attention-Gate and the eviction baselines: exact identities, eager references, real eviction, training, errors."""
import copy
import math

import pytest
import torch

from checkpoints import load_checkpoint, save_checkpoint
from conftest import run_config
from errors import KVNestError
from eval import score_eviction
from evict import (H2O, Protocol, RandomPolicy, SnapKV, StreamingLLM, flags_from_scores, kept_fraction, prefill,
                   received_attention)
from gate import Gate, GumbelSigmoid, calibrate_gate, joint_flags, load_gate, save_gate
from model import KVCache, ModelError
from weights import load_model
from train import train_gate

POLICIES = [StreamingLLM(), H2O(), SnapKV(), RandomPolicy(), None]  # None: a calibrated gate


def tokens(n, batch=2, seed=0):
    return torch.randint(0, 128, (batch, n), generator=torch.Generator().manual_seed(seed))


@pytest.fixture
def llama(tiny_llama):
    return load_model(tiny_llama[0])


def policy_for(model, policy, context, keep=0.5):
    if policy is not None:
        return policy
    gate = Gate(model.args.n_layers, model.args.n_kv_heads, model.args.dim)
    calibrate_gate(model, gate, context, keep)
    return gate


def evicted_logits(model, x, ctx_len, policy, keep, compact, one_by_one=False, **kw):
    """Prefill x[:, :ctx_len] with eviction, then the rest (at once, or one token per step): (B, T, V), flags."""
    cache = KVCache(model, x.shape[0], x.shape[1])
    ctx_logits, flags = prefill(model, x[:, :ctx_len], cache, policy, keep, compact=compact, **kw)
    if one_by_one:
        rest = [model(x[:, i: i + 1], i, cache) for i in range(ctx_len, x.shape[1])]
    else:
        rest = [model(x[:, ctx_len:], ctx_len, cache)]
    return torch.cat([ctx_logits, *rest], 1), flags


@pytest.mark.parametrize("compact", [False, True], ids=["soft", "compact"])
@pytest.mark.parametrize("policy", POLICIES, ids=lambda p: type(p).__name__)
def test_keep_all_reproduces_the_base_model(llama, policy, compact):
    x = tokens(48)
    with torch.no_grad():
        out, flags = evicted_logits(llama, x, 40, policy_for(llama, policy, x[:, :40]), 1.0, compact, exact=True)
        assert kept_fraction(flags) == 1.0
        assert (out - llama(x)).abs().max().item() < 1e-5


def eager_masked_logits(model, x, visible):
    """The model written out layer by layer with plain attention under explicit masks: visible[layer] (B, H_kv, T,
    T) says which keys each query of each KV head's group sees (the reference for every eviction path)."""
    from model import apply_rope, rope_cos_sin
    a = model.args
    cos, sin = rope_cos_sin(model.inv_freq, torch.arange(x.shape[1]))
    h = model.embed_tokens(x)
    for i, layer in enumerate(model.layers):
        attn, hn = layer.attn, layer.input_layernorm(h)
        q = apply_rope(attn.q_proj(hn).view(*x.shape, a.n_heads, -1).transpose(1, 2), cos, sin)
        k = apply_rope(attn.k_proj(hn).view(*x.shape, a.n_kv_heads, -1).transpose(1, 2), cos, sin)
        v = attn.v_proj(hn).view(*x.shape, a.n_kv_heads, -1).transpose(1, 2)
        heads = []
        for hq in range(a.n_heads):
            g = hq // (a.n_heads // a.n_kv_heads)
            s = q[:, hq] @ k[:, g].transpose(-1, -2) / math.sqrt(a.head_dim)
            heads.append(s.masked_fill(~visible[i][:, g], -math.inf).softmax(-1) @ v[:, g])
        h = h + attn.o_proj(torch.stack(heads, 2).flatten(2))
        h = h + layer.mlp(layer.post_attention_layernorm(h))
    return model.lm_head(model.norm(h))


def eviction_masks(flags, T, ctx_len, inside_window=None):
    """Causal masks where continuation queries see only the kept context entries; with inside_window, context
    queries too see only kept entries, themselves and their last inside_window tokens."""
    i, j = torch.arange(T)[:, None], torch.arange(T)[None, :]
    masks = []
    for f in flags:
        f = f.bool()[:, :, None, :]  # (B, H_kv, 1, T_ctx)
        m = (j <= i).expand(*f.shape[:2], T, T).clone()
        m[:, :, ctx_len:, :ctx_len] &= f
        if inside_window is not None:
            m[:, :, :ctx_len, :ctx_len] &= f | ((i - j) < max(inside_window, 1))[:ctx_len, :ctx_len]
        masks.append(m)
    return masks


@pytest.mark.parametrize("policy", POLICIES, ids=lambda p: type(p).__name__)
def test_eviction_equals_an_eager_reference_and_compact_cache_equals_soft(llama, policy):
    x = tokens(48)
    with torch.no_grad():
        p = policy_for(llama, policy, x[:, :40], keep=0.3)
        soft, flags = evicted_logits(llama, x, 40, p, 0.3, compact=False)
        ref = eager_masked_logits(llama, x, eviction_masks(flags, 48, 40))
        assert (soft - ref).abs().max().item() < 1e-4
        compact, _ = evicted_logits(llama, x, 40, p, 0.3, compact=True, one_by_one=True)
        assert (compact - soft).abs().max().item() < 1e-4


def test_evicted_entries_never_influence_outputs(llama):
    """Perturb the stored entries that were evicted: outputs stay the same; perturb a kept one: they change."""
    x = tokens(48, 1)
    with torch.no_grad():
        cache = KVCache(llama, 1, 48)
        prefill(llama, x[:, :40], cache, StreamingLLM(), keep=0.25, compact=False)
        out = llama(x[:, 40:], 40, copy.deepcopy(cache))
        perturbed = copy.deepcopy(cache)
        for layer in perturbed.layers:
            for g in layer.groups:
                gone = ~g.keep.bool()[..., None]  # (B, n, T_ctx, 1)
                k = g.k[:, :, :40]
                g.k[:, :, :40] = torch.where(gone, k + 100 * torch.randn_like(k), k)
                g.v[:, :, :40] = torch.where(gone, torch.randn_like(g.v[:, :, :40]) * 1e3, g.v[:, :, :40])
        assert torch.equal(llama(x[:, 40:], 40, perturbed), out)
        for layer in cache.layers:  # while perturbing one kept entry does change them
            layer.groups[0].v[:, :, 0] += 10.0
        assert not torch.allclose(llama(x[:, 40:], 40, cache), out)


@pytest.mark.parametrize("keep", [0.75, 0.5, 0.25, 0.125])
def test_achieved_keep_and_cache_bytes_are_the_ones_reported(llama, keep):
    x = tokens(40, 1)
    with torch.no_grad():
        cache = KVCache(llama, 1, 40)
        _, flags = prefill(llama, x, cache, SnapKV(), keep)
        n = round(40 * keep)
        assert all(int(f.sum()) == n * llama.args.n_kv_heads for f in flags) and kept_fraction(flags) == n / 40
        full_bytes = 2 * 2 * 40 * 16 * 4 * 2  # K and V, 2 KV heads, 40 tokens, D = 16, fp32, 2 layers
        assert cache.nbytes() == sum(t.nbytes for layer in cache.layers for g in layer.groups for t in (g.k, g.v))
        assert cache.nbytes() == kept_fraction(flags) * full_bytes
        gate = policy_for(llama, None, x, keep)
        _, flags = prefill(llama, x, KVCache(llama, 1, 40), gate, keep, exact=True)
        assert kept_fraction(flags) == pytest.approx(keep, abs=1 / (40 * 4))


@pytest.mark.parametrize("policy", POLICIES, ids=lambda p: type(p).__name__)
def test_eviction_inside_the_prefill_equals_an_eager_reference(llama, policy):
    """Inside the prefill every context query already sees only kept entries, itself and its recent window;
    sinks and the window are forced kept; keep-all is still the base model."""
    x = tokens(48)
    with torch.no_grad():
        p = policy_for(llama, policy, x[:, :40], keep=0.3)
        inside = Protocol(inside=True, sinks=2, window=3)
        out, flags = evicted_logits(llama, x, 40, p, 0.3, compact=False, protocol=inside)
        assert all(bool(f[..., :2].all() and f[..., -3:].all()) for f in flags)
        assert kept_fraction(flags) == pytest.approx(0.3, abs=0.3 if policy is None else 1 / 80)  # gate: z >= 0
        assert (out - eager_masked_logits(llama, x, eviction_masks(flags, 48, 40, inside_window=3))).abs().max() < 1e-4
        compact, _ = evicted_logits(llama, x, 40, p, 0.3, compact=True, protocol=inside)
        assert (compact - out).abs().max() < 1e-4  # the compact cache after it
        keep_all, _ = evicted_logits(llama, x, 40, p, 1.0, compact=False, exact=True, protocol=inside)
        assert (keep_all - llama(x)).abs().max() < 1e-5


def test_bad_eviction_protocols_are_clear_errors(llama):
    with pytest.raises(KVNestError, match="must be >= 0"):
        prefill(llama, tokens(40, 1), KVCache(llama, 1, 40), StreamingLLM(), 0.5, protocol=Protocol(sinks=-1))


def test_received_attention_of_a_context_shorter_than_the_observation_window():
    q, k = torch.randn(1, 4, 10, 8), torch.randn(1, 2, 10, 8)
    few = received_attention(q, k, 2, 32)  # all 10 queries observe
    assert torch.allclose(few, received_attention(q, k, 2, None))
    assert torch.allclose(few.sum(-1), torch.full((1, 2), 20.0))  # each of 2 heads x 10 queries gives out 1


def test_joint_flags_keep_the_exact_total():
    z = [torch.randn(3, 2, 50, generator=torch.Generator().manual_seed(i)) for i in range(4)]
    flags = joint_flags(z, 0.3)
    assert [int(torch.stack(flags, 1)[b].sum()) for b in range(3)] == [round(0.3 * 400)] * 3


@pytest.mark.parametrize("gumbel,gains", [(None, ((0.25, 0.85), (0.75, 0.4))),  # 0.676 -> 0.527, 0.209 -> 0.048
                                          (0.5, ((0.25, 0.9), (0.75, 0.9)))], ids=["straight-through", "gumbel"])
def test_one_gate_trained_at_drawn_keep_ratios_improves_at_each_of_them(gumbel, gains, tiny_llama, tmp_path):
    """train.py --keeps: a keep ratio drawn per step and given to the gate as an input; the gate gets better at
    every keep it was trained for, scored as eval.py scores a gate (one threshold over all layers and heads). With
    --gumbel: the relaxed flags of the gate's own threshold, the expected kept fraction pulled toward the drawn
    keep."""
    ids = tokens(100, 1)[0].repeat(20)
    held_out = ids[7:487].view(10, 48)
    model = load_model(tiny_llama[0])
    start = Gate(2, 2, 64)
    calibrate_gate(model, start, ids[:94].view(2, 47)[:, :32], 0.5)  # the median of the keeps: train_gate's start
    cfg = gate_cfg(keeps=[0.25, 0.75], gumbel=gumbel)
    gate = train_gate(model, [(ids, 1.0)], cfg, tmp_path / "k.safetensors", {})
    for keep, gain in gains:
        kl = [score_eviction(model, held_out, g, keep, 32, exact=True)["kl"] for g in (start, gate)]
        assert kl[1] < gain * kl[0], (keep, kl)
    assert gate.keeps == (0.25, 0.75) and gate.w_keep.abs().sum() > 0  # the keep input trains with the rest
    assert load_gate(tmp_path / "k.safetensors", model)[1]["keep"] == [0.25, 0.75]


@pytest.mark.parametrize("inside", [False, True], ids=["after", "inside"])
def test_gate_parameters_receive_gradients_through_the_straight_through_estimator(llama, inside):
    x = tokens(48)
    gate = policy_for(llama, None, x[:, :40])
    with torch.no_grad():  # the reduced attention's feature starts at weight 0: give it one, as training does
        gate.w[..., 5] = 0.5
    cache = KVCache(llama, 2, 48)
    ctx_logits, flags = prefill(llama, x[:, :40], cache, gate, 0.5, exact=False, compact=False, train=True,
                                protocol=Protocol(inside=inside))
    assert all(((f == 0) | (f == 1)).all() for f in flags)  # the forward pass uses hard flags
    assert ctx_logits.requires_grad == inside  # inside the prefill, the context's own outputs depend on the flags
    (llama(x[:, 40:], 40, cache).logsumexp(-1).sum() + ctx_logits.logsumexp(-1).sum()).backward()
    for name, p in gate.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert not any(p.requires_grad for p in llama.parameters())


def test_straight_through_flags_match_the_threshold():
    z = torch.tensor([[[-2.0, -0.1, 0.0, 0.3, 4.0]]], requires_grad=True)
    f = flags_from_scores([z], 0.5, exact=False, train=True)[0]
    assert f.tolist() == [[[0, 0, 1, 1, 1]]]
    f.sum().backward()
    assert torch.allclose(z.grad, torch.sigmoid(z) * (1 - torch.sigmoid(z)))


def test_gumbel_sigmoid_flags_are_draws_kept_with_probability_sigmoid_z():
    z = torch.tensor([-2.0, 0.0, 1.0, 3.0]).repeat(20000, 1).requires_grad_()
    draw = lambda: GumbelSigmoid(0.05, torch.Generator().manual_seed(0))(z)  # noqa: E731
    f = draw()
    assert ((f < 0.01) | (f > 0.99)).float().mean() > 0.9  # nearly hard at a low temperature
    assert torch.allclose(f.mean(0), torch.sigmoid(z[0]), atol=0.01)
    assert torch.equal(f, draw())  # the generator decides the noise: a resumed run repeats it
    f.sum().backward()
    assert (z.grad.sum(0) > 0).all()  # a higher logit keeps more
    with pytest.raises(KVNestError, match="not at exact keep ratios"):
        Gate(2, 2, 64).flags([z[None, None, :2]], 0.5, True, GumbelSigmoid(0.5, torch.Generator()))


def gate_cfg(**kw):
    return run_config(method="gate", seq_len=47, ctx_len=32, **kw)


def test_training_lowers_kl_and_resume_is_exact(tiny_llama, tmp_path):
    ids = tokens(100, 1)[0].repeat(20)
    held_out = ids[7:487].view(10, 48)
    model = load_model(tiny_llama[0])
    start = Gate(2, 2, 64)
    calibrate_gate(model, start, ids[:94].view(2, 47)[:, :32], 0.5)  # the start train_gate makes
    before = score_eviction(model, held_out, start, 0.5, 32, exact=True)["kl"]
    whole = train_gate(model, [(ids, 1.0)], gate_cfg(), tmp_path / "a.safetensors", {})
    assert score_eviction(model, held_out, whole, 0.5, 32, exact=True)["kl"] < 0.7 * before
    train_gate(load_model(tiny_llama[0]), [(ids, 1.0)], gate_cfg(), tmp_path / "b.safetensors", {}, stop_after=12)
    tensors, meta = load_checkpoint(tmp_path / "b.safetensors", model, "gate", "train")
    for flag in ("window", "new_keep", "gumbel"):  # as written before these flags: 0, None, None
        del meta["config"][flag]
    save_checkpoint(tmp_path / "b.safetensors", tensors, meta)
    resumed = train_gate(load_model(tiny_llama[0]), [(ids, 1.0)], gate_cfg(), tmp_path / "b.safetensors", {},
                         resume=True)
    for name, p in whole.named_parameters():
        assert torch.equal(p, dict(resumed.named_parameters())[name]), name


def test_training_with_gumbel_sigmoid_flags_lowers_kl(tiny_llama, tmp_path):
    """train.py --gumbel: soft flags drawn each step, their expected kept fraction penalized; scored with hard flags
    at the exact keep, the gate improves as the straight-through one does."""
    ids = tokens(100, 1)[0].repeat(20)
    held_out = ids[7:487].view(10, 48)
    model = load_model(tiny_llama[0])
    start = Gate(2, 2, 64)
    calibrate_gate(model, start, ids[:94].view(2, 47)[:, :32], 0.5)
    gate = train_gate(model, [(ids, 1.0)], gate_cfg(gumbel=0.5), tmp_path / "g.safetensors", {})
    kl = [score_eviction(model, held_out, g, 0.5, 32, exact=True)["kl"] for g in (start, gate)]
    assert kl[1] < 0.8 * kl[0], kl


def test_a_gate_trained_inside_with_a_recent_window_lowers_kl_under_that_protocol(tiny_llama, tmp_path):
    """train.py --protocol inside --window W: training runs the protocol eval.py scores with --window W (each context
    query sees its own last W entries, the last W are kept), so the gate trains for it and differs from W = 0."""
    ids = tokens(100, 1)[0].repeat(20)
    held_out = ids[7:487].view(10, 48)
    model = load_model(tiny_llama[0])
    inside = Protocol(inside=True, window=4)
    start = Gate(2, 2, 64)
    calibrate_gate(model, start, ids[:94].view(2, 47)[:, :32], 0.5)
    before = score_eviction(model, held_out, start, 0.5, 32, True, inside)["kl"]
    gates = {w: train_gate(model, [(ids, 1.0)], gate_cfg(protocol="inside", window=w), tmp_path / f"{w}.safetensors",
                           {}) for w in (0, 4)}
    assert score_eviction(model, held_out, gates[4], 0.5, 32, True, inside)["kl"] < 0.95 * before  # 0.445 -> 0.402
    assert not torch.equal(gates[0].w, gates[4].w)


def test_sft_on_prompt_answer_pairs_lowers_the_answer_kl(tiny_llama, tmp_path):
    """--sft: the prompt is evicted and the loss is on the answer; a few steps lower the KL on the answers."""
    ids = tokens(100, 1)[0].repeat(20)
    pairs = [(ids[i: i + 30].tolist(), ids[i + 30: i + 40].tolist()) for i in range(0, 480, 40)]
    model = load_model(tiny_llama[0])
    held_out = torch.tensor([q + a for q, a in pairs])  # (12, 40): prompt 30, answer 10
    start = Gate(2, 2, 64)
    calibrate_gate(model, start, held_out[:1, :30], 0.5)  # the start train_gate makes: its first sampled pair
    before = score_eviction(model, held_out, start, 0.5, 30, exact=True)["kl"]
    gate = train_gate(model, None, gate_cfg(sft="pairs.jsonl"), tmp_path / "s.safetensors", {}, pairs=pairs)
    assert score_eviction(model, held_out, gate, 0.5, 30, exact=True)["kl"] < 0.7 * before


def test_bad_sft_files_are_clear_errors(tiny_llama, tmp_path):
    from train import main
    bad, short, empty = tmp_path / "bad.jsonl", tmp_path / "short.jsonl", tmp_path / "empty.jsonl"
    bad.write_text('{"prompt": "w1 w2"}\n')
    empty.write_text("\n")
    short.write_text('{"prompt": "w1 w2", "answer": "w3"}\n')
    folder = ["--model", str(tiny_llama[0])]
    for argv, message in [(["--sft", str(bad), "--method", "gate"], "line 1 is not a JSON object with 'prompt' and"),
                          (["--sft", str(tmp_path / "none.jsonl"), "--method", "gate"], "is not a .jsonl file"),
                          (["--sft", str(short), "--method", "gate"], "every answer at least 2"),
                          (["--sft", str(empty), "--method", "gate"], "holds no prompt/answer pairs"),
                          (["--sft", str(short)], "--sft does not act with --method matryoshka")]:
        with pytest.raises(KVNestError, match=message):
            main(folder + argv)


def test_bad_keep_ratios_and_mismatched_checkpoints_are_clear_errors(tiny_llama, tiny_mistral, llama, tmp_path):
    x = tokens(40, 1)
    for keep in (0, -0.1, 1.5, float("nan")):
        with pytest.raises(KVNestError, match=r"keep ratio .* is outside \(0, 1\]"):
            prefill(llama, x, KVCache(llama, 1, 40), StreamingLLM(), keep)
    gate = Gate(2, 2, 64)
    save_gate(tmp_path / "g.safetensors", gate, {"model": llama.fingerprint()})
    assert torch.equal(load_gate(tmp_path / "g.safetensors", llama)[0].w, gate.w)
    with pytest.raises(KVNestError, match="made for another model"):
        load_gate(tmp_path / "g.safetensors", load_model(tiny_mistral[0]))
    with pytest.raises(KVNestError, match="not a gate checkpoint"):
        from compress import pca_projections, save_projections
        save_projections(tmp_path / "p.safetensors", pca_projections(llama, x), {"model": llama.fingerprint()})
        load_gate(tmp_path / "p.safetensors", llama)
    mistral = load_model(tiny_mistral[0])
    with pytest.raises(KVNestError, match="sliding-window"):
        prefill(mistral, x, KVCache(mistral, 1, 40), StreamingLLM(), 0.5)


def test_a_gate_checkpoint_records_the_fields_its_features_use(llama, tmp_path):
    """obs, pool and sinks are saved and read back (a changed default changes no trained gate); asking for other
    values is an error; a checkpoint written before they were recorded loads with the values it was made with."""
    from safetensors import safe_open
    from checkpoints import save_checkpoint
    x = tokens(40, 1)
    gate = Gate(2, 2, 64, obs=8, pool=3, sinks=2)
    save_gate(tmp_path / "g.safetensors", gate, {"model": llama.fingerprint()})
    loaded = load_gate(tmp_path / "g.safetensors", llama, obs=8)[0]
    assert (loaded.obs, loaded.pool, loaded.sinks) == (8, 3, 2)
    with torch.no_grad():
        assert torch.equal(loaded.score(0, *x_q_k(llama, x), 0.5), gate.score(0, *x_q_k(llama, x), 0.5))
        assert not torch.equal(Gate(2, 2, 64).score(0, *x_q_k(llama, x), 0.5), gate.score(0, *x_q_k(llama, x), 0.5))
    with pytest.raises(KVNestError, match="was trained with obs=8, not obs=32; train a gate with them"):
        load_gate(tmp_path / "g.safetensors", llama, obs=32)
    with safe_open(tmp_path / "g.safetensors", "pt") as f:
        import json
        meta = json.loads(f.metadata()["kvnest"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    for field in ("obs", "pool", "sinks"):
        meta.pop(field)
    save_checkpoint(tmp_path / "old.safetensors", tensors, meta)
    old = load_gate(tmp_path / "old.safetensors", llama)[0]
    assert (old.obs, old.pool, old.sinks) == (32, 7, 4)
    meta["obs"] = -3
    save_checkpoint(tmp_path / "bad.safetensors", tensors, meta)
    with pytest.raises(KVNestError, match="gate field obs=-3 is not valid"):
        load_gate(tmp_path / "bad.safetensors", llama)


def x_q_k(model, x):
    """A layer-0 input and its q, k after RoPE, as a policy's score receives them."""
    h = model.layers[0].input_layernorm(model.embed_tokens(x))
    q, _, k, _ = model.layers[0].attn.qkv(h, *model.rope(0, x.shape[1], h.dtype))
    return h, q, k


def test_a_compact_cache_refuses_to_overflow(llama):
    x = tokens(20, 1)
    cache = KVCache(llama, 1, 21)
    with torch.no_grad():
        prefill(llama, x, cache, SnapKV(), 0.5)
        llama(tokens(1, 1), 20, cache)
        with pytest.raises(ModelError, match="exceeds the cache of 21"):
            llama(tokens(1, 1), 21, cache)
