"""Stand-in ``modules.torch_utils``."""
import torch


def float64(t: torch.Tensor):
    """float64, or float32 on devices without it (mps, xpu)."""
    return torch.float32 if t.device.type in ("mps", "xpu") else torch.float64
