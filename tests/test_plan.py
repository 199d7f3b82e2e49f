"""One byte budget for both axes (plan.py, joint.py): a plan's bytes are its cache tensors' bytes, a full plan is the
full cache, the layer-by-layer search protocol equals eval's, per-head keeps equal uniform ones where they agree,
the search's path, and every script that takes a plan (eval, generate, bench, the compiled decode)."""
import json
import re
from dataclasses import replace

import pytest
import torch

from compress import uniform_ranks
from errors import KVNestError
from eval import main as eval_main, score_evictions
from evict import H2O, SnapKV, flags_from_scores, prefill
from joint import LayerRunner, joint_search, main as joint_main
from kernels import Decoder
from losses import kl_and_top1
from model import KVCache
from plan import Plan, load_plan, save_plans
from test_cli_errors import one_line_error
from test_compress import tokens, trained_like
from test_kernels import STEPS, decode, eval_path, gate_for
from weights import load_model


@pytest.fixture
def llama(tiny_llama):
    return load_model(tiny_llama[0])


def some_plan(model, key_mode="pre_rope", policy="snapkv") -> Plan:
    """Unequal ranks and keeps, one head keeping everything, one compressed head keeping everything."""
    plan = Plan.full(model, policy, key_mode)
    plan.rank_k[0, 1], plan.rank_v[1, 0], plan.rank_k[1, 1] = 8, 4, 12
    plan.keep[0, 0], plan.keep[1, 0], plan.keep[1, 1] = 0.5, 0.25, 0.625
    return plan


def full_bases(model, key_mode):
    with torch.no_grad():
        return trained_like(model, key_mode).features(*uniform_ranks(model, 1.0))


@pytest.mark.parametrize("key_mode", ["post_rope", "pre_rope"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_plan_bytes_are_the_cache_tensors_bytes(llama, key_mode, dtype):
    model = llama.to(dtype)
    plan, x = some_plan(model, key_mode), tokens(32, batch=2)
    cache = KVCache(model, 2, 32 + 5, plan.features(full_bases(model, key_mode)))
    with torch.no_grad():
        prefill(model, x, cache, SnapKV(obs=4), plan.keep, exact=True)
    size = dtype.itemsize
    assert cache.nbytes() == plan.nbytes(32, 2, 16, size, room=5)
    no_room = KVCache(model, 2, 32, plan.features(full_bases(model, key_mode)))
    with torch.no_grad():
        prefill(model, x, no_room, SnapKV(obs=4), plan.keep, exact=True)
    full = KVCache(model, 2, 32)  # 32 x keep is whole here, so the budget is exact
    assert no_room.nbytes() / full.nbytes() == pytest.approx(plan.budget(16, size), abs=1e-12)
    # sum of keep x (r_k + r_v) over the heads, plus an int64 per kept entry of the evicting pre-RoPE heads (in
    # units of the cache dtype: 2 in fp32, 4 in bf16), over L x H_kv x 2D = 128
    positions = 0 if key_mode == "post_rope" else 8 // size
    by_hand = (0.5 * 32 + 1.0 * 24 + 0.25 * 20 + 0.625 * 28 + (0.5 + 0.25 + 0.625) * positions) / 128
    assert plan.budget(16, size) == pytest.approx(by_hand)


def test_a_full_plan_is_the_full_cache(llama):
    plan, x, new = Plan.full(llama, "snapkv", "pre_rope"), tokens(20, batch=2), tokens(STEPS, batch=2, seed=1)
    assert plan.features(full_bases(llama, "pre_rope")) is None and not plan.evicts
    assert plan.budget(16, 4) == 1.0 and plan.nbytes(20, 2, 16, 4) == KVCache(llama, 2, 20).nbytes()
    with torch.no_grad():
        ref = llama(torch.cat([x, new], 1))[:, x.shape[1] - 1:]
        runner = LayerRunner(llama, full_bases(llama, "pre_rope"), SnapKV(obs=4), torch.cat([x, new], 1), 20)
        assert runner.kl(plan) == 0.0
    got = decode(Decoder(llama, STEPS, compile=False, keep=plan.keep, policy=SnapKV(obs=4), exact=True), x, new)
    assert (got - ref).abs().max() < 1e-5


@pytest.mark.parametrize("key_mode", ["post_rope", "pre_rope"])
@pytest.mark.parametrize("policy", ["snapkv", "gate"])
def test_the_layer_by_layer_search_protocol_equals_eval(llama, key_mode, policy):
    """LayerRunner (context and continuation one layer at a time, restartable) computes eval.score_evictions'
    protocol: the same KL, from layer 0 or restarted at layer 1 from recorded inputs."""
    x = tokens(40, batch=2, seed=2)
    pol = gate_for(llama, x[:, :28]) if policy == "gate" else SnapKV(obs=4)
    plan, full = some_plan(llama, key_mode, policy), full_bases(llama, key_mode)
    with torch.no_grad():
        runner = LayerRunner(llama, full, pol, x, 28)
        kl = runner.kl(plan, 0, record=True)
        assert runner.kl(plan, 1) == pytest.approx(kl, abs=1e-7)
        for layer in (0, 1):  # a keep move reuses the recorded context; it equals the protocol from scratch
            moved = replace(plan, keep=plan.keep.clone())
            moved.keep[layer, 1] = 0.375
            reused = runner.kl(moved, layer, same_context_after=layer)
            assert reused == pytest.approx(LayerRunner(llama, full, pol, x, 28).kl(moved), abs=1e-6)
            assert runner.kl(plan, 1) == pytest.approx(kl, abs=1e-7)  # and leaves the recorded plan as it was
        result = score_evictions(llama, x, [(pol, plan.keep, True, plan.features(full))], ctx_len=28)[0][0]
    assert kl == pytest.approx(result["kl"], rel=1e-5) and kl > 1e-3
    cache = KVCache(llama, 2, 39, plan.features(full))
    with torch.no_grad():  # and the compact cache of generation's path
        ctx, _ = prefill(llama, x[:, :28], cache, pol, plan.keep, exact=True)
        logits = torch.cat([ctx[:, -1:], llama(x[:, 28:-1], 28, cache)], 1)
        assert kl_and_top1(runner.ref, logits)[0].mean().item() == pytest.approx(kl, rel=1e-5)


def test_per_head_keeps_equal_one_keep_where_they_agree(llama):
    """A keep per head equal everywhere flags what the one keep flags; H2O's recent share follows each head's."""
    scores = [torch.randn(2, 2, 30, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    same = flags_from_scores(scores, torch.full((2, 2), 0.4, dtype=torch.float64), True)
    assert all(torch.equal(a, b) for a, b in zip(same, flags_from_scores(scores, 0.4, True)))
    mixed = flags_from_scores(scores, torch.tensor([[0.2, 0.5], [1.0, 0.1]], dtype=torch.float64), True)
    assert [f.sum((0, 2)).tolist() for f in mixed] == [[12.0, 30.0], [60.0, 6.0]]  # batch 2 x round(30 keep)
    x = tokens(30, batch=1)
    q, k = torch.randn(1, 4, 30, 16), torch.randn(1, 2, 30, 16)
    per_head = H2O().score(0, x, q, k, torch.tensor([0.2, 0.5], dtype=torch.float64))
    for h, keep in enumerate((0.2, 0.5)):
        assert torch.equal(per_head[:, h], H2O().score(0, x, q, k, keep)[:, h])


@pytest.mark.parametrize("key_mode", ["post_rope", "pre_rope"])
def test_generation_and_the_compiled_step_take_a_plan(llama, key_mode):
    x, new = tokens(20, batch=2), tokens(STEPS, batch=2, seed=1)
    plan = some_plan(llama, key_mode)
    kw = dict(features=plan.features(full_bases(llama, key_mode)), policy=SnapKV(obs=4), keep=plan.keep, exact=True)
    eager = Decoder(llama, STEPS, compile=False, **kw)
    got = decode(eager, x, new)
    seq = torch.cat([x, new], 1)
    cache = KVCache(llama, *seq.shape, kw["features"])
    with torch.no_grad():  # eval's path: the cache's slots weighed by the flags
        ctx, _ = prefill(llama, x, cache, kw["policy"], plan.keep, exact=True, compact=False)
        ref = torch.cat([ctx[:, -1:], llama(new, x.shape[1], cache)], 1)
    assert (got - ref).abs().max().item() < 1e-4
    assert eager.nbytes() == plan.nbytes(20, 2, 16, 4, room=STEPS)
    if key_mode == "pre_rope":  # the compiled step (one compile: the harder kind, positions stored)
        assert (decode(Decoder(llama, STEPS, **kw), x, new) - got).abs().max().item() < 1e-4


def test_the_search_path_is_nested_and_records_each_budget(llama):
    x = tokens(48, batch=2, seed=4)
    full = full_bases(llama, "pre_rope")
    found = joint_search(llama, full, SnapKV(obs=4), "snapkv", x, 32, 0.25, record=(1.0, 0.5, 0.25), rank_step=4,
                         per_round=4)
    assert list(found) == [1.0, 0.5, 0.25]
    plans = [p for p, _ in found.values()]
    assert plans[0].budget(16, 4) == 1.0 and found[1.0][1]["kl"] == 0.0
    for b, (p, extra) in list(found.items())[1:]:  # the first plan at or below b (one move saves < 3.5% here)
        assert b - 0.035 < extra["budget"] == p.budget(16, 4) <= b
        with torch.no_grad():
            assert extra["kl"] == pytest.approx(LayerRunner(llama, full, SnapKV(obs=4), x, 32).kl(p), abs=1e-6)
    for hi, lo in zip(plans, plans[1:]):  # nested: every unit only goes down
        assert (lo.keep <= hi.keep).all() and (lo.rank_k <= hi.rank_k).all() and (lo.rank_v <= hi.rank_v).all()
    only_keeps = joint_search(llama, None, SnapKV(obs=4), "snapkv", x, 32, 0.5, record=(), per_round=2)
    plan = only_keeps[0.5][0]
    assert (plan.rank_k == 16).all() and plan.budget(16, 4) <= 0.5 and plan.features(None) is None


def test_a_shortlist_of_every_unit_is_the_full_search_and_a_short_one_measures_fewer(llama, monkeypatch):
    """--shortlist: a shortlist as long as the units (12 here) is the search without one (same plans, same KLs); a
    shorter one measures at most that many candidates a round after the first, and still reaches each budget."""
    x, full = tokens(48, batch=2, seed=4), full_bases(llama, "pre_rope")
    measured, kl = [], LayerRunner.kl  # candidates measured per round

    def counting(self, plan, start=0, record=False, same_context_after=None):
        if record:
            measured.append(0)
        else:
            measured[-1] += 1
        return kl(self, plan, start, record, same_context_after)
    monkeypatch.setattr(LayerRunner, "kl", counting)
    runs, per_round = {}, {}
    for n in (None, 12, 4):
        measured.clear()
        runs[n] = joint_search(llama, full, SnapKV(obs=4), "snapkv", x, 32, 0.3, (0.5,), 4, per_round=3, shortlist=n)
        per_round[n] = measured[:-1]  # the last plan is measured without candidates after it
    for b, (plan, extra) in runs[None].items():
        same = runs[12][b]
        assert same[1] == extra and all(torch.equal(getattr(same[0], f), getattr(plan, f))
                                        for f in ("rank_k", "rank_v", "keep"))
    assert per_round[None] == per_round[12] and per_round[None][0] == 12
    assert per_round[4][0] == 12 and max(per_round[4][1:]) <= 4 and len(per_round[4]) > 2
    (hi, _), (lo, extra) = runs[4].values()
    assert list(runs[4]) == [0.5, 0.3] and extra["budget"] <= 0.3
    assert (lo.keep <= hi.keep).all() and (lo.rank_k <= hi.rank_k).all() and (lo.rank_v <= hi.rank_v).all()
    with pytest.raises(KVNestError, match=re.escape("a shortlist of 2 units: pass 3 (the moves per round) to 12")):
        joint_search(llama, full, SnapKV(obs=4), "snapkv", x, 32, 0.3, per_round=3, shortlist=2)


def test_moves_that_save_no_bytes_do_not_hold_the_shortlist(monkeypatch):
    """Once every head evicts, a first rank cut saves nothing (it adds a position to every evicting pre-RoPE head's
    entries): such moves wait at the end of the shortlist, so the search still reaches its budget. The default
    model's shape and a KL that only counts bytes, with noise (the search's own arithmetic, no forward pass)."""
    from types import SimpleNamespace
    import joint

    class BytesOnly:
        def __init__(self, *args):
            pass

        def kl(self, plan, start=0, record=False, same_context_after=None):
            seed = int(plan.keep.sum() * 1000 + plan.rank_k.sum() * 7 + plan.rank_v.sum() * 13)
            return 1 - plan.budget(64, 4) + 0.01 * torch.rand(1, generator=torch.Generator().manual_seed(seed)).item()
    monkeypatch.setattr(joint, "LayerRunner", BytesOnly)
    model = SimpleNamespace(args=SimpleNamespace(n_layers=30, n_kv_heads=3, head_dim=64),
                            lm_head=SimpleNamespace(weight=torch.zeros(1)))
    found = joint.joint_search(model, SimpleNamespace(key_mode="pre_rope"), SnapKV(), "snapkv", None, 384, 0.125,
                               (0.5, 0.25), 8, 0.125, per_round=48, shortlist=96)
    assert list(found) == [0.5, 0.25, 0.125] and all(e["budget"] <= b for b, (_, e) in found.items())


def test_plans_round_trip_and_bad_plans_are_refused(llama, tmp_path):
    plan, path = some_plan(llama), tmp_path / "plan.json"
    save_plans(path, {0.5: (plan, {"kl": 0.1})}, {"model": llama.fingerprint()}, 0.5)
    back = load_plan(path, llama)
    assert all(torch.equal(getattr(back, f), getattr(plan, f)) for f in ("rank_k", "rank_v", "keep"))
    data = json.loads(path.read_text())
    for field, value, message in (("keep", [[0, 1], [1, 1]], "fractions in (0, 1]"),
                                  ("keep", [[1.5, 1], [1, 1]], "fractions in (0, 1]"),
                                  ("k", [[17, 16], [16, 16]], "whole numbers in [1, 16]"),
                                  ("policy", "nope", "names no valid policy")):
        bad = json.loads(json.dumps(data))
        (bad if field == "policy" else bad["budgets"]["0.5"])[field] = value
        path.write_text(json.dumps(bad))
        with pytest.raises(KVNestError, match=re.escape(message)):
            load_plan(path, llama)


def test_cli_joint_then_eval_generate_and_bench_take_the_plan(tiny_llama, word_text, tmp_path, capsys):
    import importlib
    from errors import run_cli
    model = ["--model", str(tiny_llama[0])]
    proj = tmp_path / "p.safetensors"
    run_cli(lambda: importlib.import_module("train").main(model + ["--data", str(word_text), "--seq-len", "32",
                                                                   "--steps", "2", "--out", str(proj), "--no-table"]))
    out = tmp_path / "plan.json"
    joint_main(model + ["--projections", str(proj), "--data", str(word_text), "--seq-len", "48", "--ctx-len", "32",
                        "--windows", "2", "--rank-step", "4", "--per-round", "8", "--budget", "0.25", "--out",
                        str(out)])
    printed = capsys.readouterr().out
    assert out.exists() and out.with_suffix(".md").exists() and out.with_suffix(".png").exists()
    assert (tmp_path / "plan_0.25.png").exists() and (tmp_path / "plan_0.5.png").exists()  # each plan's heatmap
    assert "joint plan" in printed and "eviction alone" in printed and "MatryoshkaKV alone, uniform" in printed
    eval_main(model + ["--projections", str(proj), "--plan", str(out), "--budget", "0.25", "--seq-len", "48",
                       "--ctx-len", "32", "--windows", "2", "--json"])
    result = json.loads(capsys.readouterr().out)
    assert result["method"] == "plan" and result["budget"] <= 0.25
    eval_main(model + ["--projections", str(proj), "--plan", str(out), "--budget", "0.25", "--seq-len", "48",
                       "--ctx-len", "32", "--windows", "2", "--json", "--transformers"])  # hf.py's plan=
    through = json.loads(capsys.readouterr().out)
    assert through["perplexity"] == pytest.approx(result["perplexity"], rel=1e-5)
    assert through["kl"] == pytest.approx(result["kl"], rel=1e-4, abs=1e-7)
    table = out.with_suffix(".md").read_text()
    assert f"{result['perplexity']:.3f} ({result['kl']:.4f}" in table  # the same cell as joint.py's table
    from generate import main as generate_main
    generate_main(model + ["--prompt", "w1 w2 w3 w4 w5 w6 w7 w8", "--max-new-tokens", "3", "--projections",
                           str(proj), "--plan", str(out), "--budget", "0.5"])
    from bench import main as bench_main
    bench_main(model + ["--kinds", "full", "--plan", str(out), "--budget", "0.25", "--contexts", "64", "--batches",
                        "1", "--steps", "1", "--rounds", "1", "--eager"])
    assert "| plan | 64 | 1 |" in capsys.readouterr().out
    cuts = load_plan(out, load_model(tiny_llama[0])).compressed(16)
    for flags, message in ((["--plan", str(out)] + ([] if cuts else ["--projections", str(proj)]),
                            "cuts ranks: pass the projections" if cuts else "keeps every rank"),
                           (["--plan", str(out), "--projections", str(proj), "--keep", "0.5"], "--keep is set by"),
                           (["--plan", str(out), "--projections", str(proj), "--budget", "0.3"],
                            "has no entry for budget 0.3")):
        assert message in one_line_error("eval", model + ["--seq-len", "48", "--ctx-len", "32", *flags], capsys)
