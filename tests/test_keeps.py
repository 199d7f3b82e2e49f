"""One gate for every keep (train.py --keeps, --init): the keep input's knots, their interpolation, training only
the per-keep offsets from a gate trained at one keep, and the checkpoint field that records the knots."""
import json

import pytest
import torch
from safetensors import safe_open

from checkpoints import save_checkpoint
from errors import KVNestError
from eval import score_eviction
from gate import Gate, calibrate_gate, load_gate, save_gate
from test_gate import gate_cfg, tokens
from train import train_gate
from weights import load_model

KNOTS = (0.125, 0.25, 0.5, 0.75)


def test_knot_weights_are_piecewise_linear_in_log2_keep():
    g = Gate(2, 2, 8, keeps=KNOTS)
    for i, k in enumerate(KNOTS):
        assert g.knot_weights(k).tolist() == [float(j == i) for j in range(4)]
    a = g.knot_weights(2 ** -2.5)  # halfway between 0.125 and 0.25 in log2
    assert torch.allclose(a, torch.tensor([0.5, 0.5, 0.0, 0.0]))
    assert g.knot_weights(0.01).tolist() == [1.0, 0, 0, 0] and g.knot_weights(1.0).tolist() == [0, 0, 0, 1.0]
    per_head = g.knot_weights(torch.tensor([0.5, 2 ** -2.5]))  # (H_kv, K)
    assert torch.allclose(per_head, torch.stack([g.knot_weights(0.5), a]))


def plain_gate(g, weights):
    """A gate without a keep input whose w, u, c are g's shared ones plus its offsets weighed by `weights` (K,)."""
    p = Gate(2, 2, 64)
    p.load_state_dict({k: v for k, v in g.state_dict().items() if not k.endswith("_keep")})
    with torch.no_grad():
        for name in ("w", "u", "c"):
            getattr(p, name).add_(torch.einsum("k,k...->...", weights, getattr(g, name + "_keep")))
    return p


def test_a_gate_with_knots_scores_as_the_plain_gate_of_its_interpolated_weights(tiny_llama):
    model = load_model(tiny_llama[0])
    g = Gate(2, 2, 64, keeps=KNOTS)
    with torch.no_grad():
        for name in ("w_keep", "u_keep", "c_keep"):
            getattr(g, name).normal_(generator=torch.Generator().manual_seed(len(name)))
    h = model.layers[1].input_layernorm(model.embed_tokens(tokens(40)))
    q, _, k, _ = model.layers[1].attn.qkv(h, *model.rope(0, 40, h.dtype))
    for keep, weights in ((0.25, [0, 1.0, 0, 0]), (0.6, g.knot_weights(0.6).tolist())):
        ref = plain_gate(g, torch.tensor(weights)).score(1, h, q, k, keep)  # (B, H_kv, T)
        assert torch.allclose(g.score(1, h, q, k, keep), ref, atol=1e-5)
    z = g.score(1, h, q, k, torch.tensor([0.25, 0.75]))  # a joint plan's per-head keeps
    assert torch.allclose(z[:, 0], g.score(1, h, q, k, 0.25)[:, 0], atol=1e-5)
    assert torch.allclose(z[:, 1], g.score(1, h, q, k, 0.75)[:, 1], atol=1e-5)
    assert not torch.allclose(z[:, 1], g.score(1, h, q, k, 0.25)[:, 1], atol=1e-3)


def test_init_trains_only_the_offsets_and_improves_at_each_keep(tiny_llama, tmp_path):
    """--init: start from a gate trained at 50% keep; the shared weights stay as they were, the step-0 gate is
    that gate at every keep (zero offsets), and training the offsets lowers the KL at each trained keep; the run
    resumes exactly."""
    ids = tokens(100, 1)[0].repeat(20)
    held_out = ids[7:487].view(10, 48)
    model = load_model(tiny_llama[0])
    base = Gate(2, 2, 64)
    calibrate_gate(model, base, ids[:94].view(2, 47)[:, :32], 0.5)
    save_gate(tmp_path / "base.safetensors", base, {"model": model.fingerprint()})
    cfg = gate_cfg(keeps=[0.25, 0.75], init=str(tmp_path / "base.safetensors"))
    start = train_gate(model, [(ids, 1.0)], dict(cfg, steps=0), tmp_path / "s.safetensors", {})
    gate = train_gate(model, [(ids, 1.0)], cfg, tmp_path / "k.safetensors", {})
    for name, p in base.named_parameters():
        assert torch.equal(p, getattr(gate, name)), name
    assert gate.w_keep.abs().sum() > 0 and gate.c_keep.abs().sum() > 0
    for keep, gain in ((0.25, 0.9), (0.75, 0.6)):  # measured: 0.676 -> 0.587 and 0.209 -> 0.111
        kl = [score_eviction(model, held_out, g, keep, 32, exact=True)["kl"] for g in (base, start, gate)]
        assert kl[0] == kl[1] and kl[2] < gain * kl[0], (keep, kl)
    loaded = load_gate(tmp_path / "k.safetensors", model)[0]
    assert loaded.keeps == (0.25, 0.75) and torch.equal(loaded.u_keep, gate.u_keep)
    train_gate(load_model(tiny_llama[0]), [(ids, 1.0)], cfg, tmp_path / "r.safetensors", {}, stop_after=12)
    resumed = train_gate(load_model(tiny_llama[0]), [(ids, 1.0)], cfg, tmp_path / "r.safetensors", {}, resume=True)
    for name, p in gate.named_parameters():
        assert torch.equal(p, getattr(resumed, name)), name
    with pytest.raises(KVNestError, match="already has a keep input; start from a gate trained at one keep"):
        train_gate(model, [(ids, 1.0)], dict(cfg, init=str(tmp_path / "k.safetensors")), tmp_path / "x", {})


@pytest.mark.parametrize("keeps", [[0.5, 0.25], [2.0], "0.5", [1]])
def test_a_damaged_keeps_field_is_a_clear_error(tiny_llama, tmp_path, keeps):
    model = load_model(tiny_llama[0])
    save_gate(tmp_path / "g.safetensors", Gate(2, 2, 64, keeps=(0.25, 0.5)), {"model": model.fingerprint()})
    with safe_open(tmp_path / "g.safetensors", "pt") as f:
        meta = json.loads(f.metadata()["kvnest"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    save_checkpoint(tmp_path / "bad.safetensors", tensors, dict(meta, keeps=keeps))
    with pytest.raises(KVNestError, match="gate field keeps=.* is not valid; the checkpoint is damaged"):
        load_gate(tmp_path / "bad.safetensors", model)

