"""Does torch's NVRTC path (torch.cuda._compile_kernel) work here, how long does it compile and
what does one launch cost from Python? (decides whether omniq ships runtime-compiled CUDA)."""
import time
import torch

SRC = r'''
extern "C" __global__ void axpy(const float* a, float* b, float s, int n) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) b[i] += s * a[i];
}
'''
t = time.perf_counter()
k = torch.cuda._compile_kernel(SRC, "axpy")
print(f"compile {1e3 * (time.perf_counter() - t):.1f} ms")
a = torch.ones(1024, device="cuda"); b = torch.zeros_like(a)
k(grid=(4, 1, 1), block=(256, 1, 1), args=[a, b, 2.0, 1024])
torch.cuda.synchronize(); print("ok", b[:3].tolist())
for _ in range(10):
    k(grid=(4, 1, 1), block=(256, 1, 1), args=[a, b, 2.0, 1024])
torch.cuda.synchronize()
t = time.perf_counter()
for _ in range(1000):
    k(grid=(4, 1, 1), block=(256, 1, 1), args=[a, b, 2.0, 1024])
torch.cuda.synchronize()
print(f"launch {1e3 * (time.perf_counter() - t):.1f} us per call (1000 calls)")
g = torch.cuda.CUDAGraph()
s = torch.cuda.Stream(); s.wait_stream(torch.cuda.current_stream())
with torch.cuda.stream(s):
    k(grid=(4, 1, 1), block=(256, 1, 1), args=[a, b, 2.0, 1024])
torch.cuda.current_stream().wait_stream(s)
try:
    with torch.cuda.graph(g):
        k(grid=(4, 1, 1), block=(256, 1, 1), args=[a, b, 2.0, 1024])
    b.zero_(); g.replay(); torch.cuda.synchronize(); print("graph ok", b[:2].tolist())
except Exception as e:
    print("graph capture failed:", type(e).__name__, e)
import inspect
print(inspect.signature(torch.cuda._compile_kernel))
from torch.cuda import _utils
print(inspect.signature(_utils._CudaKernel.__call__))
