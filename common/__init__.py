"""Kiln: compile PyTorch models ahead of time once per hardware target and serve them.

This root package is the shared core: what the operator and the runtime share (resource
models, the enums behind them, cache keys, the artifact manifest, and the contracts between
the two sides: command-line flags and the compile summary). It never imports torch, kopf or
kubernetes, so both sides may import it.
"""

__version__ = "0.1.0"
