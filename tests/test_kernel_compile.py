"""Compile every production kernel configuration for sm_80 and sm_90 (fp16 and bf16) with
triton.compile + GPUTarget and fail on register spills. No GPU needed; skips cleanly when the
Triton NVIDIA tooling (ASTSource, GPUTarget, ptxas) is missing.

Compilation runs in one child process without TRITON_INTERPRET (conftest sets it, and
interpreted kernels cannot be compiled). The codebook matmul is compiled in its heaviest format
variant (3-bit straddling indices, two residual stages, scales and offsets) and the scalar d = 1
grid; bench/gpu_static_report.py compiles every variant.

The SASS model (kernels/sass_model.py, via static_compile.model_all) is checked on the psum GEMV
against stated bounds: at K=256 d=4 (2 bits of index per weight) its main loop requests at most
PSUM_LOOP_GLOBAL_BYTES_BOUND bytes per weight from global memory, one 4-byte table read per d
weights from shared memory, and no warp shuffles."""
import pytest

from physkern.kernels import static_compile as sc

available, reason = sc.tooling_available()
pytestmark = pytest.mark.skipif(not available, reason=reason)


@pytest.fixture(scope="module")
def compiled():
    return sc.compile_all_subprocess(full=False)


def _records(compiled, kernel):
    recs = [r for r in compiled if r["kernel"] == kernel]
    assert recs
    return recs


def _assert_clean(rec):
    where = f"{rec['kernel']}/{rec['config']} sm_{rec['arch']} {rec['dtype']} {rec['constexprs']}"
    assert rec["registers"] is not None, where
    assert rec["spill_stores"] == 0 and rec["spill_loads"] == 0, (
        f"{where}: {rec['registers']} registers, {rec['spill_stores']} B spill stores")
    assert rec["registers"] <= 255, where
    assert rec["shared_bytes"] <= (227 if rec["arch"] == 90 else 163) * 1024, where


def test_codebook_matmul_configs_compile_without_spills(compiled):
    recs = _records(compiled, "codebook_matmul")
    seen = {(r["config"], r["dtype"], r["arch"]) for r in recs}
    assert seen == {(c, t, a) for c in sc.MATMUL_CONFIGS for t in sc.DTYPES for a in sc.ARCHS}
    for rec in recs:
        _assert_clean(rec)
        assert rec["mma_instructions"] + rec["wgmma_instructions"] > 0, "tl.dot did not use mma"


def test_kmeans_assign_configs_compile_without_spills(compiled):
    recs = _records(compiled, "kmeans_assign")
    seen = {(r["constexprs"]["D"], r["dtype"], r["arch"]) for r in recs}
    assert seen == {(d, t, a) for d in sc.SUPPORTED_BLOCK_DIMS for t in sc.DTYPES
                    for a in sc.ARCHS}
    for rec in recs:
        _assert_clean(rec)


def test_gemv_vec_and_reduce_configs_compile_without_spills(compiled):
    recs = _records(compiled, "codebook_gemv")
    seen = {(r["config"], r["dtype"], r["arch"]) for r in recs}
    assert seen == {(f"gemv_vec_{c}", t, a) for c in sc.GEMV_VEC_CONFIGS for t in sc.DTYPES
                    for a in sc.ARCHS}
    # the two-stage word-wise format is among the compiled variants (a constexpr re-assignment
    # inside the stage loop once broke exactly this combination on the GPU only)
    assert any(r["constexprs"]["WORDWISE"] and r["constexprs"]["STAGES"] == 2
               for r in recs + _records(compiled, "codebook_matmul"))
    for rec in recs + _records(compiled, "split_reduce"):
        _assert_clean(rec)


def test_psum_configs_compile_without_spills(compiled):
    recs = _records(compiled, "psum_gemv")
    seen = {(r["dtype"], r["arch"]) for r in recs}
    assert seen == {(t, a) for t in sc.DTYPES for a in sc.ARCHS}
    assert any(r["constexprs"]["HI_W"] for r in recs)  # the 9-bit two-plane variant
    for rec in recs + _records(compiled, "psum_finish"):
        _assert_clean(rec)


def test_hadamard_rotate_configs_compile_without_spills(compiled):
    recs = _records(compiled, "hadamard_rotate")
    seen = {(r["config"], r["dtype"], r["arch"]) for r in recs}
    assert seen == {(f"b{b}", t, a) for b in sc.ROTATE_BLOCKS for t in sc.DTYPES + ("fp32",)
                    for a in sc.ARCHS}
    for rec in recs:   # fp32 "ieee" dot: FMA, not mma (exact +-1/8 products, fp32 sums)
        _assert_clean(rec)


# Index bytes of K=256 d=4 are 8 bits per 4 weights = 0.25 B; the loop may add the row blocks'
# scale/offset loads, nothing proportional to the codebook (the dequantizing GEMV requests
# ~2.3 B per weight in its loop: an 8-byte codebook entry per 4 weights, plus indices and x).
PSUM_LOOP_GLOBAL_BYTES_BOUND = 0.3
PSUM_LOOP_SHARED_BYTES_BOUND = 1.5   # 1.0 = one fp32 table read per 4 weights, + conversions


@pytest.fixture(scope="module")
def sass_models():
    return sc.model_all_subprocess([("layer_K256_d4_rowscale", 1, "psum"),
                                    ("layer_K256_d4_rowscale", 1, "dequant")])


def _main(models, family):
    recs = [r for r in models if r["family"] == family and r["main"]]
    assert len(recs) == 1
    return recs[0]


def test_psum_sass_model_bounds(sass_models):
    rec = _main(sass_models, "psum")
    s = rec["sass"]
    assert rec["spill_stores"] == 0 and rec["spill_loads"] == 0, rec["registers"]
    assert s["has_loop"]
    assert s["loop_global_load_bytes_per_weight"] <= PSUM_LOOP_GLOBAL_BYTES_BOUND, s
    assert s["loop_shared_load_bytes_per_weight"] <= PSUM_LOOP_SHARED_BYTES_BOUND, s
    # the lookups go through shared memory, not warp shuffles (a 2-D tl.gather would shuffle)
    assert s["loop"]["by_class"]["shuffle"] == 0, s["loop"]["by_class"]
    # one lookup per d = 4 weights: the loop's shared loads cover every lookup
    lookups = s["weights_per_iteration"] // 4
    assert s["loop"]["by_class"]["shared_load"] * s["threads"] >= lookups


def test_psum_reads_fewer_global_bytes_than_the_dequant_gemv(sass_models):
    p, d = _main(sass_models, "psum")["sass"], _main(sass_models, "dequant")["sass"]
    assert p["loop_global_load_bytes_per_weight"] * 4 < d["loop_global_load_bytes_per_weight"]
    assert (p["program_warp_instructions_per_weight"]
            < d["program_warp_instructions_per_weight"])
