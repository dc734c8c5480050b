"""Scale benchmark of streaming quantization (issue 18): memory, bit-identity, ranks, projection.

    python bench/bench_scale.py                       # default: small synthetic LLaMA (~15 min)
    python bench/bench_scale.py --size 1.5b --parts synthetic   # the ~1.5B, >= 6 GB fp32 one
    python bench/bench_scale.py --parts packaged ranks          # only those parts

Parts (each run in child processes whose resident memory, children included, is sampled every
50 ms with psutil; the parent holds no model):
  synthetic  a LLaMA with random weights (seeded, std 0.02; the packaged tokenizer's vocabulary)
             written by this script as HF shards of 500 MB (fp32), then quantized by
             physkern.streaming (GPTQ 4-bit g128, calibration from the packaged Wikipedia's
             calibration half): peak RSS, calibration activation bytes, seconds per block.
  packaged   the packaged SmolLM2-135M with one recipe through `physkern quantize` (streaming,
             the default) and `physkern quantize --in-memory`: sha256 of both model.safetensors,
             wall time and peak RSS of each.
  ranks      the small synthetic LLaMA with GPTQ through `physkern quantize` under `torchrun
             --nproc-per-node 2` (gloo, 1 thread per rank) vs `torchrun --nproc-per-node 1` (1
             thread) and the plain 1-process run (2 threads): sha256 of model.safetensors and
             wall time of each.
  projection 7B / 70B on 1 and 8 H100s, a PROJECTION from the synthetic run's measured
             per-block numbers and stated assumptions (no GPU was measured here).
Writes bench/results/scale_<size>.json (physkern.provenance).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
SIZES = {  # hidden, intermediate, layers, heads
    "small": (512, 1408, 8, 8),
    "1.5b": (2048, 5632, 28, 16),
}
PACKAGED_ARGS = ["--method", "codebook", "--k", "16", "--block-dim", "2", "--scope", "layer",
                 "--iters", "5", "--calib-windows", "4", "--calib-window", "128"]
GPTQ = {"method": "gptq", "bits": 4, "group_size": 128}
RTN = {"method": "rtn", "bits": 4, "group_size": 128}
SYNTH_CALIB = (8, 256)
# size -> [(run name, recipe, blocks to process or None = all)]: on this loaded 2-core machine
# GPTQ over every block of the 1.5B model takes hours, so there the whole model is streamed with
# RTN (no calibration) and GPTQ with calibration runs over its first block (stop_after).
SYNTH_RUNS = {"small": [("gptq_all_blocks", GPTQ, None)],
              "1.5b": [("rtn_all_blocks", RTN, None), ("gptq_first_block", GPTQ, 1)]}


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            h.update(chunk)
    return h.hexdigest()


def run_measured(cmd: list[str], env: dict | None = None) -> dict:
    """Run cmd; returns {"seconds", "peak_rss_bytes" (the process tree, sampled every 50 ms),
    "returncode", "stdout_tail", "stderr_tail"}."""
    import psutil
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}, cwd=ROOT)
    peak, done = [0], threading.Event()

    def sample():
        proc = psutil.Process(p.pid)
        while not done.is_set():
            try:
                procs = [proc] + proc.children(recursive=True)
                rss = sum(q.memory_info().rss for q in procs)
                peak[0] = max(peak[0], rss)
            except psutil.Error:
                pass
            time.sleep(0.05)

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    out, err = p.communicate()
    done.set()
    t.join()
    res = {"command": " ".join(cmd), "seconds": time.perf_counter() - t0,
           "peak_rss_bytes": peak[0], "returncode": p.returncode,
           "stdout_tail": out[-1500:], "stderr_tail": err[-1500:]}
    if p.returncode != 0:
        print(err[-3000:], file=sys.stderr)
        raise SystemExit(f"failed: {res['command']}")
    return res


# ---- the synthetic model -------------------------------------------------------------------


def write_synthetic(d: Path, size: str, seed: int = 0) -> dict:
    """A random LLaMA checkpoint in HF shards of <= 500 MB, written one block at a time; the
    packaged model's tokenizer beside it. Returns its description."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoTokenizer, LlamaConfig

    from physkern.checkpoint import INDEX_FILE, shard_file_name
    from physkern.models import packaged_model_dir
    hidden, inter, layers, heads = SIZES[size]
    tok = AutoTokenizer.from_pretrained(packaged_model_dir())
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=inter,
                      num_hidden_layers=layers, num_attention_heads=heads,
                      num_key_value_heads=heads, max_position_embeddings=2048,
                      tie_word_embeddings=True)
    if (d / "config.json").exists() and json.loads((d / "synthetic.json").read_text()) == \
            {"size": size, "seed": seed}:
        pass  # already written
    else:
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir(parents=True)
        g = torch.Generator().manual_seed(seed)
        groups: list[dict] = [{"model.embed_tokens.weight": (len(tok), hidden),
                               "model.norm.weight": (hidden,)}]
        for i in range(layers):
            p = f"model.layers.{i}."
            groups.append({p + "self_attn.q_proj.weight": (hidden, hidden),
                           p + "self_attn.k_proj.weight": (hidden, hidden),
                           p + "self_attn.v_proj.weight": (hidden, hidden),
                           p + "self_attn.o_proj.weight": (hidden, hidden),
                           p + "mlp.gate_proj.weight": (inter, hidden),
                           p + "mlp.up_proj.weight": (inter, hidden),
                           p + "mlp.down_proj.weight": (hidden, inter),
                           p + "input_layernorm.weight": (hidden,),
                           p + "post_attention_layernorm.weight": (hidden,)})
        # shards: whole groups, <= 500 MB each
        shards, cur, size_b = [], [], 0
        for grp in groups:
            n = sum(math.prod(s) * 4 for s in grp.values())
            if cur and size_b + n > 500e6:
                shards.append(cur)
                cur, size_b = [], 0
            cur.append(grp)
            size_b += n
        shards.append(cur)
        weight_map, total = {}, 0
        for k, shard in enumerate(shards):
            name = shard_file_name(k, len(shards))
            tensors = {}
            for grp in shard:
                for key, shape in grp.items():
                    if key.endswith("norm.weight"):
                        tensors[key] = torch.ones(shape)
                    else:
                        tensors[key] = torch.randn(shape, generator=g) * 0.02
                    weight_map[key] = name
                    total += tensors[key].numel() * 4
            save_file(tensors, str(d / name), metadata={"format": "pt"})
            del tensors
        (d / INDEX_FILE).write_text(json.dumps({"metadata": {"total_size": total},
                                                "weight_map": weight_map}, indent=1))
        cfg.save_pretrained(d)
        tok.save_pretrained(d)
        (d / "synthetic.json").write_text(json.dumps({"size": size, "seed": seed}))
    n_params = sum(math.prod(info) for info in _shapes(d))
    fp32 = sum(f.stat().st_size for f in d.glob("model-*.safetensors"))
    return {"size": size, "seed": seed, "hidden": hidden, "intermediate": inter,
            "layers": layers, "heads": heads, "vocab": len(tok), "parameters": n_params,
            "checkpoint_bytes_fp32": fp32,
            "block_parameters": 4 * hidden * hidden + 3 * hidden * inter,
            "shards": len(list(d.glob("model-*.safetensors")))}


def _shapes(d: Path):
    from physkern.checkpoint import Checkpoint
    return [shape for _, shape in Checkpoint(d).header.values()]


CHILD = """
import json, resource, sys, time, torch
from transformers import AutoTokenizer
from physkern.config import config_from_dict
from physkern.data import calibration_windows, load_corpus
from physkern.streaming import quantize_streaming
src, out, recipe, windows, window, stop, result = sys.argv[1:8]
stop = None if stop == "all" else int(stop)
tok = AutoTokenizer.from_pretrained(src)
cfg = config_from_dict(json.loads(recipe))
calib = calibration_windows(tok, load_corpus(None), int(windows), int(window), 0) \
    if cfg.needs_calibration else None
t0 = time.perf_counter()
times = []
import physkern.streaming as s
r = quantize_streaming(src, out, cfg, calib, tokenizer=tok, max_shard_size="250MB",
                       progress=False, overwrite=True, resume=False, stop_after=stop)
d = r.to_dict() if r is not None else {}
if r is not None:
    d["quantization"] = {k: v for k, v in d["quantization"].items() if k != "layers"}
d["seconds_total"] = time.perf_counter() - t0
d["ru_maxrss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
json.dump(d, open(result, "w"))
"""


def _stream_run(work: Path, src: Path, size: str, name: str, recipe: dict,
                stop: int | None) -> dict:
    result = work / "synthetic_result.json"
    out = work / f"q-{size}-{name}"
    run = run_measured([PY, "-P", "-c", CHILD, str(src), str(out), json.dumps(recipe),
                        str(SYNTH_CALIB[0]), str(SYNTH_CALIB[1]),
                        "all" if stop is None else str(stop), str(result)])
    r = json.loads(result.read_text())
    d = {"recipe": recipe, "blocks_processed": "all" if stop is None else stop,
         "peak_rss_bytes": run["peak_rss_bytes"], "ru_maxrss_bytes": r["ru_maxrss_bytes"],
         "seconds": run["seconds"], "seconds_in_child": r["seconds_total"],
         "command": run["command"]}
    if stop is None:
        act = r["activation_bytes"]
        d.update({"activation_bytes": act, "goal_bytes": 1.5 * 2**30 + act,
                  "meets_goal": run["peak_rss_bytes"] <= 1.5 * 2**30 + act,
                  "block_seconds": r["block_seconds"],
                  "output_bytes": sum(f.stat().st_size for f in out.glob("*.safetensors")),
                  "quantized_bits_per_weight":
                      r["quantization"]["quantized_bits_per_weight"]})
        if recipe["method"] != "rtn":
            d["calibration"] = {"windows": SYNTH_CALIB[0], "window": SYNTH_CALIB[1],
                                "corpus": "packaged Wikipedia, calibration half", "seed": 0}
    else:  # stopped: the per-block seconds are in the state folder's state.json
        [state] = list(work.glob(f".q-{size}-{name}.stream-*"))
        d["block_seconds"] = json.loads((state / "state.json").read_text())["block_seconds"]
        d["calibration"] = {"windows": SYNTH_CALIB[0], "window": SYNTH_CALIB[1],
                            "corpus": "packaged Wikipedia, calibration half", "seed": 0}
        for p in work.glob(f".q-{size}-{name}.stream-*"):
            shutil.rmtree(p, ignore_errors=True)
    return d


def part_synthetic(work: Path, size: str, save, only=None, previous=None) -> dict:
    """save(partial) is called after each run (a long run's results survive the next one).
    only: names of the runs to redo (the others are kept from `previous`)."""
    src = work / f"synthetic-{size}"
    t0 = time.perf_counter()
    desc = write_synthetic(src, size)
    desc["seconds_to_write"] = time.perf_counter() - t0
    out = {"model": desc, "runs": dict((previous or {}).get("runs", {})) if only else {}}
    for name, recipe, stop in SYNTH_RUNS[size]:
        if only and name not in only:
            continue
        print(f"   {name}", flush=True)
        out["runs"][name] = _stream_run(work, src, size, name, recipe, stop)
        print(json.dumps({k: v for k, v in out["runs"][name].items() if k != "command"})[:800],
              flush=True)
        save(out)
    return out


def _quantize_cmd(out: Path, *extra: str) -> list[str]:
    return [str(Path(PY).parent / "physkern"), "quantize", *PACKAGED_ARGS, "--out", str(out),
            "--overwrite", *extra]


def part_packaged(work: Path) -> dict:
    s = run_measured(_quantize_cmd(work / "pk-stream"))
    m = run_measured(_quantize_cmd(work / "pk-memory", "--in-memory"))
    hs, hm = sha256(work / "pk-stream" / "model.safetensors"), \
        sha256(work / "pk-memory" / "model.safetensors")
    return {"model": "SmolLM2-135M-Instruct (packaged)", "args": PACKAGED_ARGS,
            "streaming": {"seconds": s["seconds"], "peak_rss_bytes": s["peak_rss_bytes"],
                          "sha256": hs, "command": s["command"]},
            "in_memory": {"seconds": m["seconds"], "peak_rss_bytes": m["peak_rss_bytes"],
                          "sha256": hm, "command": m["command"]},
            "identical_file": hs == hm}


RANKS_ARGS = ["--method", "gptq", "--bits", "4", "--group-size", "128", "--calib-windows",
              str(SYNTH_CALIB[0]), "--calib-window", str(SYNTH_CALIB[1])]


def part_ranks(work: Path) -> dict:
    """The small synthetic LLaMA (8 blocks) with GPTQ through `physkern quantize`: plain, and
    under torchrun with 1 and 2 ranks (the packaged model's 30 blocks took too long on this
    loaded machine for three runs)."""
    torchrun = str(Path(PY).parent / "torchrun")
    phys = str(Path(PY).parent / "physkern")
    src = work / "synthetic-small"
    write_synthetic(src, "small")

    def cmd(out):
        return [phys, "quantize", "--model", str(src), *RANKS_ARGS, "--out", str(out),
                "--overwrite", "--fresh"]
    out = {}
    for name, c, env in (
            ("plain_1_process_2_threads", cmd(work / "r-plain"), {"OMP_NUM_THREADS": "2"}),
            ("torchrun_1_rank_1_thread", [torchrun, "--nproc-per-node", "1"]
             + cmd(work / "r1"), {"OMP_NUM_THREADS": "1"}),
            ("torchrun_2_ranks_1_thread_each", [torchrun, "--nproc-per-node", "2"]
             + cmd(work / "r2"), {"OMP_NUM_THREADS": "1"})):
        print(f"   {name}", flush=True)
        cmd_ = c
        r = run_measured(cmd_, env)
        d = Path(cmd_[cmd_.index("--out") + 1])
        out[name] = {"seconds": r["seconds"], "peak_rss_bytes": r["peak_rss_bytes"],
                     "sha256": sha256(d / "model.safetensors"), "command": r["command"]}
    hashes = {v["sha256"] for v in out.values()}
    return {"model": "synthetic small LLaMA (see synthetic.model)", "args": RANKS_ARGS,
            "runs": out, "identical_files": len(hashes) == 1,
            "speedup_2_ranks_vs_1_rank": out["torchrun_1_rank_1_thread"]["seconds"]
            / out["torchrun_2_ranks_1_thread_each"]["seconds"]}


# ---- projection ------------------------------------------------------------------------------

TARGETS = {  # hidden, intermediate, layers, kv heads / heads, vocab
    "llama-7b": (4096, 11008, 32, 1.0, 32000),
    "llama-70b": (8192, 28672, 80, 0.125, 128256),
}
# What no measurement here can give: the H100's effective throughput on this loop (GPTQ's
# column-sequential updates run far below peak). A range, stated as an assumption.
H100_EFFECTIVE_FLOPS = (1e12, 10e12)
H100_MEMORY = 80e9
DISK_BYTES_PER_S = 2e9  # assumed NVMe read rate for the bf16 checkpoint


def _block_layers(hidden, inter, kv):
    kvd = int(hidden * kv)
    return [(hidden, hidden), (kvd, hidden), (kvd, hidden), (hidden, hidden),
            (inter, hidden), (inter, hidden), (hidden, inter)]


def _gptq_flops(out_f, in_f):
    return 2 * out_f * in_f * in_f + in_f ** 3  # error feedback over columns + Cholesky


def _block_flops(layers, tokens):
    params = sum(o * n for o, n in layers)
    return 2 * 2 * params * tokens, [_gptq_flops(o, n) for o, n in layers]


def projection(synth: dict) -> dict:
    """7B / 70B, 1 and 8 H100s: a PROJECTION. Per block: FLOPs = 2 forward passes over the
    calibration tokens + GPTQ's per-layer FLOPs; CPU hours from the rate measured here; H100
    hours for an assumed effective-throughput range; 8 ranks: every rank runs the forward, the
    layers are split by physkern.distributed's owners() and the slowest rank sets the time.
    Memory: GPU = one block's bf16 weights + fp64 Grams of its distinct inputs + one batch of
    activations; host = the measured RSS less this model's parts, plus the target's untied
    embedding and head (bf16) and the calibration activations (bf16), plus one block (bf16)
    and its Grams when the block runs on the CPU."""
    from physkern.distributed import Dist
    m = synth["model"]
    run = next(r for r in synth["runs"].values() if r["recipe"]["method"] == "gptq")
    h, i = m["hidden"], m["intermediate"]
    cal = run["calibration"]
    tokens = cal["windows"] * cal["window"]
    fwd, qs = _block_flops(_block_layers(h, i, 1.0), tokens)
    measured = sorted(run["block_seconds"])[len(run["block_seconds"]) // 2]
    cpu_rate = (fwd + sum(qs)) / measured
    grams_measured = 8 * (2 * h * h + i * i)
    base = run["peak_rss_bytes"] - 4 * (m["vocab"] * h + m["block_parameters"]) \
        - grams_measured
    out = {"label": "PROJECTION from measured per-block numbers and stated assumptions, not a "
                    "measurement (no GPU here)",
           "basis": {"measured_run": run["recipe"], "measured_median_block_seconds_cpu": measured,
                     "measured_flops_per_block": fwd + sum(qs),
                     "cpu_effective_flops_measured": cpu_rate,
                     "host_baseline_bytes_derived": base, "calibration_tokens": tokens,
                     "h100_effective_flops_assumed": H100_EFFECTIVE_FLOPS,
                     "disk_bytes_per_s_assumed": DISK_BYTES_PER_S,
                     "dtype": "bf16 weights (--dtype bf16), statistics fp32/fp64",
                     "method": " ".join(projection.__doc__.split())}}
    for name, (hid, inter, n_layers, kv, vocab) in TARGETS.items():
        ls = _block_layers(hid, inter, kv)
        bp = sum(o * n for o, n in ls)
        fwd_t, qs_t = _block_flops(ls, tokens)
        grams = 8 * (2 * hid * hid + inter * inter)  # q/k/v and gate/up share their input
        act_batch = 2 * hid * cal["window"]
        res = {"block_parameters": bp, "blocks": n_layers,
               "parameters": bp * n_layers + 2 * vocab * hid,
               "gpu_memory_per_block_bytes": 2 * bp + grams + 4 * act_batch,
               "fits_one_h100": 2 * bp + grams + 4 * act_batch < H100_MEMORY,
               # untied embedding + head at bf16, calibration activations at bf16
               "host_rss_bytes_gpu_run": base + 2 * 2 * vocab * hid + tokens * hid * 2,
               "host_rss_bytes_cpu_run": base + 2 * 2 * vocab * hid + tokens * hid * 2
               + 2 * bp + grams,
               "read_seconds_at_assumed_disk_rate": 2 * (bp * n_layers + 2 * vocab * hid)
               / DISK_BYTES_PER_S,
               "cpu_hours_this_machine_measured_rate": (fwd_t + sum(qs_t)) / cpu_rate
               * n_layers / 3600}
        for gpus in (1, 8):
            owners = Dist(0, gpus).owners([o * n for o, n in ls])
            slowest = max(sum(q for q, o in zip(qs_t, owners) if o == r) for r in range(gpus))
            res[f"h100_x{gpus}_hours_range"] = [(fwd_t + slowest) / f * n_layers / 3600
                                                for f in reversed(H100_EFFECTIVE_FLOPS)]
        out[name] = res
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", choices=list(SIZES), default="small")
    ap.add_argument("--parts", nargs="+", default=["synthetic", "packaged", "ranks",
                                                   "projection"],
                    choices=["synthetic", "packaged", "ranks", "projection"])
    ap.add_argument("--work", default=None, help="scratch folder (default /tmp/physkern-scale)")
    ap.add_argument("--out", default=None,
                    help="results JSON (default bench/results/scale_<size>.json)")
    ap.add_argument("--keep", action="store_true", help="keep the scratch folder")
    ap.add_argument("--runs", nargs="+", default=None,
                    help="synthetic part: redo only these runs (names in SYNTH_RUNS), keep the "
                         "others from the existing JSON")
    args = ap.parse_args()
    from physkern.provenance import provenance, write_json
    work = Path(args.work or "/tmp/physkern-scale")
    work.mkdir(parents=True, exist_ok=True)
    out = Path(args.out or ROOT / "bench" / "results" / f"scale_{args.size}.json")
    payload = json.loads(out.read_text()) if out.exists() else {}
    payload.pop("provenance", None)
    payload.update({"description": __doc__.split("\n")[0], "size": args.size})
    for part in args.parts:
        print(f"== {part}", flush=True)
        t0 = time.perf_counter()
        if part == "synthetic":
            def save(partial):
                write_json(out, {**payload, "synthetic": partial, **provenance("cpu")})
            payload["synthetic"] = part_synthetic(work, args.size, save, args.runs,
                                                  payload.get("synthetic"))
        elif part == "packaged":
            payload["packaged"] = part_packaged(work)
        elif part == "ranks":
            payload["ranks"] = part_ranks(work)
        elif part == "projection":
            if "synthetic" not in payload:
                raise SystemExit("projection needs the synthetic part (run it first)")
            payload["projection"] = projection(payload["synthetic"])
        print(json.dumps(payload[part], indent=1, default=str)[:3000], flush=True)
        print(f"   {time.perf_counter() - t0:.0f} s", flush=True)
        write_json(out, {**payload, **provenance("cpu")})
    if not args.keep:
        for p in work.iterdir():
            if p.name.startswith(("q-", "pk-", "r-", "r1", "r2", "synthetic_result", ".q-")):
                shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink()
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
