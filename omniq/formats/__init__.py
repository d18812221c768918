"""Bit-level element codecs shared by the schemes: saturating fp8 casts, e2m1, e8m0,
integer and nibble packing. Each layout constant and tie rule lives here exactly once."""
