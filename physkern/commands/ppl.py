"""`physkern ppl`: perplexity of a model on a corpus' evaluation text."""
from __future__ import annotations

import argparse

from ._common import add_eval_args, add_model_corpus_args, check_output_file, resolve_window


def register(sub) -> None:
    p = sub.add_parser("ppl", help="perplexity of a model on evaluation text",
                       description="Perplexity with non-overlapping windows (default) or a "
                                   "sliding window (--stride). Runs offline on the packaged "
                                   "model and text when no flags are given.")
    add_model_corpus_args(p)
    add_eval_args(p)
    p.add_argument("--part", choices=["evaluation", "calibration", "all"], default=None,
                   help="which text to score: a --corpus FILE is scored whole (all) by default; "
                        "packaged corpora and wikitext2 score their evaluation part (second half "
                        "of the documents / test split), as the published results do")
    p.add_argument("--json", default=None, help="write the result JSON here")
    p.set_defaults(func=run)


def evaluate(args: argparse.Namespace, model=None, tokenizer=None):
    """Load what is missing, score the chosen part of the corpus (args.part; None = the
    corpus' default_part), return the result (res.extra: corpus, part)."""
    from ..data import evaluation_tokens, load_corpus
    from ..eval import perplexity
    from ..models import load_model, resolve_model_name
    if args.tokens is not None and args.tokens < 0:
        raise ValueError(f"tokens must be >= 0 (0 = all), got {args.tokens}")
    if args.stride is not None and args.stride <= 0:
        raise ValueError(f"stride must be positive, got {args.stride}")
    corpus = load_corpus(args.corpus)
    # a user's file is scored whole by default; packaged corpora as published (evaluation part)
    part = getattr(args, "part", None) or corpus.default_part
    if model is None:
        model, tokenizer = load_model(args.model, device=args.device)
    window = resolve_window(model, args.window)
    tokens = evaluation_tokens(tokenizer, corpus, args.tokens or None, part=part)
    res = perplexity(model, tokens, window, args.stride, batch_size=args.batch_size,
                     model_name=resolve_model_name(args.model), corpus_name=corpus.name)
    res.extra["corpus"] = corpus.describe()
    res.extra["part"] = part
    return res


PART_WORDS = {"evaluation": "evaluation part", "calibration": "calibration part",
              "all": "whole text"}


def run(args: argparse.Namespace) -> int:
    if args.json:
        check_output_file(args.json, "--json")  # before the evaluation, not after
    res = evaluate(args)
    print(f"model {res.model}\ncorpus {res.corpus} ({PART_WORDS[res.extra['part']]}), "
          f"{res.tokens_scored} tokens "
          f"scored, {res.protocol} windows of {res.window}, stride {res.stride}, {res.dtype}, "
          f"{res.device}\nperplexity {res.perplexity:.4f}  ({res.tokens_per_second:.0f} tok/s)")
    if args.json:
        res.write_json(args.json)
        print(f"wrote {args.json}")
    return 0
