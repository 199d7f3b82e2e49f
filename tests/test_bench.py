"""bench.py measures every cache kind side by side; its byte counts are those of the cache tensors."""
import sys

import pytest
import torch

from bench import KINDS, bench, bytes_per_token_of, capacity, peer_model, table
from errors import KVNestError
from weights import load_model


def test_bench_rows_bytes_and_capacity(tiny_llama):
    model = load_model(tiny_llama[0])
    per_token = bytes_per_token_of(model, 0.5, 0.25)
    rows = bench(model, contexts=[64], batches=[1, 2], steps=2, budget=0.5, keep=0.25, per_token=per_token,
                 compile=False, rounds=2)
    assert [(r["kind"], r["batch"]) for r in rows] == [(k, b) for b in (1, 2) for k in KINDS]
    assert all(r["fits"] and 0 < r["step_s"] <= r["slowest_s"] and r["peak_bytes"] > 0 for r in rows)
    by = {(r["kind"], r["batch"]): r for r in rows}
    slots = 64 + 4  # context + room for the 2 + 2 decoded tokens
    per_slot = 2 * 2 * 2 * 16 * 4  # K and V, 2 layers, 2 KV heads, D = 16, fp32
    for b in (1, 2):
        assert by["full", b]["kv_bytes"] == b * slots * per_slot
        assert by["matryoshka", b]["kv_bytes"] == by["matryoshka-pre", b]["kv_bytes"] == b * slots * per_slot // 2
        assert by["eviction", b]["kv_bytes"] == b * (16 + 4) * per_slot  # 16 of 64 context entries kept
        assert by["both", b]["kv_bytes"] == b * (16 + 4) * per_slot // 2
        positions = b * (16 + 4) * 2 * 2 * 8  # pre-RoPE keys after eviction: an int64 position per slot and head
        assert by["both-pre", b]["kv_bytes"] == b * (16 + 4) * per_slot // 2 + positions
        assert by["full", b]["read_bytes"] == by["full", b]["kv_bytes"]  # a step reads its whole buffers
    assert table(rows, torch.device("cpu")).count("\n") == len(rows) + 1
    cap = capacity(per_token, [1, 4], torch.device("cpu"))
    assert cap["full"][1] // 4 - cap["full"][4] <= 1
    for kind, gain in (("matryoshka", 2), ("eviction", 4), ("both", 8)):
        assert abs(cap[kind][1] / cap["full"][1] - gain) < 1e-3
    x = torch.randint(0, 128, (1, 8))
    with torch.no_grad():  # bench leaves the model as it found it
        assert torch.equal(model(x), load_model(tiny_llama[0])(x))


def test_filled_caches_decode_like_prefilled_ones(tiny_llama):
    """bench's random caches are caches as a prefill leaves them: decoding from one equals the uncached forward over
    the same entries (here: a full cache filled with the entries of a real prefill)."""
    from bench import filled_cache
    from model import KVCache
    model = load_model(tiny_llama[0])
    x = torch.randint(0, 128, (2, 12))
    cache, real = filled_cache(model, "full", 2, 11, 1, 1.0, 1.0), KVCache(model, 2, 12)
    with torch.no_grad():
        model(x[:, :11], 0, real)
        for mine, theirs in zip(cache.layers, real.layers):
            mine.groups[0].k.copy_(theirs.groups[0].k)
            mine.groups[0].v.copy_(theirs.groups[0].v)
        assert cache.layers[0].groups[0].length.tolist() == [[11, 11], [11, 11]]
        assert (model(x[:, 11:], 11, cache) - model(x)[:, 11:]).abs().max() < 1e-5


def test_the_peer_row_is_transformers_decode_with_the_same_cache_bytes(tiny_llama):
    """--peer: transformers' own decode of the same model, timed in the same run; its StaticCache holds what
    kvnest's full cache holds."""
    from bench import PEER
    model = load_model(tiny_llama[0])
    per_token = bytes_per_token_of(model, 0.5, 0.5, ["full"])
    per_token[PEER] = per_token["full"]
    rows = bench(model, contexts=[64], batches=[2], steps=2, budget=0.5, keep=0.5, per_token=per_token,
                 compile=False, rounds=1, peer=peer_model(model, str(tiny_llama[0])))
    full, peer = rows
    assert peer["kind"] == PEER and peer["fits"] and peer["step_s"] > 0
    assert peer["kv_bytes"] == full["kv_bytes"] == 2 * (64 + 4) * 2 * 2 * 2 * 16 * 4


def test_the_peer_without_transformers_is_one_line(tiny_llama, monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)  # as if it were not installed
    with pytest.raises(KVNestError, match="--peer needs transformers: pip install 'transformers>=5,<5.25'"):
        peer_model(load_model(tiny_llama[0]), str(tiny_llama[0]))
