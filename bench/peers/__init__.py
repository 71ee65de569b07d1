"""The same benchmark models served by TorchServe and BentoML, the way their users serve eager PyTorch."""
