"""Does an incoherence rotation help physkern's codebooks? (issue 19 item 1, measured first)

For each chosen decoder layer of the packaged model, with the X^T X of its FP inputs from the
calibration text, quantize the weight W [out, in] with a codebook recipe three ways and compare
the relative output error sqrt(tr(E G E^T) / tr(W G W^T)), E = W_hat - W (G = X^T X):
  none     W itself;
  input    W R with R = P D blockdiag(H_b) the seeded, exactly orthogonal input rotation of
           physkern.rotation (random permutation P, random signs D, Sylvester Hadamard blocks
           H_b / sqrt(b), b = 64 on this model), as CodebookConfig(rotation="hadamard"): the layer
           would compute (W R)(R^T x), so it quantizes W R under the rotated statistics R^T G R;
           orthogonality makes the error the same quantity in either basis;
  both     U^T W R, the output side rotated as well (U of the same kind over out_features).
Also recorded: the kurtosis of W's entries before/after (rotations make them near-Gaussian) and
the largest |w| / rms. The rotation costs no stored bits (it is a seed); QuantizedLinear applies
it to each layer input (physkern.rotation). The first measurement (before physkern.rotation
existed) drew the permutation with torch.randperm and put the signs after the Hadamard blocks:
the same family of rotations, another draw.

    python bench/rotation_study.py [--layers 0 15 29] [--recipes k64_d2 k256_d4] [--windows 8]
Writes bench/results/rotation_study.json.
"""
from __future__ import annotations

import argparse
import sys
import time

import torch

RECIPES = {  # name -> CodebookConfig fields (layer codebook + error feedback, as the presets)
    "k64_d2": dict(k=64, block_dim=2, scope="layer", error_feedback=True),
    "k256_d4": dict(k=256, block_dim=4, scope="layer", error_feedback=True),
    "k16_d2": dict(k=16, block_dim=2, scope="layer", error_feedback=True),
}


def block_rotation(n: int, seed: int) -> torch.Tensor:
    """The seeded orthogonal R [n, n] float64 that CodebookConfig(rotation="hadamard", seed=seed)
    uses (physkern.rotation: permutation, random signs, 64-block Hadamard), formed densely."""
    from physkern.rotation import Rotation
    return Rotation.make("hadamard", n, seed).matrix()


def kurtosis(w: torch.Tensor) -> float:
    x = w.double().flatten()
    x = x - x.mean()
    return float((x ** 4).mean() / (x ** 2).mean() ** 2)


def output_error(w: torch.Tensor, w_hat: torch.Tensor, g: torch.Tensor) -> float:
    e = (w_hat - w).double()
    num = torch.einsum("oi,ij,oj->", e, g, e)
    den = torch.einsum("oi,ij,oj->", w.double(), g, w.double())
    return float((num / den).clamp_min(0).sqrt())


def study_layer(w: torch.Tensor, gram: torch.Tensor, count: int, recipe: dict, seed: int) -> dict:
    from physkern.api import quantize_weight
    from physkern.methods.codebook import CodebookConfig
    cfg = CodebookConfig(seed=seed, **recipe)
    g = gram.double()
    out = {}
    r_in = block_rotation(w.shape[1], seed)
    r_out = block_rotation(w.shape[0], seed + 1)
    for kind in ("none", "input", "both"):
        if kind == "none":
            wr, gr = w.double(), g
        elif kind == "input":
            wr, gr = w.double() @ r_in, r_in.T @ g @ r_in
        else:
            wr, gr = r_out.T @ w.double() @ r_in, r_in.T @ g @ r_in
        m2 = (torch.diagonal(gr) / max(count, 1)).float()
        qw = quantize_weight(wr.float(), cfg, m2, gr.float())
        out[kind] = {"output_error": output_error(wr, qw.dequantize().double(), gr),
                     "kurtosis": kurtosis(wr),
                     "max_over_rms": float(wr.abs().max() / wr.pow(2).mean().sqrt())}
    return out


def main(argv=None) -> int:
    from physkern.calib import Gram, collect_statistics
    from physkern.data import calibration_windows, load_corpus
    from physkern.models import decoder_linear_layers, load_model
    from physkern.provenance import provenance, write_json
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--blocks", nargs="+", type=int, default=[0, 15, 29],
                   help="decoder blocks whose 7 linear layers are studied")
    p.add_argument("--recipes", nargs="+", default=["k64_d2"], choices=sorted(RECIPES))
    p.add_argument("--windows", type=int, default=8, help="calibration windows of 1024 tokens")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="bench/results/rotation_study.json")
    args = p.parse_args(argv)
    torch.manual_seed(args.seed)
    t0 = time.time()
    model, tok = load_model(None)
    n_blocks = model.config.num_hidden_layers
    bad = [b for b in args.blocks if not 0 <= b < n_blocks]
    if bad:
        raise SystemExit(f"--blocks: {bad} out of range 0..{n_blocks - 1}")
    layers = [l for l in decoder_linear_layers(model)
              if int(l.name.split(".")[2]) in args.blocks]
    windows = calibration_windows(tok, load_corpus("wiki"), args.windows, 1024, seed=args.seed)
    stats = collect_statistics(model, windows, {"g": lambda l: Gram(l.in_features)}, layers)
    rows = []

    def summarize() -> dict:
        summary = {}
        for rname in args.recipes:
            rs = [r for r in rows if r["recipe"] == rname]
            if not rs:
                continue
            summary[rname] = {k: {"mean_output_error": sum(r[k]["output_error"] for r in rs)
                                  / len(rs),
                                  "layers_improved_vs_none": sum(
                                      r[k]["output_error"] < r["none"]["output_error"]
                                      for r in rs)}
                              for k in ("none", "input", "both")}
            summary[rname]["layers"] = len(rs)
        return summary

    def write(done: bool) -> None:  # after every layer: a long run keeps what it measured
        write_json(args.out, {
            "experiment": "incoherence rotation before codebook quantization: relative output "
                          "error per layer (FP inputs, X^T X from calibration text)",
            "model": "SmolLM2-135M-Instruct (packaged)", "corpus": "wiki calibration part",
            "calibration": {"windows": args.windows, "window": 1024, "seed": args.seed},
            "rotation": "physkern.rotation 'hadamard' (seeded permutation, random signs, "
                        "block-diagonal Hadamard of 64); 'both' also rotates the output side",
            "metric": "sqrt(tr(E G E^T) / tr(W G W^T)), G = X^T X",
            "complete": done, "layers_planned": [l.name for l in layers],
            "rows": rows, "summary": summarize(), "seconds": time.time() - t0,
            **provenance("cpu")})

    for l in layers:
        g = stats[l.name]["g"]
        for rname in args.recipes:
            res = study_layer(l.weight().detach().float(), g.value, g.count, RECIPES[rname],
                              args.seed)
            rows.append({"layer": l.name, "recipe": rname, **res})
            print(f"{l.name:40s} {rname:8s} " + "  ".join(
                f"{k} {v['output_error']:.4f} (kurt {v['kurtosis']:.1f})" for k, v in res.items()),
                flush=True)
            write(False)
    write(True)
    print(summarize())
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
