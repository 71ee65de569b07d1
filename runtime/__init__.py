"""What runs in Kiln's pods: `kiln-compile` (the compile Job) and `kiln-serve` (HTTP inference).

Layers: fetch/export/aot/cache (compile path); protocol → tensors → dataplane →
server (serve path). Nothing here imports the operator.
"""
