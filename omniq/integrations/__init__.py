"""Integrations with vLLM and vLLM-Omni."""
