"""kernels.py: the compiled decode step equals the eager paths of every cache kind, compiles without graph breaks
into few graphs, and its caches hold (and its steps read) exactly the bytes it reports."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from compress import compress, set_ranks, uniform_ranks
from evict import SnapKV, prefill_and_evict, restore_full
from gate import Gate, calibrate_gate
from bench import main as bench_main
from eval import main as eval_main, score_both, score_eviction
from kernels import Decoder, policy_from_flags, rotated_scores, round_up
from model import KVNestError, apply_rope, load_model, rope_cos_sin
from test_compress import random_ranks, tokens, trained_like

ROOT = Path(__file__).resolve().parents[1]
STEPS = 6


@pytest.fixture
def llama(tiny_llama):
    return load_model(tiny_llama[0])


def decode(runner, x, new):
    """Logits of the prefill's last position and of each step: (B, 1 + STEPS, vocab)."""
    with torch.no_grad():
        out = [runner(x, 0)[:, -1]]
        for i in range(new.shape[1]):
            out.append(runner(new[:, i: i + 1], x.shape[1] + i)[:, -1])
    return torch.stack(out, 1)


def gate_for(model, x):
    """A calibrated gate: its thresholded flags keep different counts per head and per sequence."""
    gate = Gate(model.args.n_layers, model.args.n_kv_heads, model.args.dim).to(model.inv_freq.device)
    calibrate_gate(model, gate, x, 0.5)
    return gate


def kind_setup(model, kind, x):
    """Put the model in a kind's state; returns the Decoder's policy arguments."""
    if kind in ("matryoshka", "matryoshka-pre", "both", "both-pre"):
        compress(model, trained_like(model, "pre_rope" if kind.endswith("-pre") else "post_rope"))
        set_ranks(model, *random_ranks(model))  # K and V ranks differ per head: several groups per layer
    return {"policy": gate_for(model, x), "keep": 0.5} if kind.startswith(("eviction", "both")) else {}


def eager_reference(model, kind, x, new, policy_args):
    """The model's own eager path: its static caches, or eviction into gate.py's CompactCache."""
    if "policy" not in policy_args:
        model.setup_cache(x.shape[0], x.shape[1] + new.shape[1])
        out = decode(model, x, new)
        model.clear_cache()
        return out
    with torch.no_grad():
        logits, _ = prefill_and_evict(model, x, policy_args["policy"], 0.5, compact=True, max_new=new.shape[1])
        out = [logits[:, -1]] + [model(new[:, i: i + 1], x.shape[1] + i)[:, -1] for i in range(new.shape[1])]
    restore_full(model)
    return torch.stack(out, 1)


@pytest.mark.parametrize("kind", ["full", "matryoshka", "matryoshka-pre", "eviction"])
def test_decoder_equals_the_models_eager_path(llama, kind):
    x, new = tokens(20, batch=2), tokens(STEPS, batch=2, seed=1)
    policy_args = kind_setup(llama, kind, x)
    ref = eager_reference(llama, kind, x, new, policy_args)
    got = decode(Decoder(llama, STEPS, bucket=4, compile=False, **policy_args), x, new)
    assert (got - ref).abs().max().item() < 1e-5


def test_full_cache_decoder_equals_the_uncached_forward_with_a_sliding_window(tiny_mistral):
    model = load_model(tiny_mistral[0])  # window 8: the decoded tokens no longer see the first entries
    x, new = tokens(12, batch=2), tokens(STEPS, batch=2, seed=1)
    with torch.no_grad():
        ref = model(torch.cat([x, new], 1))[:, x.shape[1] - 1: -1]
    got = decode(Decoder(model, STEPS, bucket=4, compile=False), x, new)[:, :-1]
    assert (got - ref).abs().max().item() < 1e-5


@pytest.mark.parametrize("key_mode", ["post_rope", "pre_rope"])
def test_both_at_full_rank_equals_eviction_alone(llama, key_mode):
    x, new = tokens(20, batch=2), tokens(STEPS, batch=2, seed=1)
    gate = gate_for(llama, x)
    evicted = decode(Decoder(llama, STEPS, gate, 0.5, bucket=4, compile=False), x, new)
    compress(llama, trained_like(llama, key_mode))  # orthogonal bases at full rank: compression is exact
    set_ranks(llama, *uniform_ranks(llama, 1.0))
    both = decode(Decoder(llama, STEPS, gate, 0.5, bucket=4, compile=False), x, new)
    assert (both - evicted).abs().max().item() < 1e-4


@pytest.mark.parametrize("key_mode", ["post_rope", "pre_rope"])
def test_both_axes_score_equals_eviction_alone_at_full_rank(llama, key_mode):
    windows, plain = tokens(24, batch=2, seed=3), [layer.attn for layer in llama.layers]
    alone = score_eviction(llama, windows, SnapKV(), 0.5, ctx_len=16)
    assert alone["kl"] > 1e-3  # eviction changes the predictions: not two full caches compared
    compress(llama, trained_like(llama, key_mode))
    set_ranks(llama, *uniform_ranks(llama, 1.0))
    both = score_both(llama, plain, windows, SnapKV(), 0.5, ctx_len=16)
    assert abs(both["kl"] - alone["kl"]) < 1e-5 and both["perplexity"] == pytest.approx(alone["perplexity"], 1e-5)
    set_ranks(llama, *uniform_ranks(llama, 0.25))
    assert score_both(llama, plain, windows, SnapKV(), 0.5, ctx_len=16)["kl"] > both["kl"] + 1e-3


@pytest.mark.parametrize("kind", ["full", "matryoshka", "matryoshka-pre", "eviction", "both", "both-pre"])
def test_compiled_equals_eager_without_graph_breaks_and_recompiles(llama, kind):
    x, new = tokens(20, batch=2), tokens(STEPS, batch=2, seed=1)
    policy_args = kind_setup(llama, kind, x)
    eager = Decoder(llama, STEPS, bucket=4, compile=False, **policy_args)
    ref = decode(eager, x, new)
    explain = torch._dynamo.explain(eager.eager_step)(new[:, :1], torch.tensor(26), eager.read_lengths())
    assert explain.graph_break_count == 0 and explain.graph_count == 1
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    got = decode(Decoder(llama, STEPS, bucket=2, **policy_args), x, new)  # 6 steps, 3 read lengths
    assert (got - ref).abs().max().item() < 1e-5
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] <= 2  # a static length, then a symbolic one
    again = decode(Decoder(llama, STEPS, bucket=2, **policy_args), x[:1, :12], new[:1])  # another batch, context
    assert (again - decode(eager, x[:1, :12], new[:1])).abs().max().item() < 1e-5
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] <= 3  # and a symbolic batch


def test_cache_bytes_are_the_tensors_bytes_and_the_budget(llama):
    x = tokens(20, batch=2)
    full = Decoder(llama, STEPS, bucket=4, compile=False)
    full(x, 0)
    tensors = [t for layer in full.groups for g in layer for t in (g.k, g.v)]
    # K and V, 2 layers, batch 2, 2 KV heads, 20 context slots + 8 + 1 of room, D = 16, fp32
    assert full.nbytes() == sum(t.nbytes for t in tensors) == 2 * 2 * 2 * 2 * (20 + 9) * 16 * 4
    compress(llama, trained_like(llama))
    set_ranks(llama, *uniform_ranks(llama, 0.25))
    mat = Decoder(llama, STEPS, bucket=4, compile=False)
    mat(x, 0)
    assert mat.nbytes() == full.nbytes() // 4  # bytes = budget x full cache bytes
    assert all(g.k.shape[-1] == 4 for layer in mat.groups for g in layer)  # r = 0.25 x 16 features held, no padding
    mat(tokens(1, batch=2), 20)
    assert mat.bytes_read() == mat.nbytes() * (20 + 4) // (20 + 9)  # the prefix: 20 context slots + one bucket


def test_evicted_caches_hold_only_kept_entries(llama):
    x = tokens(20, batch=1)
    dec = Decoder(llama, STEPS, SnapKV(), 0.5, bucket=4, compile=False)
    dec(x, 0)
    for layer in dec.groups:
        assert len(layer) == 1  # SnapKV keeps 10 entries in every head: one group per layer
        assert layer[0].k.shape == (1, 2, 10 + 9, 16) and layer[0].length.tolist() == [[10, 10]]
    assert dec.nbytes() == 2 * 2 * 2 * (10 + 9) * 16 * 4


def test_bad_use_is_a_clear_error(llama, tiny_mistral):
    x = tokens(20, batch=1)
    dec = Decoder(llama, 2, bucket=4, compile=False)
    dec(x, 0)
    with pytest.raises(KVNestError, match="one token at the next position"):
        dec(tokens(1, batch=1), 25)
    dec(tokens(1, batch=1), 20)
    dec(tokens(1, batch=1), 21)
    with pytest.raises(KVNestError, match="hold 2 new tokens; raise max_new"):
        dec(tokens(1, batch=1), 22)
    with pytest.raises(KVNestError, match="sliding-window"):
        Decoder(load_model(tiny_mistral[0]), 2, SnapKV(), 0.5)
    assert round_up(5, 4) == 8 and round_up(8, 4) == 8
    with pytest.raises(KVNestError, match="--evict gate needs --gate"):
        policy_from_flags(llama, "gate", None, 0.5)
    with pytest.raises(KVNestError, match="keep ratio 1.5 is outside"):
        policy_from_flags(llama, "snapkv", None, 1.5)
    with pytest.raises(KVNestError, match=r"unknown kinds \['nope'\]; choose from full"):
        bench_main(["--kinds", "full,nope"])
    with pytest.raises(KVNestError, match="--rounds 0: time each kind at least once"):
        bench_main(["--rounds", "0"])
    with pytest.raises(KVNestError, match="drop --evict-sweep, --protocol inside"):
        eval_main(["--model", str(tiny_mistral[0]), "--evict", "h2o", "--projections", "p.safetensors",
                   "--protocol", "inside"])


def test_rotated_scores_equal_scores_of_rotated_keys():
    g = torch.Generator().manual_seed(0)
    q, K = torch.randn(2, 3, 4, 16, generator=g), torch.randn(2, 3, 40, 16, generator=g)  # (B, n, G, D), (B, n, L, D)
    inv_freq = 1.0 / 1e4 ** (torch.arange(0, 16, 2) / 16)
    cos, sin = rope_cos_sin(inv_freq, torch.arange(40))  # (L, D)
    ref = q @ apply_rope(K, cos, sin).transpose(-1, -2)  # (B, n, G, L)
    torch.testing.assert_close(rotated_scores(q, K, cos[:, :8], sin[:, :8]), ref, atol=1e-5, rtol=1e-5)


def test_cli_compiled_generation_equals_eager(tiny_llama):
    folder = str(tiny_llama[0])
    runs = [subprocess.run([sys.executable, "model.py", "--model", folder, "--prompt", "w1 w2 w3 w4 w5 w6",
                            "--max-new-tokens", "8", *flags], cwd=ROOT, capture_output=True, text=True, timeout=600)
            for flags in ([], ["--compile"], ["--evict", "snapkv", "--keep", "0.5", "--no-compile"])]
    assert all(r.returncode == 0 for r in runs), [r.stderr[-500:] for r in runs]
    assert runs[0].stdout == runs[1].stdout and len(runs[0].stdout.split()) == 8
    assert len(runs[2].stdout.split()) == 8


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (CUDA graphs, bf16)")
@pytest.mark.parametrize("kind", ["full", "matryoshka", "matryoshka-pre", "eviction", "both"])
def test_cuda_graphs_in_bf16_equal_eager(tiny_llama, kind):
    model = load_model(tiny_llama[0], dtype=torch.bfloat16, device="cuda")
    x, new = tokens(20, batch=2).cuda(), tokens(STEPS, batch=2, seed=1).cuda()
    policy_args = kind_setup(model, kind, x)
    ref = decode(Decoder(model, STEPS, bucket=2, compile=False, **policy_args), x, new).float()
    got = decode(Decoder(model, STEPS, bucket=2, **policy_args), x, new).float()  # mode="reduce-overhead"
    assert (got - ref).abs().max().item() <= 0.05 * ref.abs().max().item()  # bf16 rounding, not a wrong answer
