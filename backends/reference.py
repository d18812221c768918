"""The reference backend: scheme.matmul itself. Always valid, lowest priority, any device."""
from omniq.dispatch import Kernel, register_kernel


@register_kernel
class ReferenceKernel(Kernel):
    name = "reference"
    backend = "reference"
    schemes = ("*",)
    priority = -100

    def run(self, x, qw, bias):
        return qw.scheme.matmul(x, qw, bias)
