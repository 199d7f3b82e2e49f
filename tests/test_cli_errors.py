"""Every script either works or says why in one line: a table of bad values for every numeric flag, and of flag
combinations that must be refused (a flag with no effect is an error, never silently ignored). Each case runs the
script's main under the CLI wrapper and must end in exit status 2 with exactly one line, `error: ...`."""
import importlib

import pytest

from errors import run_cli

NUMERIC = {  # script: flags that take a number
    "generate": ["--max-new-tokens", "--temperature", "--max-len", "--budget", "--keep"],
    "eval": ["--windows", "--seq-len", "--budget", "--keep", "--ctx-len", "--sinks", "--window"],
    "train": ["--steps", "--batch", "--seq-len", "--lr", "--warmup", "--clip", "--kl-weight", "--ce-weight",
              "--rank-step", "--calib-windows", "--keep", "--keep-weight", "--ctx-len", "--save-every"],
    "search": ["--budget", "--calib-windows", "--calib-len", "--step", "--min-rank", "--per-round"],
    "passkey": ["--length", "--keep", "--samples", "--budget"],
    "bench": ["--steps", "--rounds", "--budget", "--keep"],
}
REQUIRED = {"generate": ["--prompt", "w1"], "search": ["--projections", "p.safetensors"]}
BAD = ["abc", "nan", "inf", "-1"]  # not a number, not finite, negative: refused by every numeric flag
ZERO_OK = {"--temperature", "--sinks", "--window", "--kl-weight", "--ce-weight", "--keep-weight", "--warmup"}  # 0 is a meaningful value of these


def one_line_error(script: str, argv: list, capsys) -> str:
    main = importlib.import_module(script).main
    with pytest.raises(SystemExit) as exit_:
        run_cli(lambda: main(argv))
    err = capsys.readouterr().err
    assert exit_.value.code == 2, err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    return err


CASES = [(script, flag, value) for script, flags in NUMERIC.items() for flag in flags
         for value in BAD + ([] if flag in ZERO_OK else ["0"])]


@pytest.mark.parametrize("script,flag,value", CASES, ids=[f"{s}{f}={v}" for s, f, v in CASES])
def test_bad_numeric_values_are_one_line_errors(script, flag, value, tiny_llama, capsys):
    argv = ["--model", str(tiny_llama[0]), *REQUIRED.get(script, []), f"{flag}={value}"]
    assert flag in one_line_error(script, argv, capsys)


COMBINATIONS = [  # (script, flags, what the error says)
    ("generate", ["--prompt", "w1", "--budget", "0.5"], "pass --projections too"),
    ("generate", ["--prompt", "w1", "--ranks", "r.json"], "pass --projections too"),
    ("generate", ["--prompt", "w1", "--keep", "0.5"], "act with --evict"),
    ("generate", ["--prompt", "w1", "--gate", "g.safetensors"], "act with --evict"),
    ("generate", ["--prompt", "w1", "--evict", "h2o", "--gate", "g.safetensors"], "policy of --evict gate"),
    ("generate", ["--prompt", "w1", "--evict", "gate"], "--evict gate needs --gate"),
    ("generate", ["--prompt", "w1", "--evict", "nope"], "invalid choice"),
    ("generate", ["--prompt", ""], "the prompt is empty"),
    ("eval", ["--keep", "0.5"], "act with --evict"),
    ("eval", ["--sinks", "4"], "--sinks acts with --evict"),
    ("eval", ["--protocol", "inside"], "--protocol acts with --evict"),
    ("eval", ["--gate-new"], "--gate-new acts with --evict"),
    ("eval", ["--evict", "h2o", "--gate-new"], "--gate-new acts with the gate"),
    ("eval", ["--evict", "h2o", "--gate-threshold"], "--gate-threshold acts with the gate"),
    ("eval", ["--evict-sweep", "--evict", "h2o"], "drop --evict and --keep"),
    ("eval", ["--evict-sweep", "--keep", "0.5"], "drop --evict and --keep"),
    ("eval", ["--sweep"], "--sweep scores --projections"),
    ("eval", ["--evict", "h2o", "--ctx-len", "600"], "leaves no continuation"),
    ("eval", ["--seq-len", "300"], "--seq-len 300 exceeds the model's context of 256"),
    ("train", ["--keep", "0.3"], "--keep does not act with --method matryoshka"),
    ("train", ["--protocol", "inside"], "--protocol does not act with --method matryoshka"),
    ("train", ["--method", "gate", "--key-mode", "post_rope"], "--key-mode does not act with --method gate"),
    ("train", ["--method", "gate", "--rank-step", "4"], "--rank-step does not act with --method gate"),
    ("train", ["--seq-len", "511"], "exceeds the model's context of 256"),
    ("train", ["--kl-weight", "0"], "nothing to train on"),
    ("train", ["--warmup", "1"], "--warmup 1.0 must be in [0, 1)"),
    ("train", ["--rank-step", "17", "--seq-len", "32"], "outside [1, head_dim=16]"),
    ("train", ["--method", "gate", "--seq-len", "40", "--ctx-len", "39"], "must leave continuation tokens"),
    ("search", ["--projections", "p.safetensors", "--calib-len", "300"], "exceeds the model's context"),
    ("passkey", ["--methods", "gate"], "unknown gate; choose from"),
    ("passkey", ["--budget", "0.5"], "pass --projections too"),
    ("passkey", ["--length", "300"], "exceeds the model's context of 256"),
    ("bench", ["--kinds", "full,nope"], "unknown kinds"),
    ("bench", ["--contexts", "1024,x"], "--contexts '1024,x': pass whole numbers"),
    ("bench", ["--batches", "0"], "pass whole numbers >= 1"),
]


@pytest.mark.parametrize("script,flags,message", COMBINATIONS, ids=[f"{s} {' '.join(f)}" for s, f, _ in COMBINATIONS])
def test_refused_combinations_are_one_line_errors(script, flags, message, tiny_llama, capsys):
    import re
    fits = {"eval": ["--seq-len", "64"], "passkey": ["--length", "200"]}.get(script, [])  # the model's context: 256
    err = one_line_error(script, ["--model", str(tiny_llama[0]), *fits, *flags], capsys)
    assert re.search(message if "|" in message else re.escape(message), err), err


def test_missing_cuda_is_one_line(tiny_llama, capsys):
    import torch
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    err = one_line_error("generate", ["--model", str(tiny_llama[0]), "--prompt", "w1", "--device", "cuda"], capsys)
    assert "no CUDA GPU; pass --device cpu" in err
