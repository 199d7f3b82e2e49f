"""MatryoshkaKV: exact identities, eager references, the cache's bytes, search, training and resume, bad input."""
import itertools
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import run_config
from compress import (KEY_MODES, budget_of, load_projections, load_ranks, pca_projections, save_projections,
                      uniform_ranks)
from errors import KVNestError
from model import KVCache, apply_rope, generate, rope_cos_sin
from weights import load_model
from search import greedy_search, swap_refine
from train import train_matryoshka

ROOT = Path(__file__).resolve().parents[1]


def tokens(n, batch=2, seed=0):
    return torch.randint(0, 128, (batch, n), generator=torch.Generator().manual_seed(seed))


def random_ranks(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    shape = (model.args.n_layers, model.args.n_kv_heads)
    return (torch.randint(1, model.args.head_dim + 1, shape, generator=g),
            torch.randint(1, model.args.head_dim + 1, shape, generator=g))


def trained_like(model, key_mode="post_rope", seed=0):
    """PCA projections moved away from PCA (random W and offset), as training would."""
    proj = pca_projections(model, tokens(64, 4, seed=seed), key_mode)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in (proj.W_k, proj.W_v, proj.b_v):
            p.copy_(0.1 * torch.randn(p.shape, generator=g))
    return proj


def compressed(model, x, features):
    """The model's logits over x (B, T) with a cache built with `features`."""
    return model(x, 0, KVCache(model, *x.shape, features))


@pytest.fixture
def llama(tiny_llama):
    return load_model(tiny_llama[0])


def test_bases_stay_orthogonal_after_optimizer_steps(llama):
    proj = trained_like(llama)
    opt = torch.optim.AdamW(proj.parameters(), lr=0.1)
    for _ in range(5):
        U_k, U_v = proj.bases()
        loss = (U_k[..., :3] ** 3).sum() + (U_v * torch.randn_like(U_v)).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert proj.W_k.abs().max() > 0.2  # the steps moved the parameters far from their start
    eye = torch.eye(llama.args.head_dim)
    for U in proj.bases():
        assert (U.transpose(-1, -2) @ U - eye).abs().max().item() < 1e-5


@pytest.mark.parametrize("key_mode", KEY_MODES)
def test_full_rank_reproduces_the_base_model(llama, key_mode):
    x = tokens(20)
    with torch.no_grad():
        features = trained_like(llama, key_mode).features(*uniform_ranks(llama, 1.0))
        assert (compressed(llama, x, features) - llama(x)).abs().max().item() < 1e-4


def test_reconstruction_error_never_grows_with_rank(llama):
    keys = []
    handle = llama.layers[1].attn.k_proj.register_forward_hook(lambda m, i, o: keys.append(o))
    with torch.no_grad():
        llama(tokens(40))
    handle.remove()
    B, T, _ = keys[0].shape
    k = keys[0].view(B, T, 2, 16).transpose(1, 2)  # (B, H_kv, T, D)
    for proj in (pca_projections(llama, tokens(64, 4), "pre_rope"), trained_like(llama, "pre_rope")):
        U = proj.bases()[0][1].detach()  # layer 1: (H_kv, D, D)
        errors = [((k - k @ U[:, :, :r] @ U[:, :, :r].transpose(-1, -2)) ** 2).sum().item() for r in range(17)]
        assert all(b <= a + 1e-4 for a, b in zip(errors, errors[1:])) and errors[-1] < 1e-6 * errors[0]


@pytest.mark.parametrize("budget", [1.0, 0.5, 0.25, None])
def test_cache_bytes_equal_the_budget(llama, budget):
    rank_k, rank_v = uniform_ranks(llama, budget) if budget else random_ranks(llama)
    full = 2 * 3 * 2 * 2 * 50 * 16 * 4  # K and V, batch 3, 2 layers, 2 KV heads, 50 tokens, D = 16, fp32
    achieved = KVCache(llama, 3, 50, trained_like(llama).features(rank_k, rank_v)).nbytes()
    assert KVCache(llama, 3, 50).nbytes() == full
    assert achieved == budget_of(rank_k, rank_v, 16) * full
    if budget:
        assert budget_of(rank_k, rank_v, 16) == budget


def test_attention_equals_an_eager_reference_with_a_key_mean(llama):
    """Module output against attention written out with P = U_r U_r^T, keys reconstructed as P (k - mu) + mu:
    the key-mean term mu, which the module drops, changes nothing."""
    attn = llama.layers[0].attn
    proj = trained_like(llama)
    rank_k, rank_v = random_ranks(llama, seed=3)
    x = torch.randn(2, 12, 64, generator=torch.Generator().manual_seed(1))
    cos, sin = rope_cos_sin(llama.inv_freq, torch.arange(12))
    with torch.no_grad():
        out = attn(x, 0, cos, sin, KVCache(llama, 2, 12, proj.features(rank_k, rank_v)).layers[0])
        q = apply_rope(attn.q_proj(x).view(2, 12, 4, 16).transpose(1, 2), cos, sin)
        k = apply_rope(attn.k_proj(x).view(2, 12, 2, 16).transpose(1, 2), cos, sin)
        v = attn.v_proj(x).view(2, 12, 2, 16).transpose(1, 2)
        U_k, U_v = (U[0] for U in proj.bases())
        b, mu = proj.b_v[0], 5 * torch.randn(2, 16)
        heads = []
        for h in range(4):
            g = h // 2
            P_k = U_k[g, :, : rank_k[0, g]] @ U_k[g, :, : rank_k[0, g]].T
            P_v = U_v[g, :, : rank_v[0, g]] @ U_v[g, :, : rank_v[0, g]].T
            k_hat = (k[:, g] - mu[g]) @ P_k + mu[g]
            v_hat = (v[:, g] - b[g]) @ P_v + b[g]
            s = q[:, h] @ k_hat.transpose(-1, -2) / 4 + torch.full((12, 12), -math.inf).triu(1)
            heads.append(s.softmax(-1) @ v_hat)
        ref = attn.o_proj(torch.stack(heads, 1).transpose(1, 2).reshape(2, 12, 64))
    assert (out - ref).abs().max().item() < 1e-5


@pytest.mark.parametrize("key_mode", KEY_MODES)
@pytest.mark.parametrize("fixture", ["tiny_llama", "tiny_mistral"])
def test_compressed_cache_decode_equals_uncached(fixture, key_mode, request):
    model = load_model(request.getfixturevalue(fixture)[0])
    features = trained_like(model, key_mode).features(*random_ranks(model, seed=5))
    x = tokens(26, 3)
    with torch.no_grad():
        full, cache = compressed(model, x, features), KVCache(model, 3, 40, features)
        assert (full - model(x)).abs().max().item() > 0.1  # compressed: not the base model
        steps = [model(x[:, :9], 0, cache)] + [model(x[:, i:i + 1], i, cache) for i in range(9, 26)]
        assert (torch.cat(steps, 1) - full).abs().max().item() < 1e-4
        cache = KVCache(model, 3, 40, features)
        cached = torch.stack(list(generate(lambda t, p: model(t, p, cache), x[:, :5], 20)), 1)
        y = x[:, :5]
        for _ in range(20):
            y = torch.cat([y, compressed(model, y, features)[:, -1:].argmax(-1)], 1)
    assert torch.equal(cached, y[:, 5:])


def test_search_meets_its_budgets_and_is_deterministic(llama):
    proj, calib = trained_like(llama), tokens(32, 2)
    runs = [greedy_search(llama, proj, calib, 0.25, step=2, per_round=3) for _ in range(2)]
    assert runs[0] == runs[1]
    assert sorted(runs[0]) == [0.25, 0.375, 0.5, 0.625, 0.75, 1.0]
    for b, e in runs[0].items():
        assert budget_of(torch.tensor(e["k"]), torch.tensor(e["v"]), 16) == b
    assert runs[0][0.25]["kl"] > runs[0][0.75]["kl"] > 0
    exact = greedy_search(llama, proj, calib, 0.75, step=2, per_round=1)
    assert budget_of(torch.tensor(exact[0.75]["k"]), torch.tensor(exact[0.75]["v"]), 16) == 0.75


def test_swap_refine_keeps_the_bytes_and_reaches_the_best_ranks(llama):
    """Ranks 8 or 16 on 8 units, four lowered (budget 0.75): 70 rank tables, scored by brute force on the eager
    model. Started at the worst of them, the refinement reaches the best; from the greedy's, it never loses."""
    proj, calib = trained_like(llama), tokens(32, 2)
    units = [(k, l, h) for k in "kv" for l in range(2) for h in range(2)]
    ref = llama(calib).log_softmax(-1)

    def table(lowered):
        ranks = {"k": torch.full((2, 2), 16), "v": torch.full((2, 2), 16)}
        for kind, l, h in lowered:
            ranks[kind][l, h] = 8
        return ranks

    def kl(ranks):
        with torch.no_grad():
            out = compressed(llama, calib, proj.features(ranks["k"], ranks["v"])).log_softmax(-1)
        return (ref.exp() * (ref - out)).sum(-1).mean().item()

    scored = sorted((kl(table(c)), c) for c in itertools.combinations(units, 4))
    worst = table(scored[-1][1])
    refined = swap_refine(llama, proj, calib, {"k": worst["k"].tolist(), "v": worst["v"].tolist()}, step=8,
                          min_rank=8, rounds=20)
    k, v = torch.tensor(refined["k"]), torch.tensor(refined["v"])
    assert budget_of(k, v, 16) == 0.75
    assert refined["kl"] == pytest.approx(kl({"k": k, "v": v}), rel=1e-4)
    assert refined["kl"] == pytest.approx(scored[0][0], rel=1e-4), [round(x, 5) for x, _ in scored]
    greedy = greedy_search(llama, proj, calib, 0.75, step=8, per_round=3)[0.75]
    assert swap_refine(llama, proj, calib, greedy, step=8, min_rank=8, rounds=20)["kl"] <= greedy["kl"]


def test_swap_refine_with_check_windows_keeps_only_swaps_they_agree_with(llama):
    """Checked on the calibration windows themselves, the refinement is the unchecked one, bit for bit. Checked on
    other windows, it refuses swaps the calibration alone would keep, and each KL it reports is the eager model's
    on its windows and never above the start's."""
    proj, calib, other = trained_like(llama), tokens(32, 2), tokens(32, 2, seed=5)
    greedy = greedy_search(llama, proj, calib, 0.5, step=2, per_round=7)[0.5]

    def kl(x, k, v):
        with torch.no_grad():
            ref, out = llama(x).log_softmax(-1), compressed(llama, x, proj.features(k, v)).log_softmax(-1)
        return (ref.exp() * (ref - out)).sum(-1).mean().item()

    plain = swap_refine(llama, proj, calib, greedy, step=2, min_rank=2, rounds=3)
    same = swap_refine(llama, proj, calib, greedy, step=2, min_rank=2, rounds=3, check=calib)
    assert (plain["k"], plain["v"]) != (greedy["k"], greedy["v"])  # it moved, so the identity says something
    assert (same["k"], same["v"], same["kl"], same["check_kl"]) == (plain["k"], plain["v"], plain["kl"], plain["kl"])
    checked = swap_refine(llama, proj, calib, greedy, step=2, min_rank=2, rounds=3, check=other)
    assert (checked["k"], checked["v"]) != (plain["k"], plain["v"]) and checked["kl"] > plain["kl"]
    k, v = torch.tensor(checked["k"]), torch.tensor(checked["v"])
    assert budget_of(k, v, 16) == 0.5
    assert checked["kl"] == pytest.approx(kl(calib, k, v), rel=1e-4)
    assert checked["check_kl"] == pytest.approx(kl(other, k, v), rel=1e-4)
    assert checked["start"]["check_kl"] == pytest.approx(
        kl(other, torch.tensor(greedy["k"]), torch.tensor(greedy["v"])), rel=1e-4)
    assert checked["check_kl"] < checked["start"]["check_kl"] and checked["kl"] < checked["start"]["kl"]


def kl_at_half_budget(model, proj, x, ranks=None):
    with torch.no_grad():
        ref = model(x).log_softmax(-1)
        out = compressed(model, x, proj.features(*(ranks or uniform_ranks(model, 0.5)))).log_softmax(-1)
        return (ref.exp() * (ref - out)).sum(-1).mean().item()


def test_a_few_training_steps_lower_the_loss(tiny_llama, tmp_path):
    """On text with structure to learn (a repeated passage; i.i.d. random tokens leave PCA near-optimal)."""
    model, ids = load_model(tiny_llama[0]), tokens(100, 1)[0].repeat(20)
    held_out = ids[:400].view(4, 100)[:, :32]
    before = kl_at_half_budget(model, pca_projections(model, ids[:512].view(4, 128), "pre_rope"), held_out)
    proj = train_matryoshka(model, [(ids, 1.0)], run_config(), tmp_path / "p.safetensors", {},
                            calib=ids[:512].view(4, 128))
    assert kl_at_half_budget(model, proj, held_out) < 0.9 * before


def test_fixed_ranks_fine_tune_trained_projections_for_one_plan(tiny_llama, tmp_path, monkeypatch):
    """train.py --init PROJ --ranks RANKS: the run starts from PROJ (at a vanishing lr it ends there), never draws
    ranks, and lowers the KL at the plan's ranks (half the bytes, unevenly split) below PROJ's and below what the
    same steps with ranks drawn (Matryoshka training continued from PROJ) reach there."""
    model, ids = load_model(tiny_llama[0]), tokens(100, 1)[0].repeat(20)
    held_out, calib = ids[:400].view(4, 100)[:, :32], ids[:512].view(4, 128)
    base_path, ranks_path = tmp_path / "base.safetensors", tmp_path / "ranks.json"
    base = train_matryoshka(model, [(ids, 1.0)], run_config(), base_path, {}, calib=calib)
    plan = ([[2, 14], [6, 10]], [[12, 4], [8, 8]])  # 64 of 128 rank units: a 50% budget
    ranks_path.write_text(json.dumps({"model": model.fingerprint(), "target": "0.5",
                                      "budgets": {"0.5": {"k": plan[0], "v": plan[1]}}}))
    monkeypatch.setattr("train.sample_ranks", lambda *a: pytest.fail("a --ranks run drew ranks"))
    cfg = run_config(init=str(base_path), ranks=str(ranks_path))
    still = train_matryoshka(model, [(ids, 1.0)], dict(cfg, lr=1e-12, steps=2), tmp_path / "still.safetensors", {})
    for name in ("U0_k", "U0_v", "W_k", "W_v", "b_v"):
        torch.testing.assert_close(getattr(still, name), getattr(base, name), rtol=0, atol=1e-9)
    tuned = train_matryoshka(model, [(ids, 1.0)], cfg, tmp_path / "tuned.safetensors", {})
    with pytest.raises(KVNestError, match="projects keys pre_rope; pass --key-mode pre_rope"):
        train_matryoshka(model, [(ids, 1.0)], dict(cfg, key_mode="post_rope"), tmp_path / "other.safetensors", {})
    monkeypatch.undo()
    drawn = train_matryoshka(model, [(ids, 1.0)], dict(cfg, ranks=None), tmp_path / "drawn.safetensors", {})
    kl = {name: kl_at_half_budget(model, p, held_out, tuple(torch.tensor(r) for r in plan))
          for name, p in (("base", base), ("tuned", tuned), ("drawn", drawn))}
    assert kl["tuned"] < 0.9 * kl["base"] and kl["tuned"] < kl["drawn"], kl  # drawn: the same steps, ranks drawn


def test_resume_gives_the_same_steps_as_an_uninterrupted_run(tiny_llama, tmp_path):
    ids, calib, cfg = tokens(2000, 1)[0], tokens(128, 4)[0:4], run_config(steps=6)
    whole = train_matryoshka(load_model(tiny_llama[0]), [(ids, 1.0)], cfg, tmp_path / "a.safetensors", {}, calib=calib)
    train_matryoshka(load_model(tiny_llama[0]), [(ids, 1.0)], cfg, tmp_path / "b.safetensors", {}, calib=calib,
                     stop_after=3)
    assert json.loads(__import__("safetensors").safe_open(tmp_path / "b.safetensors", "pt").metadata()["kvnest"]
                      )["step"] == 3
    resumed = train_matryoshka(load_model(tiny_llama[0]), [(ids, 1.0)], cfg, tmp_path / "b.safetensors", {},
                               resume=True)
    for name in ("W_k", "W_v", "b_v"):
        assert torch.equal(getattr(whole, name), getattr(resumed, name))
    with pytest.raises(KVNestError, match="trained with lr=0.01; pass the same flags"):
        train_matryoshka(load_model(tiny_llama[0]), [(ids, 1.0)], dict(cfg, lr=1e-3), tmp_path / "b.safetensors", {},
                         resume=True)


def test_bad_ranks_and_budgets_are_clear_errors(llama):
    proj, r = trained_like(llama), torch.full((2, 2), 8)
    with pytest.raises(KVNestError, match=r"K rank 17 is outside \[1, head_dim=16\]"):
        proj.features(r + 9, r)
    with pytest.raises(KVNestError, match=r"V rank 0 is outside"):
        proj.features(r, r * 0)
    with pytest.raises(KVNestError, match=r"shape \(3, 2\), the model needs \(2, 2\)"):
        proj.features(torch.full((3, 2), 8), r)
    for budget in (0, -0.5, 1.5):
        with pytest.raises(KVNestError, match=r"outside \(0, 1\]"):
            uniform_ranks(llama, budget)


def test_checkpoint_for_another_model_is_refused(tiny_llama, tiny_mistral, tmp_path):
    llama, mistral = load_model(tiny_llama[0]), load_model(tiny_mistral[0])
    path = tmp_path / "p.safetensors"
    save_projections(path, trained_like(llama), {"model": llama.fingerprint()})
    proj, meta, _ = load_projections(path, llama)
    assert torch.equal(proj.W_k, trained_like(llama).W_k) and meta["key_mode"] == "post_rope"
    with pytest.raises(KVNestError, match="was made for another model"):
        load_projections(path, mistral)
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(KVNestError, match="damaged"):
        load_projections(path, llama)


def test_a_checkpoint_is_refused_by_a_model_that_differs_by_small_noise(tiny_llama, tmp_path):
    """The fingerprint holds a digest of every weight as stored: the same model with noise far below the old
    checksum's 3 significant figures is another model; the same weights loaded in bf16 are the same model; a
    checkpoint written before the digest existed still loads."""
    import shutil
    from safetensors.torch import load_file, save_file
    from checkpoints import save_checkpoint
    shutil.copytree(tiny_llama[0], tmp_path / "noisy")
    weights = load_file(tmp_path / "noisy" / "model.safetensors")
    save_file({k: v + 1e-6 * torch.randn_like(v) for k, v in weights.items()}, tmp_path / "noisy" / "model.safetensors",
              metadata={"format": "pt"})
    llama, noisy = load_model(tiny_llama[0]), load_model(tmp_path / "noisy")
    assert {k: v for k, v in noisy.fingerprint().items() if k != "digest"} == \
        {k: v for k, v in llama.fingerprint().items() if k != "digest"}  # the old fingerprint could not tell
    path = tmp_path / "p.safetensors"
    proj = trained_like(llama)
    save_projections(path, proj, {"model": llama.fingerprint()})
    with pytest.raises(KVNestError, match="was made for another model"):
        load_projections(path, noisy)
    load_projections(path, load_model(tiny_llama[0], dtype=torch.bfloat16))
    old = {k: v for k, v in llama.fingerprint().items() if k != "digest"}
    save_checkpoint(tmp_path / "old.safetensors", proj.state_dict(), {"kvnest": "matryoshka", "model": old,
                                                                        "key_mode": "post_rope"})
    load_projections(tmp_path / "old.safetensors", llama)


def test_scripts_end_to_end_on_a_tiny_model(tiny_llama, word_text, tmp_path):
    """train.py -> search.py -> eval.py --sweep and generate.py --projections, as a user runs them."""
    folder, ckpt, ranks = str(tiny_llama[0]), str(tmp_path / "p.safetensors"), str(tmp_path / "ranks.json")

    def run(*args):
        r = subprocess.run([sys.executable, *args, "--model", folder], cwd=ROOT, capture_output=True, text=True,
                           timeout=600)
        assert r.returncode == 0, r.stderr[-2000:]
        return r.stdout

    common = ["--data", str(word_text)]
    run("train.py", *common, "--eval-data", str(word_text), "--steps", "4", "--seq-len", "32", "--calib-windows",
        "2", "--out", ckpt)
    run("search.py", *common, "--projections", ckpt, "--budget", "0.25", "--calib-len", "32", "--refine", "1",
        "--out", ranks)
    assert Path(ranks).with_name("ranks_0.5.png").stat().st_size > 1000
    for budget in (0.25, 0.375):  # the refined target, and the greedy's 37.5% on the way
        k, v = load_ranks(ranks, load_model(folder), budget)
        assert budget_of(k, v, 16) == budget
    target = json.loads(Path(ranks).read_text())["budgets"]["0.25"]
    assert target["kl"] <= target["start"]["kl"] and "Swap refinement at 25.0%" in Path(ranks).with_suffix(
        ".md").read_text()
    tuned = str(tmp_path / "tuned.safetensors")  # fine-tune at the 25% ranks; the closing table scores them
    table = run("train.py", *common, "--eval-data", str(word_text), "--steps", "2", "--seq-len", "32", "--init",
                ckpt, "--ranks", ranks, "--out", tuned)
    assert f"| 25.0%, {ranks} |" in table and "| start (--init) ppl (KL) |" in table
    assert load_projections(tuned, load_model(folder))[1]["config"]["ranks"] == ranks
    refined = str(tmp_path / "refined.json")  # refine the greedy's 37.5% ranks without a new search
    run("search.py", *common, "--projections", ckpt, "--budget", "0.375", "--calib-len", "32", "--refine", "1",
        "--start", ranks, "--refine-check", "2", "--out", refined)
    entry = json.loads(Path(refined).read_text())["budgets"]["0.375"]
    assert entry["check_kl"] <= entry["start"]["check_kl"] and json.loads(Path(refined).read_text())["check"] == "2 x 32"
    assert "check windows' KL" in Path(refined).with_suffix(".md").read_text()
    assert entry["start"]["k"] == k.tolist() and entry["start"]["v"] == v.tolist() and entry["kl"] <= entry[
        "start"]["kl"] == pytest.approx(json.loads(Path(ranks).read_text())["budgets"]["0.375"]["kl"], rel=1e-5)
    table = run("eval.py", *common, "--projections", ckpt, "--ranks", ranks, "--sweep", "--windows", "2",
                "--seq-len", "64", "--out-dir", str(tmp_path))
    assert "trained, searched" in table and (tmp_path / "sweep.png").stat().st_size > 1000
    result = json.loads(run("eval.py", *common, "--projections", ckpt, "--budget", "0.5", "--windows", "2",
                            "--seq-len", "64", "--json"))
    assert result["cache_ratio"] == 0.5 and result["budget"] == 0.5 and result["kl"] > 0
    assert "tokens/s" in subprocess.run([sys.executable, "generate.py", "--model", folder, "--prompt", "w1 w2",
                                         "--projections", ckpt, "--ranks", ranks, "--budget", "0.5"], cwd=ROOT,
                                        capture_output=True, text=True).stderr


@pytest.mark.parametrize("method", ["matryoshka", "gate", "gate+new", "gate+keeps"])
@pytest.mark.parametrize("device,dtype", [("cpu", "bfloat16"), ("cpu", "float16"), ("cuda", "float32"),
                                          ("cuda", "bfloat16")])
def test_train_py_runs_in_half_precision_and_on_cuda(method, device, dtype, tiny_llama, word_text, tmp_path):
    """Both methods train on a half-precision model (on CUDA in bf16 autocast too): the trained tensors stay fp32
    and finite, move off their start, and the checkpoint loads on the CPU in fp32. gate+new: with the decoded-token
    head and Gumbel-sigmoid flags; gate+keeps: one gate for every keep, with its keep input."""
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    from gate import load_gate
    from train import main as train_main
    out = tmp_path / "c.safetensors"
    argv = ["--model", str(tiny_llama[0]), "--method", method.split("+")[0], "--data", str(word_text), "--seq-len",
            "40", "--steps", "4", "--lr", "0.01", "--device", device, "--dtype", dtype, "--out", str(out), "--no-table"]
    extra = {"matryoshka": [], "gate": ["--ctx-len", "20"],
             "gate+new": ["--ctx-len", "20", "--window", "4", "--new-keep", "0.3", "--gumbel", "0.5"],
             "gate+keeps": ["--ctx-len", "20", "--keeps", "0.25,0.75"]}[method]
    train_main(argv + extra)
    model = load_model(tiny_llama[0])
    trained = load_projections(out, model)[0] if method == "matryoshka" else load_gate(out, model)[0]
    names = {"matryoshka": ["W_k", "W_v"], "gate": ["u", "c"], "gate+new": ["u", "u_new"],
             "gate+keeps": ["u", "u_keep", "w_keep"]}[method]  # W, u: 0 at start
    for name in names:
        p = getattr(trained, name)
        assert p.dtype == torch.float32 and torch.isfinite(p).all() and p.abs().max() > 0, name
