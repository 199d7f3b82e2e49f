"""kernels.py and every combination of the two axes: eval's path, generation's path and the compiled step agree for
{full, MatryoshkaKV after/before RoPE} x {no eviction, each policy, the gate}; the compiled step compiles without
graph breaks into few graphs; the caches hold exactly the bytes they report."""
import copy
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bench import main as bench_main
from compress import uniform_ranks
from eval import main as eval_main, score_eviction
from evict import H2O, Protocol, RandomPolicy, SnapKV, StreamingLLM, prefill
from gate import Gate, calibrate_gate
from kernels import Decoder
from model import KVCache, apply_rope, rope_cos_sin, rotated_scores
from weights import load_model
from errors import KVNestError
from test_compress import random_ranks, tokens, trained_like

ROOT = Path(__file__).resolve().parents[1]
STEPS = 6
FEATURES = [None, "post_rope", "pre_rope"]
POLICIES = [None, "streaming", "h2o", "snapkv", "random", "gate"]


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


def setup(model, features, policy, x):
    """Decoder keyword arguments for a combination: features with random ranks (several groups per layer)."""
    policies = {None: None, "streaming": StreamingLLM(), "h2o": H2O(), "snapkv": SnapKV(), "random": RandomPolicy()}
    kw = {"features": None if features is None else trained_like(model, features).features(*random_ranks(model))}
    if policy is not None:
        kw.update(policy=gate_for(model, x) if policy == "gate" else policies[policy], keep=0.5,
                  exact=True if policy == "gate" else None)
    return kw


def eval_path(model, x, new, kw):
    """The scoring path of eval.py: one prefill (with eviction weighing the cache's slots), then the continuation
    in one forward. Returns the same positions as `decode`."""
    seq = torch.cat([x, new], 1)
    cache = KVCache(model, *seq.shape, kw["features"])
    with torch.no_grad():
        if "policy" in kw:
            ctx, _ = prefill(model, x, cache, kw["policy"], 0.5, exact=kw["exact"], compact=False)
            rest = model(new[:, :-1], x.shape[1], cache)
            return torch.cat([ctx[:, -1:], rest, model(new[:, -1:], seq.shape[1] - 1, cache)], 1)
        return model(seq, 0, cache)[:, x.shape[1] - 1:]


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("features", FEATURES)
def test_every_combination_agrees_between_eval_and_generation(llama, features, policy):
    """Generation decodes one token per step from a cache that holds only the kept, compressed entries; eval
    weighs a full-length cache's slots in one forward. They compute the same thing."""
    x, new = tokens(20, batch=2), tokens(STEPS, batch=2, seed=1)
    kw = setup(llama, features, policy, x)
    got = decode(Decoder(llama, STEPS, compile=False, **kw), x, new)
    ref = eval_path(llama, x, new, kw)
    assert (got - ref).abs().max().item() < 1e-4
    if features or policy:  # and it is not the base model
        assert (got - eval_path(llama, x, new, {"features": None})).abs().max().item() > 1e-3


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("features", FEATURES)
def test_full_rank_and_keep_all_equal_the_base_model(llama, features, policy):
    x, new = tokens(20, batch=2), tokens(STEPS, batch=2, seed=1)
    kw = setup(llama, features, policy, x)
    if features:
        kw["features"] = trained_like(llama, features).features(*uniform_ranks(llama, 1.0))
    if policy:
        kw["keep"] = 1.0
    got = decode(Decoder(llama, STEPS, compile=False, **kw), x, new)
    with torch.no_grad():
        ref = llama(torch.cat([x, new], 1))[:, x.shape[1] - 1:]
    assert (got - ref).abs().max().item() < 1e-4


def test_full_cache_decoder_equals_the_uncached_forward_with_a_sliding_window(tiny_mistral):
    model = load_model(tiny_mistral[0])  # window 8: the decoded tokens no longer see the first entries
    x, new = tokens(12, batch=2), tokens(STEPS, batch=2, seed=1)
    with torch.no_grad():
        ref = model(torch.cat([x, new], 1))[:, x.shape[1] - 1: -1]
    got = decode(Decoder(model, STEPS, compile=False), x, new)[:, :-1]
    assert (got - ref).abs().max().item() < 1e-5


@pytest.mark.parametrize("key_mode", ["post_rope", "pre_rope"])
def test_both_axes_score_equals_eviction_alone_at_full_rank(llama, key_mode):
    windows = tokens(24, batch=2, seed=3)
    alone = score_eviction(llama, windows, SnapKV(), 0.5, ctx_len=16)
    assert alone["kl"] > 1e-3  # eviction changes the predictions: not two full caches compared
    proj = trained_like(llama, key_mode)
    both = score_eviction(llama, windows, SnapKV(), 0.5, ctx_len=16, features=proj.features(*uniform_ranks(llama, 1)))
    assert abs(both["kl"] - alone["kl"]) < 1e-5 and both["perplexity"] == pytest.approx(alone["perplexity"], 1e-5)
    quarter = proj.features(*uniform_ranks(llama, 0.25))
    assert score_eviction(llama, windows, SnapKV(), 0.5, ctx_len=16, features=quarter)["kl"] > both["kl"] + 1e-3
    compact = score_eviction(llama, windows, SnapKV(), 0.5, ctx_len=16, features=quarter, compact=True)
    assert compact["kl"] == pytest.approx(score_eviction(llama, windows, SnapKV(), 0.5, 16, features=quarter)["kl"],
                                          abs=1e-5)


@pytest.mark.parametrize("features,policy", [(None, None), ("post_rope", None), ("pre_rope", None),
                                             (None, "snapkv"), ("post_rope", "snapkv"), ("pre_rope", "gate")],
                         ids=["full", "matryoshka", "matryoshka-pre", "eviction", "both", "both-pre"])
def test_compiled_equals_eager_without_graph_breaks_and_recompiles(llama, features, policy):
    """One graph per layer structure (regional compilation: layers of one structure share it), no graph breaks,
    and no recompilation for another context."""
    x, new = tokens(20, batch=2), tokens(STEPS, batch=2, seed=1)
    kw = setup(llama, features, policy, x)
    if features:  # two groups per layer, the same in every layer
        ranks = torch.tensor([[4, 12], [4, 12]]), torch.tensor([[8, 16], [8, 16]])
        kw["features"] = trained_like(llama, features).features(*ranks)
    eager = Decoder(llama, STEPS + 1, compile=False, **kw)
    ref = decode(eager, x, new)
    structures = {tuple((len(g.heads), g.pos is None) for g in layer.groups) for layer in eager.cache.layers}
    explain = torch._dynamo.explain(llama.layers[0].forward)(
        llama.embed_tokens(new[:, :1]), torch.tensor(26), *llama.rope(torch.tensor(26), 1, torch.float32),
        copy.deepcopy(eager.cache.layers[0]), eager.cache.rope)
    assert explain.graph_break_count == 0 and explain.graph_count == 1
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    got = decode(Decoder(llama, STEPS, **kw), x, new)
    assert (got - ref).abs().max().item() < 1e-5
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == len(structures)
    again = decode(Decoder(llama, STEPS, **kw), x[:, :14], new)  # another context: the same graphs
    assert (again - decode(eager, x[:, :14], new)).abs().max().item() < 1e-5
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == len(structures)


def test_cache_bytes_are_the_tensors_bytes_and_the_budget(llama):
    x = tokens(20, batch=2)
    full = Decoder(llama, STEPS, compile=False)
    full(x, 0)
    tensors = [t for layer in full.cache.layers for g in layer.groups for t in (g.k, g.v)]
    # K and V, 2 layers, batch 2, 2 KV heads, 20 context slots + 6 of room, D = 16, fp32
    assert full.nbytes() == sum(t.nbytes for t in tensors) == 2 * 2 * 2 * 2 * (20 + 6) * 16 * 4
    mat = Decoder(llama, STEPS, trained_like(llama).features(*uniform_ranks(llama, 0.25)), compile=False)
    mat(x, 0)
    assert mat.nbytes() == full.nbytes() // 4  # bytes = budget x full cache bytes
    assert all(g.k.shape[-1] == 4 for layer in mat.cache.layers for g in layer.groups)  # r = 4 features, no padding


def test_evicted_caches_hold_only_kept_entries(llama):
    x = tokens(20, batch=1)
    dec = Decoder(llama, STEPS, policy=SnapKV(), keep=0.5, compile=False)
    dec(x, 0)
    for layer in dec.cache.layers:
        assert len(layer.groups) == 1  # SnapKV keeps 10 entries in every head: one group per layer
        assert layer.groups[0].k.shape == (1, 2, 10 + 6, 16) and layer.groups[0].length.tolist() == [[10, 10]]
    assert dec.nbytes() == 2 * 2 * 2 * (10 + 6) * 16 * 4
    pre = Decoder(llama, STEPS, trained_like(llama, "pre_rope").features(*uniform_ranks(llama, 0.5)), SnapKV(), 0.5,
                  compile=False)
    pre(x, 0)  # pre-RoPE keys after eviction keep their positions: an int64 per slot and head
    assert pre.nbytes() == dec.nbytes() // 2 + 2 * 2 * (10 + 6) * 8


def test_bad_use_is_a_clear_error(llama, tiny_mistral, capsys):
    x = tokens(20, batch=1)
    dec = Decoder(llama, 2, compile=False)
    dec(x, 0)
    with pytest.raises(KVNestError, match="one token at the next position"):
        dec(tokens(1, batch=1), 25)
    dec(tokens(1, batch=1), 20)
    dec(tokens(1, batch=1), 21)
    with pytest.raises(KVNestError, match="hold 2 new tokens; raise max_new"):
        dec(tokens(1, batch=1), 22)
    with pytest.raises(KVNestError, match="sliding-window"):
        Decoder(load_model(tiny_mistral[0]), 2, policy=SnapKV(), keep=0.5)(x, 0)
    with pytest.raises(KVNestError, match=r"unknown kinds \['nope'\]; choose from full"):
        bench_main(["--kinds", "full,nope"])
    with pytest.raises(SystemExit):
        bench_main(["--rounds", "0"])
    assert capsys.readouterr().err == "error: argument --rounds: 0 must be >= 1; see --help\n"
    with pytest.raises(KVNestError, match="--keep and --gate act with --evict; pass --evict too"):
        eval_main(["--model", str(tiny_mistral[0]), "--keep", "0.5", "--seq-len", "64"])


def test_rotated_scores_equal_scores_of_rotated_keys():
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 3, 4, 5, 16, generator=g)  # (B, n, G, T, D)
    K = torch.randn(2, 3, 40, 16, generator=g)  # (B, n, S, D)
    inv_freq = 1.0 / 1e4 ** (torch.arange(0, 16, 2) / 16)
    cos, sin = rope_cos_sin(inv_freq, torch.arange(40))  # (S, D)
    ref = q @ apply_rope(K, cos, sin)[:, :, None].transpose(-1, -2)  # (B, n, G, T, S)
    torch.testing.assert_close(rotated_scores(q, K, cos[:, :8], sin[:, :8]), ref, atol=1e-5, rtol=1e-5)


def test_cli_compiled_generation_equals_eager(tiny_llama):
    folder = str(tiny_llama[0])
    runs = [subprocess.run([sys.executable, "generate.py", "--model", folder, "--prompt", "w1 w2 w3 w4 w5 w6",
                            "--max-new-tokens", "8", *flags], cwd=ROOT, capture_output=True, text=True, timeout=600)
            for flags in ([], ["--compile"], ["--evict", "snapkv", "--keep", "0.5", "--no-compile"])]
    assert all(r.returncode == 0 for r in runs), [r.stderr[-500:] for r in runs]
    assert runs[0].stdout == runs[1].stdout and len(runs[0].stdout.split()) == 8
    assert len(runs[2].stdout.split()) == 8


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (CUDA graphs, bf16)")
@pytest.mark.parametrize("features,policy", [(None, None), ("post_rope", None), ("pre_rope", None),
                                             (None, "gate"), ("post_rope", "gate")])
def test_cuda_graphs_in_bf16_equal_eager(tiny_llama, features, policy):
    model = load_model(tiny_llama[0], dtype=torch.bfloat16, device="cuda")
    x, new = tokens(20, batch=2).cuda(), tokens(STEPS, batch=2, seed=1).cuda()
    kw = setup(model, features, policy, x)
    ref = decode(Decoder(model, STEPS, compile=False, **kw), x, new).float()
    got = decode(Decoder(model, STEPS, **kw), x, new).float()  # mode="reduce-overhead"
    assert (got - ref).abs().max().item() <= 0.05 * ref.abs().max().item()  # bf16 rounding, not a wrong answer


KINDS = [(None, None), ("post_rope", None), ("pre_rope", None), (None, "streaming"), ("post_rope", "streaming"),
         ("pre_rope", "gate")]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("features,policy", KINDS, ids=["full", "matryoshka", "matryoshka-pre", "eviction", "both",
                                                          "both-pre"])
def test_every_kind_runs_in_half_precision_close_to_fp32(tiny_llama, features, policy, dtype):
    """fp32 bases, offsets and gates meet a half-precision model: what the cache stores follows the model's dtype
    (the class of slip that broke the first GPU run), and the logits stay close to fp32's (with the gate, which
    may flag other entries from half-precision scores, they stay finite and close to the same half model's eval)."""
    x, new = tokens(20, batch=2), tokens(STEPS, batch=2, seed=1)
    full, half = load_model(tiny_llama[0]), load_model(tiny_llama[0], dtype=dtype)
    kw = setup(full, features, policy, x)
    ref = decode(Decoder(full, STEPS, compile=False, **kw), x, new)
    dec = Decoder(half, STEPS, compile=False, **kw)
    got = decode(dec, x, new)
    if policy == "gate":
        ref = eval_path(half, x, new, kw).float()
    assert got.dtype == dtype and (got.float() - ref).abs().max().item() <= 0.05 * ref.abs().max().item()
    for layer in dec.cache.layers:
        for g in layer.groups:
            assert all(t.dtype == dtype for t in (g.k, g.v, g.U_k, g.U_v, g.b_v) if t is not None)
            assert all(t.device == half.lm_head.weight.device for t in g.buffers())


@pytest.mark.parametrize("features", FEATURES)
def test_a_decoder_keeps_everything_on_the_model_device(tiny_llama, features):
    """A model on the meta device (no data: any tensor left on the CPU is an error in the op that meets it) decodes
    with fp32 bases made on the CPU: the cache casts and moves them, as a GPU run needs."""
    cpu = load_model(tiny_llama[0])
    kw = {"features": None if features is None else trained_like(cpu, features).features(*random_ranks(cpu))}
    model = load_model(tiny_llama[0], dtype=torch.bfloat16).to("meta")
    dec = Decoder(model, 2, compile=False, **kw)
    x = tokens(10, batch=2).to("meta")
    assert dec(x, 0).device.type == dec(x[:, :1], 10).device.type == "meta"
    assert all(t.device.type == "meta" and t.dtype in (torch.bfloat16, torch.long) for t in dec.cache.buffers())
    assert all(t.device.type == "meta" for t in dec.cache.rope or ())  # the rope table stays fp32, cast where used


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("features,policy", KINDS, ids=["full", "matryoshka", "matryoshka-pre", "eviction", "both",
                                                          "both-pre"])
def test_compiled_half_precision_equals_eager(tiny_llama, features, policy, dtype):
    model = load_model(tiny_llama[0], dtype=dtype)
    x, new = tokens(20, batch=2), tokens(STEPS, batch=2, seed=1)
    kw = setup(model, features, policy, x)
    ref = decode(Decoder(model, STEPS, compile=False, **kw), x, new).float()
    got = decode(Decoder(model, STEPS, **kw), x, new).float()
    assert (got - ref).abs().max().item() <= 0.02 * ref.abs().max().item()  # rounding in fused kernels


def test_generate_evicts_inside_the_prefill_as_the_protocol_says(tiny_llama, capsys):
    """generate.py --protocol inside --sinks 1 --window 3 prints the greedy tokens of the Decoder under that
    protocol; after the prefill they differ here (the flag acts)."""
    from generate import main as generate_main
    from model import generate
    model, x = load_model(tiny_llama[0]), tokens(30, 1)
    out = {}
    for where in ("inside", "after"):
        generate_main(["--model", str(tiny_llama[0]), "--prompt", " ".join(f"w{i}" for i in x[0].tolist()),
                       "--evict", "h2o", "--keep", "0.3", "--protocol", where, "--sinks", "1", "--window", "3",
                       "--max-new-tokens", "8"])
        out[where] = [int(w[1:]) for w in capsys.readouterr().out.split()]
    runner = Decoder(model, 8, policy=H2O(), keep=0.3, compile=False, protocol=Protocol(True, 1, 3))
    ref = torch.stack(list(generate(runner, x, 8)), 1)[0].tolist()
    assert len(out["inside"]) > 4 and out["inside"] == ref[:len(out["inside"])] and out["after"] != out["inside"]
