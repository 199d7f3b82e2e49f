"""Real weights: a Hugging Face model folder (config.json, model.safetensors or shards with an index) loaded into
model.py's Transformer, with no transformers at run time. What model.py does not implement, and a folder whose
files are malformed or disagree with each other, is refused in one line that names the problem."""
import hashlib
import json
from pathlib import Path

import torch

from errors import KVNestError
from model import ModelArgs, Transformer, rope_frequencies

ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM"}  # model_type -> architecture
SIZES = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size")
SCALING_KEYS = {"linear": ("factor",), "llama3": ("factor", "low_freq_factor", "high_freq_factor",
                                                  "original_max_position_embeddings")}


def read_json(path: Path, what: str):
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise KVNestError(f"{path} is not valid JSON ({e}); restore the model's {what}") from None


def args_from_hf_config(cfg: dict) -> ModelArgs:
    """Read a Hugging Face config.json dict; refuse what model.py does not implement, by name."""
    if not isinstance(cfg, dict):
        raise KVNestError(f"config.json holds a {type(cfg).__name__}, not an object; restore the model's config")
    model_type = cfg.get("model_type")
    arch = (cfg.get("architectures") or [ARCHITECTURES.get(model_type, str(model_type))])[0]
    if model_type not in ARCHITECTURES or arch not in ARCHITECTURES.values():
        raise KVNestError(f"unsupported architecture {arch!r} (model_type {model_type!r}); kvnest supports "
                          f"{', '.join(ARCHITECTURES.values())}")
    missing = [k for k in SIZES if k not in cfg]
    if missing:
        raise KVNestError(f"config.json lacks {', '.join(missing)}; is it a complete Hugging Face config?")
    for key in SIZES + ("num_key_value_heads", "head_dim", "max_position_embeddings"):
        value = cfg.get(key)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise KVNestError(f"config.json: {key}={value!r} is not a positive whole number")
    for key, ok in (("hidden_act", "silu"), ("attention_bias", False), ("mlp_bias", False),
                    ("pretraining_tp", 1)):
        if cfg.get(key, ok) != ok:
            raise KVNestError(f"unsupported config field {key}={cfg[key]!r}; kvnest supports only {key}={ok!r}")
    rope = dict(cfg.get("rope_parameters") or {})  # transformers >= 5 keeps theta and scaling here
    scaling = cfg.get("rope_scaling") or ({k: v for k, v in rope.items() if k != "rope_theta"} or None)
    if scaling is not None:
        kind = scaling.get("rope_type", scaling.get("type"))
        if kind == "default":
            scaling = None
        elif kind not in SCALING_KEYS:
            raise KVNestError(f"unsupported rope scaling {kind!r}; kvnest supports 'llama3' and 'linear'")
        else:
            lacks = [k for k in SCALING_KEYS[kind] if not isinstance(scaling.get(k), (int, float))]
            if lacks:
                raise KVNestError(f"config.json: {kind} rope scaling lacks {', '.join(lacks)}")
            scaling = dict(scaling, rope_type=kind)
    n_heads, eos = cfg["num_attention_heads"], cfg.get("eos_token_id", 2)
    return ModelArgs(
        dim=cfg["hidden_size"], n_layers=cfg["num_hidden_layers"], n_heads=n_heads,
        n_kv_heads=cfg.get("num_key_value_heads") or n_heads,
        head_dim=cfg.get("head_dim") or cfg["hidden_size"] // n_heads, hidden_dim=cfg["intermediate_size"],
        vocab_size=cfg["vocab_size"], norm_eps=cfg.get("rms_norm_eps", 1e-5),
        rope_theta=rope.get("rope_theta", cfg.get("rope_theta", 1e4)), rope_scaling=scaling,
        max_seq_len=cfg.get("max_position_embeddings", 4096), tie_embeddings=cfg.get("tie_word_embeddings", False),
        sliding_window=cfg.get("sliding_window") if model_type == "mistral" else None,
        bos_id=cfg.get("bos_token_id"), eos_ids=tuple(eos if isinstance(eos, list) else [eos]))


def weight_files(folder: Path) -> list:
    """The safetensors files of a folder: those its index names (never outside the folder), or every one."""
    index = folder / "model.safetensors.index.json"
    if not index.is_file():
        return sorted(folder.glob("*.safetensors"))
    data = read_json(index, "index")
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(f, str) for f in weight_map.values()):
        raise KVNestError(f"{index} has no weight_map of tensor names to files; restore the model's index")
    files = sorted({(folder / f).resolve() for f in weight_map.values()})
    outside = [f for f in files if folder.resolve() not in f.parents]
    if outside:
        raise KVNestError(f"{index} names {outside[0]}, outside {folder}; refusing to read files outside the folder")
    return files


def stored_tensors(folder: Path, device="cpu"):
    """(name, tensor) of every weight as stored in the folder's safetensors files."""
    from safetensors import SafetensorError, safe_open
    for file in weight_files(folder):
        try:
            with safe_open(file, framework="pt", device=str(device)) as f:
                for name in f.keys():
                    yield name, f.get_tensor(name)
        except (SafetensorError, OSError) as e:
            raise KVNestError(f"cannot read {file} ({str(e).splitlines()[0]}); the file is damaged or truncated, "
                              f"download or convert it again") from None


def tensor_digest(t: torch.Tensor) -> str:
    return hashlib.blake2b(t.cpu().contiguous().view(-1).view(torch.uint8).numpy(), digest_size=16).hexdigest()


def weights_digest(digests: dict) -> str:
    """One digest of {stored name: tensor digest}: what a checkpoint's fingerprint records of the weights."""
    return hashlib.blake2b("".join(f"{n}:{d};" for n, d in sorted(digests.items())).encode(),
                           digest_size=16).hexdigest()


def kvnest_name(hf_name: str) -> str:
    """model.layers.0.self_attn.k_proj.weight -> layers.0.attn.k_proj.weight"""
    return hf_name.removeprefix("model.").replace("self_attn.", "attn.")


def load_model(path, dtype=torch.float32, device="cpu") -> Transformer:
    """Load a Hugging Face folder (config.json + model.safetensors or shards with an index), no transformers."""
    folder = Path(path)
    if not folder.is_dir():
        raise KVNestError(f"model folder {folder} does not exist; pass --model a Hugging Face model folder")
    if not (folder / "config.json").is_file():
        raise KVNestError(f"{folder} has no config.json; pass a Hugging Face model folder")
    args = args_from_hf_config(read_json(folder / "config.json", "config.json"))
    if not weight_files(folder):
        raise KVNestError(f"{folder} has no *.safetensors weights; convert the checkpoint to safetensors first")
    state, digests = {}, {}
    for name, tensor in stored_tensors(folder, device):
        digests[name] = tensor_digest(tensor)  # of the weights as stored, whatever --dtype
        state[kvnest_name(name)] = tensor.to(dtype)
    return assemble(args, state, weights_digest(digests), str(folder))


def assemble(args: ModelArgs, state: dict, digest: str | None, source: str) -> Transformer:
    """A Transformer holding the tensors of `state` (kvnest names) themselves, no copy; refuses missing tensors
    and shapes that disagree with the config, by name."""
    if args.tie_embeddings or "lm_head.weight" not in state:
        state["lm_head.weight"] = state.get("embed_tokens.weight")
    with torch.device("meta"):
        model = Transformer(args)
    expected = model.state_dict()
    missing = sorted(k for k in expected if state.get(k) is None)
    if missing:
        raise KVNestError(f"weights in {source} lack {len(missing)} tensors (first: {missing[0]}); "
                          f"is this a complete {args.n_layers}-layer LLaMA/Mistral checkpoint?")
    wrong = [k for k, t in expected.items() if state[k].shape != t.shape]
    if wrong:
        raise KVNestError(f"{source}: {wrong[0]} has shape {tuple(state[wrong[0]].shape)} but config.json implies "
                          f"{tuple(expected[wrong[0]].shape)}; the config and the weights disagree")
    model.load_state_dict(state, strict=False, assign=True)
    model.digest = digest
    model.inv_freq = rope_frequencies(args).to(state["lm_head.weight"].device)
    return model.eval().requires_grad_(False)
