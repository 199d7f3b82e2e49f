"""model.py against transformers on tiny random configs, cached decode against the uncached forward, bad input."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import save_tiny
from errors import KVNestError
from model import KVCache, ModelError, generate
from weights import args_from_hf_config, load_model

ROOT = Path(__file__).resolve().parents[1]


def tokens(n, batch=2, vocab=128, seed=0):
    return torch.randint(0, vocab, (batch, n), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("fixture", ["tiny_llama", "tiny_mistral"])
def test_logits_match_transformers(fixture, request):
    folder, ref = request.getfixturevalue(fixture)
    x = tokens(24)  # longer than the Mistral window of 8, so the window matters
    with torch.no_grad():
        diff = (load_model(folder)(x) - ref(x).logits).abs().max().item()
    assert diff <= 1e-4


@pytest.mark.parametrize("scaling", [{"rope_type": "linear", "factor": 4.0},
                                     {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                      "high_freq_factor": 4.0, "original_max_position_embeddings": 32}])
def test_rope_scaling_matches_transformers(tmp_path, scaling):
    ref = save_tiny(tmp_path, "llama", tie=True, rope_parameters=dict(scaling, rope_theta=10000.0))
    assert json.loads((tmp_path / "config.json").read_text())  # written by transformers itself
    x = tokens(64)
    with torch.no_grad():
        assert (load_model(tmp_path)(x) - ref(x).logits).abs().max().item() <= 1e-4


def greedy_uncached(model, prompt, n):
    x = prompt
    for _ in range(n):
        x = torch.cat([x, model(x)[:, -1].argmax(-1, keepdim=True)], dim=1)
    return x[:, prompt.shape[1]:]


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("fixture", ["tiny_llama", "tiny_mistral"])
def test_cached_greedy_decode_equals_uncached(fixture, batch, request):
    model = load_model(request.getfixturevalue(fixture)[0])
    prompt, cache = tokens(7, batch), KVCache(model, batch, 40)
    cached = torch.stack(list(generate(lambda t, p: model(t, p, cache), prompt, 24)), dim=1)
    assert torch.equal(cached, greedy_uncached(model, prompt, 24))


def test_cached_logits_equal_uncached(tiny_mistral):
    model = load_model(tiny_mistral[0])
    x = tokens(30)
    with torch.no_grad():
        full, cache = model(x), KVCache(model, 2, 30)
        steps = [model(x[:, :10], 0, cache)] + [model(x[:, i:i + 1], i, cache) for i in range(10, 30)]
    assert (torch.cat(steps, 1) - full).abs().max().item() <= 1e-5


def test_bf16_load_runs_close_to_fp32(tiny_llama):
    x = tokens(16)
    with torch.no_grad():
        a = load_model(tiny_llama[0])(x)
        b = load_model(tiny_llama[0], dtype=torch.bfloat16)(x).float()
    assert b.dtype == torch.float32 and (a - b).abs().max().item() < 0.1 * a.abs().max().item()


def test_sharded_checkpoint_with_index(tmp_path):
    ref = save_tiny(tmp_path / "full", "llama")
    ref.save_pretrained(tmp_path / "sharded", safe_serialization=True, max_shard_size="50KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    x = tokens(8)
    with torch.no_grad():
        assert torch.equal(load_model(tmp_path / "sharded")(x), load_model(tmp_path / "full")(x))


def test_missing_folder_is_a_clear_error(tmp_path):
    with pytest.raises(KVNestError, match="does not exist"):
        load_model(tmp_path / "nope")


def test_folder_without_weights_is_a_clear_error(tmp_path, tiny_llama):
    shutil.copy(tiny_llama[0] / "config.json", tmp_path)
    with pytest.raises(KVNestError, match="no \\*.safetensors weights"):
        load_model(tmp_path)


def test_truncated_safetensors_is_a_clear_error(tmp_path, tiny_llama):
    shutil.copy(tiny_llama[0] / "config.json", tmp_path)
    data = (tiny_llama[0] / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(KVNestError, match="damaged or truncated"):
        load_model(tmp_path)


def test_unsupported_architecture_and_fields_are_clear_errors():
    base = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 96,
            "vocab_size": 128}
    with pytest.raises(KVNestError, match="unsupported architecture 'GPT2LMHeadModel'"):
        args_from_hf_config(dict(base, model_type="gpt2", architectures=["GPT2LMHeadModel"]))
    with pytest.raises(KVNestError, match="attention_bias"):
        args_from_hf_config(dict(base, model_type="llama", attention_bias=True))
    with pytest.raises(KVNestError, match="config.json lacks vocab_size"):
        args_from_hf_config({k: v for k, v in base.items() if k != "vocab_size"} | {"model_type": "llama"})
    with pytest.raises(KVNestError, match="rope scaling 'yarn'"):
        args_from_hf_config(dict(base, model_type="llama", rope_scaling={"rope_type": "yarn", "factor": 2}))


def test_sequence_longer_than_cache_is_a_clear_error(tiny_llama):
    model = load_model(tiny_llama[0])
    with pytest.raises(ModelError, match="exceeds the cache of 8"):
        model(tokens(9, 1), 0, KVCache(model, 1, 8))
    with pytest.raises(ModelError, match="257 tokens exceed the model's context of 256"):
        model(tokens(257, 1))


def run_script(*args, env_extra=None):
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=600)


def test_cli_prompt_longer_than_cache_is_one_line(tiny_llama, tmp_path):
    folder = tiny_llama[0]
    r = run_script("generate.py", "--model", str(folder), "--prompt", "w1 w2 w3 w4 w5", "--max-len", "4")
    assert r.returncode == 2
    assert r.stderr.strip() == ("error: prompt of 5 tokens plus 100 new does not fit a cache of 4; raise --max-len "
                                "or shorten the prompt")
    ok = run_script("generate.py", "--model", str(folder), "--prompt", "w1 w2 w3", "--max-new-tokens", "5")
    assert ok.returncode == 0 and "tokens/s" in ok.stderr


def test_cli_missing_model_folder_is_one_line(tmp_path):
    r = run_script("generate.py", "--model", str(tmp_path / "none"), "--prompt", "hi")
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "does not exist" in r.stderr
