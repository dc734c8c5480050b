"""kernels/sass_model.py on canned SASS text: parsing, the main loop, widths and per-weight
figures (no GPU tooling needed; tests/test_kernel_compile.py runs it on real cubins)."""
import pytest

from physkern.kernels import sass_model as sm

SASS = """
        /*0000*/                   MOV R1, c[0x0][0x28] ;           /* 0x000 */
        /*0010*/                   LDG.E.U16 R2, desc[UR4][R4.64] ;  /* 0x000 */
        /*0020*/                   STS [R3], R2 ;                    /* 0x000 */
        /*0030*/                   BAR.SYNC.DEFER_BLOCKING 0x0 ;     /* 0x000 */
        /*0040*/              @!P0 LDG.E.128 R8, desc[UR4][R6.64] ;  /* 0x000 */
        /*0050*/                   LDS R9, [R8] ;                    /* 0x000 */
        /*0060*/                   LDSM.16.M88.4 R12, [R3] ;         /* 0x000 */
        /*0070*/                   FADD R10, R10, R9 ;               /* 0x000 */
        /*0080*/                   SHFL.BFLY PT, R11, R10, 0x1, 0x1f ;  /* 0x000 */
        /*0090*/              @!P1 BRA 0x40 ;                        /* 0x000 */
        /*00a0*/                   REDG.E.ADD.F32.FTZ.RN.STRONG.GPU desc[UR4][R2.64], R10 ;
        /*00b0*/                   EXIT ;                            /* 0x000 */
        /*00c0*/                   BRA 0xc0;                         /* 0x000 */
"""


def test_parse_and_loop():
    ins = sm.parse_sass(SASS)
    assert [i.op for i in ins][:3] == ["MOV", "LDG.E.U16", "STS"]
    assert ins[4].pred == "@!P0"
    start, end = sm.main_loop(ins)             # BRA 0x40 back-edge; BRA self is not a loop
    assert (ins[start].addr, ins[end].addr) == (0x40, 0x90)


@pytest.mark.parametrize("op,width", [("LDG.E", 4), ("LDG.E.U16", 2), ("LDG.E.64", 8),
                                      ("LDG.E.128", 16), ("LDS.U8", 1), ("LDSM.16.M88.4", 16),
                                      ("LDSM.16.M88", 4), ("LDGSTS.E.BYPASS.LTC128B.128", 16)])
def test_widths(op, width):
    assert sm.mem_width(op) == width


def test_summary_per_weight():
    ins = sm.parse_sass(SASS)
    s = sm.summarize(ins, threads=128, weights_per_iteration=1024, iterations=2)
    loop = s["loop"]
    assert loop["instructions"] == 6
    assert loop["by_class"]["global_load"] == 1 and loop["by_class"]["shared_load"] == 2
    assert loop["by_class"]["shuffle"] == 1 and loop["by_width"]["LDG.128"] == 1
    # 16 B per thread x 128 threads / 1024 weights
    assert s["loop_global_load_bytes_per_weight"] == 2.0
    assert s["loop_shared_load_bytes_per_weight"] == (4 + 16) * 128 / 1024
    # program: the loop twice + the 2-byte load outside, over 2048 weights
    assert s["program_global_load_bytes_per_weight"] == (16 * 2 + 2) * 128 / 2048
    assert s["loop_warp_instructions_per_weight"] == 6 * 4 / 1024
    assert s["outside_loop"]["by_class"]["global_atomic"] == 1


def test_no_loop():
    ins = sm.parse_sass(SASS.replace("@!P1 BRA 0x40", "@!P1 BRA 0xb0"))
    assert sm.main_loop(ins) is None
    assert not sm.summarize(ins, 128, 1024)["has_loop"]
