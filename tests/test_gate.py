"""Attention-Gate and the eviction baselines: exact identities, eager references, real eviction, training, errors."""
import math

import pytest
import torch

from conftest import run_config
from eval import score_eviction
from evict import (H2O, CompactCache, Protocol, RandomPolicy, SnapKV, StreamingLLM, evicting, flags_from_scores,
                   kept_fraction, prefill_and_evict, received_attention, restore_full)
from gate import Gate, calibrate_gate, joint_flags, load_gate, save_gate
from model import KVNestError, load_model
from train import train_gate

POLICIES = [StreamingLLM(), H2O(0.5), SnapKV(), RandomPolicy(), None]  # None: a calibrated gate


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


@pytest.mark.parametrize("policy", POLICIES, ids=lambda p: type(p).__name__)
def test_keep_all_reproduces_the_base_model(llama, policy):
    x = tokens(48)
    with torch.no_grad():
        base = llama(x)
        p = policy_for(llama, policy, x[:, :40])
        ctx_logits, flags = prefill_and_evict(llama, x[:, :40], p, keep=1.0, exact=True)
        assert kept_fraction(flags) == 1.0
        out = torch.cat([ctx_logits, llama(x[:, 40:], 40)], 1)
    assert (out - base).abs().max().item() < 1e-5


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
def test_eviction_equals_an_eager_reference_and_compact_cache_equals_masked(llama, policy):
    x = tokens(48)
    with torch.no_grad():
        p = policy_for(llama, policy, x[:, :40], keep=0.3)
        ctx_logits, flags = prefill_and_evict(llama, x[:, :40], p, keep=0.3)
        masked = torch.cat([ctx_logits, llama(x[:, 40:], 40)], 1)
        ref = eager_masked_logits(llama, x, eviction_masks(flags, 48, 40))
        assert (masked - ref).abs().max().item() < 1e-4
        prefill_and_evict(llama, x[:, :40], p, keep=0.3, compact=True, max_new=8)
        compact = torch.cat([llama(x[:, i:i + 1], i) for i in range(40, 48)], 1)  # one decode step at a time
        assert (compact - masked[:, 40:]).abs().max().item() < 1e-4
    restore_full(llama)


def test_evicted_entries_never_influence_outputs(llama):
    """Perturb the tokens whose every entry was evicted in the layers after the first: outputs stay the same."""
    x = tokens(48, 1)
    with torch.no_grad():
        ctx_logits, flags = prefill_and_evict(llama, x[:, :40], StreamingLLM(), keep=0.25)
        out = llama(x[:, 40:], 40)
        for attn in evicting(llama):  # perturb the stored context entries where they are evicted
            gone = ~attn.keep_mask.bool()[..., None]  # (B, H_kv, T_ctx, 1)
            attn.ctx_k = torch.where(gone, attn.ctx_k + 100 * torch.randn_like(attn.ctx_k), attn.ctx_k)
            attn.ctx_v = torch.where(gone, torch.randn_like(attn.ctx_v) * 1e3, attn.ctx_v)
        assert torch.equal(llama(x[:, 40:], 40), out)
        for attn in evicting(llama):  # while perturbing one kept entry does change them
            attn.ctx_v[:, :, 0] += 10.0
        assert not torch.allclose(llama(x[:, 40:], 40), out)
    restore_full(llama)


@pytest.mark.parametrize("keep", [0.75, 0.5, 0.25, 0.125])
def test_achieved_keep_and_cache_bytes_are_the_ones_reported(llama, keep):
    x = tokens(40, 1)
    with torch.no_grad():
        _, flags = prefill_and_evict(llama, x, SnapKV(), keep, compact=True)
        n = round(40 * keep)
        assert all(int(f.sum()) == n * llama.args.n_kv_heads for f in flags) and kept_fraction(flags) == n / 40
        full_bytes = 2 * 2 * 40 * 16 * 4 * 2  # K and V, 2 KV heads, 40 tokens, D = 16, fp32, 2 layers
        held = sum(layer.attn.cache.nbytes() for layer in llama.layers)
        assert held == sum(layer.attn.cache.held_bytes() for layer in llama.layers) == kept_fraction(flags) * full_bytes
        gate = policy_for(llama, None, x, keep)
        _, flags = prefill_and_evict(llama, x, gate, keep, exact=True)
        assert kept_fraction(flags) == pytest.approx(keep, abs=1 / (40 * 4))
    restore_full(llama)


@pytest.mark.parametrize("policy", POLICIES, ids=lambda p: type(p).__name__)
def test_eviction_inside_the_prefill_equals_an_eager_reference(llama, policy):
    """Inside the prefill every context query already sees only kept entries, itself and its recent window;
    sinks and the window are forced kept; keep-all is still the base model."""
    x = tokens(48)
    with torch.no_grad():
        p = policy_for(llama, policy, x[:, :40], keep=0.3)
        inside = Protocol(inside=True, sinks=2, window=3)
        ctx_logits, flags = prefill_and_evict(llama, x[:, :40], p, keep=0.3, protocol=inside)
        assert all(bool(f[..., :2].all() and f[..., -3:].all()) for f in flags)
        assert kept_fraction(flags) == pytest.approx(0.3, abs=0.3 if policy is None else 1 / 80)  # gate: z >= 0
        out = torch.cat([ctx_logits, llama(x[:, 40:], 40)], 1)
        assert (out - eager_masked_logits(llama, x, eviction_masks(flags, 48, 40, inside_window=3))).abs().max() < 1e-4
        prefill_and_evict(llama, x[:, :40], p, keep=0.3, compact=True, max_new=8, protocol=inside)
        assert (llama(x[:, 40:], 40) - out[:, 40:]).abs().max() < 1e-4  # the compact cache after it
        ctx_logits, _ = prefill_and_evict(llama, x[:, :40], p, keep=1.0, exact=True, protocol=inside)
        keep_all = torch.cat([ctx_logits, llama(x[:, 40:], 40)], 1)
        restore_full(llama)
        assert (keep_all - llama(x)).abs().max() < 1e-5


def test_gating_new_tokens_evicts_them_after_their_window_and_equals_an_eager_reference(llama):
    """Decoded tokens stay visible to `window` queries, then leave where the gate says so. Here head 0 keeps every
    new token and head 1 none (their biases, set after the prefill), and decoding from the compact cache equals the
    eager model under exactly those masks, while head 1's cache stops growing."""
    x, window, new = tokens(52), 3, 12
    gate = policy_for(llama, None, x[:, :40], keep=0.5)
    with torch.no_grad():
        gated = Protocol(window=window, gate_new=True)
        _, flags = prefill_and_evict(llama, x[:, :40], gate, 0.5, exact=True, compact=True, max_new=new,
                                     protocol=gated)
        gate.c[:, 0], gate.c[:, 1] = 1e4, -1e4
        out = llama(x[:, 40:], 40)
    masks = eviction_masks(flags, 52, 40)
    i, j = torch.arange(52)[:, None], torch.arange(52)[None, :]
    for m in masks:
        m[:, 1, 40:, 40:] &= ((i - j) < window)[40:, 40:]
    with torch.no_grad():
        assert (out - eager_masked_logits(llama, x, masks)[:, 40:]).abs().max() < 1e-4
    for layer, f in zip(llama.layers, flags):
        cache, held = layer.attn.cache, f.sum(-1)  # (B, H_kv) kept context entries
        assert (cache.new_tokens.kept, cache.new_tokens.decided) == (2 * (new - window + 1), 4 * (new - window + 1))
        assert torch.equal(cache.length[0], held[:, 0] + new) and torch.equal(cache.length[1], held[:, 1] + window - 1)
    restore_full(llama)


def test_bad_eviction_protocols_are_clear_errors(llama):
    x = tokens(40, 1)
    gate = policy_for(llama, None, x)
    cases = [(StreamingLLM(), Protocol(window=4, gate_new=True), True, "needs a learned gate"),
             (gate, Protocol(window=4, gate_new=True), False, "pass compact=True"),
             (gate, Protocol(gate_new=True), True, "window >= 1"),
             (gate, Protocol(sinks=-1), False, "must be >= 0")]
    for policy, protocol, compact, message in cases:
        with pytest.raises(KVNestError, match=message):
            prefill_and_evict(llama, x, policy, 0.5, compact=compact, max_new=4, protocol=protocol)
    restore_full(llama)


def test_received_attention_of_a_context_shorter_than_the_observation_window():
    q, k = torch.randn(1, 4, 10, 8), torch.randn(1, 2, 10, 8)
    few = received_attention(q, k, 2, 32)  # all 10 queries observe
    assert torch.allclose(few, received_attention(q, k, 2, None))
    assert torch.allclose(few.sum(-1), torch.full((1, 2), 20.0))  # each of 2 heads x 10 queries gives out 1


def test_joint_flags_keep_the_exact_total():
    z = [torch.randn(3, 2, 50, generator=torch.Generator().manual_seed(i)) for i in range(4)]
    flags = joint_flags(z, 0.3)
    assert [int(torch.stack(flags, 1)[b].sum()) for b in range(3)] == [round(0.3 * 400)] * 3


@pytest.mark.parametrize("inside", [False, True], ids=["after", "inside"])
def test_gate_parameters_receive_gradients_through_the_straight_through_estimator(llama, inside):
    x = tokens(48)
    gate = policy_for(llama, None, x[:, :40])
    with torch.no_grad():  # the reduced attention's feature starts at weight 0: give it one, as training does
        gate.w[..., 5] = 0.5
    ctx_logits, flags = prefill_and_evict(llama, x[:, :40], gate, 0.5, exact=False, train=True,
                                          protocol=Protocol(inside=inside))
    assert all(((f == 0) | (f == 1)).all() for f in flags)  # the forward pass uses hard flags
    assert ctx_logits.requires_grad == inside  # inside the prefill, the context's own outputs depend on the flags
    llama(x[:, 40:], 40).logsumexp(-1).sum().backward()
    for name, p in gate.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert not any(p.requires_grad for p in llama.parameters())
    restore_full(llama)


def test_straight_through_flags_match_the_threshold():
    z = torch.tensor([[[-2.0, -0.1, 0.0, 0.3, 4.0]]], requires_grad=True)
    f = flags_from_scores([z], 0.5, exact=False, straight_through=True)[0]
    assert f.tolist() == [[[0, 0, 1, 1, 1]]]
    f.sum().backward()
    assert torch.allclose(z.grad, torch.sigmoid(z) * (1 - torch.sigmoid(z)))


def gate_cfg(**kw):
    return run_config(method="gate", seq_len=47, ctx_len=32, **kw)


def test_training_lowers_kl_and_resume_is_exact(tiny_llama, tmp_path):
    ids = tokens(100, 1)[0].repeat(20)
    held_out = ids[7:487].view(10, 48)
    model = load_model(tiny_llama[0])
    start = Gate(2, 2, 64)
    calibrate_gate(model, start, ids[:94].view(2, 47)[:, :32], 0.5)  # the start train_gate makes
    before = score_eviction(model, held_out, start, 0.5, 32, exact=True)["kl"]
    whole = train_gate(model, ids, gate_cfg(), tmp_path / "a.safetensors", {})
    assert score_eviction(model, held_out, whole, 0.5, 32, exact=True)["kl"] < 0.7 * before
    train_gate(load_model(tiny_llama[0]), ids, gate_cfg(), tmp_path / "b.safetensors", {}, stop_after=12)
    resumed = train_gate(load_model(tiny_llama[0]), ids, gate_cfg(), tmp_path / "b.safetensors", {}, resume=True)
    for name, p in whole.named_parameters():
        assert torch.equal(p, dict(resumed.named_parameters())[name]), name


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
                          (["--sft", str(short)], "--sft trains the gate")]:
        with pytest.raises(KVNestError, match=message):
            main(folder + argv)


def test_bad_keep_ratios_and_mismatched_checkpoints_are_clear_errors(tiny_llama, tiny_mistral, llama, tmp_path):
    x = tokens(40, 1)
    for keep in (0, -0.1, 1.5):
        with pytest.raises(KVNestError, match=r"keep ratio .* is outside \(0, 1\]"):
            prefill_and_evict(llama, x, StreamingLLM(), keep)
    gate = Gate(2, 2, 64)
    save_gate(tmp_path / "g.safetensors", gate, {"model": llama.fingerprint()})
    assert torch.equal(load_gate(tmp_path / "g.safetensors", llama)[0].w, gate.w)
    with pytest.raises(KVNestError, match="made for another model"):
        load_gate(tmp_path / "g.safetensors", load_model(tiny_mistral[0]))
    with pytest.raises(KVNestError, match="not a gate checkpoint"):
        from compress import pca_projections, save_projections
        save_projections(tmp_path / "p.safetensors", pca_projections(llama, x), {"model": llama.fingerprint()})
        load_gate(tmp_path / "p.safetensors", llama)
    with pytest.raises(KVNestError, match="sliding-window"):
        evicting(load_model(tiny_mistral[0]))


def test_compact_cache_refuses_to_overflow(llama):
    k = torch.randn(1, 2, 10, 16)
    cache = CompactCache(k, k, torch.ones(1, 2, 10), max_new=1)
    q = torch.randn(1, 4, 2, 16)
    with pytest.raises(KVNestError, match="compact cache is full"):
        cache.attend(q, torch.randn(1, 2, 2, 16), torch.randn(1, 2, 2, 16))


def test_scripts_end_to_end_on_a_tiny_model(tiny_llama, word_text, tmp_path):
    """train.py --method gate -> eval.py --evict / --evict-sweep, as a user runs them."""
    import json
    import subprocess
    import sys
    from pathlib import Path
    root, folder, ckpt = Path(__file__).resolve().parents[1], str(tiny_llama[0]), str(tmp_path / "g.safetensors")

    def run(*args):
        r = subprocess.run([sys.executable, *args, "--model", folder, "--data", str(word_text)], cwd=root,
                           capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stderr[-2000:]
        return r.stdout

    run("train.py", "--method", "gate", "--eval-data", str(word_text), "--steps", "3", "--seq-len", "47",
        "--ctx-len", "32", "--out", ckpt)
    assert "| 50.0% |" in Path(ckpt).with_suffix(".md").read_text()
    one = json.loads(run("eval.py", "--evict", "gate", "--gate", ckpt, "--keep", "0.25", "--seq-len", "48",
                         "--ctx-len", "32", "--json"))
    assert one["keep"] == 0.25 and one["kl"] > 0
    table = run("eval.py", "--evict-sweep", "--gate", ckpt, "--seq-len", "48", "--ctx-len", "32", "--windows", "2",
                "--out-dir", str(tmp_path))
    assert "| 12.5% |" in table and "gate" in table and (tmp_path / "evict_sweep.png").stat().st_size > 1000
    bad = subprocess.run([sys.executable, "eval.py", "--model", folder, "--evict", "h2o", "--keep", "1.5"], cwd=root,
                         capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.startswith("error: keep ratio 1.5 is outside (0, 1]")


def test_passkey_decode_from_a_keep_all_compact_cache_equals_greedy_decode(tiny_llama):
    import random
    from assets import Tokenizer
    from passkey import make_sample, retrieve
    model, tok = load_model(tiny_llama[0]), Tokenizer(tiny_llama[0])
    doc, question, key = make_sample(tok, 120, random.Random(0))
    assert len(doc) + len(question) == 120 and len(key) == 5
    x = torch.tensor([doc + question])
    with torch.no_grad():
        for _ in range(8):
            x = torch.cat([x, model(x)[:, -1:].argmax(-1)], 1)
    assert retrieve(model, tok, doc, question, StreamingLLM(), 1.0) == tok.decode(x[0, 120:].tolist())
