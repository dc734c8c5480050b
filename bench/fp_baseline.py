"""FP32 perplexity of the packaged model on the packaged evaluation text, both protocols.

    python bench/fp_baseline.py [--tokens 102400] [--out bench/results/fp_baseline.json]

Writes one JSON with a PerplexityResult per protocol (non-overlapping 1024-token windows, and
a sliding 1024-token window with stride 512), each recording tokens, protocol, device, versions.
"""
import argparse
import sys

from physkern.data import evaluation_tokens, load_corpus
from physkern.eval import perplexity
from physkern.models import load_model, resolve_model_name
from physkern.provenance import provenance, write_json


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=102400)
    p.add_argument("--window", type=int, default=1024)
    p.add_argument("--stride", type=int, default=512)
    p.add_argument("--out", default="bench/results/fp_baseline.json")
    args = p.parse_args(argv)
    corpus = load_corpus()
    model, tok = load_model()
    tokens = evaluation_tokens(tok, corpus, args.tokens)
    name = resolve_model_name(None)
    results = {}
    for label, stride in (("non_overlapping", None), ("sliding", args.stride)):
        r = perplexity(model, tokens, args.window, stride, model_name=name, corpus_name=corpus.name)
        results[label] = r.to_dict()
        print(f"{label}: perplexity {r.perplexity:.4f} over {r.tokens_scored} tokens "
              f"(window {r.window}, stride {r.stride})", flush=True)
    write_json(args.out, {"model": name, "corpus": corpus.describe(), "dtype": "float32",
                          "results": results, **provenance("cpu")})
    print(f"wrote {args.out}")


if __name__ == "__main__":
    sys.exit(main())
