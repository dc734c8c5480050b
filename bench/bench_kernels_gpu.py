"""GPU benchmarks of physkern's Triton kernels -> bench/results/kernels_gpu.json.

    python bench/bench_kernels_gpu.py [--quick] [--only matmul|kmeans|psum] [--ms 1 16]
        [--shapes 4096x4096] [--recipes NAME ...] [--smoke] [--profile-once] [--out FILE]

Needs a CUDA GPU (exits with status 2 otherwise). Measured in one run, on one card:

0. Ceilings: device-to-device copy bandwidth (bytes read + written) and a cuBLAS fp16 8192^3
   matmul's TFLOP/s; the datasheet HBM peak of the card by name is recorded beside them.
1. Codebook matmul (the dequantizing GEMM/GEMV) vs cuBLAS fp16 (F.linear with a dense fp16 W),
   W of 4096x4096 and 11008x4096 (out x in), M in {1, 16, 128, 2048}, x fp16, for storage recipes
   from 1.5 to 4.5 true bits/weight (random indices and codebooks: speed does not depend on the
   values). Weights are rotated over enough copies (>= 512 MB for each method) that they stream
   from HBM as in a whole model rather than sitting in the 50-60 MB L2. Two timings each:
   - graph: a CUDA graph of one call per copy, replayed; time per call (launch overhead removed,
     as a decode loop under CUDA graphs sees it). The goal (M=1: >= 3x cuBLAS fp16 at <= 2.5
     true bpw) is judged on this one.
   - eager: triton.testing.do_bench (median) of a Python call cycling over the copies (includes
     Python dispatch and launch overhead).
   GB/s counts the fewest bytes each method must move (weights as stored + x + y); the split-K
   partial sums of the GEMV path are extra traffic and not counted.
   The psum GEMV (kernels/codebook_gemv_psum.py: table lookups, no dequantization) is timed
   the same way, on the same copies, beside it for the formats it takes (one layer codebook)
   at M <= 16: the "psum" entries of a row (its index layout is built for every copy during
   the warm-up, outside the timed region; it is a second copy of the indices on the device).
2. psum correctness (--only psum, also part of the default run): codebook_matmul_psum vs
   codebook_matmul_reference over many shapes including odd ones (K 1..1024, d 1..8, 1-2
   stages, scale groups, offsets, bias, M 1..16, fp32/fp16/bf16 x), the output poisoned with
   NaN first. `--smoke` runs a few small cases on CPU under TRITON_INTERPRET=1 (checks the
   script without a GPU).
3. `--profile-once`: one call each of the dequantizing GEMV and the psum GEMV at 4096x4096
   K=256 d=4, M=1, untimed, for Nsight Compute (bench/gpu_session.sh runs ncu on it).
4. k-means assignment (Triton) on the 3072x768 per-row K=64 d=8 layer of the CPU benchmark and on
   a 4096x4096 layer-scope K=4096 d=8 layer (2M blocks), vs the reference on the GPU and, for
   the small case, the seeds' per-row Python loop on the GPU; FLOP/s counted as 3*d per (block,
   centroid) pair (subtract, square, accumulate), beside a cuBLAS fp32 (TF32 off) matmul.
"""
from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from physkern.kernels import codebook_gemv_psum as psum  # noqa: E402
from physkern.kernels.codebook_matmul import (codebook_matmul_reference,  # noqa: E402
                                              codebook_matmul_triton)
from physkern.kernels.kmeans_assign import kmeans_assign_reference, kmeans_assign_triton  # noqa: E402
from physkern.provenance import provenance, write_json  # noqa: E402
from physkern.quant.packing import index_bits, pack_indices  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "kernels_gpu.json"
# Vendor datasheet HBM bandwidth (GB/s) by device name fragment; a lead, recorded beside the
# copy bandwidth measured in the same run.
DATASHEET_HBM_GBS = {"H200": 4800.0, "H100 80GB HBM3": 3350.0, "H100": 3350.0, "A100": 2039.0}
SHAPES = [(4096, 4096), (11008, 4096)]
MS = (1, 16, 128, 2048)
# name: (block_dim d, K, codebook_rows (None = layer scope), scale_group (None = one per row),
#        offsets) -- fp16 codebooks and scales as physkern stores them.
RECIPES = {
    "layer_K4096_d8_rowscale": (8, 4096, None, None, False),
    "layer_K256_d4_rowscale": (4, 256, None, None, False),
    "layer_K512_d4_rowscale": (4, 512, None, None, False),
    "layer_K64_d2_rowscale": (2, 64, None, None, False),
    "rtn_4bit_g64 (d=1 K=16 affine)": (1, 16, None, 64, True),
}
ROTATE_BYTES = 512 << 20


def datasheet_hbm(name: str) -> float | None:
    for frag, gbs in DATASHEET_HBM_GBS.items():
        if frag in name:
            return gbs
    return None


def copy_bandwidth() -> float:
    """GB/s of a 1 GiB device-to-device copy, bytes read plus written, median of 20."""
    a = torch.empty(1 << 28, dtype=torch.float32, device="cuda").normal_()
    b = torch.empty_like(a)
    import triton.testing as tt
    ms = tt.do_bench(lambda: b.copy_(a), warmup=50, rep=300, return_mode="median")
    return 2 * a.numel() * 4 / (ms * 1e-3) / 1e9


def matmul_tflops(dtype, n: int = 8192) -> float:
    import triton.testing as tt
    a = torch.randn(n, n, device="cuda", dtype=dtype)
    b = torch.randn(n, n, device="cuda", dtype=dtype)
    ms = tt.do_bench(lambda: a @ b, warmup=50, rep=300, return_mode="median")
    return 2 * n ** 3 / (ms * 1e-3) / 1e12


def graph_time(calls, replays: int = 20) -> float:
    """Seconds per call: capture all `calls` (one per weight copy) in one CUDA graph, replay it."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for fn in calls:  # warm-up (compiles, allocator pools) outside the capture
            fn()
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for fn in calls:
            fn()
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e-3 / len(calls))
    del graph
    return statistics.median(times)


def eager_time(calls) -> float:
    import triton.testing as tt
    state = {"i": 0}

    def step():
        calls[state["i"] % len(calls)]()
        state["i"] += 1

    return tt.do_bench(step, warmup=25, rep=200, return_mode="median") * 1e-3


def make_storage(out_f, in_f, recipe, gen):
    d, k, rows, sg, offs = recipe
    rows = rows or out_f
    sg = sg or in_f
    idx = torch.randint(0, k, (1, out_f, in_f // d), generator=gen)
    packed = pack_indices(idx, index_bits(k)).cuda()
    cb = torch.randn(1, out_f // rows, k, d, generator=gen).half().cuda()
    scales = (torch.rand(out_f, in_f // sg, generator=gen) * 0.02 + 0.01).half().cuda()
    offsets = (torch.randn(out_f, in_f // sg, generator=gen) * 0.01).half().cuda() if offs else None
    return packed, cb, scales, offsets, rows, sg


def storage_bytes(*tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


PSUM_MS = (1, 16)


def psum_eligible(recipe, m: int) -> bool:
    d, k, rows, sg, offs = recipe
    return m in PSUM_MS and rows is None and psum.psum_supported(1, 1, k, d, sg or d,
                                                                   sg is not None)


def bench_matmul(quick: bool, copy_gbs: float, peak_gbs: float | None, save=None,
                 shapes=SHAPES, ms=MS, recipes=RECIPES) -> list:
    """save(rows) is called after every cell, so a run cut short keeps what it measured."""
    rows_out = []
    gen = torch.Generator().manual_seed(0)
    for out_f, in_f in shapes:
        dense_bytes = out_f * in_f * 2
        n_dense = max(2, math.ceil(ROTATE_BYTES / dense_bytes))
        dense = [torch.randn(out_f, in_f, device="cuda", dtype=torch.float16) * 0.02
                 for _ in range(n_dense)]
        for rname, recipe in recipes.items():
            packed, cb, sc, of, rows, sg = make_storage(out_f, in_f, recipe, gen)
            q_bytes = storage_bytes(packed, cb, sc, of)
            n_q = max(2, min(256, math.ceil(ROTATE_BYTES / q_bytes)))
            # Copies share codebook/scale values but live in separate buffers, so each call
            # reads its own bytes from HBM.
            copies = [(packed.clone(), cb.clone(), sc.clone(), None if of is None else of.clone())
                      for _ in range(n_q)]
            bpw = q_bytes * 8 / (out_f * in_f)
            for m in ms:
                if quick and m not in (1, 2048):
                    continue
                x = torch.randn(m, in_f, device="cuda", dtype=torch.float16)
                # Correctness of this exact configuration against the dense dequantized weight.
                y = codebook_matmul_triton(x, *copies[0][:2], copies[0][2], copies[0][3], None,
                                           in_f, rows, sg)
                ref = codebook_matmul_reference(x.float(), *copies[0][:2], copies[0][2],
                                                copies[0][3], None, in_f, rows, sg)
                rel = float((y.float() - ref).norm() / ref.norm())
                q_calls = [lambda c=c: codebook_matmul_triton(x, c[0], c[1], c[2], c[3], None,
                                                              in_f, rows, sg) for c in copies]
                d_calls = [lambda w=w: F.linear(x, w) for w in dense]
                tq_g, td_g = graph_time(q_calls), graph_time(d_calls)
                tq_e, td_e = eager_time(q_calls), eager_time(d_calls)
                io = (m * in_f + m * out_f) * 2
                gbs_q = (q_bytes + io) / tq_g / 1e9
                gbs_d = (dense_bytes + io) / td_g / 1e9
                row = {"shape": f"{out_f}x{in_f}", "out": out_f, "in": in_f, "m": m,
                       "recipe": rname, "true_bits_per_weight": bpw,
                       "seeds_formula_bits": index_bits(recipe[1]) / recipe[0],
                       "weight_bytes": q_bytes, "dense_fp16_bytes": dense_bytes,
                       "copies_rotated": {"codebook": n_q, "dense": n_dense},
                       "rel_err_vs_reference": rel,
                       "graph_s": {"codebook": tq_g, "cublas_fp16": td_g},
                       "eager_s": {"codebook": tq_e, "cublas_fp16": td_e},
                       "speedup_vs_cublas_graph": td_g / tq_g,
                       "speedup_vs_cublas_eager": td_e / tq_e,
                       "gbs_graph": {"codebook": gbs_q, "cublas_fp16": gbs_d},
                       "fraction_of_copy_bw": {"codebook": gbs_q / copy_gbs,
                                               "cublas_fp16": gbs_d / copy_gbs},
                       "fraction_of_datasheet_hbm": None if not peak_gbs else
                       {"codebook": gbs_q / peak_gbs, "cublas_fp16": gbs_d / peak_gbs},
                       "tflops_graph": {"codebook": 2 * m * out_f * in_f / tq_g / 1e12,
                                        "cublas_fp16": 2 * m * out_f * in_f / td_g / 1e12}}
                if psum_eligible(recipe, m):
                    add_psum(row, x, copies, ref, in_f, out_f, rows, sg, q_bytes + io, td_g,
                             td_e)
                rows_out.append(row)
                if save:
                    save(rows_out)
                print(f"{row['shape']:>10s} M={m:<5d} {rname:32s} {bpw:5.3f} bpw  "
                      f"graph {tq_g * 1e6:9.1f} us vs cuBLAS {td_g * 1e6:9.1f} us "
                      f"({td_g / tq_g:5.2f}x)  eager {tq_e * 1e6:8.1f} vs {td_e * 1e6:8.1f} us  "
                      f"{gbs_q:7.0f} GB/s  err {rel:.1e}", flush=True)
                if "psum" in row["graph_s"]:
                    tp = row["graph_s"]["psum"]
                    print(f"{'':>10s} {'psum GEMV':>40s}       graph {tp * 1e6:9.1f} us "
                          f"({td_g / tp:5.2f}x cuBLAS)  eager {row['eager_s']['psum'] * 1e6:8.1f}"
                          f" us  err {row['rel_err_vs_reference_psum']:.1e}", flush=True)
            del copies
        del dense
        torch.cuda.empty_cache()
    return rows_out


def add_psum(row: dict, x, copies, ref, in_f, out_f, rows, sg, nbytes, td_g, td_e) -> None:
    """Time the psum GEMV on the same copies and x (graph + eager) into `row`."""
    c0 = copies[0]
    y = psum.codebook_matmul_psum(x, c0[0], c0[1], c0[2], c0[3], None, in_f, rows, sg)
    row["rel_err_vs_reference_psum"] = float((y.float() - ref).norm() / ref.norm())
    calls = [lambda c=c: psum.codebook_matmul_psum(x, c[0], c[1], c[2], c[3], None, in_f, rows,
                                                   sg) for c in copies]
    tp_g, tp_e = graph_time(calls), eager_time(calls)
    row["graph_s"]["psum"], row["eager_s"]["psum"] = tp_g, tp_e
    row["speedup_psum_vs_cublas_graph"] = td_g / tp_g
    row["speedup_psum_vs_cublas_eager"] = td_e / tp_e
    row["speedup_psum_vs_codebook_graph"] = row["graph_s"]["codebook"] / tp_g
    row["gbs_graph"]["psum"] = nbytes / tp_g / 1e9
    row["tflops_graph"]["psum"] = 2 * x.shape[0] * out_f * in_f / tp_g / 1e12


# (out, in, d, K, stages, scale_group (None: one per row), offsets, bias)
PSUM_CASES = [
    (4096, 4096, 4, 256, 1, None, False, False),
    (11008, 4096, 4, 512, 1, None, False, True),
    (4096, 11008, 2, 64, 1, None, False, False),
    (37, 40, 4, 256, 1, None, False, True),
    (33, 24, 1, 16, 2, 8, True, True),
    (1000, 96, 2, 1024, 1, 12, True, False),
    (257, 136, 8, 1, 1, None, False, False),
    (130, 64, 2, 64, 2, 16, True, True),
    (2049, 520, 4, 100, 1, 40, False, True),
]
PSUM_SMOKE_CASES = [(37, 40, 4, 256, 1, None, False, True), (33, 24, 1, 16, 2, 8, True, True)]


def check_psum(device, smoke: bool = False) -> list:
    """codebook_matmul_psum vs codebook_matmul_reference (fp32) on `device`; records with the
    relative error, the tolerance and whether it passed."""
    tol = {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 2e-2}
    gen = torch.Generator().manual_seed(1)
    out = []
    for case in (PSUM_SMOKE_CASES if smoke else PSUM_CASES):
        out_f, in_f, d, k, stages, sg, offs, has_bias = case
        sgv = sg or in_f
        idx = torch.randint(0, k, (stages, out_f, in_f // d), generator=gen)
        packed = pack_indices(idx, index_bits(k)).to(device)
        cb = torch.randn(stages, 1, k, d, generator=gen).half().to(device)
        sc = (torch.rand(out_f, in_f // sgv, generator=gen) + 0.5).half().to(device)
        of = (torch.randn(out_f, in_f // sgv, generator=gen) * 0.1).half().to(device) \
            if offs else None
        bias = torch.randn(out_f, generator=gen).half().to(device) if has_bias else None
        for m in ((1, 3) if smoke else (1, 5, 16)):
            for dt in ((torch.float32,) if smoke else tuple(tol)):
                x = torch.randn(m, in_f, generator=gen).to(device, dt)
                if device.type == "cuda":
                    torch.full((64 << 20,), float("nan"), device=device)  # poison freed memory
                rec = {"case": case, "m": m, "dtype": str(dt).replace("torch.", "")}
                try:
                    y = psum.codebook_matmul_psum(x, packed, cb, sc, of, bias, in_f, out_f, sgv)
                    ref = codebook_matmul_reference(x.float(), packed, cb, sc, of, bias, in_f,
                                                    out_f, sgv)
                    err = float((y.float() - ref).norm() / ref.norm().clamp_min(1e-30)) \
                        if torch.isfinite(y.float()).all() else float("inf")
                    rec.update(rel_err=err, tol=tol[dt], ok=err <= tol[dt])
                except Exception as e:  # noqa: BLE001 - recorded, the run goes on
                    rec.update(ok=False, error=f"{type(e).__name__}: {e}")
                out.append(rec)
    n_bad = sum(not r["ok"] for r in out)
    print(f"psum correctness: {len(out)} cases, {n_bad} failed", flush=True)
    for r in out:
        if not r["ok"]:
            print("  FAILED", r, flush=True)
    return out


def profile_once() -> None:
    """One untimed call of each GEMV at 4096x4096 K=256 d=4 (M=1) for Nsight Compute; the
    psum layout is built and both kernels compiled by a first call outside the profiled pair."""
    gen = torch.Generator().manual_seed(0)
    packed, cb, sc, of, rows, sg = make_storage(4096, 4096, RECIPES["layer_K256_d4_rowscale"],
                                                gen)
    x = torch.randn(1, 4096, device="cuda", dtype=torch.float16)
    for _ in range(2):  # the first round compiles and builds the layout
        codebook_matmul_triton(x, packed, cb, sc, of, None, 4096, rows, sg)
        psum.codebook_matmul_psum(x, packed, cb, sc, of, None, 4096, rows, sg)
    torch.cuda.synchronize()


def seeds_style_loop(blocks, centroids):
    out = torch.empty(blocks.shape[:2], dtype=torch.int64, device=blocks.device)
    for r in range(blocks.shape[0]):
        diff = blocks[r][:, None, :] - centroids[r][None, :, :]
        out[r] = (diff * diff).sum(-1).argmin(-1)
    return out


def bench_kmeans(fp32_tflops: float) -> list:
    import triton.testing as tt
    rows = []
    gen = torch.Generator().manual_seed(0)
    for label, (s, n, k, d) in {"3072x768 row scope K=64 d=8": (3072, 96, 64, 8),
                                "4096x4096 layer scope K=4096 d=8": (1, 4096 * 512, 4096, 8)}.items():
        blocks = torch.randn(s, n, d, generator=gen).cuda()
        cents = torch.randn(s, k, d, generator=gen).cuda()
        t_tr = tt.do_bench(lambda: kmeans_assign_triton(blocks, cents), warmup=25, rep=200,
                           return_mode="median") * 1e-3
        t_ref = tt.do_bench(lambda: kmeans_assign_reference(blocks, cents), warmup=5, rep=50,
                            return_mode="median") * 1e-3
        idx, dist = kmeans_assign_triton(blocks, cents)
        ridx, rdist = kmeans_assign_reference(blocks, cents)
        flops = 3 * d * s * n * k
        row = {"case": label, "scopes": s, "blocks_per_scope": n, "k": k, "d": d,
               "triton_s": t_tr, "reference_gpu_s": t_ref, "speedup_vs_reference": t_ref / t_tr,
               "flops_3d": flops, "triton_tflops": flops / t_tr / 1e12,
               "fraction_of_cublas_fp32_matmul": flops / t_tr / 1e12 / fp32_tflops,
               "max_dist_rel_diff": float(((dist - rdist).abs() / rdist.abs().max()).max()),
               "index_mismatches": int((idx != ridx).sum())}
        if s == 3072:
            seeds_style_loop(blocks, cents)
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            seeds_style_loop(blocks, cents)
            torch.cuda.synchronize()
            row["seeds_loop_gpu_s"] = time.perf_counter() - t0
            row["speedup_vs_seeds_loop"] = row["seeds_loop_gpu_s"] / t_tr
        rows.append(row)
        print(f"kmeans {label:36s} triton {t_tr * 1e3:8.3f} ms  ref {t_ref * 1e3:8.3f} ms  "
              f"{row['triton_tflops']:6.2f} TFLOP/s ({row['fraction_of_cublas_fp32_matmul']:.0%} of "
              f"fp32 matmul)" + (f"  seeds loop {row['seeds_loop_gpu_s'] * 1e3:.1f} ms"
                                 if "seeds_loop_gpu_s" in row else ""), flush=True)
    return rows


def _shape(text: str) -> tuple:
    out_f, _, in_f = text.partition("x")
    if not (out_f.isdigit() and in_f.isdigit()):
        raise argparse.ArgumentTypeError(f"shape must be OUTxIN, got {text!r}")
    return int(out_f), int(in_f)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="M in {1, 2048} only")
    p.add_argument("--only", choices=("matmul", "kmeans", "psum"), default=None)
    p.add_argument("--ms", type=int, nargs="+", default=list(MS), help="rows of x to time")
    p.add_argument("--shapes", type=_shape, nargs="+", default=list(SHAPES),
                   help="weight shapes OUTxIN")
    p.add_argument("--recipes", nargs="+", default=list(RECIPES), choices=list(RECIPES),
                   metavar="RECIPE", help=f"storage recipes, from {list(RECIPES)}")
    p.add_argument("--smoke", action="store_true",
                   help="psum correctness on a few small cases on CPU (TRITON_INTERPRET=1)")
    p.add_argument("--profile-once", action="store_true",
                   help="one untimed call of each GEMV for Nsight Compute, then exit")
    p.add_argument("--out", default=str(RESULTS))
    args = p.parse_args(argv)
    if args.smoke:
        if os.environ.get("TRITON_INTERPRET") != "1":
            print("bench_kernels_gpu --smoke: set TRITON_INTERPRET=1 (CPU interpreter)")
            return 2
        recs = check_psum(torch.device("cpu"), smoke=True)
        return 0 if all(r["ok"] for r in recs) else 1
    if not torch.cuda.is_available():
        print("bench_kernels_gpu: no CUDA device")
        return 2
    if args.profile_once:
        profile_once()
        return 0
    torch.backends.cuda.matmul.allow_tf32 = False
    name = torch.cuda.get_device_name()
    payload = {"provenance": provenance("cuda"), "device_name": name, "protocol": __doc__}
    status = 0
    if args.only in (None, "psum"):
        payload["psum_correctness"] = recs = check_psum(torch.device("cuda"))
        status = 0 if all(r["ok"] for r in recs) else 1
        write_json(args.out, payload)
        if args.only == "psum":
            print(f"wrote {args.out}")
            return status
    copy_gbs = copy_bandwidth()
    peak = datasheet_hbm(name)
    fp16_tf = matmul_tflops(torch.float16)
    fp32_tf = matmul_tflops(torch.float32, 4096)
    print(f"{name}: copy {copy_gbs:.0f} GB/s (datasheet {peak}), cuBLAS fp16 {fp16_tf:.0f} "
          f"TFLOP/s, fp32 (TF32 off) {fp32_tf:.1f} TFLOP/s", flush=True)
    payload["ceilings"] = {"copy_gbs_read_plus_write": copy_gbs, "datasheet_hbm_gbs": peak,
                           "cublas_fp16_tflops_8192": fp16_tf,
                           "cublas_fp32_tflops_4096_tf32_off": fp32_tf}
    if args.only in (None, "kmeans"):
        payload["kmeans_assign"] = bench_kmeans(fp32_tf)
        write_json(args.out, payload)
    if args.only in (None, "matmul"):
        def save(rows):
            payload["codebook_matmul"] = rows
            write_json(args.out, payload)
        payload["codebook_matmul"] = bench_matmul(
            args.quick, copy_gbs, peak, save, shapes=args.shapes, ms=tuple(args.ms),
            recipes={r: RECIPES[r] for r in args.recipes})
    write_json(args.out, payload)
    print(f"wrote {args.out}")
    return status


if __name__ == "__main__":
    sys.exit(main())
