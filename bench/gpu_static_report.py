"""Static GPU report: compile every production configuration of physkern's Triton kernels for
sm_80 (A100) and sm_90 (H100) without a GPU and record registers, spills, shared memory and the
tensor-core instructions (mma.sync / wgmma) in the PTX -> bench/results/kernels_gpu_static.json.

    python bench/gpu_static_report.py

Static compile information only, not a GPU measurement: it says what ptxas allocates, not how
fast anything runs.
"""
from __future__ import annotations

import sys
from pathlib import Path

from physkern.kernels import static_compile as sc
from physkern.provenance import provenance, write_json

RESULTS = Path(__file__).resolve().parent / "results" / "kernels_gpu_static.json"


def main() -> int:
    ok, reason = sc.tooling_available()
    if not ok:
        print(f"static GPU compilation unavailable: {reason}")
        return 1
    records = sc.compile_all_subprocess(full=True)
    for r in records:
        print(f"{r['kernel']:16s} {r['config']:12s} sm_{r['arch']} {r['dtype']:5s} "
              f"{str({k: v for k, v in r['constexprs'].items() if not k.startswith('BLOCK')}):90s} "
              f"regs {r['registers']:3d} spills {r['spill_stores']:4d}/{r['spill_loads']:4d} "
              f"smem {r['shared_bytes']:6d} mma {r['mma_instructions']:3d} "
              f"wgmma {r['wgmma_instructions']:3d}")
    spilling = [r for r in records if r["spill_stores"] or r["spill_loads"]]
    payload = {"benchmark": "kernels_gpu_static",
               "kind": "static compile information (triton.compile for GPUTarget + ptxas -v); "
                       "not a GPU measurement",
               "provenance": provenance("cpu"),
               "targets": [f"sm_{a}" for a in sc.ARCHS], "dtypes": list(sc.DTYPES),
               "n_configs": len(records), "n_spilling": len(spilling), "configs": records}
    print("wrote", write_json(RESULTS, payload), f"({len(records)} configs, "
          f"{len(spilling)} with spills)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
