"""What runs in Kiln's pods: `kiln-compile` (the compile Job) and `kiln-serve` (HTTP inference).

Two paths. The compile path (compile, fetch, unpack, bundle, formats, export, aot,
openvino_ir, validate, cache) imports torch. The serve path does not: serve | intake → server
→ routes | intake_pool | grpc_service → inference → dataplane → batching → frames → shm → tensors → protocol
(kept by .importlinter), beside them preload, loader, aoti_shim, bodies, dtypes, metrics,
errors and settings; its torch side (torch_loaders, torch_arrays, device, aoti_library) loads
only when the lean loader cannot run an artifact. Nothing here imports the operator.
"""
