"""Static GPU report: compile every production configuration of physkern's Triton kernels for
sm_80 (A100) and sm_90 (H100) without a GPU and record registers, spills, shared memory and the
tensor-core instructions (mma.sync / wgmma) in the PTX; then model the codebook GEMV/GEMM
launches from their sm_90 SASS (kernels/sass_model.py: the production launchers' launches at
4096x4096 as on 132 SMs, compiled as Triton's JIT specializes them; instructions, global/shared
loads by width, bytes requested per weight) -> bench/results/kernels_gpu_static.json.

    python bench/gpu_static_report.py [--sass-only]

--sass-only keeps the JSON's ptxas records and redoes the SASS model (minutes instead of the
full sweep). Static compile information only, not a GPU measurement: it says what ptxas
allocates and what the compiled code requests, not how fast anything runs.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from physkern.kernels import sass_model
from physkern.kernels import static_compile as sc
from physkern.provenance import provenance, write_json

RESULTS = Path(__file__).resolve().parent / "results" / "kernels_gpu_static.json"


def print_models(models: list) -> None:
    """One line per main kernel: per weight a program reads (for the rows of x it serves),
    and "call": per weight of the matrix over the whole call at that M."""
    print(f"{'family':8s} {'format':24s} {'M':>5s} {'kernel':22s} {'regs':>4s} {'spill':>5s} "
          f"{'smem':>6s} {'progs':>6s} {'instr/w':>8s} {'loop i/w':>8s} {'gB/w':>6s} "
          f"{'loop gB/w':>9s} {'sB/w':>6s} {'shfl':>5s} {'call gB/w':>9s} {'call i/w':>8s}")
    for r in models:
        if not r["main"]:
            continue
        s = r["sass"]
        print(f"{r['family']:8s} {r['format']:24s} {r['m']:5d} {r['kernel']:22s} "
              f"{r['registers']:4d} {r['spill_stores']:5d} {r['shared_bytes']:6d} "
              f"{r['programs']:6d} {s['program_warp_instructions_per_weight']:8.4f} "
              f"{s['loop_warp_instructions_per_weight']:8.4f} "
              f"{s['program_global_load_bytes_per_weight']:6.3f} "
              f"{s['loop_global_load_bytes_per_weight']:9.3f} "
              f"{s['program_shared_load_bytes_per_weight']:6.3f} "
              f"{s['loop']['by_class']['shuffle']:5d} "
              f"{r['call_per_matrix_weight']['global_load_bytes']:9.3f} "
              f"{r['call_per_matrix_weight']['warp_instructions']:8.4f}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sass-only", action="store_true",
                   help="keep the JSON's ptxas records, redo the SASS model only")
    args = p.parse_args(argv)
    ok, reason = sc.tooling_available()
    if not ok:
        print(f"static GPU compilation unavailable: {reason}")
        return 1
    if args.sass_only:
        old = json.loads(RESULTS.read_text())
        records = old["configs"]
    else:
        records = sc.compile_all_subprocess(full=True)
        for r in records:
            print(f"{r['kernel']:16s} {r['config']:12s} sm_{r['arch']} {r['dtype']:5s} "
                  f"{str({k: v for k, v in r['constexprs'].items() if not k.startswith('BLOCK')}):90s} "
                  f"regs {r['registers']:3d} spills {r['spill_stores']:4d}/{r['spill_loads']:4d} "
                  f"smem {r['shared_bytes']:6d} mma {r['mma_instructions']:3d} "
                  f"wgmma {r['wgmma_instructions']:3d}")
    models = sc.model_all_subprocess()
    print_models(models)
    spilling = [r for r in records if r["spill_stores"] or r["spill_loads"]]
    payload = {"benchmark": "kernels_gpu_static",
               "kind": "static compile information (triton.compile for GPUTarget + ptxas -v; "
                       "cuobjdump -sass for the model); not a GPU measurement",
               "provenance": provenance("cpu"),
               "targets": [f"sm_{a}" for a in sc.ARCHS], "dtypes": list(sc.DTYPES),
               "n_configs": len(records), "n_spilling": len(spilling), "configs": records,
               "sass_model": {"about": sass_model.__doc__, "arch": f"sm_{sc.SASS_ARCH}",
                              "sms_assumed": sc.SASS_SMS, "shape": list(sc.SASS_SHAPE),
                              "formats": {k: {"d": v[0], "K": v[1]}
                                          for k, v in sc.SASS_FORMATS.items()},
                              "launches": models}}
    print("wrote", write_json(RESULTS, payload), f"({len(records)} configs, "
          f"{len(spilling)} with spills, {len(models)} modelled launches)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
