"""Shared fixtures: tiny random LLaMA/Mistral checkpoints written by transformers, and the real default model."""
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

TINY = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=128, max_position_embeddings=256, rms_norm_eps=1e-5)


def save_tiny(folder: Path, kind: str = "llama", tie: bool = False, seed: int = 0, **extra):
    """A random tiny model saved by transformers (safetensors); returns the transformers model for reference."""
    from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM
    cfg_cls, model_cls = {"llama": (LlamaConfig, LlamaForCausalLM),
                          "mistral": (MistralConfig, MistralForCausalLM)}[kind]
    torch.manual_seed(seed)
    cfg = cfg_cls(**dict(TINY, tie_word_embeddings=tie, **extra))
    model = model_cls(cfg).eval()
    with torch.no_grad():  # larger than the default init so that attention patterns are far from uniform
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.15)
    model.save_pretrained(folder, safe_serialization=True)
    write_word_tokenizer(folder, cfg.vocab_size)
    return model


def write_word_tokenizer(folder: Path, vocab: int) -> None:
    """A whitespace word-level tokenizer: "w0 w1 ..." are the token ids 0, 1, ..."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(vocab)}, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(folder / "tokenizer.json"))


@pytest.fixture(scope="session")
def word_text(tmp_path_factory) -> Path:
    """A .txt file of random words for the tiny models (with some repetition for the model to notice)."""
    g = torch.Generator().manual_seed(0)
    path = tmp_path_factory.mktemp("data") / "words.txt"
    ids = torch.randint(0, 128, (6000,), generator=g)
    path.write_text(" ".join(f"w{i}" for i in ids.tolist()))
    return path


def run_config(**overrides) -> dict:
    """A complete train.py run config (every run-defining flag) sized for the tiny models."""
    from train import RUN_FLAGS
    cfg = dict(method="matryoshka", key_mode="pre_rope", seq_len=32, batch=2, lr=1e-2, warmup=0.1, clip=1.0,
               kl_weight=1.0, ce_weight=0.0, rank_step=4, seed=0, steps=30, calib_windows=2, data=None, keep=0.5,
               keep_weight=10.0, ctx_len=384, protocol="after", sft=None, keeps=None, window=0, new_keep=None,
               gumbel=None, init=None, ranks=None)
    cfg.update(overrides)
    assert set(cfg) == set(RUN_FLAGS)
    return cfg


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny_llama")
    return folder, save_tiny(folder, "llama")


@pytest.fixture(scope="session")
def tiny_mistral(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny_mistral")
    return folder, save_tiny(folder, "mistral", tie=True, seed=1, sliding_window=8)


@pytest.fixture(scope="session")
def default_folder():
    from assets import default_model_folder
    return default_model_folder()


@pytest.fixture(scope="session")
def default_model(default_folder):
    from assets import Tokenizer
    from weights import load_model
    return load_model(default_folder), Tokenizer(default_folder)


@pytest.fixture(scope="session")
def reference_gguf(tmp_path_factory):
    """transformers' own load of the same GGUF: the independent reference for the default model."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from assets import fetch_gguf
    gguf = fetch_gguf(tmp_path_factory.mktemp("gguf"))
    kw = dict(gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, dtype=torch.float32, **kw).eval()
    return model, AutoTokenizer.from_pretrained(gguf.parent, **kw)
