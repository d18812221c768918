"""Device-agnostic kernel code (installed as omniq.kernels): Triton kernels and torch paths."""
