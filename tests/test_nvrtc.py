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


# ---- cuLaunchKernelEx with Programmatic Dependent Launch ------------------------------------
# cuda.h (CUDA 12.x, 64-bit): CUlaunchConfig_st {7 x unsigned int, [4 pad], CUstream hStream @32,
# CUlaunchAttribute* attrs @40, unsigned int numAttrs @48, [4 pad]} = 56 bytes;
# CUlaunchAttribute_st {CUlaunchAttributeID id (int32) @0, char pad[4], CUlaunchAttributeValue
# value @8 (a 64-byte union)} = 72 bytes; CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION = 6,
# value.programmaticStreamSerializationAllowed is the union's first int.
CONFIG_LAYOUT = "<7I4xQQI4x"
ATTR_LAYOUT = "<i4x64s"


@pytest.fixture
def fake_ex_driver(monkeypatch):
    state = {"version": 12040, "capability": (9, 0), "has_ex": True, "ex_result": 0}
    plain, ex = [], []

    def launch(fn, gx, gy, gz, bx, by, bz, smem, stream, args, extra):
        plain.append(dict(grid=(gx, gy, gz), block=(bx, by, bz)))
        return 0

    def launch_ex(cfg_ref, fn, args, extra):
        # copy the bytes the driver would read, while the caller's objects are alive
        cfg = cfg_ref._obj
        raw = ctypes.string_at(ctypes.addressof(cfg), 56)
        fields = struct.unpack(CONFIG_LAYOUT, raw)
        n_attrs = fields[9]
        attrs = ctypes.string_at(fields[8], 72 * n_attrs)
        argv = [ctypes.string_at(args[j], 8) for j in range(3)]
        ex.append(dict(raw=raw, fields=fields, attrs=attrs, fn=fn.value, args=argv, extra=extra))
        return state["ex_result"]

    def get_version(ref):
        ref._obj.value = state["version"]
        return 0

    class Lib:
        cuLaunchKernel = staticmethod(launch)
        cuDriverGetVersion = staticmethod(get_version)

        def __getattr__(self, name):
            if name == "cuLaunchKernelEx" and state["has_ex"]:
                return launch_ex
            raise AttributeError(name)

    monkeypatch.setattr(nvrtc, "_driver", lambda: Lib())
    monkeypatch.setattr(nvrtc, "_LAUNCH", [])
    monkeypatch.setattr(nvrtc, "_PDL", {})
    monkeypatch.setattr(nvrtc, "_PDL_LOGGED", set())
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: _FakeStream())
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda idx=None: state["capability"])
    return state, plain, ex


def _kernel():
    k = nvrtc.NvrtcKernel("", "pdl_k", "pif")
    k._funcs[0] = ctypes.c_void_p(77)
    return k


def test_pdl_launch_passes_cuda_h_structs(fake_ex_driver):
    _, plain, ex = fake_ex_driver
    t = torch.arange(2, dtype=torch.float32)
    _kernel()(torch.device("cuda", 0), (7, 3), (96,), [t, -5, 2.5], shared_mem=40, pdl=True)
    assert not plain and len(ex) == 1
    c = ex[0]
    assert c["fields"][:8] == (7, 3, 1, 96, 1, 1, 40, _FakeStream.cuda_stream)
    assert c["fields"][9] == 1, "one launch attribute"
    assert c["raw"][28:32] == b"\0\0\0\0" and c["raw"][52:56] == b"\0\0\0\0"
    attr_id, value = struct.unpack(ATTR_LAYOUT, c["attrs"])
    assert attr_id == 6, "CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION"
    assert struct.unpack("<i", value[:4])[0] == 1 and value[4:] == bytes(60)
    assert c["fn"] == 77 and c["extra"] is None
    assert struct.unpack("Q", c["args"][0])[0] == t.data_ptr()
    assert struct.unpack("i", c["args"][1][:4])[0] == -5
    assert struct.unpack("f", c["args"][2][:4])[0] == 2.5


def test_plain_launch_unless_asked(fake_ex_driver):
    _, plain, ex = fake_ex_driver
    _kernel()(torch.device("cuda", 0), (2,), (32,), [None, 1, 0.0])
    assert len(plain) == 1 and not ex


@pytest.mark.parametrize("what,words", [("has_ex", "no cuLaunchKernelEx"), ("version", "< 12.3"),
                                        ("capability", "8.9 < 9.0")])
def test_pdl_falls_back_with_a_logged_reason(fake_ex_driver, caplog, what, words):
    state, plain, ex = fake_ex_driver
    state.update(has_ex=False) if what == "has_ex" else None
    state.update(version=12020) if what == "version" else None
    state.update(capability=(8, 9)) if what == "capability" else None
    with caplog.at_level("INFO", logger="omniq"):
        for _ in range(3):
            _kernel()(torch.device("cuda", 0), (4, 2), (64,), [None, 3, 1.0], pdl=True)
    assert len(plain) == 3 and not ex
    assert plain[0]["grid"] == (4, 2, 1) and plain[0]["block"] == (64, 1, 1)
    assert words in nvrtc.pdl_reason(torch.device("cuda", 0))
    logged = [r.getMessage() for r in caplog.records if "programmatic dependent launch" in r.getMessage()]
    assert len(logged) == 1 and words in logged[0], "the reason is logged once"


def test_refused_pdl_launch_falls_back_for_good(fake_ex_driver, monkeypatch, caplog):
    """A driver that rejects the launch attribute (outside stream capture): that launch and every
    later one go through cuLaunchKernel, with the error as the logged reason."""
    state, plain, ex = fake_ex_driver
    state["ex_result"] = 1   # CUDA_ERROR_INVALID_VALUE
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    with caplog.at_level("INFO", logger="omniq"):
        for _ in range(3):
            _kernel()(torch.device("cuda", 0), (1,), (32,), [None, 0, 0.0], pdl=True)
    assert len(ex) == 1 and len(plain) == 3
    assert "CUDA error 1" in nvrtc.pdl_reason(torch.device("cuda", 0))
    assert sum("CUDA error 1" in r.getMessage() for r in caplog.records) == 1


def test_refused_pdl_launch_under_capture_raises(fake_ex_driver, monkeypatch):
    """Under capture a failed launch has already invalidated the capture: no silent retry."""
    state, plain, ex = fake_ex_driver
    state["ex_result"] = 700
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    with pytest.raises(RuntimeError, match="CUDA error 700"):
        _kernel()(torch.device("cuda", 0), (1,), (32,), [None, 0, 0.0], pdl=True)
    assert not plain


def test_resident_ctas_is_the_drivers_occupancy_times_the_sms(monkeypatch):
    """One occupancy query per (device, block, shared memory), times the SM count; a driver error
    is raised with the kernel's name, not turned into a guess."""
    asked = []

    class Lib:
        def __init__(self, per_sm, res=0):
            self.per_sm, self.res = per_sm, res

        def cuOccupancyMaxActiveBlocksPerMultiprocessor(self, out, fn, threads, smem):
            asked.append((fn.value, threads.value, smem.value))
            out._obj.value = self.per_sm
            return self.res

    class Props:
        multi_processor_count = 132

    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda idx: Props())
    k = nvrtc.NvrtcKernel("", "gemv", "p")
    k._funcs[0] = ctypes.c_void_p(7)
    monkeypatch.setattr(nvrtc, "_driver", lambda: Lib(4))
    dev = torch.device("cuda", 0)
    assert k.resident_ctas(dev, 128) == 528 and k.resident_ctas(dev, 128) == 528
    assert asked == [(7, 128, 0)], "asked once per (device, threads, shared memory)"
    monkeypatch.setattr(nvrtc, "_driver", lambda: Lib(5))
    assert k.resident_ctas(dev, 256, 1024) == 660 and asked[-1] == (7, 256, 1024)
    monkeypatch.setattr(nvrtc, "_driver", lambda: Lib(0, res=98))
    with pytest.raises(RuntimeError, match="gemv.*CUDA error 98"):
        k.resident_ctas(dev, 64)
