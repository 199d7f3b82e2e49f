"""haystack.py and retrieval.py: the generators are deterministic and their answers are right (read back from the
generated text), the scoring is exact on hand-made answers, the shared prefill equals evicting each method on its
own, and the suite runs end to end on a tiny model and resumes from its sample log."""
import re
from collections import Counter

import pytest
import torch

from haystack import TASKS, build, prompt, score
from retrieval import answer_all, main as retrieval_main


def parsed_answers(task: str, s) -> list:
    """The answers, read back from the context text alone."""
    pairs = re.findall(r"special magic numbers for (\w+) is: (\d+)\.", s.context)
    key = re.search(r"for (\w+) mentioned", s.question).group(1) if "magic" in s.question else None
    if task in ("needle", "needle_text", "multikey", "multivalue"):
        return [v for k, v in pairs if k == key]
    if task == "vartrack":
        value = re.search(r"the value (\d+)", s.question).group(1)
        holds = {}
        for name, src in re.findall(r"VAR (\w+) = (\w+)\.", s.context):
            holds[name] = src if src.isdigit() else holds.get(src)
        return [n for n, v in holds.items() if v == value]
    counts = Counter(re.findall(r"\d+\. (\w+)", s.context)).most_common()
    assert counts[9][1] > counts[10][1]  # ten words stand out
    return [w for w, _ in counts[:10]]


@pytest.mark.parametrize("task", TASKS)
def test_generators_are_deterministic_and_their_answers_right(task, default_model):
    tok = default_model[1]
    for length in (512, 2048):
        s = build(task, tok, length, seed=7)
        assert s == build(task, tok, length, seed=7) and s != build(task, tok, length, seed=8)
        assert sorted(parsed_answers(task, s)) == sorted(s.answers)
        n = sum(len(part) for part in prompt(tok, s))
        assert abs(n - length) <= 0.06 * length, n
    if task in ("needle", "needle_text"):  # the needle sits at the asked depth
        for depth in (0.0, 0.5, 1.0):
            s = build(task, tok, 2048, 0, depth=depth)
            parts = s.context.split(". ")
            at = next(i for i, p in enumerate(parts) if "special magic" in p) / (len(parts) - 1)
            assert abs(at - depth) < 0.05, (depth, at)


def test_build_refuses_an_unknown_task_and_too_short_a_length(default_model):
    from errors import KVNestError
    with pytest.raises(KVNestError, match="unknown task 'nope'; choose from needle, needle_text"):
        build("nope", default_model[1], 1024, 0)
    with pytest.raises(KVNestError, match="length 60 is too short for a retrieval prompt; use at least 200 tokens"):
        build("needle", default_model[1], 60, 0)


def test_scoring_is_the_fraction_of_expected_strings_found():
    assert score(" 1234567.", ["1234567"]) == 1.0
    assert score("The number is 123456", ["1234567"]) == 0.0
    assert score("ABCDE, fghij and KLMNO", ["ABCDE", "FGHIJ", "klmno", "PQRST"]) == 0.75
    assert score("", ["x"]) == 0.0


def test_the_shared_prefill_equals_each_method_alone(tiny_llama):
    """answer_all prefills once for all policies and evicts a copy per method; passkey.retrieve (evict.prefill
    through kernels.Decoder, the question read one token at a time) is the independent reference."""
    from assets import Tokenizer
    from compress import uniform_ranks
    from evict import H2O, SnapKV, StreamingLLM
    from passkey import retrieve
    from test_compress import trained_like
    from weights import load_model
    model, tok = load_model(tiny_llama[0]), Tokenizer(tiny_llama[0])
    features = trained_like(model, "pre_rope").features(*uniform_ranks(model, 0.5))
    runs = {"full": (None, None, 1.0), "snapkv": (None, SnapKV(), 0.5), "h2o": (None, H2O(), 0.25),
            "streaming": (None, StreamingLLM(), 0.5), "matryoshka": (features, None, 1.0),
            "both": (features, SnapKV(), 0.5)}
    g = torch.Generator().manual_seed(0)
    words = lambda n: " ".join(f"w{i}" for i in torch.randint(1, 128, (n,), generator=g).tolist())  # noqa: E731
    sample = type(build("needle", tok, 200, 0))(words(150), words(6), words(3), ["never"])  # decode all 8
    got = answer_all(model, tok, sample, runs, aware=False, max_new=8)
    doc, question = prompt(tok, sample)
    for name, (f, policy, keep) in runs.items():
        ref = retrieve(model, tok, doc, question, policy, keep, f, new_tokens=8).split()
        stop = f"w{model.args.eos_ids[0]}"  # answer_all stops at the end of sequence, retrieve does not
        assert got[name].split() == (ref[: ref.index(stop) + 1] if stop in ref else ref), name


def test_the_suite_runs_end_to_end_on_a_tiny_model(tiny_llama, tmp_path, capsys):
    retrieval_main(["--model", str(tiny_llama[0]), "--lengths", "200", "--samples", "1", "--compressions", "0.5",
                    "--methods", "snapkv,streaming", "--tasks", "needle,multikey", "--out-dir", str(tmp_path)])
    text = capsys.readouterr().out
    assert "200 tokens, query-agnostic" in text and "200 tokens, query-aware" in text
    assert "| snapkv 50.0% |" in text and "| full |" in text
    assert (tmp_path / "retrieval.md").is_file() and (tmp_path / "retrieval_200_aware.png").is_file()


def test_an_interrupted_run_resumes_from_its_sample_log(tiny_llama, tmp_path, monkeypatch):
    """Every sample's scores are logged as they come, one log per setting; a rerun reads them back (decoding only
    what is missing), a line cut short is decoded again, and the tables equal one uninterrupted run's."""
    import retrieval
    from errors import KVNestError
    flags = ["--model", str(tiny_llama[0]), "--lengths", "200", "--compressions", "0.5", "--tasks",
             "needle,multikey", "--query", "agnostic", "--methods", "snapkv"]
    retrieval_main(flags + ["--samples", "2", "--out-dir", str(tmp_path / "once")])
    decoded = []
    real = retrieval.answer_all
    monkeypatch.setattr(retrieval, "answer_all", lambda *a, **k: decoded.append(a[2].answers) or real(*a, **k))
    out = tmp_path / "twice"
    retrieval_main(flags + ["--samples", "1", "--out-dir", str(out)])
    [log] = out.glob("retrieval_*.jsonl")
    log.write_text(log.read_text()[:-20])  # the last sample's line cut short, as by a kill during the write
    decoded.clear()
    retrieval_main(flags + ["--samples", "2", "--out-dir", str(out)])
    assert len(decoded) == 3  # multikey's sample 0 (cut short) and both tasks' sample 1; needle's sample 0 read
    assert len(log.read_text().splitlines()) == 1 + 4
    assert (out / "retrieval.json").read_text() == (tmp_path / "once" / "retrieval.json").read_text()
    retrieval_main(flags[:-1] + ["h2o", "--samples", "1", "--out-dir", str(out)])  # other runs: a log of its own
    assert len(list(out.glob("retrieval_*.jsonl"))) == 2 and len(log.read_text().splitlines()) == 1 + 4
    import haystack
    made = haystack.MAX_NEW
    monkeypatch.setattr(haystack, "MAX_NEW", dict(made, needle=13))  # samples made another way: not read back
    retrieval_main(flags + ["--samples", "1", "--out-dir", str(out)])
    assert len(list(out.glob("retrieval_*.jsonl"))) == 3 and len(log.read_text().splitlines()) == 1 + 4
    monkeypatch.setattr(haystack, "MAX_NEW", made)
    decoded.clear()
    retrieval_main(flags + ["--samples", "1", "--out-dir", str(out), "--fresh"])
    assert len(decoded) == 2 and len(log.read_text().splitlines()) == 1 + 2
    log.write_text("not json\n")
    with pytest.raises(KVNestError, match="is not a sample log of these settings; pass --fresh to replace it"):
        retrieval_main(flags + ["--samples", "1", "--out-dir", str(out)])
