"""llama.cpp on the same weights: file size, bits/parameter, perplexity and tokens/s.

The peer every user compares with. One command builds what it needs (cached under
$PHYSKERN_CACHE/llamacpp) and writes bench/results/llamacpp_cpu.json:
  1. llama.cpp's tools from the llama-cpp-python 0.3.36 sdist (which vendors llama.cpp), built
     with cmake for this CPU's instruction sets named explicitly (GGML_NATIVE=OFF: a native build
     was seen to die with an illegal instruction in this VM);
  2. an f32 GGUF of the packaged model's weights (its convert_hf_to_gguf.py, from the
     transformers copy physkern converts the packaged Q4_1 GGUF into);
  3. an importance matrix from physkern's calibration text (the wiki corpus' first half, never
     scored), then each quantization type with it (llama-quantize --imatrix);
  4. perplexity through physkern's own harness (the GGUF de-quantized by transformers; the same
     tokens, windows and protocol as every physkern figure), file MB and bits/parameter (whole
     file, 8 * bytes / parameters, as the source GGUF's 5.85), and llama-bench prefill (pp512)
     and decode (tg128) tokens/s at each thread count.

    python bench/bench_llamacpp.py [--types IQ2_XXS IQ3_XXS ...] [--threads 1 2] [--tokens 16384]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tarfile
import time
from pathlib import Path

SDIST = "llama-cpp-python==0.3.36"
SDIST_DIR = "llama_cpp_python-0.3.36"
TOOLS = ("llama-bench", "llama-quantize", "llama-imatrix")
# convert_hf_to_gguf.py imports sentencepiece before it looks for a tokenizer.model (this model
# has none and falls back to its BPE tokenizer.json): installed beside the build, not in the venv.
CONVERT_DEPS = ("sentencepiece==0.2.1",)
# Instruction sets named explicitly, for the AVX-512 EPYC this project runs on (GGML_NATIVE=OFF).
CMAKE_FLAGS = ["-DCMAKE_BUILD_TYPE=Release", "-DGGML_NATIVE=OFF", "-DGGML_AVX=ON", "-DGGML_AVX2=ON",
               "-DGGML_FMA=ON", "-DGGML_F16C=ON", "-DGGML_AVX512=ON", "-DGGML_AVX512_VBMI=ON",
               "-DGGML_AVX512_VNNI=ON", "-DGGML_AVX512_BF16=ON", "-DLLAMA_CURL=OFF",
               "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_SERVER=OFF", "-DGGML_OPENMP=ON"]
# The rows of issue 16's table: llama.cpp's smallest types and the usual 4/8-bit ones.
DEFAULT_TYPES = ("IQ2_XXS", "IQ3_XXS", "Q2_K", "Q4_0", "IQ4_XS", "Q8_0")
KNOWN_TYPES = DEFAULT_TYPES + ("IQ2_XS", "IQ2_S", "IQ3_S", "Q3_K_S", "Q3_K_M", "Q4_K_S",
                               "Q4_K_M", "Q5_K_S", "Q6_K", "F16")


def _run(cmd: list[str], log: Path, **kw) -> None:
    """Run a tool, its output appended to `log`; a failure names the command and the log."""
    with open(log, "a") as f:
        f.write(f"$ {' '.join(map(str, cmd))}\n")
        f.flush()
        rc = subprocess.run(list(map(str, cmd)), stdout=f, stderr=subprocess.STDOUT, **kw).returncode
    if rc != 0:
        raise RuntimeError(f"{Path(cmd[0]).name} failed (exit {rc}); see {log}")


def llama_cpp_source(work: Path) -> Path:
    """The vendored llama.cpp of the pinned sdist, downloaded from PyPI once."""
    src = work / SDIST_DIR / "vendor" / "llama.cpp"
    if (src / "CMakeLists.txt").is_file():
        return src
    work.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "pip", "download", SDIST, "--no-deps",
                    "--no-binary", ":all:", "-d", str(work)], check=True)
    with tarfile.open(work / f"{SDIST_DIR}.tar.gz") as tar:
        tar.extractall(work, filter="data")
    return src


def build_tools(src: Path, log: Path, jobs: int) -> Path:
    """Build llama.cpp's command-line tools (about 15 minutes on 2 cores, once)."""
    bin_dir = src / "build" / "bin"
    if all((bin_dir / t).is_file() for t in TOOLS):
        return bin_dir
    _run(["cmake", "-S", src, "-B", src / "build", *CMAKE_FLAGS], log)
    _run(["cmake", "--build", src / "build", f"-j{jobs}", "--target", *TOOLS], log)
    return bin_dir


def f32_gguf(src: Path, work: Path, log: Path) -> Path:
    """An f32 GGUF of the packaged model's weights (the transformers copy physkern uses)."""
    from physkern.models import packaged_model_dir
    out = work / "smollm2-135m-f32.gguf"
    if not out.is_file():
        tmp = out.with_suffix(".partial")
        deps = work / "pydeps"
        if not deps.is_dir():
            subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--target",
                            str(deps), *CONVERT_DEPS], check=True)
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(src / "gguf-py"), str(deps)]))
        _run([sys.executable, src / "convert_hf_to_gguf.py", packaged_model_dir(),
              "--outtype", "f32", "--outfile", tmp], log, env=env)
        os.replace(tmp, out)
    return out


def calibration_file(work: Path, windows: int, window: int) -> Path:
    """The calibration part of the wiki corpus (never scored), enough text for the imatrix."""
    from physkern.data import load_corpus
    out = work / f"calibration_wiki_{windows}x{window}.txt"
    if not out.is_file():
        # ~4 characters per token; twice what the chunks need, so none comes up short.
        text = load_corpus("wiki").calibration_text[: 8 * windows * window]
        out.write_text(text)
    return out


def quantize_all(bin_dir: Path, f32: Path, calib: Path, types, work: Path, log: Path,
                 threads: int, windows: int, window: int) -> dict[str, Path]:
    imatrix = work / f"imatrix_{windows}x{window}.gguf"
    if not imatrix.is_file():
        _run([bin_dir / "llama-imatrix", "-m", f32, "-f", calib, "-o", imatrix,
              "--chunks", windows, "-c", window, "-t", threads], log)
    files = {}
    for t in types:
        out = work / f"smollm2-135m-{t}.gguf"
        if not out.is_file():
            tmp = out.with_suffix(".partial")
            _run([bin_dir / "llama-quantize", "--imatrix", imatrix, f32, tmp, t, threads], log)
            os.replace(tmp, out)
        files[t] = out
    return files


def speed(bin_dir: Path, files: dict[str, Path], threads, reps: int, log: Path) -> dict:
    """llama-bench pp512 / tg128 tokens/s per file and thread count (mean of `reps`)."""
    out = {}
    for name, path in files.items():
        cmd = [bin_dir / "llama-bench", "-m", path, "-p", "512", "-n", "128",
               "-t", ",".join(map(str, threads)), "-r", reps, "-o", "json"]
        res = subprocess.run(list(map(str, cmd)), capture_output=True, text=True)
        with open(log, "a") as f:
            f.write(f"$ {' '.join(map(str, cmd))}\n{res.stderr}\n{res.stdout}\n")
        if res.returncode != 0:
            raise RuntimeError(f"llama-bench failed on {path.name}; see {log}")
        for row in json.loads(res.stdout):
            kind = "prefill_tok_s" if row["n_prompt"] else "decode_tok_s"
            out.setdefault(name, {}).setdefault(str(row["n_threads"]), {})[kind] = row["avg_ts"]
    return out


def perplexity_of(path: Path, tokens: int) -> dict:
    """physkern's harness on the GGUF (de-quantized to fp32 by transformers): same text, same
    windows as bench/results/whole_model_16k.json."""
    from physkern.data import evaluation_tokens, load_corpus
    from physkern.eval import perplexity
    from physkern.models import load_model
    model, tok = load_model(str(path))
    ids = evaluation_tokens(tok, load_corpus("wiki"), tokens)
    res = perplexity(model, ids, 1024, None, batch_size=1, model_name=path.name,
                     corpus_name="wiki")
    return {"perplexity": res.perplexity, "tokens_scored": res.tokens_scored,
            "protocol": res.protocol, "window": res.window}


def main(argv=None) -> int:
    from physkern.cache import cache_dir
    from physkern.provenance import provenance, write_json
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--types", nargs="+", default=list(DEFAULT_TYPES), choices=KNOWN_TYPES)
    p.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    p.add_argument("--tokens", type=int, default=16384, help="evaluation tokens (wiki)")
    p.add_argument("--calib-windows", type=int, default=32)
    p.add_argument("--calib-window", type=int, default=1024)
    p.add_argument("--reps", type=int, default=3, help="llama-bench repetitions")
    p.add_argument("--jobs", type=int, default=2, help="build jobs")
    p.add_argument("--skip-ppl", action="store_true", help="sizes and speed only")
    p.add_argument("--out", default="bench/results/llamacpp_cpu.json")
    args = p.parse_args(argv)
    if any(t <= 0 for t in args.threads):
        raise SystemExit(f"--threads: positive counts, got {args.threads}")
    work = cache_dir() / "llamacpp"
    log = work / "bench_llamacpp.log"
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    load_before = os.getloadavg()
    src = llama_cpp_source(work)
    bin_dir = build_tools(src, log, args.jobs)
    f32 = f32_gguf(src, work, log)
    calib = calibration_file(work, args.calib_windows, args.calib_window)
    files = {"F32": f32, **quantize_all(bin_dir, f32, calib, args.types, work, log,
                                          max(args.threads), args.calib_windows,
                                          args.calib_window)}
    from physkern.models import load_model
    n_params = sum(p.numel() for p in load_model(str(f32))[0].parameters())
    rows = {}
    for name, path in files.items():
        size = path.stat().st_size
        rows[name] = {"file": path.name, "file_mb": size / 1e6,
                      "bits_per_parameter": 8 * size / n_params}
    for name, by_threads in speed(bin_dir, files, args.threads, args.reps, log).items():
        rows[name]["speed"] = by_threads
    if not args.skip_ppl:
        for name, path in files.items():
            print(f"perplexity of {path.name} ...", flush=True)
            rows[name].update(perplexity_of(path, args.tokens))
    for name, r in rows.items():
        sp = " ".join(f"{t}t: pp {v.get('prefill_tok_s', 0):.0f} tg {v.get('decode_tok_s', 0):.1f}"
                      for t, v in r.get("speed", {}).items())
        ppl = f"ppl {r['perplexity']:.2f}" if "perplexity" in r else ""
        print(f"{name:8s} {r['file_mb']:7.1f} MB {r['bits_per_parameter']:5.2f} b/param {ppl}  {sp}")
    write_json(args.out, {
        "experiment": "llama.cpp on the packaged model's weights: size, perplexity, tokens/s",
        "model": "SmolLM2-135M-Instruct (weights of the packaged Q4_1 GGUF, as f32), "
                 f"{n_params} parameters",
        "llama_cpp": f"vendored in {SDIST} (cmake {' '.join(CMAKE_FLAGS)})",
        "imatrix": f"llama-imatrix, {args.calib_windows} chunks x {args.calib_window} tokens of "
                   "the wiki corpus' calibration part (first half of the documents)",
        "perplexity_protocol": {"harness": "physkern.eval.perplexity on the GGUF de-quantized "
                                           "to fp32 by transformers", "corpus": "wiki",
                                "part": "evaluation (second half of the documents)",
                                "tokens_input": args.tokens, "window": 1024,
                                "kind": "non-overlapping"},
        "speed_protocol": f"llama-bench -p 512 -n 128 -r {args.reps}: pp = prefill of a "
                          "512-token prompt, tg = decode of 128 tokens, batch 1, tokens/s mean",
        "bits_note": "bits/parameter = 8 x whole file bytes / parameters (tokenizer and "
                     "metadata included), as the source GGUF's 5.85",
        "loadavg_before": load_before, "loadavg_after": os.getloadavg(),
        "cpu_count": os.cpu_count(),
        "rows": rows, "seconds": time.time() - t0, **provenance("cpu")})
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
