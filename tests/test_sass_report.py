"""verify.sass_report without a GPU: the SASS analysis on hand-written listings, and the report of
both backends' streaming kernels against the targets of the built extension (c = 64: at most 6
warp-instructions per element forward and 9 backward on the cuda backend; no spills)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from verify import sass_report as sr

ROOT = Path(__file__).resolve().parents[1]

# A tile loop (0x40-0x110) holding a barrier, an inner loop (0x60-0x80), a guarded arm that only
# calls a subroutine (the slow path of a 64-bit division: skipped on the hot path) and a plain
# guarded instruction (counted).
LISTING = """
        /*0000*/                   MOV R1, c[0x0][0x28] ;
        /*0010*/                   S2R R0, SR_TID.X ;
        /*0040*/                   LDG.E R2, desc[UR4][R4.64] ;
        /*0050*/                   BAR.SYNC.DEFER_BLOCKING 0x0 ;
        /*0060*/                   FFMA R6, R2, R3, R6 ;
        /*0070*/                   IADD3 R7, R7, 0x1, RZ ;
        /*0080*/              @P0 BRA 0x60 ;
        /*0090*/              @P1 BRA 0xd0 ;
        /*00a0*/                   MOV R8, R2 ;
        /*00b0*/                   CALL.REL.NOINC 0x200 ;
        /*00c0*/                   BRA 0xd0 ;
        /*00d0*/              @P2 FADD R9, R9, R6 ;
        /*00e0*/                   STS [R0], R9 ;
        /*00f0*/                   STL [R1], R9 ;
        /*0100*/                   LDS.128 R12, [R0] ;
        /*0110*/              @P3 BRA 0x40 ;
        /*0120*/                   EXIT ;
        /*0200*/                   RET.REL.NODEC R20 0x0 ;
"""


def test_main_loop_hot_path_and_counts_on_a_listing():
    instrs = sr.parse(LISTING)
    assert [i.base for i in instrs[:3]] == ["MOV", "S2R", "LDG"]
    assert sr.loops(instrs) == [(0x60, 0x80), (0x40, 0x110)]
    start, end, body = sr.main_loop(instrs)
    assert (start, end) == (0x40, 0x110) and len(body) == 14
    ops, notes = sr.hot_path(instrs, start, end, trips=lambda inner: 8.0)
    # the inner loop's three instructions 8 times; the division's arm (MOV, CALL, BRA) skipped
    assert ops["FFMA"] == 8 and ops["IADD3"] == 8 and ops["BRA"] == 8 + 2
    assert "CALL" not in ops and "MOV" not in ops
    assert ops["FADD"] == ops["STS"] == ops["LDS"] == ops["LDG"] == ops["BAR"] == ops["STL"] == 1
    assert notes == []
    _, notes = sr.hot_path(instrs, start, end)
    assert notes == ["inner loop 0x60-0x80 counted once"]
    assert sr.op_counts(body)["FFMA"] == 1 and sr.op_counts(body)["HGMMA"] == 0
    assert sr.spill_bytes(body) == 4


def test_a_loop_without_a_barrier_is_no_main_loop():
    with pytest.raises(ValueError, match="no loop with a barrier"):
        sr.main_loop(sr.parse(LISTING.replace("BAR.SYNC.DEFER_BLOCKING 0x0", "NOP")))


def test_blocks_per_sm_from_registers_shared_memory_and_threads():
    assert sr.blocks_per_sm(64, 0, 256) == 4  # 64 registers × 256 threads: a quarter of the file
    assert sr.blocks_per_sm(32, 0, 256) == 8  # threads: 2048 per SM
    assert sr.blocks_per_sm(32, 100 * 1024, 256) == 2  # shared memory: 228 KB per SM
    assert sr.blocks_per_sm(255, 0, 256) == 1


def _tools_missing() -> str | None:
    if os.environ.get("TRITON_INTERPRET", "0").strip() == "1" and importlib.util.find_spec("triton") is None:
        return "triton is not installed"
    try:
        from intl_kernels import _C
    except ImportError:
        return "the C++ extension is not built"
    if not _C.cuda_built():
        return "the extension has no CUDA kernels"
    try:
        sr.find_tool("cuobjdump")
    except FileNotFoundError:
        return "cuobjdump not found"
    return None


@pytest.mark.slow
@pytest.mark.skipif(_tools_missing() is not None, reason=str(_tools_missing()))
def test_report_of_both_backends_meets_the_layer_targets(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(ROOT)
    proc = subprocess.run(
        [sys.executable, "-m", "verify.sass_report", "--tag", "t", "--out-dir", str(tmp_path)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    cuda = json.loads((tmp_path / "sass-report-cuda-t.json").read_text())
    triton = json.loads((tmp_path / "sass-report-triton-t.json").read_text())
    for name in ("sass-report-cuda-t.md", "sass-report-triton-t.md"):
        assert "prediction" in (tmp_path / name).read_text().lower(), name
    # 4 streaming kernels × 3 row buckets × 3 dtypes; every one counted from its SASS
    assert len(cuda["kernels"]) == 36
    for k in cuda["kernels"]:
        assert k["warp_instructions_per_element"] > 0 and k["ffma"] > 0, k["name"]
    for dtype, per in cuda["per_element"].items():
        assert per["fwd"] <= 6.0 and per["bwd"] <= 9.0, (dtype, per)
    assert {(k["kernel"], k["direction"]) for k in triton["kernels"]} == {
        ("rowstats", "fwd"), ("gram", "fwd"), ("apply", "fwd"), ("gram", "bwd"), ("apply", "bwd"),
    }  # fmt: skip
    assert all(k["spill_bytes"] == 0 for k in triton["kernels"]), triton["kernels"]
    # the bf16 triton products run on the tensor cores (wgmma), the float32 ones on FMA
    for k in triton["kernels"]:
        if k["kernel"] in ("gram", "apply"):
            assert (k["hgmma"] > 0) == (k["dtype"] == "bf16"), k
    assert len(cuda["layer"]) == len(triton["layer"]) == 10  # 5 stages × 2 dtypes
