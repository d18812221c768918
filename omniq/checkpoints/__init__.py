"""Readers from public checkpoint formats to QuantizedWeight."""
