"""PyTorch runtime: a network in eval mode behind the Predictor interface."""

from __future__ import annotations

import numpy as np

from segcli.runtimes.device import apply_threads


class TorchPredictor:
    """Runs a torch module on batches; chunking keeps memory bounded by ``max_batch``."""

    backend = "torch"
    provider = "torch"

    def __init__(self, module, n_classes: int, in_channels: int, device: str = "cpu", max_batch: int = 16,
                 half: bool = False, channels_last: bool = False, bf16: bool = False) -> None:
        # lazy: torch costs ~1.3 s to import
        import torch

        apply_threads()
        self.torch = torch
        self.device = device
        self.provider = f"torch-{device}"
        self.n_classes = n_classes
        self.in_channels = in_channels
        self.max_batch = max(1, int(max_batch))
        self.half = half and device.startswith("cuda")
        self.bf16 = bf16 and not self.half  # autocast to bfloat16 (CPUs with AVX512-BF16/AMX, recent GPUs)
        if self.bf16:
            self.provider = f"torch-{device}-bf16"
        self.channels_last = channels_last
        self.module = module.to(device).eval()
        if channels_last:
            self.module = self.module.to(memory_format=torch.channels_last)

    def _forward(self, x: np.ndarray) -> np.ndarray:
        torch = self.torch
        # Writable (a copy only if not): torch warns on read-only arrays, such as a plane's shared downscaled view.
        t = torch.from_numpy(np.require(x, np.float32, ["C", "W"])).to(self.device)
        if self.channels_last:
            t = t.contiguous(memory_format=torch.channels_last)
        with torch.inference_mode():
            if self.half:
                with torch.autocast("cuda", dtype=torch.float16):
                    logits = self.module(t)
            elif self.bf16:
                with torch.autocast("cuda" if self.device.startswith("cuda") else "cpu", dtype=torch.bfloat16):
                    logits = self.module(t)
            else:
                logits = self.module(t)
            logits = logits.float()
            if logits.shape[1] == 1:
                p = torch.sigmoid(logits)
                probs = torch.cat([1 - p, p], dim=1)
            else:
                probs = torch.softmax(logits, dim=1)
        return probs.cpu().numpy()

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        if batch.ndim != 4:
            raise ValueError(f"expected an NCHW batch, got shape {batch.shape}")
        outs = [self._forward(batch[i : i + self.max_batch]) for i in range(0, len(batch), self.max_batch)]
        return np.concatenate(outs, axis=0) if outs else np.zeros((0, self.n_classes) + batch.shape[2:], np.float32)
