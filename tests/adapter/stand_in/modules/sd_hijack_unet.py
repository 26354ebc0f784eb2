"""Stand-in ``modules.sd_hijack_unet``: ``th`` for ldm's ``openaimodel`` whose ``cat`` resizes the first of two
tensors to the second's spatial size, so the webui runs the U-Net at multiples of 8 rather than 64."""
import torch


class TorchHijackForUnet:
    def __getattr__(self, item):
        if item == "cat":
            return self.cat
        if hasattr(torch, item):
            return getattr(torch, item)
        raise AttributeError(f"'{type(self).__name__}' object has no attribute '{item}'")

    def cat(self, tensors, *args, **kwargs):
        if len(tensors) == 2:
            a, b = tensors
            if a.shape[-2:] != b.shape[-2:]:
                a = torch.nn.functional.interpolate(a, b.shape[-2:], mode="nearest")
            tensors = (a, b)
        return torch.cat(tensors, *args, **kwargs)


th = TorchHijackForUnet()
