"""Training text: several sources mixed by weight (train.py --data FILE:WEIGHT ...), and corpus.py's text of other
kinds gathered from installed packages."""
import pytest
import torch

from assets import data_weight, load_mix, load_text, mixed_windows
from corpus import LICENCE_FILE, MIN_CHARS, docstrings, installed_with, licences, sample
from distill import sample_batch
from errors import KVNestError
from train import check_resume, same_file


def test_one_source_draws_the_windows_it_always_drew():
    """A single text samples exactly as before the mix existed, so earlier runs and resumes are unchanged."""
    ids = torch.arange(1000)
    got = sample_batch([(ids, 1.0)], 4, 16, torch.Generator().manual_seed(3))
    starts = torch.randint(0, 1000 - 17, (4,), generator=torch.Generator().manual_seed(3))
    assert torch.equal(got, torch.stack([ids[s: s + 17] for s in starts.tolist()]))


def test_windows_come_from_each_source_in_proportion_to_its_weight():
    a, b = torch.full((300,), 1), torch.arange(1000, 1400)  # a: all 1s; b: distinct tokens
    x = sample_batch([(a, 3.0), (b, 1.0)], 2000, 16, torch.Generator().manual_seed(0))
    from_a = (x == 1).all(1)
    assert ((x >= 1000).all(1) | from_a).all()  # each window lies within one source
    assert abs(from_a.float().mean().item() - 0.75) < 0.03
    assert ((x[~from_a, 1:] - x[~from_a, :-1]) == 1).all()  # contiguous windows of b


def test_a_source_too_short_for_a_window_is_named():
    with pytest.raises(KVNestError, match="training text has 10 tokens, too few for windows of 16"):
        sample_batch([(torch.arange(100), 1.0), (torch.arange(10), 1.0)], 2, 16, torch.Generator())


def test_data_specs_parse_weights_and_refuse_bad_ones(tmp_path):
    assert data_weight("a.txt:2") == ("a.txt", 2.0)
    assert data_weight("a.txt") == ("a.txt", 1.0)
    assert data_weight(r"C:\data\a.txt") == (r"C:\data\a.txt", 1.0)
    for bad in ("a.txt:0", "a.txt:-1", "a.txt:nan", "a.txt:inf", ":2"):
        with pytest.raises(KVNestError, match="must be a positive number"):
            data_weight(bad)
    (tmp_path / "t.txt").write_text("hello there")
    mix = load_mix(["default:2", f"{tmp_path / 't.txt'}:0.5"], "train")
    assert mix == [(load_text(None, "train"), 2.0), ("hello there", 0.5)]
    assert load_mix(None, "eval") == [(load_text(None, "eval"), 1.0)]


def test_calibration_windows_are_shared_by_weight_at_least_one_each():
    a, b = torch.zeros(10_000, dtype=torch.long), torch.ones(10_000, dtype=torch.long)
    w = mixed_windows([(a, 3.0), (b, 1.0)], 64, 8)
    assert w.shape == (8, 64) and int(w[:, 0].sum()) == 2  # 6 windows of a, 2 of b
    assert mixed_windows([(a, 100.0), (b, 1.0)], 64, 1)[:, 0].tolist() == [0, 1]


def test_windows_after_skip_follow_the_first_ones_without_overlap():
    a, b = torch.arange(1000), torch.arange(1000, 1600)  # 15 and 9 windows of 64 tokens
    first, after = mixed_windows([(a, 2.0), (b, 1.0)], 64, 3), mixed_windows([(a, 2.0), (b, 1.0)], 64, 6, skip=3)
    assert first[:, 0].tolist() == [0, 64, 1000] and after[:, 0].tolist() == [128, 192, 256, 320, 1064, 1128]
    assert not set(first.flatten().tolist()) & set(after.flatten().tolist())
    with pytest.raises(KVNestError, match="too few for 10 windows of 64"):
        mixed_windows([(a, 1.0), (b, 1.0)], 64, 2, skip=18)  # b: 9 skipped + 1 > its 9 windows


def test_resume_accepts_the_same_mix_by_other_paths_and_refuses_another(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rel, absolute = ["a.txt:2", "default"], [f"{tmp_path / 'a.txt'}:2", "default"]
    assert same_file(rel, absolute) == absolute
    assert same_file(rel, [f"{tmp_path / 'a.txt'}:3", "default"]) == rel
    cfg = {k: None for k in ("data", "sft")}
    cfg.update(steps=5, data=absolute)
    from train import RUN_FLAGS
    full = {k: cfg.get(k) for k in RUN_FLAGS}
    assert check_resume(tmp_path / "c", {"config": dict(full, data=rel), "step": 0}, full, {}) == 0
    with pytest.raises(KVNestError, match="trained with data="):
        check_resume(tmp_path / "c", {"config": dict(full, data=["a.txt:3", "default"]), "step": 0}, full, {})


def test_docstrings_are_gathered_whole_deduplicated_and_outside_tests(tmp_path):
    long = " ".join(["Explain the thing."] * 20)  # above MIN_CHARS
    assert len(long) >= MIN_CHARS
    (tmp_path / "pkg" / "tests").mkdir(parents=True)
    (tmp_path / "pkg" / "mod.py").write_text(f'"""{long}"""\n\ndef f():\n    """short"""\n\n'
                                             f'class C:\n    """{long}B"""\n\ndef g():\n    """{long}"""\n')
    (tmp_path / "pkg" / "tests" / "test_x.py").write_text(f'"""{long}T"""\n')
    (tmp_path / "pkg" / "broken.py").write_text("def (:\n")
    docs = docstrings(tmp_path / "pkg", "pkg")
    assert docs == [long, long + "B"]  # f's is too short, g's a copy of the module's, tests/ and broken.py skipped


def test_samples_are_seeded_whole_documents_up_to_the_budget():
    docs = [f"doc {i} " + "x" * 100 for i in range(50)]
    text = sample(docs, 1000, seed=0)
    parts = text.split("\n\n")
    assert set(parts) <= set(docs) and len(parts) == 10  # 10 documents of 106 characters reach 1000
    assert text == sample(docs, 1000, seed=0) and text != sample(docs, 1000, seed=1)


def test_licences_drop_copies_and_any_that_shares_the_held_out_licence(tmp_path):
    held_out = " ".join(f"psf{i}" for i in range(400))  # 393 eight-word runs
    mit = "Permission is hereby granted, free of charge, to any person obtaining a copy " * 3
    files = {"LICENSE": mit, "COPYING": mit.replace(" ", "\n  "),  # the same text, other line breaks
             "LICENSE.APACHE": "Apache " + " ".join(f"w{i}" for i in range(200)),
             "NOTICE": " ".join(f"psf{i}" for i in range(10)) + " and ours " * 100,  # 3 of 203 runs shared
             "LICENSE.txt": " ".join(f"psf{i}" for i in range(20, 60))}  # it is the held-out text
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    got = licences([tmp_path / n for n in files], held_out)
    assert got == [files["LICENSE"], files["LICENSE.APACHE"]]
    assert [n for n in ("LICENSE", "LICENCE.md", "COPYING", "NOTICE.txt", "LICENSE_DEJAVU", "license.py",
                        "licenses", "LICENSES.json", "MY_LICENSE") if LICENCE_FILE.match(n)] == \
        ["LICENSE", "LICENCE.md", "COPYING", "NOTICE.txt", "LICENSE_DEJAVU"]  # not modules, folders or lists


def test_the_licences_come_from_what_requirements_install(tmp_path):
    """The requirement names and, recursively, what they require; extras and missing names skipped."""
    req = tmp_path / "requirements.txt"
    req.write_text("# a comment\n--extra-index-url https://example.org\ntorch>=2.5\nnot-a-package-here==1.0\n")
    names = [d.metadata["Name"].lower() for d in installed_with(req)]
    assert {"torch", "sympy", "networkx", "mpmath"} <= set(names) and names == sorted(names)
    assert "not-a-package-here" not in names and "pyyaml" not in names  # torch[pyyaml]: an extra


def test_train_on_a_mix_search_and_score_every_kind_of_text(tiny_llama, word_text, tmp_path, capsys):
    """train.py on two weighted files -> search.py calibrated on the mix -> domains.py over a trained and a held-out
    text; its cells equal eval.py's own figures for the same text and budget."""
    import json

    from domains import main as domains_main
    from eval import main as eval_main
    from search import main as search_main
    from train import main as train_main
    other = tmp_path / "other.txt"
    other.write_text(" ".join(f"w{(7 * i) % 50}" for i in range(3000)))  # another kind: a different pattern
    model, ckpt, ranks = ["--model", str(tiny_llama[0])], str(tmp_path / "p.safetensors"), str(tmp_path / "r.json")
    mix = ["--data", f"{word_text}:3", f"{other}:1"]
    train_main(model + mix + ["--steps", "3", "--seq-len", "32", "--calib-windows", "2", "--out", ckpt,
                              "--no-table"])
    search_main(model + mix + ["--projections", ckpt, "--budget", "0.5", "--calib-len", "32", "--out", ranks])
    assert json.loads((tmp_path / "r.json").read_text())["calibration"] == "2 x 32"  # one window from each source
    capsys.readouterr()
    domains_main(model + ["--projections", ckpt, "--ranks", ranks, "--texts", str(word_text), str(other),
                          "--budgets", "0.5", "--windows", "2", "--seq-len", "64", "--out-dir", str(tmp_path)])
    table = capsys.readouterr().out
    assert table.count("| 50.0% |") == 2 and "trained, searched" in table
    record = json.loads((tmp_path / "domains.json").read_text())
    assert record["trained_on"] == "words 75% + other 25%, 3 steps" and record["projections"] == ckpt
    scores = record["scores"]
    eval_main(model + ["--projections", ckpt, "--budget", "0.5", "--windows", "2", "--seq-len", "64", "--data",
                       str(other), "--json"])
    direct = json.loads(capsys.readouterr().out)
    cell = scores[str(other)]["0.5"]["trained, uniform"]
    assert cell["perplexity"] == pytest.approx(direct["perplexity"], rel=1e-6)
    assert cell["kl"] == pytest.approx(direct["kl"], rel=1e-6)
    assert (tmp_path / "domains.png").stat().st_size > 1000

    # a second run trained on one file only, then both side by side: one column per training mix
    one, one_ckpt = tmp_path / "one", str(tmp_path / "one.safetensors")
    train_main(model + ["--data", str(word_text), "--steps", "2", "--seq-len", "32", "--calib-windows", "2",
                        "--out", one_ckpt, "--no-table"])
    domains_main(model + ["--projections", one_ckpt, "--texts", str(word_text), str(other), "--budgets", "0.5",
                          "--windows", "2", "--seq-len", "64", "--out-dir", str(one)])
    capsys.readouterr()
    domains_main(["--compare", str(tmp_path), str(one), "--out-dir", str(tmp_path / "both")])
    table = capsys.readouterr().out.splitlines()
    assert table[0] == "| text | full | budget | words 75% + other 25%, 3 steps | words 100%, 2 steps |"
    second = json.loads((one / "domains.json").read_text())["scores"][str(other)]
    row = next(r for r in table if r.startswith("| other.txt |"))
    for scores in (scores[str(other)], second):
        ppl = scores["0.5"]["trained, uniform"]["perplexity"]
        assert f"{ppl:.2f} ({ppl / scores['full']:.2f}x" in row
    assert (tmp_path / "both" / "compare.md").read_text().splitlines() == table
    assert (tmp_path / "both" / "compare.png").stat().st_size > 1000
    again = tmp_path / "again"  # a second run on the same mix: told apart by its folder
    again.mkdir()
    (again / "domains.json").write_text((one / "domains.json").read_text())
    domains_main(["--compare", str(one), str(again), "--out-dir", str(tmp_path / "both")])
    assert f"| words 100%, 2 steps ({one}) | words 100%, 2 steps ({again}) |" in capsys.readouterr().out
    with pytest.raises(KVNestError, match="a run has no 'trained, searched' column"):
        domains_main(["--compare", str(tmp_path), str(one), "--column", "searched"])
    twin = tmp_path / "twin"  # the searched column of the first run, twice
    twin.mkdir()
    (twin / "domains.json").write_text((tmp_path / "domains.json").read_text())
    domains_main(["--compare", str(tmp_path), str(twin), "--column", "searched", "--out-dir", str(twin)])
    ppl = record["scores"][str(other)]["0.5"]["trained, searched"]["perplexity"]
    assert next(r for r in capsys.readouterr().out.splitlines() if r.startswith("| other.txt |")).count(
        f"| {ppl:.2f} (") == 2
    with pytest.raises(KVNestError, match="a run is named twice"):
        domains_main(["--compare", str(one), str(one)])
    with pytest.raises(KVNestError, match="nope/domains.json is not a domains.py result"):
        domains_main(["--compare", str(tmp_path), str(tmp_path / "nope")])
    with pytest.raises(KVNestError, match="the runs scored different texts or budgets"):
        (one / "domains.json").write_text(json.dumps({**json.loads((one / "domains.json").read_text()),
                                                      "scores": {str(other): second}}))
        domains_main(["--compare", str(tmp_path), str(one)])


def test_a_python_without_its_licence_is_named_before_any_parsing(tmp_path, monkeypatch):
    import corpus
    monkeypatch.setattr(corpus.sysconfig, "get_paths", lambda: {"stdlib": str(tmp_path)})
    monkeypatch.setattr(corpus, "docstrings", lambda *a: pytest.fail("parsed before the licence was checked"))
    with pytest.raises(KVNestError, match="LICENSE.txt is missing from this Python"):
        corpus.build(tmp_path / "out", 1000)
