"""The Kiln operator (kopf): TorchModel → CompiledArtifacts, compile Jobs, Deployments, Services.

Layers (kept by .importlinter): `kiln.api` (resource models) → `core` (pure:
spec in, desired children and status out) → `k8s` (client I/O) → `handlers`
(kopf glue). The operator never imports torch.
"""
