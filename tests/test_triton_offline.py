"""tools/triton_offline.py on the CPU: one of omniq's Triton kernels compiled for sm_90 by Triton's
own compiler and bundled ptxas (no GPU, nothing runs), and the errors it gives for a wrong
argument list."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

# Triton is a test requirement (requirements-test.txt): its absence is a failure, not a skip
TOOLS = Path(__file__).resolve().parent.parent / "tools"
sys.path.insert(0, str(TOOLS))
import triton_offline  # noqa: E402

from omniq.kernels import triton_w8a8 as w8a8  # noqa: E402

SIG = {"x_ptr": "*bf16", "q_ptr": "*fp8e4nv", "s_ptr": "*fp32", "azp_ptr": "*fp32", "in_s_ptr": "*fp32",
       "in_z_ptr": "*fp32", "K": "i32", "stride_xm": "i32", "stride_qm": "i32", "n_kb": "i32"}
CONST = {"ACT": 0, "FP8": True, "SYM": True, "BLOCK_K": 1024, "ONE_PASS": True}


def test_compiles_the_activation_quantizer_for_sm90():
    # a process of its own: the tests run Triton interpreted, whose kernels do not compile
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, str(TOOLS / "triton_offline.py"),
                        "omniq.kernels.triton_w8a8:_quant_act_kernel", "--sig", json.dumps(SIG),
                        "--const", json.dumps(CONST), "--warps", "4", "--count", "st.global", "--no-fp-fusion"],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    line = r.stdout.strip().splitlines()[-1]
    fields = dict(w.split(":") for w in line.split() if w.startswith(("REG:", "STACK:", "LOCAL:", "SHARED:")))
    assert int(fields["REG"]) > 0 and fields["LOCAL"] == "0" and fields["STACK"] == "0", line   # no spills
    assert " spill STL/LDL 0/0 " in line, line
    n_sass = int(line.split(" sass ")[1].split()[0])
    assert n_sass > 50 and int(line.split("st.global x")[1].split()[0]) > 0, line   # it stores codes


def test_names_a_wrong_or_missing_argument():
    with pytest.raises(ValueError, match="no argument"):
        triton_offline.compile_report(w8a8._quant_act_kernel, dict(SIG, nope="i32"), CONST)
    with pytest.raises(ValueError, match="BLOCK_K"):
        triton_offline.compile_report(w8a8._quant_act_kernel, SIG, {k: v for k, v in CONST.items() if k != "BLOCK_K"})


def test_spills_are_counted_from_the_sass():
    """Spills show as STL / LDL in the SASS (and a STACK frame), not in LOCAL: the counts come
    from the instructions, predicated ones included."""
    sys.path.insert(0, str(TOOLS))
    import nvrtc_offline
    sass = """
        /*0000*/                   LDC R1, c[0x0][0x28] ;
        /*0010*/                   STL [R1+0x4], R2 ;
                                                         /* 0x000fe20000100800 */
        /*0020*/              @!P0 STL.64 [R1+0x8], R4 ;
        /*0030*/               @P1 LDL.LU R6, [R1+0x4] ;
        /*0040*/                   LDG.E.128 R8, desc[UR4][R2.64] ;
        /*0050*/                   EXIT ;
    """
    ops = nvrtc_offline.sass_opcodes(nvrtc_offline.sass_code(sass))
    assert ops == ["LDC", "STL", "STL.64", "LDL.LU", "LDG.E.128", "EXIT"]
    assert sum(o.startswith("STL") for o in ops) == 2 and sum(o.startswith("LDL") for o in ops) == 1
