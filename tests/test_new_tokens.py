"""Gating decoded tokens (gate.py's decoded-token head, eval.py --gate-new, train.py --new-keep): one decode step at
a time from a compact cache equals an eager reference and the one-forward form training uses; the window features
equal a plain loop; training reaches its kept fraction and lowers the KL; errors."""
import pytest
import torch

from checkpoints import load_checkpoint, save_checkpoint
from conftest import run_config
from errors import KVNestError
from eval import score_eviction
from evict import Protocol, SnapKV, prefill, received_attention
from gate import Gate, calibrate_gate, calibrate_new_tokens, judged, judged_forward, judging, load_gate, save_gate
from model import KVCache
from test_gate import eager_masked_logits, eviction_masks, tokens
from train import train_gate
from weights import load_model

CTX, T, WINDOW = 40, 60, 4


@pytest.fixture
def llama(tiny_llama):
    return load_model(tiny_llama[0])


def new_gate(model, x, new_keep=0.5):
    """A gate with a decoded-token head calibrated on x, every one of its features given a weight."""
    a = model.args
    gate = Gate(a.n_layers, a.n_kv_heads, a.dim, new_tokens=True)
    calibrate_gate(model, gate, x[:, :CTX], 0.5)
    with torch.no_grad():
        gate.w_new[..., 1] = 0.5
        gate.u_new.copy_(torch.randn(gate.u_new.shape, generator=torch.Generator().manual_seed(1)))
    calibrate_new_tokens(model, gate, x, CTX, new_keep, WINDOW)
    return gate


def decoded_one_by_one(model, x, gate, dtype=None):
    """Context evicted at 50% (its last WINDOW forced kept) into a compact cache, then one token per step with the
    gate judging each after WINDOW queries: (logits of the continuation, context flags, judges)."""
    cache = KVCache(model, x.shape[0], x.shape[1], dtype=dtype)
    _, flags = prefill(model, x[:, :CTX], cache, gate, 0.5, Protocol(window=WINDOW), exact=True)
    with judging(model, cache, gate, WINDOW) as judges:
        out = torch.cat([model(x[:, i: i + 1], i, cache) for i in range(CTX, x.shape[1])], 1)
    return out, flags, judges, cache


def decoded_in_one_forward(model, x, gate, train=False):
    soft = KVCache(model, x.shape[0], x.shape[1])
    _, flags = prefill(model, x[:, :CTX], soft, gate, 0.5, Protocol(window=WINDOW), exact=True, compact=False,
                       train=train)
    return judged_forward(model, x[:, CTX:], CTX, soft, gate, WINDOW, flags, train)


def decoded_masks(context_flags, new_flags):
    """Eager masks: continuation queries see the kept context, and decoded token j if kept or i - j < WINDOW."""
    masks = eviction_masks(context_flags, T, CTX)
    i, j = torch.arange(T)[:, None], torch.arange(T)[None, :]
    near = ((i - j) < WINDOW)[CTX:, CTX:]
    for m, f in zip(masks, new_flags):
        m[:, :, CTX:, CTX:] &= f.bool()[:, :, None, :] | near
    return masks


def test_decoded_tokens_leave_after_their_window_as_an_eager_reference_says(llama):
    """Head 0 keeps every decoded token and head 1 none (their biases): decoding from the compact cache equals the
    eager model under exactly those masks, while head 1's cache stops growing."""
    x = tokens(T)
    gate = new_gate(llama, x)
    with torch.no_grad():
        gate.c_new[:, 0], gate.c_new[:, 1] = 1e4, -1e4
        out, flags, judges, cache = decoded_one_by_one(llama, x, gate)
        new = torch.zeros(2, 2, T - CTX)
        new[:, 0] = 1
        assert (out - eager_masked_logits(llama, x, decoded_masks(flags, [new, new]))[:, CTX:]).abs().max() < 1e-4
    n_judged = T - CTX - WINDOW + 1
    for layer, f, judge in zip(cache.layers, flags, judges):
        assert (judge.kept, judge.decided) == (2 * n_judged, 4 * n_judged)
        held = f.sum(-1)  # (B, H_kv) kept context entries
        length = torch.cat([g.length for g in layer.groups], 1)[:, torch.cat([g.heads for g in layer.groups]).argsort()]
        assert torch.equal(length[:, 0], held[:, 0] + T - CTX)
        assert torch.equal(length[:, 1], held[:, 1] + WINDOW - 1)


def test_judging_in_one_forward_equals_one_decode_step_at_a_time(llama):
    """The parallel form training uses makes the same decisions as decoding: the same counts per layer, and the
    same logits, which also equal the eager model under the masks its flags give."""
    x = tokens(T)
    gate = new_gate(llama, x)
    with torch.no_grad():
        one_by_one, flags, judges, _ = decoded_one_by_one(llama, x, gate)
        parallel, new_flags = decoded_in_one_forward(llama, x, gate)
        assert (parallel - one_by_one).abs().max() < 1e-4
        for f, judge in zip(judged(new_flags, WINDOW), judges):
            assert int(f.sum()) == judge.kept and f.numel() == judge.decided
        kept = sum(j.kept for j in judges) / sum(j.decided for j in judges)
        assert 0.2 < kept < 0.8  # a real mix of decisions, not all one way
        ref = eager_masked_logits(llama, x, decoded_masks(flags, new_flags))[:, CTX:]
        assert (parallel - ref).abs().max() < 1e-4


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_judging_runs_in_half_precision_close_to_fp32(tiny_llama, dtype):
    x = tokens(T)
    fp32 = load_model(tiny_llama[0])
    gate = new_gate(fp32, x)
    half = load_model(tiny_llama[0], dtype=dtype)
    with torch.no_grad():
        ref = decoded_one_by_one(fp32, x, gate)[0]
        out, _, judges, cache = decoded_one_by_one(half, x, gate)
        parallel = decoded_in_one_forward(half, x, gate)[0]
    assert out.dtype == dtype and all(g.k.dtype == dtype for layer in cache.layers for g in layer.groups)
    assert (out.float().softmax(-1) - ref.softmax(-1)).abs().max() < 0.1
    assert (parallel.float().softmax(-1) - out.float().softmax(-1)).abs().max() < 0.1


def test_window_features_equal_a_plain_loop():
    """received_attention with a band: each query's softmax over its last `band` keys only, summed over the queries
    and the group's heads."""
    q, k = torch.randn(1, 4, 12, 8), torch.randn(1, 2, 12, 8)
    ref = torch.zeros(1, 2, 12)
    for h in range(4):
        for i in range(12):
            lo = max(0, i - 3 + 1)
            s = q[0, h, i] @ k[0, h // 2, lo: i + 1].T / 8 ** 0.5
            ref[0, h // 2, lo: i + 1] += s.softmax(-1)
    assert torch.allclose(received_attention(q, k, 2, None, band=3), ref, atol=1e-6)
    assert torch.allclose(received_attention(q, k, 2, None, chunk=5, band=3), ref, atol=1e-6)


def test_calibration_keeps_the_asked_fraction_of_judged_tokens(llama):
    x = tokens(T)
    gate = new_gate(llama, x, new_keep=0.25)
    cache = KVCache(llama, 2, T)
    with torch.no_grad():
        llama(x[:, :CTX], 0, cache)
        full = [torch.ones(2, 2, CTX)] * 2
        _, new_flags = judged_forward(llama, x[:, CTX:], CTX, cache, gate, WINDOW, full)
    first = judged(new_flags, WINDOW)[0]  # the first layer's input does not depend on any eviction
    assert torch.allclose(first.mean((0, 2)), torch.full((2,), 0.25), atol=1 / 34)  # per head: 2 x 17 judged


def test_training_on_decoded_tokens_lowers_their_kl_and_resumes_exactly(tiny_llama, tmp_path):
    """train.py --new-keep: the decoded-token head trains with the context gate; scored as eval.py --gate-new does
    (one decode step at a time, real eviction), the KL falls while about the asked fraction stays kept."""
    ids = tokens(100, 1)[0].repeat(20)
    held_out = ids[7:487].view(10, 48)
    model = load_model(tiny_llama[0])
    cfg = run_config(method="gate", seq_len=47, ctx_len=16, window=4, new_keep=0.3)
    start = Gate(2, 2, 64, new_tokens=True)  # the start train_gate makes
    calib = ids[:94].view(2, 47)
    calibrate_gate(model, start, calib[:, :16], 0.5)
    calibrate_new_tokens(model, start, calib, 16, 0.3, 4)
    gate = train_gate(model, [(ids, 1.0)], cfg, tmp_path / "a.safetensors", {})
    protocol = Protocol(window=4)
    before, after = (score_eviction(model, held_out, g, 0.5, 16, True, protocol, gate_new=True)
                     for g in (start, gate))
    assert after["kl"] < 0.93 * before["kl"], (before, after)  # measured: 0.590 -> 0.517
    assert abs(after["new_tokens_keep"] - 0.3) < 0.15, after
    loaded, meta, _ = load_gate(tmp_path / "a.safetensors", model)
    assert loaded.new_tokens and meta["config"]["new_keep"] == 0.3 and torch.equal(loaded.w_new, gate.w_new)
    train_gate(load_model(tiny_llama[0]), [(ids, 1.0)], cfg, tmp_path / "b.safetensors", {}, stop_after=12)
    resumed = train_gate(load_model(tiny_llama[0]), [(ids, 1.0)], cfg, tmp_path / "b.safetensors", {}, resume=True)
    for name, p in gate.named_parameters():
        assert torch.equal(p, dict(resumed.named_parameters())[name]), name


def test_gates_without_a_decoded_token_head_are_clear_errors(llama, tmp_path):
    """A gate trained before --new-keep (or without it) loads as before and is refused by name where decoded
    tokens are judged; a damaged new_tokens field is refused on load."""
    x = tokens(T)
    plain = Gate(2, 2, 64)
    calibrate_gate(llama, plain, x[:, :CTX], 0.5)
    save_gate(tmp_path / "g.safetensors", plain, {"model": llama.fingerprint()})
    tensors, meta = load_checkpoint(tmp_path / "g.safetensors", llama, "gate", "train")
    assert meta["new_tokens"] is False
    del meta["new_tokens"]  # as written before the field existed
    save_checkpoint(tmp_path / "old.safetensors", dict(tensors), meta)
    old = load_gate(tmp_path / "old.safetensors", llama)[0]
    assert not old.new_tokens and not hasattr(old, "w_new")
    cache = KVCache(llama, 2, T)
    prefill(llama, x[:, :CTX], cache, old, 0.5, Protocol(window=WINDOW), exact=True)
    with pytest.raises(KVNestError, match="this gate was not trained on decoded tokens; train one with"):
        with judging(llama, cache, old, WINDOW):
            pass
    with pytest.raises(KVNestError, match="not trained on decoded tokens"):
        judged_forward(llama, x[:, CTX:], CTX, cache, old, WINDOW, [None, None])
    gate = new_gate(llama, x)
    with pytest.raises(KVNestError, match="needs a learned gate"):
        with judging(llama, cache, SnapKV(), WINDOW):
            pass
    with pytest.raises(KVNestError, match="window >= 1"):
        with judging(llama, cache, gate, 0):
            pass
    soft = KVCache(llama, 2, T)
    prefill(llama, x[:, :CTX], soft, gate, 0.5, exact=True, compact=False)
    with pytest.raises(KVNestError, match="evicts from a compact cache"):
        with judging(llama, soft, gate, WINDOW):
            pass
    save_checkpoint(tmp_path / "bad.safetensors", dict(tensors), dict(meta, new_tokens=1))
    with pytest.raises(KVNestError, match="gate field new_tokens=1 is not valid"):
        load_gate(tmp_path / "bad.safetensors", llama)


def test_generate_gates_new_tokens_as_the_one_forward_form_over_its_own_output(tiny_llama, tmp_path, capsys):
    """generate.py --window W --gate-new: greedy decoding with the decoded-token head picks, token by token, the argmax
    of judged_forward run over the prompt and that same output (the prompt evicted to 50% as --evict gate does, its
    last W entries kept); without those kept, the one-forward form refuses to run."""
    from generate import main as generate_main
    model = load_model(tiny_llama[0])
    x = tokens(T)
    gate = new_gate(model, x)
    save_gate(tmp_path / "g.safetensors", gate, {"model": model.fingerprint()})
    prompt = x[:1, :CTX]
    generate_main(["--model", str(tiny_llama[0]), "--prompt", " ".join(f"w{i}" for i in prompt[0].tolist()),
                   "--evict", "gate", "--gate", str(tmp_path / "g.safetensors"), "--window", str(WINDOW), "--gate-new",
                   "--max-new-tokens", "16"])
    printed = capsys.readouterr()
    out = [int(w[1:]) for w in printed.out.split()]
    assert len(out) > WINDOW + 2 and "judged new entries kept" in printed.err
    soft = KVCache(model, 1, CTX + len(out))
    with torch.no_grad():
        ctx_logits, flags = prefill(model, prompt, soft, gate, 0.5, Protocol(window=WINDOW), True, compact=False)
        logits, _ = judged_forward(model, torch.tensor([out[:-1]]), CTX, soft, gate, WINDOW, flags)
        assert torch.cat([ctx_logits[:, -1:], logits], 1).argmax(-1)[0].tolist() == out
        _, unprotected = prefill(model, prompt, KVCache(model, 1, T), gate, 0.5, exact=True, compact=False)
        with pytest.raises(KVNestError, match="last 3 entries must be kept under a decoded-token window of 4"):
            judged_forward(model, torch.tensor([out[:-1]]), CTX, soft, gate, WINDOW, unprotected)
    with pytest.raises(KVNestError, match="drop --compile"):
        generate_main(["--model", str(tiny_llama[0]), "--prompt", "w1", "--evict", "gate", "--gate",
                       str(tmp_path / "g.safetensors"), "--window", "4", "--gate-new", "--compile"])
    with pytest.raises(KVNestError, match="after `window` queries: pass a window >= 1"):
        generate_main(["--model", str(tiny_llama[0]), "--prompt", "w1", "--evict", "gate", "--gate",
                       str(tmp_path / "g.safetensors"), "--gate-new"])
    from eval import main as eval_main
    with pytest.raises(KVNestError, match="after `window` queries: pass a window >= 1"):
        eval_main(["--model", str(tiny_llama[0]), "--evict", "gate", "--gate", str(tmp_path / "g.safetensors"),
                   "--gate-new", "--seq-len", "64", "--ctx-len", "32"])
