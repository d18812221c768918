"""omniq's error types. Every message names what is wrong, where, and what is allowed."""


class OmniqError(ValueError):
    """Bad input to omniq: an unknown scheme or parameter, a malformed weight or tensor."""


class KernelError(RuntimeError):
    """A kernel cannot run the problem it was asked to (a forced kernel, or none valid)."""


def where(layer: str | None) -> str:
    """Prefix naming the layer an error is about, when the caller knows it."""
    return f"layer {layer!r}: " if layer else ""
