"""Kiln: compile PyTorch models ahead of time once per hardware target and serve them.

This root package holds what the operator and the runtime share (resource
models, cache keys, the artifact manifest). It never imports torch, kopf or
kubernetes, so both sides may import it.
"""

__version__ = "0.1.0"
