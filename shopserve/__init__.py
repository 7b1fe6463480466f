"""shopserve: product search served by a Triton ensemble (see README.md)."""

__version__ = "0.1.0"
