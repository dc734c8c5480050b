"""MPO (TT-SVD + ALS sweeps) vs truncated SVD at equal true bits: relative weight error.

    python bench/mpo_vs_svd.py [--type mlp.gate_proj] [--bits 0.5 1 2 4] [--cores 2 3]
                               [--sweeps 2] [--every K] [--layers N]
                               [--out bench/results/mpo_vs_svd.json]

On every decoder layer of one weight type of the packaged model (SmolLM2-135M), for each bits
target: MPO cores at the largest bond dimension chi whose fp16 cores fit the target
(physkern.research.mpo.chi_for_bits), found by TT-SVD and then `--sweeps` plain (Frobenius) ALS
sweeps; truncated SVD at the largest rank r whose fp16 factors (r * (out + in) values) fit the
same target. Both are stored at fp16 and the error is measured on the stored (fp16) factors:
relative Frobenius error ||W - W~|| / ||W||, pooled over the layers
(sqrt(sum ||E||^2 / sum ||W||^2)) and averaged per layer. True bits/weight are each method's own
stored bits over the weights it replaces (as physkern.quant.accounting counts them). Weight error
only: no calibration, no perplexity, no healing.
"""
import argparse
import math
import sys
import time

import torch

from physkern.models import decoder_linear_layers, load_model, resolve_model_name
from physkern.provenance import provenance, write_json
from physkern.research.mpo import (MPOLinear, chi_for_bits, dmrg_sweeps, factorize,
                                   mpo_decompose, mpo_objective)


def svd_rank_for_bits(out: int, inp: int, target_bits: float, dtype_bits: int = 16) -> int:
    return int(target_bits * out * inp // (dtype_bits * (out + inp)))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--type", default="mlp.gate_proj",
                   help="weight type: the layer name's tail (default mlp.gate_proj)")
    p.add_argument("--bits", type=float, nargs="+", default=[0.5, 1.0, 2.0, 4.0])
    p.add_argument("--cores", type=int, nargs="+", default=[2, 3])
    p.add_argument("--sweeps", type=int, default=2)
    p.add_argument("--every", type=int, default=1, help="every K-th layer of the type (default 1)")
    p.add_argument("--layers", type=int, default=None, help="first N layers only (default all)")
    p.add_argument("--out", default="bench/results/mpo_vs_svd.json")
    args = p.parse_args(argv)
    t_start = time.time()
    model, _ = load_model()
    layers = [l for l in decoder_linear_layers(model) if l.name.endswith("." + args.type)]
    if not layers:
        raise SystemExit(f"--type {args.type!r} matches no decoder layer")
    layers = layers[::args.every]
    layers = layers[:args.layers] if args.layers else layers
    out_f, in_f = layers[0].out_features, layers[0].in_features
    n = out_f * in_f
    factors = {c: (factorize(out_f, c), factorize(in_f, c)) for c in args.cores}

    # (method, target) -> accumulators
    acc: dict = {}

    def add(key, err2, w2, bits, extra=None):
        a = acc.setdefault(key, {"err2": 0.0, "w2": 0.0, "rel": [], "bits": bits, "extra": []})
        a["err2"] += err2
        a["w2"] += w2
        a["rel"].append(math.sqrt(err2 / w2))
        if extra is not None:
            a["extra"].append(extra)

    for li, layer in enumerate(layers):
        W = layer.weight().detach().float()
        w2 = float((W.double() ** 2).sum())
        U, S, Vh = torch.linalg.svd(W.double(), full_matrices=False)
        for target in args.bits:
            r = svd_rank_for_bits(out_f, in_f, target)
            if r >= 1:
                up = (U[:, :r] * S[:r]).half().double()
                down = Vh[:r].half().double()
                E = W.double() - up @ down
                add(("svd", target), float((E * E).sum()), w2, r * (out_f + in_f) * 16 / n,
                    {"rank": r})
            for c, (of, inf) in factors.items():
                try:
                    chi = chi_for_bits(of, inf, target)
                except ValueError:
                    continue
                cores = mpo_decompose(W, of, inf, chi)
                obj_ttsvd = mpo_objective(W, cores)
                if args.sweeps:
                    cores, objs = dmrg_sweeps(W, cores, args.sweeps)
                else:
                    objs = [obj_ttsvd]
                m = MPOLinear(cores)  # fp16 storage, as counted
                E = W.double() - m.weight().double()
                add((f"mpo{c}", target), float((E * E).sum()), w2, m.bits_per_weight(),
                    {"chi": chi, "ttsvd_rel": math.sqrt(obj_ttsvd / w2),
                     "swept_rel_fp32": math.sqrt(objs[-1] / w2)})
        print(f"layer {li + 1}/{len(layers)} {layer.name} done ({time.time() - t_start:.0f} s)",
              flush=True)

    rows = []
    for (method, target), a in sorted(acc.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        row = {"method": method, "target_bits": target, "bits_per_weight": a["bits"],
               "rel_error_pooled": math.sqrt(a["err2"] / a["w2"]),
               "rel_error_mean": sum(a["rel"]) / len(a["rel"]), "layers": len(a["rel"])}
        if method == "svd":
            row["rank"] = a["extra"][0]["rank"]
        else:
            c = int(method[3:])
            row.update(cores=c, out_factors=factors[c][0], in_factors=factors[c][1],
                       chi=a["extra"][0]["chi"],
                       ttsvd_rel_error_mean=sum(e["ttsvd_rel"] for e in a["extra"]) / len(a["rel"]),
                       swept_rel_error_mean_fp32=sum(e["swept_rel_fp32"] for e in a["extra"])
                       / len(a["rel"]))
        rows.append(row)

    print(f"\n{args.type} [{out_f} x {in_f}], {len(layers)} layers, fp16 factors/cores; "
          f"MPO = TT-SVD + {args.sweeps} sweeps")
    print(f"{'target':>6} {'method':>6} {'size':>8} {'bits/w':>7} {'rel err (pooled)':>17} "
          f"{'mean':>7} {'TT-SVD only':>11}")
    for row in rows:
        size = f"r={row['rank']}" if row["method"] == "svd" else f"chi={row['chi']}"
        tt = f"{row['ttsvd_rel_error_mean']:.4f}" if "chi" in row else ""
        print(f"{row['target_bits']:>6g} {row['method']:>6} {size:>8} "
              f"{row['bits_per_weight']:>7.3f} {row['rel_error_pooled']:>17.4f} "
              f"{row['rel_error_mean']:>7.4f} {tt:>11}")
    write_json(args.out, {"model": resolve_model_name(None), "weight_type": args.type,
                          "shape": [out_f, in_f], "layers": [l.name for l in layers],
                          "sweeps": args.sweeps, "storage_dtype": "float16",
                          "metric": "relative Frobenius error of the stored (fp16) factors",
                          "seconds": round(time.time() - t_start, 1), "rows": rows,
                          **provenance("cpu")})
    print(f"wrote {args.out}")


if __name__ == "__main__":
    sys.exit(main())
