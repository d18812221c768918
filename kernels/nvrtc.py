"""CUDA C++ kernels compiled at run time with NVRTC, launched through the driver API.

omniq ships CUDA kernels as source: on a CUDA machine the first call compiles them for the
device at hand (NVRTC, which the CUDA build of PyTorch carries, about half a second per kernel
variant) and caches the module per (source, device). No toolkit, no C++ extension build, no
wheel per CUDA version. The kernels take raw pointers, so each one is a plain
`extern "C" __global__` function and the Python side states its argument types once.

    kern = NvrtcKernel(SOURCE, "my_kernel", "ppii", defines={"BF16": 1})
    kern(device, grid, block, [x, y, 3, 4])          # p: tensor (or None), i: int32, f: float32

A launch costs a few microseconds of Python (ctypes; the driver entry point is looked up once,
not per call as torch's own `_compile_kernel` launcher does); inside a CUDA graph it costs
nothing.

`kern(..., pdl=True)` launches through cuLaunchKernelEx with Programmatic Dependent Launch
(sm_90+, driver >= 12.3 so that stream capture records it as a programmatic graph edge): the
kernel may start while the previous kernel on the stream is still running, and must execute
`griddepcontrol.wait` before it touches anything that kernel writes (and before any write of
its own). The previous kernel lets it start early with `griddepcontrol.launch_dependents`;
without that, it starts when all of the previous kernel's CTAs have exited. Where PDL is not
available the launch falls back to cuLaunchKernel, once logged with the reason (`pdl_reason`).
"""
from __future__ import annotations

import ctypes
import hashlib
import logging
import threading

import torch

_LOCK = threading.Lock()
log = logging.getLogger("omniq")


def _driver():
    """libcuda through torch's helpers (the name moved between torch releases). Each call of
    those helpers dlopens the library again (~20 us), hence `_launch_fn`."""
    from torch.cuda import _utils
    get = getattr(_utils, "_get_gpu_runtime_library", None) or getattr(_utils, "_get_cuda_library")
    return get()


_LAUNCH: list = []


def _launch_fn():
    """cuLaunchKernel, looked up once per process."""
    if not _LAUNCH:
        lib = _driver()
        _LAUNCH.extend((lib.cuLaunchKernel, lib))  # the library object kept alive with its function
    return _LAUNCH[0]


# ---- cuLaunchKernelEx (cuda.h, CUDA 12.x) ----------------------------------------------------
CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION = 6
PDL_MIN_DRIVER = 12030          # programmatic edges survive stream capture from CUDA 12.3 on
PDL_MIN_CAPABILITY = (9, 0)


class CUlaunchAttributeValue(ctypes.Union):
    """CUlaunchAttributeValue_union: 64 bytes, pointer-aligned (some members hold a CUevent)."""
    _fields_ = [("pad", ctypes.c_char * 64), ("programmaticStreamSerializationAllowed", ctypes.c_int),
                ("_align", ctypes.c_void_p)]


class CUlaunchAttribute(ctypes.Structure):
    """CUlaunchAttribute_st: the id (an enum, int32), 4 bytes of padding, the value (72 bytes)."""
    _fields_ = [("id", ctypes.c_int32), ("pad", ctypes.c_char * 4), ("value", CUlaunchAttributeValue)]


class CUlaunchConfig(ctypes.Structure):
    """CUlaunchConfig_st (56 bytes on 64-bit: hStream at offset 32, attrs at 40, numAttrs at 48)."""
    _fields_ = [("gridDimX", ctypes.c_uint), ("gridDimY", ctypes.c_uint), ("gridDimZ", ctypes.c_uint),
                ("blockDimX", ctypes.c_uint), ("blockDimY", ctypes.c_uint), ("blockDimZ", ctypes.c_uint),
                ("sharedMemBytes", ctypes.c_uint), ("hStream", ctypes.c_void_p),
                ("attrs", ctypes.POINTER(CUlaunchAttribute)), ("numAttrs", ctypes.c_uint)]


_PDL: dict = {}          # "fn": cuLaunchKernelEx or None, "why": reason, "lib", per-device reasons
_PDL_LOGGED: set = set()


def _launch_ex_fn():
    """(cuLaunchKernelEx or None, why not), looked up once per process."""
    if "fn" not in _PDL:
        lib, fn, why = _driver(), None, None
        try:
            fn = lib.cuLaunchKernelEx
        except AttributeError:
            why = "the CUDA driver has no cuLaunchKernelEx (needs a CUDA 12 driver)"
        if fn is not None:
            ver = ctypes.c_int(0)
            try:
                res = lib.cuDriverGetVersion(ctypes.byref(ver))
            except AttributeError:
                res = -1
            if res != 0 or ver.value < PDL_MIN_DRIVER:
                fn, why = None, (f"CUDA driver {ver.value // 1000}.{ver.value % 1000 // 10} < 12.3: PDL edges are not "
                                 f"kept by stream capture")
        _PDL.update(fn=fn, why=why, lib=lib)
    return _PDL["fn"], _PDL["why"]


def pdl_reason(device: torch.device) -> str | None:
    """Why a `pdl=True` launch on `device` falls back to a plain launch, or None when it does not."""
    if device.type != "cuda":
        return f"needs a CUDA device, not {device.type}"
    fn, why = _launch_ex_fn()
    if fn is None:
        return why
    idx = device.index if device.index is not None else torch.cuda.current_device()
    key = ("cap", idx)
    if key not in _PDL:
        cap = torch.cuda.get_device_capability(idx)
        _PDL[key] = None if cap >= PDL_MIN_CAPABILITY else \
            f"compute capability {cap[0]}.{cap[1]} < 9.0 (griddepcontrol is sm_90+)"
    return _PDL[key]


def pdl_config(grid, block, shared_mem: int, stream: int):
    """(CUlaunchConfig, its one attribute) for a launch with programmatic stream serialization;
    the attribute must stay alive until the launch returns."""
    attr = (CUlaunchAttribute * 1)()
    attr[0].id = CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION
    attr[0].value.programmaticStreamSerializationAllowed = 1
    cfg = CUlaunchConfig(grid[0], grid[1], grid[2], block[0], block[1], block[2], shared_mem,
                         ctypes.c_void_p(stream), attr, 1)
    return cfg, attr


def cuda_device_reason(device: torch.device, rocm_why: str) -> str | None:
    """Why `device` is not an NVIDIA CUDA device torch can run on (`rocm_why` for ROCm builds),
    or None: the first check of every omniq CUDA kernel."""
    if device.type != "cuda":
        return f"needs a CUDA device, not {device.type}"
    if not torch.cuda.is_available():
        return "torch has no CUDA runtime here"
    if torch.version.hip is not None:
        return f"ROCm: {rocm_why}"
    return None


def nvrtc_reason(device: torch.device) -> str | None:
    """Why NVRTC kernels cannot run on `device`, or None when they can."""
    why = cuda_device_reason(device, "omniq's NVRTC kernels are written for NVIDIA GPUs")
    if why:
        return why
    try:
        from torch.cuda import _utils
        (getattr(_utils, "_get_gpu_rtc_library", None) or getattr(_utils, "_get_nvrtc_library"))()
        _utils._nvrtc_compile  # noqa: B018 - present in torch >= 2.8
        _utils._cuda_load_module  # noqa: B018
    except Exception as e:  # noqa: BLE001 - any failure means: no runtime compilation here
        return f"NVRTC is not usable through torch here ({type(e).__name__}: {e})"
    return None


_CTYPES = {"p": ctypes.c_void_p, "i": ctypes.c_int32, "f": ctypes.c_float}


class NvrtcKernel:
    """One `extern "C" __global__` function of a CUDA source, compiled lazily per device.

    `signature` has one letter per kernel argument: p (pointer: a tensor or None), i (int32),
    f (float32). `defines` become `#define NAME VALUE` lines before the source, so one source
    serves several specialisations (one compiled module each)."""

    def __init__(self, source: str, name: str, signature: str, defines: dict | None = None):
        bad = set(signature) - set(_CTYPES)
        if bad:
            raise ValueError(f"NvrtcKernel {name}: unknown argument kinds {sorted(bad)} (use p, i, f)")
        head = "".join(f"#define {k} {int(v) if isinstance(v, bool) else v}\n"
                       for k, v in sorted((defines or {}).items()))
        self.source = head + source
        self.name = name
        self.signature = signature
        self._funcs: dict[int, ctypes.c_void_p] = {}
        self._occupancy: dict = {}
        self._keep: list = []
        self.key = hashlib.sha1(self.source.encode()).hexdigest()[:12]

    def _function(self, device: torch.device):
        idx = device.index if device.index is not None else torch.cuda.current_device()
        fn = self._funcs.get(idx)
        if fn is not None:
            return fn
        with _LOCK:
            fn = self._funcs.get(idx)
            if fn is None:
                from torch.cuda import _utils
                with torch.cuda.device(idx):
                    major, minor = torch.cuda.get_device_capability(idx)
                    try:
                        binary, lowered = _utils._nvrtc_compile(
                            self.source, self.name, f"{major}{minor}",
                            nvcc_options=["-std=c++17"])
                    except RuntimeError as e:
                        raise RuntimeError(f"omniq: NVRTC could not compile {self.name} "
                                           f"(variant {self.key}) for sm_{major}{minor}:\n{e}") from None
                    mod = _utils._cuda_load_module(binary, [lowered])
                    kern = mod[lowered] if isinstance(mod, dict) else getattr(mod, lowered)
                self._keep.append(kern)  # keeps the module loaded
                fn = kern.func
                self._funcs[idx] = fn
        return fn

    def resident_ctas(self, device: torch.device, threads: int, shared_mem: int = 0) -> int:
        """CTAs of `threads` threads that fit on the whole GPU at once (one wave): the driver's
        occupancy for this compiled variant (its registers decide it) times the SM count."""
        idx = device.index if device.index is not None else torch.cuda.current_device()
        key = (idx, threads, shared_mem)
        got = self._occupancy.get(key)
        if got is None:
            fn = self._function(device)
            per_sm = ctypes.c_int(0)
            res = _driver().cuOccupancyMaxActiveBlocksPerMultiprocessor(
                ctypes.byref(per_sm), fn, ctypes.c_int(threads), ctypes.c_size_t(shared_mem))
            if res != 0:
                raise RuntimeError(f"omniq: cuOccupancyMaxActiveBlocksPerMultiprocessor({self.name}) failed "
                                   f"with CUDA error {res}")
            got = max(1, per_sm.value) * torch.cuda.get_device_properties(idx).multi_processor_count
            self._occupancy[key] = got
        return got

    def __call__(self, device: torch.device, grid, block, args, shared_mem: int = 0, pdl: bool = False) -> None:
        if len(args) != len(self.signature):
            raise TypeError(f"{self.name} takes {len(self.signature)} arguments ({self.signature}), "
                            f"got {len(args)}")
        fn = self._function(device)
        holders = []
        for kind, a in zip(self.signature, args):
            if kind == "p":
                holders.append(ctypes.c_void_p(0 if a is None else a.data_ptr()))
            else:
                holders.append(_CTYPES[kind](a))
        arr = (ctypes.c_void_p * len(holders))(*[ctypes.addressof(h) for h in holders])
        stream = torch.cuda.current_stream(device)
        g = tuple(grid) + (1,) * (3 - len(grid))
        b = tuple(block) + (1,) * (3 - len(block))
        if pdl:
            why = pdl_reason(device)
            if why is None:
                cfg, _attr = pdl_config(g, b, shared_mem, stream.cuda_stream)   # _attr kept alive: cfg points at it
                res = _PDL["fn"](ctypes.byref(cfg), fn, arr, None)
                if res == 0:
                    return
                if torch.cuda.is_current_stream_capturing():
                    raise RuntimeError(f"omniq: cuLaunchKernelEx({self.name}, PDL) failed with CUDA error {res}")
                # a driver that refuses the attribute: plain launches from now on
                why = f"cuLaunchKernelEx failed with CUDA error {res}"
                _PDL.update(fn=None, why=why)
            if why not in _PDL_LOGGED:
                _PDL_LOGGED.add(why)
                log.info("omniq: %s launched without programmatic dependent launch: %s", self.name, why)
        res = _launch_fn()(fn, g[0], g[1], g[2], b[0], b[1], b[2], shared_mem,
                           ctypes.c_void_p(stream.cuda_stream), arr, None)
        if res != 0:
            raise RuntimeError(f"omniq: cuLaunchKernel({self.name}) failed with CUDA error {res}")
