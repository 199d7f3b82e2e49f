"""bench.py measures every cache kind side by side; its byte counts are those of the cache tensors."""
import torch

from bench import bench
from model import load_model


def test_bench_rows_and_byte_ratios(tiny_llama):
    model = load_model(tiny_llama[0])
    rows = bench(model, context=64, steps=3, budget=0.5, keep=0.25)
    names = [r[0] for r in rows]
    assert names[0] == "full cache" and len(rows) == 4 and all(r[1] > 0 for r in rows)
    full = 2 * 2 * 2 * (64 + 4) * 16 * 4  # K and V, 2 layers, 2 KV heads, 68 slots, D = 16, fp32
    assert rows[0][2] == full and rows[1][2] == rows[2][2] == full // 2
    assert rows[3][2] == 2 * 2 * 2 * (16 + 4) * 16 * 4  # 16 kept context entries + room for 4 decoded per head
    x = torch.randint(0, 128, (1, 8))
    with torch.no_grad():  # bench leaves the model as it found it
        assert torch.equal(model(x), load_model(tiny_llama[0])(x))
