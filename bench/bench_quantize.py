"""Seconds and peak memory to quantize every decoder linear layer of the packaged model.

    python bench/bench_quantize.py [--recipe NAME ...] [--out bench/results/quantize_cpu.json]

Each recipe runs in its own child process (this script re-invoked with --child), so the peak
resident memory (getrusage ru_maxrss of that process) belongs to that recipe alone: model load,
calibration statistics and quantization. The FP model's resident size after loading is recorded
beside it. Recipes: "plain_layer_k256_d4" is the issue's reference point (layer-shared k-means,
d=4, K=256, 25 iterations, no calibration: "about 700 s on 2 cores" with plain torch k-means;
goal <= 5 min per codebook recipe); "make_run_default" is the recipe `make run` uses.
Results merge into the output JSON by recipe name.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

RECIPES = {
    "plain_layer_k256_d4": {"method": "codebook", "k": 256, "block_dim": 4, "scope": "layer",
                            "calibrate": False, "iters": 25},
    "make_run_default": {"method": "codebook", "k": 32, "block_dim": 2, "scope": "layer",
                         "error_feedback": True},
    "layer_k64_d2_ef": {"method": "codebook", "k": 64, "block_dim": 2, "scope": "layer",
                        "error_feedback": True},
}
CALIB_WINDOWS, CALIB_WINDOW = 32, 1024


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def child(name: str) -> dict:
    import torch
    from physkern.api import quantize
    from physkern.config import config_from_dict
    from physkern.data import calibration_windows, load_corpus
    from physkern.models import load_model, resolve_model_name

    cfg = config_from_dict(RECIPES[name])
    t0 = time.perf_counter()
    model, tok = load_model()
    rss_loaded = _rss_mib()
    calib = None
    if cfg.needs_calibration:
        calib = calibration_windows(tok, load_corpus(), CALIB_WINDOWS, CALIB_WINDOW, seed=0)
    t1 = time.perf_counter()
    report = quantize(model, cfg, calibration=calib)
    t2 = time.perf_counter()
    return {"recipe": name, "config": cfg.to_dict(), "model": resolve_model_name(None),
            "layers_quantized": len(report.layers),
            "calibration": None if calib is None else {"windows": CALIB_WINDOWS,
                                                       "window": CALIB_WINDOW, "seed": 0},
            "seconds_load": t1 - t0, "seconds_quantize": t2 - t1,
            "peak_rss_mib": _rss_mib(), "rss_after_fp_load_mib": rss_loaded,
            "torch_threads": torch.get_num_threads()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipe", nargs="+", default=list(RECIPES), choices=list(RECIPES))
    ap.add_argument("--out", default="bench/results/quantize_cpu.json")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child)))
        return 0
    import os
    from physkern.provenance import provenance, write_json
    out = Path(args.out)
    payload = json.loads(out.read_text()) if out.exists() else {"results": {}}
    for name in args.recipe:
        load0 = os.getloadavg()
        proc = subprocess.run([sys.executable, __file__, "--child", name], check=True,
                              capture_output=True, text=True)
        res = json.loads(proc.stdout.strip().splitlines()[-1])
        res["load_average_before_after"] = [load0, os.getloadavg()]
        payload["results"][name] = res
        print(f"{name}: quantize {res['seconds_quantize']:.0f} s, peak RSS "
              f"{res['peak_rss_mib']:.0f} MiB (FP model loaded: {res['rss_after_fp_load_mib']:.0f})")
        payload.update({"benchmark": "quantize all decoder linear layers of the packaged model",
                        "goal": "<= 300 s per codebook recipe (issue 7)",
                        "note": "wall time on a shared 2-core machine: see each load average",
                        **provenance("cpu")})
        write_json(out, payload)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
