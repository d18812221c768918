"""The NVRTC launcher's host side, on any machine: argument marshalling against the kernel's
signature (pointer, int32, float32 by value), grid/block padding, the driver looked up once,
and the reasons it gives where it cannot run."""
from __future__ import annotations

import ctypes
import struct

import pytest
import torch

from omniq.kernels import nvrtc


class _FakeStream:
    cuda_stream = 1234


@pytest.fixture
def fake_driver(monkeypatch):
    calls, lookups = [], []

    def launch(fn, gx, gy, gz, bx, by, bz, smem, stream, args, extra):
        # the driver copies the argument values during the call: so does this stand-in
        raw = [ctypes.string_at(args[j], 8) for j in range(len(args))]
        calls.append(dict(fn=fn, grid=(gx, gy, gz), block=(bx, by, bz), smem=smem, stream=stream.value,
                          raw=raw))
        return 0

    class Lib:
        @property
        def cuLaunchKernel(self):
            lookups.append(1)
            return launch

    monkeypatch.setattr(nvrtc, "_driver", lambda: Lib())
    monkeypatch.setattr(nvrtc, "_LAUNCH", [])
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: _FakeStream())
    return calls, lookups


def _read(raw: bytes, kind: str):
    if kind == "p":
        return struct.unpack("Q", raw)[0]
    if kind == "i":
        return struct.unpack("i", raw[:4])[0]
    return struct.unpack("f", raw[:4])[0]


def test_arguments_are_marshalled_by_signature(fake_driver):
    calls, lookups = fake_driver
    k = nvrtc.NvrtcKernel("extern \"C\" __global__ void f() {}", "f", "ppif")
    k._funcs[0] = ctypes.c_void_p(99)
    t = torch.arange(4, dtype=torch.float32)
    for i in range(3):
        k(torch.device("cuda", 0), (5, 2), (128,), [t, None, -7 - i, 0.1], shared_mem=16)
    assert len(lookups) == 1, "the driver entry point is looked up once"
    c = calls[-1]
    assert c["grid"] == (5, 2, 1) and c["block"] == (128, 1, 1) and c["smem"] == 16 and c["stream"] == 1234
    got = [_read(c["raw"][j], kind) for j, kind in enumerate("ppif")]
    assert got[0] == t.data_ptr() and got[1] == 0 and got[2] == -9
    # float arguments travel as float32 (a double's low word would read as 0.0 for 2.0)
    assert struct.pack("f", got[3]) == struct.pack("f", 0.1)


def test_wrong_argument_count_names_the_signature(fake_driver):
    k = nvrtc.NvrtcKernel("", "g", "pi")
    k._funcs[0] = ctypes.c_void_p(1)
    with pytest.raises(TypeError, match="takes 2 arguments"):
        k(torch.device("cuda", 0), (1,), (32,), [None])


def test_bad_signature_and_reasons():
    with pytest.raises(ValueError, match="unknown argument kinds"):
        nvrtc.NvrtcKernel("", "h", "pd")
    assert "CUDA device" in nvrtc.nvrtc_reason(torch.device("cpu"))


def test_defines_become_a_header():
    k = nvrtc.NvrtcKernel("BODY", "h", "p", defines={"BF16": True, "MT": 2})
    assert k.source == "#define BF16 1\n#define MT 2\nBODY"
