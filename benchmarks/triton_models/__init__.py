"""Triton Python-model adapters used only by tuning variants (copied into variant repositories)."""
