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
              "--rank-step", "--calib-windows", "--keep", "--keep-weight", "--ctx-len", "--save-every",
              "--window", "--new-keep", "--gumbel"],
    "search": ["--budget", "--calib-windows", "--calib-len", "--step", "--min-rank", "--per-round"],
    "passkey": ["--length", "--keep", "--samples", "--budget"],
    "bench": ["--steps", "--rounds", "--budget", "--keep"],
    "retrieval": ["--samples"],
    "joint": ["--budget", "--calib-windows", "--seq-len", "--ctx-len", "--rank-step", "--keep-step", "--per-round",
              "--shortlist", "--windows"],
}
REQUIRED = {"generate": ["--prompt", "w1"], "search": ["--projections", "p.safetensors"]}
BAD = ["abc", "nan", "inf", "-1"]  # not a number, not finite, negative: refused by every numeric flag
# 0 is a meaningful value of these
ZERO_OK = {"--temperature", "--sinks", "--window", "--kl-weight", "--ce-weight", "--keep-weight", "--warmup"}


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
    ("eval", ["--transformers", "--evict-sweep"], "--transformers scores one setting, its decoded tokens all kept"),
    ("eval", ["--transformers", "--evict", "h2o", "--gate-new"], "drop --gate-new"),
    ("generate", ["--prompt", "w1", "--window", "4"], "--window acts with --evict, --evict-sweep or --plan"),
    ("generate", ["--prompt", "w1", "--evict", "h2o", "--gate-new", "--window", "4"], "needs a learned gate"),
    ("train", ["--keep", "0.3"], "--keep does not act with --method matryoshka"),
    ("train", ["--protocol", "inside"], "--protocol does not act with --method matryoshka"),
    ("train", ["--method", "gate", "--key-mode", "post_rope"], "--key-mode does not act with --method gate"),
    ("train", ["--method", "gate", "--rank-step", "4"], "--rank-step does not act with --method gate"),
    ("train", ["--seq-len", "511"], "exceeds the model's context of 256"),
    ("train", ["--kl-weight", "0"], "nothing to train on"),
    ("train", ["--warmup", "1"], "--warmup 1.0 must be in [0, 1)"),
    ("train", ["--rank-step", "17", "--seq-len", "32"], "outside [1, head_dim=16]"),
    ("train", ["--method", "gate", "--seq-len", "40", "--ctx-len", "39"], "must leave continuation tokens"),
    ("train", ["--keeps", "0.5"], "--keeps does not act with --method matryoshka"),
    ("train", ["--new-keep", "0.5"], "--new-keep does not act with --method matryoshka"),
    ("train", ["--gumbel", "0.5"], "--gumbel does not act with --method matryoshka"),
    ("train", ["--method", "gate", "--new-keep", "0.5"], "--new-keep needs --window >= 1"),
    ("train", ["--method", "gate", "--window", "4", "--new-keep", "0.5", "--sft", "p.jsonl"], "not on --sft pairs"),
    ("train", ["--method", "gate", "--window", "32", "--new-keep", "0.5", "--seq-len", "64", "--ctx-len", "40"],
     "the 24 continuation tokens of --seq-len 64 are fewer than --window 32"),
    ("train", ["--method", "gate", "--keeps", "0.25,0.5", "--keep", "0.3"], "--keep does not act with --method gate "
     "--keeps"),
    ("train", ["--method", "gate", "--keeps", "0.25,2"], "2 is outside (0, 1]"),
    ("train", ["--method", "gate", "--keeps", "0.25,"], "--keeps"),
    ("train", ["--method", "gate", "--ranks", "r.json"], "--ranks does not act with --method gate; drop it"),
    ("train", ["--ranks", "r.json", "--rank-step", "4"], "--rank-step does not act with --ranks"),
    ("train", ["--init", "p.safetensors", "--calib-windows", "4"], "--calib-windows does not act with --init"),
    ("train", ["--method", "gate", "--init", "g.safetensors"], "from a gate trained at one: give --keeps too"),
    ("train", ["--method", "gate", "--keeps", "0.25,0.5", "--init", "g.safetensors", "--window", "4", "--new-keep",
               "0.5"], "not the decoded-token head: drop --new-keep"),
    ("train", ["--data", "default:0"], "--data default:0: the weight after ':' must be a positive number"),
    ("train", ["--data", "default", "default:inf"], "the weight after ':' must be a positive number"),
    ("train", ["--data", "default", "nope.txt:2", "--seq-len", "32"], "data file nope.txt does not exist"),
    ("search", ["--projections", "p.safetensors", "--calib-len", "300"], "exceeds the model's context"),
    ("search", ["--projections", "p.safetensors", "--per-round", "8"], "would lower every rank each round"),
    ("search", ["--projections", "p.safetensors", "--start", "r.json"], "--start names ranks to refine: pass --refine"),
    ("search", ["--projections", "p.safetensors", "--refine-tries", "4"], "--refine-tries sets the swap refinement"),
    ("search", ["--projections", "p.safetensors", "--refine-check", "4"], "--refine-check checks the swap refinement"),
    ("search", ["--projections", "p.safetensors", "--start", "r.json", "--refine", "1", "--per-round", "4"],
     "--per-round sets the greedy search, which --start skips"),
    ("domains", ["--projections", "p.safetensors", "--budgets", "0.5,1"], "pass budgets below 1"),
    ("domains", ["--projections", "p.safetensors", "--seq-len", "300"], "exceeds the model's context of 256"),
    ("domains", [], "pass --projections CKPT (a python train.py checkpoint) to score, or --compare"),
    ("domains", ["--compare", "runs/a", "--texts", "x.txt"], "--model --texts would score anew: drop it"),
    ("domains", ["--column", "searched", "--projections", "p"], "--column picks what --compare shows"),
    ("passkey", ["--methods", "gate"], "unknown gate; choose from"),
    ("passkey", ["--budget", "0.5"], "pass --projections too"),
    ("passkey", ["--length", "300"], "exceeds the model's context of 256"),
    ("retrieval", ["--lengths", "100"], "pass whole numbers >= 200"),
    ("retrieval", ["--lengths", "250"], "exceed the model's context of 256"),
    ("retrieval", ["--tasks", "needle,nope"], "--tasks: unknown ['nope']"),
    ("retrieval", ["--compressions", "0.5,1"], "pass fractions in (0, 1)"),
    ("retrieval", ["--quick", "--samples", "3"],
     "--quick sets --lengths, --samples and --compressions; drop --samples"),
    ("retrieval", ["--heatmap", "--projections", "p.safetensors"], "--heatmap scores the needle"),
    ("retrieval", ["--query", "agnostic,before"], "--query: unknown ['before']; choose from agnostic, aware"),
    ("retrieval", ["--heatmap", "--query", "aware"], "query-agnostic; drop --query"),
    ("retrieval", ["--heatmap", "--fresh"], "query-agnostic; drop --fresh"),
    ("bench", ["--kinds", "full,nope"], "unknown kinds"),
    ("bench", ["--contexts", "1024,x"], "--contexts '1024,x': pass whole numbers"),
    ("bench", ["--batches", "0"], "pass whole numbers >= 1"),
    ("bench", ["--kinds", "full,plan"], "unknown kinds ['plan']"),
    ("joint", ["--policy", "gate"], "--gate is the policy of --policy gate; pass both or neither"),
    ("joint", ["--gate", "g.safetensors"], "pass both or neither"),
    ("joint", ["--ranks", "r.json"], "pass --projections too"),
    ("joint", ["--ctx-len", "600"], "must leave continuation tokens"),
    ("joint", ["--seq-len", "300", "--ctx-len", "100"], "exceeds the model's context of 256"),
    ("joint", ["--seq-len", "48", "--ctx-len", "32", "--per-round", "4"], "pass 1 to 3"),
    ("joint", ["--seq-len", "48", "--ctx-len", "32", "--budget", "0.1"], "is below 0.1250"),
    ("joint", ["--seq-len", "48", "--ctx-len", "32", "--per-round", "2", "--shortlist", "1"],
     "a shortlist of 1 units: pass 2 (the moves per round) to 4"),
    ("joint", ["--seq-len", "48", "--ctx-len", "32", "--keep-step", "1"], "keep step 1.0 in (0, 1)"),
    ("eval", ["--plan", "nope.json"], "plan nope.json does not exist; make one with `python joint.py`"),
    ("eval", ["--plan", "p.json", "--sweep"], "--plan sets each head's ranks and exact keep; drop --sweep"),
    ("eval", ["--plan", "p.json", "--evict-sweep"], "--evict-sweep is set by --plan"),
    ("generate", ["--prompt", "w1", "--plan", "p.json", "--evict", "h2o"], "--evict is set by --plan"),
    ("generate", ["--prompt", "w1", "--plan", "p.json", "--ranks", "r.json"], "--ranks is set by --plan"),
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


def write(folder, name: str, content) -> str:
    path = folder / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return str(path)


RANKS = {  # a ranks file's content: what it must say
    "not JSON": ("nope", "is not a search.py file"),
    "a list": ("[1]", "is not a search.py file"),
    "no budgets": ('{"model": {}, "target": "0.5"}', "is not a search.py file"),
    "ragged": ('{{"model": {fp}, "target": "0.5", "budgets": {{"0.5": {{"k": [[8, 8], [8]], '
               '"v": [[8, 8], [8, 8]]}}}}}}', "must each be 2 lists of 2 whole numbers"),
    "not whole": ('{{"model": {fp}, "target": "0.5", "budgets": {{"0.5": {{"k": [[8.5, 8], [8, 8]], '
                  '"v": [[8, 8], [8, 8]]}}}}}}', "must each be 2 lists of 2 whole numbers"),
    "no v": ('{{"model": {fp}, "target": "0.5", "budgets": {{"0.5": {{"k": [[8, 8], [8, 8]]}}}}}}',
             "must each be 2 lists of 2 whole numbers"),
}


@pytest.fixture(scope="module")
def projections(tiny_llama, word_text, tmp_path_factory):
    out = tmp_path_factory.mktemp("ckpt") / "p.safetensors"
    run_cli(lambda: importlib.import_module("train").main(
        ["--model", str(tiny_llama[0]), "--data", str(word_text), "--seq-len", "32", "--steps", "2", "--save-every",
         "1", "--out", str(out), "--no-table"]))
    return out


@pytest.mark.parametrize("case", list(RANKS))
def test_malformed_ranks_files_are_one_line_errors(case, tiny_llama, projections, tmp_path, capsys):
    import json
    from weights import load_model
    content, message = RANKS[case]
    fp = json.dumps(load_model(tiny_llama[0]).fingerprint())
    ranks = write(tmp_path, "r.json", content.format(fp=fp) if "{fp}" in content else content)
    err = one_line_error("eval", ["--model", str(tiny_llama[0]), "--seq-len", "32", "--projections",
                                  str(projections), "--ranks", ranks], capsys)
    assert message in err


TEXTS = {  # a --data file: what it must say
    "latin1.txt": (b"w1 w2 caf\xe9 w3", "is not UTF-8 text"),
    "binary.txt": (bytes(range(256)) * 8, "is not UTF-8 text"),
    "number.jsonl": ('{"text": 5}', "'text' string fields"),
    "list.jsonl": ("[1, 2]", "'text' string fields"),
    "words.csv": ("w1,w2", "neither .txt nor .jsonl"),
}


@pytest.mark.parametrize("name", list(TEXTS))
def test_bad_text_files_are_one_line_errors(name, tiny_llama, tmp_path, capsys):
    content, message = TEXTS[name]
    data = write(tmp_path, name, content)
    for script in ("eval", "train"):
        assert message in one_line_error(script, ["--model", str(tiny_llama[0]), "--seq-len", "32", "--data", data],
                                         capsys)


def test_bad_tokenizers_and_prompts_are_one_line_errors(tiny_llama, tmp_path, capsys):
    import shutil
    folder = tmp_path / "model"
    shutil.copytree(tiny_llama[0], folder)
    prompt = ["--prompt", b"w1 \xff".decode("utf-8", "surrogateescape")]  # what Python makes of such bytes in argv
    assert "not valid UTF-8" in one_line_error("generate", ["--model", str(folder), *prompt], capsys)
    write(folder, "tokenizer.json", '{"model": ')
    assert "is not a valid tokenizer" in one_line_error("generate", ["--model", str(folder), "--prompt", "w1"],
                                                        capsys)


EDITS = {  # how a checkpoint is edited: what --resume must say
    "a missing tensor": (lambda t, m: t.pop(sorted(k for k in t if not k.startswith("opt."))[0]), "is missing"),
    "a wrong shape": (lambda t, m: t.update({k: t[k][..., :-1] for k in ["W_k", "c"] if k in t}), "of shape"),
    "no step": (lambda t, m: m.pop("step"), "lacks a valid config, step"),
    "a step past the end": (lambda t, m: m.update(step=10**6), "lacks a valid config, step"),
    "no config": (lambda t, m: m.pop("config"), "lacks a valid config, step"),
    "no optimizer state": (lambda t, m: [t.pop(k) for k in list(t) if k.startswith("opt.")], "optimizer state"),
    "a wrong optimizer shape": (lambda t, m: t.update({k: t[k].flatten()[:3] for k in t if k.endswith("exp_avg")}),
                                "optimizer state of"),
}


@pytest.mark.parametrize("method", ["matryoshka", "gate"])
def test_edited_checkpoints_are_refused_on_resume(method, tiny_llama, word_text, tmp_path, capsys):
    import json
    from safetensors import safe_open
    from safetensors.torch import save_file
    out = tmp_path / "c.safetensors"
    argv = ["--model", str(tiny_llama[0]), "--method", method, "--data", str(word_text), "--seq-len", "40",
            "--steps", "2", "--save-every", "1", "--out", str(out), "--no-table"]
    argv += ["--ctx-len", "20"] if method == "gate" else []
    run_cli(lambda: importlib.import_module("train").main(argv))
    capsys.readouterr()
    with safe_open(out, "pt") as f:
        tensors, meta = {k: f.get_tensor(k) for k in f.keys()}, json.loads(f.metadata()["kvnest"])
    for case, (edit, message) in EDITS.items():
        t, m = dict(tensors), json.loads(json.dumps(meta))
        edit(t, m)
        save_file({k: v.contiguous() for k, v in t.items()}, out, metadata={"kvnest": json.dumps(m)})
        assert message in one_line_error("train", argv + ["--resume"], capsys), case


def test_resume_accepts_the_same_data_by_a_relative_or_an_absolute_path(tiny_llama, word_text, tmp_path,
                                                                          monkeypatch, capsys):
    out = tmp_path / "c.safetensors"
    argv = ["--model", str(tiny_llama[0]), "--seq-len", "32", "--steps", "2", "--out", str(out), "--no-table"]
    monkeypatch.chdir(word_text.parent)
    run_cli(lambda: importlib.import_module("train").main(argv + ["--data", word_text.name]))
    run_cli(lambda: importlib.import_module("train").main(argv + ["--data", str(word_text), "--resume"]))
    assert capsys.readouterr().out.count("saved") == 2


@pytest.mark.parametrize("device,message", [("foo", "is not a device name"), ("xpu", "does not run here")])
def test_devices_this_machine_lacks_are_one_line(device, message, tiny_llama, capsys):
    err = one_line_error("generate", ["--model", str(tiny_llama[0]), "--prompt", "w1", "--device", device], capsys)
    assert message in err


def test_a_dtype_the_gpu_cannot_run_is_one_line(tiny_llama, monkeypatch, capsys):
    import torch
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a GPU without bf16 (before Ampere)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: False)
    err = one_line_error("generate", ["--model", str(tiny_llama[0]), "--prompt", "w1", "--device", "cuda",
                                      "--dtype", "bfloat16"], capsys)
    assert "this GPU has no bfloat16 arithmetic; pass --dtype float16" in err
