"""`physkern analyze <name>`: the command line of the physics analyses.

The analyses themselves are plain functions in physkern/research/analysis/<module>.py (no
argparse there); this module defines each one's sub-command: its arguments, the printed table,
the JSON (with provenance) and the PNG plots, written by default into ./physkern-analysis/
(--out-dir to choose). To add an analysis: write its functions in physkern/research/analysis/,
then a `register_<name>` / `run_<name>` pair here and one entry in ANALYSES.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from ..provenance import provenance, write_json
from ..research.analysis import clusters, energy, entropy, rg_flow, spectra
from ..research.analysis._common import short_type
from ._common import ANALYSIS_OUT_DIR, add_model_corpus_args, resolve_window


def register(sub) -> None:
    p = sub.add_parser("analyze", help="physics-inspired analyses of a model (rg, spectra, ...)",
                       description="Run one analysis on a model; each writes a JSON (with "
                                   "provenance) and PNG plots, by default into "
                                   "./physkern-analysis/ (--out-dir to choose; the committed "
                                   "results used --out-dir bench/results/analysis).")
    analyses = p.add_subparsers(dest="analysis", metavar="ANALYSIS")
    for add in ANALYSES:
        add(analyses)

    def _no_analysis(args) -> int:
        names = ", ".join(sorted(analyses.choices)) or "none installed"
        raise ValueError(f"analyze: name an analysis ({names})")

    p.set_defaults(func=_no_analysis)


# ----------------------------------------------------------------------------------------------
# arguments and output paths shared by the analyses


def add_model_args(p: argparse.ArgumentParser) -> None:
    """--model and --device (analyses that need no text)."""
    p.add_argument("--model", default=None,
                   help="hub name, local directory or .gguf path; default: the packaged "
                        "SmolLM2-135M-Instruct")
    p.add_argument("--device", default="cpu", help="torch device (default cpu)")


def add_output_args(p: argparse.ArgumentParser, stem: str) -> None:
    p.add_argument("--out-dir", default=ANALYSIS_OUT_DIR,
                   help=f"folder for the JSON and PNG files (default {ANALYSIS_OUT_DIR})")
    p.add_argument("--name", default=stem,
                   help=f"file stem of the outputs (default {stem!r})")


def _parser(sub, name: str, module, help: str) -> argparse.ArgumentParser:
    """The sub-parser of one analysis; its description is the research module's docstring."""
    return sub.add_parser(name, help=help, description=module.__doc__,
                          formatter_class=argparse.RawDescriptionHelpFormatter)


def add_types_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--types", nargs="*", default=None,
                   help="weight types to analyse (default all; e.g. q k v o gate up down)")


def output_path(args: argparse.Namespace, suffix: str) -> Path:
    """<--out-dir>/<name><suffix> (default ./physkern-analysis/), folder created."""
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    return out / f"{args.name}{suffix}"



def write_outputs(args: argparse.Namespace, payload: dict, plot, *png_suffixes: str) -> None:
    """<name>.json holding payload, then the PNGs <name><suffix> drawn by plot(*paths); prints
    the paths written."""
    js = output_path(args, ".json")
    write_json(js, payload)
    pngs = [output_path(args, suffix) for suffix in png_suffixes]
    plot(*pngs)
    print(f"wrote {', '.join(map(str, [js] + pngs))}")

# ----------------------------------------------------------------------------------------------
# clusters: physkern.research.analysis.clusters


def register_clusters(sub) -> None:
    p = _parser(sub, "clusters", clusters, "metastable token clusters across depth")
    add_model_corpus_args(p)
    p.add_argument("--windows", type=int, default=8, help="windows of text (default 8)")
    p.add_argument("--window", type=int, default=128, help="tokens per window (default 128)")
    thresholds = clusters.DEFAULT_THRESHOLDS
    p.add_argument("--thresholds", type=float, nargs="+", default=list(thresholds),
                   help="distance thresholds on 1 - cos, each in (0, 2] "
                        f"(default {' '.join(map(str, thresholds))}; the seeds used 0.05)")
    add_output_args(p, "clusters")
    p.set_defaults(func=run_clusters)


def run_clusters(args: argparse.Namespace) -> int:
    from ..data import evaluation_tokens, load_corpus
    from ..models import load_model, resolve_model_name
    for t in args.thresholds:
        clusters.check_threshold(t)
    if args.windows <= 0 or args.window < 2:
        raise ValueError(f"windows must be >= 1 and window >= 2, got {args.windows}, "
                         f"{args.window}")
    corpus = load_corpus(args.corpus)
    model, tok = load_model(args.model, device=args.device)
    ids = evaluation_tokens(tok, corpus, args.windows * args.window)
    windows = ids.view(args.windows, args.window).to(args.device)
    result = clusters.cluster_analysis(model, windows, args.thresholds)
    head = "".join(f"{'t=' + format(t, 'g'):>9}" for t in result["thresholds"])
    print(f"{'depth':>12}{'mean cos':>10}{head}")
    for d in result["depth"]:
        row = "".join(f"{result['clusters'][str(t)][d]:>9.1f}" for t in result["thresholds"])
        print(f"{d:>12}{result['mean_cosine'][d]:>10.3f}{row}")
    row = "".join(f"{result['post_norm']['clusters'][str(t)]:>9.1f}" for t in result["thresholds"])
    print(f"{'final norm':>12}{result['post_norm']['mean_cosine']:>10.3f}{row}")
    for k, f in result["fits"].items():
        print(f"fit a + b/t^2 to {k}: R^2 {f['r2']:.3f}; "
              f"b/t^2 alone: R^2 {f['r2_no_intercept']:.3f}")
    payload = {"analysis": "clusters", "model": resolve_model_name(args.model),
               "corpus": corpus.describe(), "text": "evaluation part, consecutive windows",
               "method": "average linkage on 1 - cos, flat clusters at distance threshold",
               **result, "provenance": provenance(args.device)}
    write_outputs(args, payload, lambda png: clusters.plot_clusters(result, png), ".png")
    return 0


# ----------------------------------------------------------------------------------------------
# energy: physkern.research.analysis.energy


def register_energy(sub) -> None:
    p = _parser(sub, "energy", energy, "kinetic + point-perplexity 'energy' and its conservation")
    add_model_corpus_args(p)
    p.add_argument("--texts", type=int, default=4, help="texts (windows of evaluation text)")
    p.add_argument("--length", type=int, default=256, help="tokens per text (default 256)")
    p.add_argument("--state", choices=energy.STATES, default="pre_norm",
                   help="last-layer hidden state before (default) or after the final norm")
    p.add_argument("--kinetic-scale", choices=energy.KINETIC_SCALES, default="none",
                   help="divide K by 1 (none, default) or by the hidden size (dim)")
    p.add_argument("--skip-first", type=int, default=0,
                   help="drop this many steps at the start of each text (default 0)")
    p.add_argument("--random-seeds", type=int, nargs="*", default=[0, 1, 2],
                   help="seeds of randomly re-initialised models of the same architecture")
    add_output_args(p, "energy")
    p.set_defaults(func=run_energy)


def run_energy(args: argparse.Namespace) -> int:
    from ..data import evaluation_tokens, load_corpus
    from ..models import load_model, resolve_model_name
    energy.check_options(args.state, args.kinetic_scale)
    if args.texts <= 0 or args.length < 2:
        raise ValueError(f"texts must be >= 1 and length >= 2, got {args.texts}, {args.length}")
    if args.skip_first < 0 or args.skip_first > args.length - 3:
        raise ValueError(f"skip-first must be in [0, length - 3], got {args.skip_first}")
    corpus = load_corpus(args.corpus)
    model, tok = load_model(args.model, device=args.device)
    ids = evaluation_tokens(tok, corpus, args.texts * args.length)
    texts = ids.view(args.texts, args.length).to(args.device)
    opts = dict(state=args.state, kinetic_scale=args.kinetic_scale)
    results = {"pretrained": energy.energy_over_texts(model, texts, skip_first=args.skip_first,
                                                      **opts)}
    # the same with the first step dropped, to show how much the first token's jump weighs
    alt_skip = 1 if args.skip_first == 0 else 0
    alt = {"pretrained": energy.energy_over_texts(model, texts, skip_first=alt_skip,
                                                  **opts)["mean"]}
    example = {"pretrained": energy.energy_terms(model, texts[0], **opts)}
    for seed in args.random_seeds:
        rnd = energy.random_reinit(model, seed)
        name = f"random seed {seed}"
        results[name] = energy.energy_over_texts(rnd, texts, skip_first=args.skip_first, **opts)
        alt[name] = energy.energy_over_texts(rnd, texts, skip_first=alt_skip, **opts)["mean"]
        if len(example) == 1:
            example[name] = energy.energy_terms(rnd, texts[0], **opts)
        del rnd
    print(f"{'model':<16}{'CV(E)':>9}{'CV(K)':>9}{'CV(V)':>9}{'mean K':>12}{'mean V':>9}"
          f"{'K/V':>12}   (skip_first={args.skip_first})")
    for name, r in results.items():
        m = r["mean"]
        print(f"{name:<16}{m['cv_E']:>9.3f}{m['cv_K']:>9.3f}{m['cv_V']:>9.3f}{m['mean_K']:>12.5g}"
              f"{m['mean_V']:>9.3f}{m['kinetic_over_potential']:>12.5g}")
    print(f"with skip_first={alt_skip}:")
    for name, m in alt.items():
        print(f"{name:<16}{m['cv_E']:>9.3f}{m['cv_K']:>9.3f}{m['cv_V']:>9.3f}{m['mean_K']:>12.5g}"
              f"{m['mean_V']:>9.3f}{m['kinetic_over_potential']:>12.5g}")
    payload = {"analysis": "energy", "model": resolve_model_name(args.model),
               "corpus": corpus.describe(), "texts": args.texts, "length": args.length,
               "definition": {"K": "0.5*||h_{t+1}-h_t||^2"
                                   + (" / hidden_size" if args.kinetic_scale == "dim" else ""),
                              "V": "-ln p(x_{t+1}|x_<=t) (nats)", "E": "K + V",
                              "state": args.state, "cv": "population std / |mean| over positions",
                              "skip_first": args.skip_first,
                              "random": "transformers from_config init, torch.manual_seed(seed)"},
               "results": results, f"mean_with_skip_first_{alt_skip}": alt,
               "provenance": provenance(args.device)}
    means = {k: v["mean"] for k, v in results.items()}
    write_outputs(args, payload, lambda png: energy.plot_energy(example, means, png), ".png")
    return 0


# ----------------------------------------------------------------------------------------------
# entropy: physkern.research.analysis.entropy


def register_entropy(sub) -> None:
    p = _parser(sub, "entropy", entropy, "activation entropy of every linear layer's input")
    add_model_corpus_args(p)
    p.add_argument("--windows", type=int, default=entropy.DEFAULT_WINDOWS,
                   help=f"calibration windows (default {entropy.DEFAULT_WINDOWS})")
    p.add_argument("--window", type=int, default=None,
                   help="tokens per window (default min(model context, 1024))")
    p.add_argument("--seed", type=int, default=0, help="seed of the window offsets (default 0)")
    p.add_argument("--bins", type=int, default=entropy.DEFAULT_BINS,
                   help=f"histogram bins (default {entropy.DEFAULT_BINS})")
    p.add_argument("--no-per-channel", dest="per_channel", action="store_false",
                   help="skip the per-input-channel histograms")
    p.add_argument("--out", "--out-dir", dest="out_dir", default=ANALYSIS_OUT_DIR,
                   help=f"folder for the JSON and PNG (default {ANALYSIS_OUT_DIR})")
    p.add_argument("--name", default="entropy", help="file stem of the outputs (default entropy)")
    p.set_defaults(func=run_entropy)


def run_entropy(args: argparse.Namespace) -> int:
    from ..data import calibration_windows, load_corpus
    from ..models import load_model, resolve_model_name
    if args.windows < 1:
        raise ValueError(f"windows must be >= 1, got {args.windows}")
    if args.bins < 1:
        raise ValueError(f"bins must be >= 1, got {args.bins}")
    corpus = load_corpus(args.corpus)
    model, tok = load_model(args.model, device=args.device)
    window = resolve_window(model, args.window)
    windows = calibration_windows(tok, corpus, args.windows, window, args.seed)
    result = entropy.entropy_analysis(model, windows, args.bins, args.per_channel, progress=True)
    entropy.report(result)
    payload = {"analysis": "entropy", "model": resolve_model_name(args.model),
               "corpus": corpus.describe(),
               "protocol": {"windows": args.windows, "window": window, "seed": args.seed,
                            "tokens": args.windows * window, "bins": args.bins,
                            "text": "calibration half of the corpus documents",
                            "range": "two passes: finite min/max per layer, then histograms",
                            "estimator": "Miller-Madow (plug-in also given), bits"},
               **result, "provenance": provenance(args.device)}
    title = (f"Activation entropy: {resolve_model_name(args.model)}, {args.windows}x{window} "
             f"tokens, {args.bins} bins")
    write_outputs(args, payload, lambda png: entropy.plot_entropy(result, png, title=title), ".png")
    return 0


# ----------------------------------------------------------------------------------------------
# rg: physkern.research.analysis.rg_flow


def register_rg(sub) -> None:
    p = _parser(sub, "rg", rg_flow, "RG flow: singular-value growth rates across depth")
    add_model_args(p)
    add_types_arg(p)
    p.add_argument("--relevant", type=float, default=rg_flow.DEFAULT_RELEVANT,
                   help=f"growth rate above which an index is relevant "
                        f"(default {rg_flow.DEFAULT_RELEVANT})")
    p.add_argument("--irrelevant", type=float, default=rg_flow.DEFAULT_IRRELEVANT,
                   help=f"growth rate below which an index is irrelevant "
                        f"(default {rg_flow.DEFAULT_IRRELEVANT})")
    add_output_args(p, "rg_flow")
    p.set_defaults(func=run_rg)


def run_rg(args: argparse.Namespace) -> int:
    from ..models import load_model, resolve_model_name
    if args.irrelevant > args.relevant:
        raise ValueError(f"irrelevant threshold ({args.irrelevant}) must not exceed the relevant "
                         f"threshold ({args.relevant})")
    model, _ = load_model(args.model, device=args.device)
    result = rg_flow.rg_flow(model, args.types, args.relevant, args.irrelevant)
    print(f"{'type':<18}{'shape':>12}{'mean gamma':>12}{'mean slope':>12}"
          f"{'rel/marg/irr (gamma)':>24}")
    for wtype, t in result["types"].items():
        c = t["classes_gamma"]
        print(f"{short_type(wtype):<18}{'x'.join(map(str, t['shape'])):>12}"
              f"{t['mean_gamma']:>+12.4f}{t['mean_slope']:>+12.4f}"
              f"{c['relevant']:>10.2f}/{c['marginal']:.2f}/{c['irrelevant']:.2f}")
    payload = {"analysis": "rg_flow", "model": resolve_model_name(args.model),
               "definition": {"gamma": "ln(sigma_last[i]/sigma_first[i])/(L-1)",
                              "slope": "least-squares slope of ln sigma_i over layers 0..L-1"},
               **result, "provenance": provenance(args.device)}
    write_outputs(args, payload, lambda *pngs: rg_flow.plot_rg(result, *pngs), "_sigma.png",
                  "_gamma_hist.png")
    return 0


# ----------------------------------------------------------------------------------------------
# spectra: physkern.research.analysis.spectra


def register_spectra(sub) -> None:
    p = _parser(sub, "spectra", spectra,
                "ESD of W^T W/N, Marchenko-Pastur fit, outliers, tail alpha")
    add_model_args(p)
    add_types_arg(p)
    p.add_argument("--tw-margin", type=float, default=spectra.DEFAULT_TW_MARGIN,
                   help="Tracy-Widom scales above the MP edge for an eigenvalue to count as an "
                        f"outlier (default {spectra.DEFAULT_TW_MARGIN:g})")
    add_output_args(p, "spectra")
    p.set_defaults(func=run_spectra)


def run_spectra(args: argparse.Namespace) -> int:
    from ..models import load_model, resolve_model_name
    if args.tw_margin < 0:
        raise ValueError(f"tw-margin must be >= 0, got {args.tw_margin}")
    model, _ = load_model(args.model, device=args.device)
    result = spectra.spectra(model, args.types, args.tw_margin)
    print(f"{'type':<12}{'q':>7}{'mean alpha':>12}{'mean outliers':>15}{'mean KS':>9}")
    summary = {}
    for t, layers in result["types"].items():
        s = {"mean_alpha": float(np.mean([d["alpha"] for d in layers])),
             "median_alpha": float(np.median([d["alpha"] for d in layers])),
             "mean_outliers": float(np.mean([d["outliers"] for d in layers])),
             "mean_ks": float(np.mean([d["ks"] for d in layers]))}
        summary[t] = s
        print(f"{short_type(t):<12}{layers[0]['q']:>7.3f}{s['mean_alpha']:>12.3f}"
              f"{s['mean_outliers']:>15.2f}{s['mean_ks']:>9.3f}")
    layers_json = {t: [{k: v for k, v in d.items() if k != "eigenvalues"} for d in ls]
                   for t, ls in result["types"].items()}
    payload = {"analysis": "spectra", "model": resolve_model_name(args.model),
               "definition": "X = W^T W / N (W oriented N x M, N >= M), q = M/N; MP edge "
                             "sigma^2 (1 + sqrt q)^2 with sigma^2 fitted by minimum KS distance; "
                             "outliers above edge + tw_margin Tracy-Widom scales; alpha by "
                             "Clauset-Shalizi-Newman power-law fit of the largest eigenvalues",
               "tw_margin": args.tw_margin, "summary": summary, "types": layers_json,
               "provenance": provenance(args.device)}
    write_outputs(args, payload, lambda *pngs: spectra.plot_spectra(result, *pngs), "_esd.png",
                  "_depth.png")
    return 0


# the sub-commands, in the order `physkern analyze --help` lists them
ANALYSES = (register_clusters, register_energy, register_entropy, register_rg, register_spectra)
