"""hf.py against kvnest's own model: a transformers model inside compress_cache gives the same next-token logits
and greedy generations as kvnest's decoder with the same checkpoints and settings, for every cache kind, on tiny
random Llama and Mistral models; its cache holds the bytes kvnest reports; left padding equals each prompt alone;
decoded tokens judged by a gate (gate_new) as kvnest's own judging judges them; eviction inside the prefill as
kvnest's own protocol evicts."""
import pytest
import torch

from compress import save_projections, uniform_ranks
from errors import KVNestError
from evict import baseline
from gate import Gate, calibrate_gate, judging, load_gate, save_gate
from hf import compress_cache, kvnest_view
from kernels import Decoder
from model import KVCache, generate
from evict import Protocol, prefill
from weights import load_model
from test_compress import tokens, trained_like
from test_kernels import decode
from test_new_tokens import CTX, WINDOW, new_gate

STEPS = 5
KINDS = {  # name: compress_cache arguments (file names stand for the checkpoints made below)
    "full": {},
    "matryoshka": dict(projections="post", budget=0.5),
    "matryoshka-pre": dict(projections="pre", budget=0.5),
    **{name: dict(policy=name, keep=0.5) for name in ("streaming", "h2o", "snapkv", "random")},
    "gate": dict(policy="gate", gate="gate", keep=0.5),
    "both": dict(projections="post", budget=0.5, policy="snapkv", keep=0.5),
    "both-pre-gate": dict(projections="pre", budget=0.5, policy="gate", gate="gate", keep=0.5),
}


@pytest.fixture(scope="module")
def checkpoints(tiny_llama, tiny_mistral, tmp_path_factory):
    """Projections (keys after and before RoPE) and a calibrated gate for each tiny model, as train.py writes."""
    out = {}
    for name, (folder, _) in (("llama", tiny_llama), ("mistral", tiny_mistral)):
        model, tmp = load_model(folder), tmp_path_factory.mktemp(name)
        meta = {"model": model.fingerprint()}
        files = {mode[:-5] if mode.endswith("_rope") else mode: tmp / f"{mode}.safetensors"
                 for mode in ("post_rope", "pre_rope")}
        for mode, path in zip(("post_rope", "pre_rope"), files.values()):
            save_projections(path, trained_like(model, mode), meta)
        gate = Gate(model.args.n_layers, model.args.n_kv_heads, model.args.dim)
        calibrate_gate(model, gate, tokens(24), 0.5)
        save_gate(tmp / "gate.safetensors", gate, meta)
        out[name] = {**files, "gate": tmp / "gate.safetensors"}
    return out


def arguments(kind: str, files: dict) -> dict:
    return {k: files[v] if k in ("projections", "gate") else v for k, v in KINDS[kind].items()}


def kvnest_settings(model, args: dict) -> dict:
    """The same settings as Decoder arguments, from the same files."""
    from compress import load_projections
    kw = {}
    if "projections" in args:
        proj = load_projections(args["projections"], model)[0]
        kw["features"] = proj.features(*uniform_ranks(model, args["budget"]))
    if "policy" in args:
        kw["policy"] = load_gate(args["gate"], model)[0] if args["policy"] == "gate" else baseline(args["policy"])
        kw["keep"], kw["exact"] = args["keep"], True if args["policy"] == "gate" else None  # as the scripts
    return kw


def hf_model(folder):
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def hf_generate(model, x, mask=None, n=STEPS + 1):
    """n greedy tokens through transformers' generate: (B, n) tokens, (B, n, V) logits."""
    out = model.generate(x, attention_mask=torch.ones_like(x) if mask is None else mask, max_new_tokens=n,
                         min_new_tokens=n, do_sample=False, output_logits=True, return_dict_in_generate=True,
                         pad_token_id=0)
    return out.sequences[:, x.shape[1]:], torch.stack(out.logits, 1)


@pytest.mark.parametrize("arch,kind", [("llama", k) for k in KINDS] +
                         [("mistral", k) for k in ("full", "matryoshka", "matryoshka-pre")])
def test_generate_through_hf_equals_kvnest(arch, kind, checkpoints, tiny_llama, tiny_mistral):
    folder = {"llama": tiny_llama, "mistral": tiny_mistral}[arch][0]
    model, hf, x = load_model(folder), hf_model(folder), tokens(20)
    args = arguments(kind, checkpoints[arch])
    with torch.no_grad(), compress_cache(hf, **args):
        new, logits = hf_generate(hf, x)
    kw = kvnest_settings(model, args)
    ref = decode(Decoder(model, STEPS, compile=False, **kw), x, new[:, :-1])  # teacher-forced on hf's tokens
    assert (logits - ref).abs().max().item() <= 1e-4
    greedy = torch.stack(list(generate(Decoder(model, STEPS + 1, compile=False, **kw), x, STEPS + 1)), 1)
    assert torch.equal(greedy, new)


@pytest.mark.parametrize("kind", ["full", "matryoshka-pre", "snapkv", "gate", "both-pre-gate"])
def test_left_padding_equals_each_prompt_alone(kind, checkpoints, tiny_llama):
    model, hf = load_model(tiny_llama[0]), hf_model(tiny_llama[0])
    args, long, short = arguments(kind, checkpoints["llama"]), tokens(20, 1), tokens(13, 1, seed=3)
    x = torch.cat([long, torch.cat([torch.zeros(1, 7, dtype=torch.long), short], 1)])
    mask = torch.cat([torch.ones(1, 20), torch.cat([torch.zeros(1, 7), torch.ones(1, 13)], 1)]).long()
    with torch.no_grad(), compress_cache(hf, **args):
        new, logits = hf_generate(hf, x, mask)
    kw = kvnest_settings(model, args)
    for b, prompt in enumerate((long, short)):
        ref = decode(Decoder(model, STEPS, compile=False, **kw), prompt, new[b: b + 1, :-1])
        assert (logits[b: b + 1] - ref).abs().max().item() <= 1e-4, b


@pytest.mark.parametrize("kind,fraction", [("full", 1), ("matryoshka", 0.5), ("snapkv", 0.5), ("both", 0.25),
                                           ("both-pre-gate", None)])
def test_cache_bytes_after_the_prefill_are_kvnest_bytes(kind, fraction, checkpoints, tiny_llama):
    model, hf, x = load_model(tiny_llama[0]), hf_model(tiny_llama[0]), tokens(20)
    args = arguments(kind, checkpoints["llama"])
    with torch.no_grad(), compress_cache(hf, **args) as attached:
        hf(x)
        held = sum(t.nbytes for name, t in attached.cache.kv.named_buffers()
                   if name.split(".")[-1] in ("k", "v", "pos"))  # what the entries occupy
    kw = kvnest_settings(model, args)
    cache = KVCache(model, 2, 20, kw.get("features"))
    with torch.no_grad():
        if "policy" in kw:
            prefill(model, x, cache, kw["policy"], kw["keep"], exact=kw["exact"])
        else:
            model(x, 0, cache)
    assert held == attached.cache.nbytes() == cache.nbytes()
    if fraction is not None:
        assert held == fraction * KVCache(model, 2, 20).nbytes()


@pytest.fixture(scope="module")
def new_token_gate(tiny_llama, tmp_path_factory):
    """A gate trained-like on decoded tokens (test_new_tokens.new_gate), saved as train.py --new-keep saves it."""
    model = load_model(tiny_llama[0])
    path = tmp_path_factory.mktemp("new") / "gate.safetensors"
    save_gate(path, new_gate(model, tokens(CTX + 20)), {"model": model.fingerprint()})
    return path


def hf_judged(hf, x, gate, n, mask=None):
    """hf_generate with decoded tokens judged: (tokens, logits, the Attachment with its judges)."""
    with torch.no_grad(), compress_cache(hf, policy="gate", gate=gate, keep=0.5, window=WINDOW,
                                           gate_new=True) as attached:
        return *hf_generate(hf, x, mask, n), attached


def test_judged_decoded_tokens_through_hf_equal_kvnest_s_judging(new_token_gate, tiny_llama):
    """The same tokens, logits, kept counts and cache lengths as the Decoder with the prompt's last WINDOW kept
    and gate.judging on its cache (generate.py --gate-new)."""
    model, hf, x, n = load_model(tiny_llama[0]), hf_model(tiny_llama[0]), tokens(CTX), 16
    new, logits, attached = hf_judged(hf, x, new_token_gate, n)
    gate = load_gate(new_token_gate, model)[0]
    runner = Decoder(model, n, policy=gate, keep=0.5, exact=True, compile=False, protocol=Protocol(window=WINDOW))
    with torch.no_grad():
        ref = [runner(x, 0)[:, -1]]
        with judging(model, runner.cache, gate, WINDOW) as judges:
            ref += [runner(new[:, i: i + 1], CTX + i)[:, -1] for i in range(n - 1)]
    assert (logits - torch.stack(ref, 1)).abs().max().item() <= 1e-4
    assert [(j.kept, j.decided) for j in attached.judges] == [(j.kept, j.decided) for j in judges]
    assert 0 < sum(j.kept for j in judges) < sum(j.decided for j in judges) == 2 * 2 * 2 * (n - WINDOW)
    assert torch.equal(torch.stack(ref, 1).argmax(-1), new)  # greedy on kvnest's own logits too
    for ours, theirs in zip(attached.cache.kv.layers, runner.cache.layers):  # the same entries left
        assert all(torch.equal(a.length, b.length) for a, b in zip(ours.groups, theirs.groups))


def test_judged_decoded_tokens_with_left_padding_equal_each_prompt_alone(new_token_gate, tiny_llama):
    hf, long, short, n = hf_model(tiny_llama[0]), tokens(CTX, 1), tokens(CTX - 7, 1, seed=3), 12
    x = torch.cat([long, torch.cat([torch.zeros(1, 7, dtype=torch.long), short], 1)])
    mask = torch.cat([torch.ones(1, CTX), torch.cat([torch.zeros(1, 7), torch.ones(1, CTX - 7)], 1)]).long()
    new, logits, _ = hf_judged(hf, x, new_token_gate, n, mask)
    for b, prompt in enumerate((long, short)):
        alone, alone_logits, _ = hf_judged(hf, prompt, new_token_gate, n)
        assert torch.equal(new[b: b + 1], alone)
        assert (logits[b: b + 1] - alone_logits).abs().max().item() <= 1e-4, b


@pytest.mark.parametrize("kind,sinks,window", [("h2o", 0, 0), ("snapkv", 2, 4), ("gate", 0, 4),
                                               ("both-pre-gate", 1, 3)])
def test_eviction_inside_the_prefill_through_hf_equals_kvnest(kind, sinks, window, checkpoints, tiny_llama):
    """inside=True: each layer flags the prompt before attending; the same logits and kept entries as kvnest's
    Decoder with Protocol(inside=True), which differ from those of eviction after the prefill."""
    model, hf, x = load_model(tiny_llama[0]), hf_model(tiny_llama[0]), tokens(20)
    args = arguments(kind, checkpoints["llama"])
    with torch.no_grad(), compress_cache(hf, **args, inside=True, sinks=sinks, window=window or None) as attached:
        new, logits = hf_generate(hf, x)
    kw = kvnest_settings(model, args)
    runner = Decoder(model, STEPS, compile=False, protocol=Protocol(True, sinks, window), **kw)
    ref = decode(runner, x, new[:, :-1])
    assert (logits - ref).abs().max().item() <= 1e-4
    after = decode(Decoder(model, STEPS, compile=False, protocol=Protocol(False, sinks, window), **kw), x,
                   new[:, :-1])
    assert (after - ref).abs().max().item() > 1e-3  # the protocols differ here: this test can fail
    for ours, theirs in zip(attached.cache.kv.layers, runner.cache.layers):
        assert [g.length.tolist() for g in ours.groups] == [g.length.tolist() for g in theirs.groups]


def test_eviction_inside_the_prefill_with_left_padding_equals_each_prompt_alone(checkpoints, tiny_llama):
    hf, long, short = hf_model(tiny_llama[0]), tokens(20, 1), tokens(13, 1, seed=3)
    x = torch.cat([long, torch.cat([torch.zeros(1, 7, dtype=torch.long), short], 1)])
    mask = torch.cat([torch.ones(1, 20), torch.cat([torch.zeros(1, 7), torch.ones(1, 13)], 1)]).long()
    args = dict(arguments("gate", checkpoints["llama"]), inside=True, sinks=1)
    with torch.no_grad(), compress_cache(hf, **args):
        new, logits = hf_generate(hf, x, mask)
        for b, prompt in enumerate((long, short)):
            alone, alone_logits = hf_generate(hf, prompt)
            assert torch.equal(new[b: b + 1], alone)
            assert (logits[b: b + 1] - alone_logits).abs().max().item() <= 1e-4, b


@pytest.mark.parametrize("policy,inside,dtype", [("snapkv", False, torch.float32), ("gate", False, torch.float32),
                                                 ("gate", True, torch.float32), ("gate", True, torch.bfloat16)])
def test_a_joint_plan_through_hf_equals_kvnest(policy, inside, dtype, checkpoints, tiny_llama, tmp_path):
    """plan=: each head its own ranks and keep ratio (joint.py); the same logits as kvnest's Decoder with the
    plan's compression (bf16: close to them), and the cache holds the bytes the plan predicts."""
    from transformers import AutoModelForCausalLM
    from plan import plan_compression, save_plans
    from test_plan import some_plan
    model, x = load_model(tiny_llama[0], dtype=dtype), tokens(20)
    hf = AutoModelForCausalLM.from_pretrained(tiny_llama[0], dtype=dtype).eval()
    files, path = checkpoints["llama"], tmp_path / "plan.json"
    save_plans(path, {0.5: (some_plan(model, "pre_rope", policy), {})}, {"model": model.fingerprint()}, 0.5)
    gate = files["gate"] if policy == "gate" else None
    with torch.no_grad(), compress_cache(hf, projections=files["pre"], plan=path, gate=gate,
                                         inside=inside) as attached:
        hf(x)
        held = attached.cache.nbytes()
        new, logits = hf_generate(hf, x)
    plan, features, chosen = plan_compression(model, path, None, files["pre"], gate)
    runner = Decoder(model, STEPS, features, chosen, plan.keep, True, compile=False, protocol=Protocol(inside))
    ref = decode(runner, x, new[:, :-1]).float()
    tolerance = 1e-4 if dtype == torch.float32 else 0.05 * ref.abs().max().item()
    assert (logits.float() - ref).abs().max().item() <= tolerance
    assert held == plan.nbytes(20, 2, 16, dtype.itemsize) < KVCache(model, 2, 20).nbytes()
    for kwargs, message in ((dict(plan=path, gate=gate), "cuts ranks: pass the projections"),
                            (dict(plan=path, projections=files["pre"], gate=gate, keep=0.5), "keep is set by the plan"),
                            (dict(plan=path, projections=files["post"], gate=gate), "searched for keys pre_rope")):
        with pytest.raises(KVNestError, match=message):
            with compress_cache(hf, **kwargs):
                pass


def test_the_view_has_the_fingerprint_of_kvnest_s_own_load(tiny_llama):
    assert kvnest_view(hf_model(tiny_llama[0])).fingerprint() == load_model(tiny_llama[0]).fingerprint()


def test_bad_use_is_a_kvnest_error(checkpoints, new_token_gate, tiny_llama, tiny_mistral, tmp_path):
    from transformers import Qwen2Config, Qwen2ForCausalLM
    hf, files = hf_model(tiny_llama[0]), checkpoints["llama"]
    cases = [(dict(projections=checkpoints["mistral"]["post"], budget=0.5), "made for another model"),
             (dict(projections=files["post"], budget=1.5), "outside (0, 1]"),
             (dict(projections=files["post"]), "need a budget"),
             (dict(policy="h2o", keep=0.0), "outside (0, 1]"),
             (dict(policy="gate"), "needs gate="),
             (dict(keep=0.5), "pass policy too"),
             (dict(policy="nope"), "unknown eviction method"),
             (dict(window=4), "window acts with a policy"),
             (dict(inside=True), "inside acts with a policy"),
             (dict(policy="snapkv", window=4, gate_new=True), "needs a learned gate"),
             (dict(policy="gate", gate=files["gate"], window=4, gate_new=True), "not trained on decoded tokens"),
             (dict(policy="gate", gate=new_token_gate, gate_new=True), "after `window` queries: pass a window >= 1"),
             (dict(policy="gate", gate=files["gate"], window=0), r"window=0: pass a whole number >= 1"),
             (dict(policy="h2o", sinks=-1), r"sinks=-1: pass a whole number >= 0")]
    for kwargs, message in cases:
        with pytest.raises(KVNestError, match=message.replace("(", r"\(").replace(")", r"\)")):
            with compress_cache(hf, **kwargs):
                pass
    with pytest.raises(KVNestError, match="sliding-window"):
        with compress_cache(hf_model(tiny_mistral[0]), policy="snapkv", keep=0.5):
            pass
    qwen = Qwen2ForCausalLM(Qwen2Config(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, vocab_size=128))
    with pytest.raises(KVNestError, match="unsupported architecture 'qwen2'"):
        with compress_cache(qwen):
            pass
    with torch.no_grad(), compress_cache(hf, policy="snapkv", keep=0.5):  # right padding is refused by name
        with pytest.raises(KVNestError, match="not left padding"):
            hf(tokens(6), attention_mask=torch.tensor([[1, 1, 1, 1, 0, 0]] * 2))
    with torch.no_grad(), compress_cache(hf, policy="snapkv", inside=True, window=4):
        with pytest.raises(KVNestError, match="left padding with a recent window inside the prefill"):
            hf(tokens(6), attention_mask=torch.tensor([[1] * 6, [0, 0, 1, 1, 1, 1]]))
    with torch.no_grad(), compress_cache(hf, policy="gate", gate=new_token_gate, window=4, gate_new=True) as attached:
        hf(tokens(6))  # the prefill
        with pytest.raises(KVNestError, match="decoded tokens are judged one per forward; 2 tokens"):
            hf(tokens(2), **attached.cache_kwargs())
    with torch.no_grad(), compress_cache(hf):
        with pytest.raises(KVNestError, match="257 tokens exceed the model's context of 256"):
            hf(tokens(257, 1))
    assert hf.config._attn_implementation != "kvnest"  # restored after the block


def test_a_long_generation_grows_the_cache_and_stays_equal(checkpoints, tiny_llama):
    """Past the prefill the buffers grow several times (by half the tokens seen); nothing moves."""
    model, hf, x, n = load_model(tiny_llama[0]), hf_model(tiny_llama[0]), tokens(20), 90
    args = arguments("both-pre-gate", checkpoints["llama"])
    with torch.no_grad(), compress_cache(hf, **args) as attached:
        new, logits = hf_generate(hf, x, n=n)
    kw = kvnest_settings(model, args)
    ref = decode(Decoder(model, n, compile=False, **kw), x, new[:, :-1])
    assert (logits - ref).abs().max().item() <= 1e-4
    assert attached.cache.seen == 20 + n - 1 and attached.cache.free >= 0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kind,inside", [("matryoshka-pre", False), ("both", False), ("both-pre-gate", True)])
def test_half_precision_models_run_close_to_kvnest(kind, inside, dtype, checkpoints, tiny_llama):
    """fp32 projections meet a half-precision transformers model: the cache follows the model's dtype (evicting
    after the prefill or inside it, with a recent window)."""
    from transformers import AutoModelForCausalLM
    model, x = load_model(tiny_llama[0], dtype=dtype), tokens(20)
    hf = AutoModelForCausalLM.from_pretrained(tiny_llama[0], dtype=dtype).eval()
    args, protocol = arguments(kind, checkpoints["llama"]), Protocol(inside, 0, 3 if inside else 0)
    with torch.no_grad(), compress_cache(hf, **args, inside=inside, window=protocol.window or None) as attached:
        new, logits = hf_generate(hf, x)
    assert {t.dtype for t in attached.cache.kv.buffers() if t.is_floating_point()} == {dtype}
    runner = Decoder(model, STEPS, compile=False, protocol=protocol, **kvnest_settings(model, args))
    ref = decode(runner, x, new[:, :-1]).float()
    assert (logits.float() - ref).abs().max().item() <= 0.05 * ref.abs().max().item()


def test_eval_py_through_transformers_prints_kvnest_s_figures(checkpoints, tiny_llama, word_text, capsys):
    import json
    from eval import main as eval_main
    argv = ["--model", str(tiny_llama[0]), "--data", str(word_text), "--seq-len", "64", "--projections",
            str(checkpoints["llama"]["pre"]), "--budget", "0.5", "--evict", "snapkv", "--ctx-len", "40", "--json"]
    results = []
    for protocol in ([], ["--protocol", "inside", "--window", "4", "--sinks", "1"]):
        for extra in ([], ["--transformers"]):
            eval_main(argv + protocol + extra)
            results.append(json.loads(capsys.readouterr().out))
    for key in ("perplexity", "kl", "top1"):
        assert results[1][key] == pytest.approx(results[0][key], rel=1e-5, abs=1e-7), key
        assert results[3][key] == pytest.approx(results[2][key], rel=1e-5, abs=1e-7), key
    assert results[2]["kl"] != results[0]["kl"]


def test_eval_through_transformers_without_transformers_is_one_line(tiny_llama, monkeypatch):
    import sys
    from eval import score_transformers
    monkeypatch.setitem(sys.modules, "transformers", None)  # as if it were not installed
    monkeypatch.delitem(sys.modules, "hf", raising=False)
    with pytest.raises(KVNestError, match="--transformers needs transformers: pip install 'transformers>=5,<5.25'"):
        score_transformers(tiny_llama[0], load_model(tiny_llama[0]), tokens(32, 1), None)
