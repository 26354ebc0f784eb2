"""The arithmetic of the step configurations: their FLOPs, counted on the meta device.

These are the noise-free floors the timed ratios should approach. ``torch.utils.flop_counter`` counts matmuls,
convolutions and attention (attention decomposes to bmm on meta). The U-Net has the released module tree with a
size's widths and no real weights, so counting the released size costs no compute and no memory.
"""
from __future__ import annotations

import torch

from .sizes import BenchSize, checkpoint_dims
from .steps import RATIO_TERMS, StepBench


def meta_unet(size: BenchSize) -> torch.nn.Module:
    """The U-Net of ``size`` on the meta device (shapes only)."""
    from lib_colorize.models import UNetConfig, UNetModel

    dims = checkpoint_dims(size)
    with torch.device("meta"):
        return UNetModel(UNetConfig(model_channels=dims.model_channels, channel_mult=dims.channel_mult,
                                    num_res_blocks=dims.num_res_blocks, attention_levels=dims.attention_levels,
                                    context_dim=dims.context_dim)).eval()


def meta_step_bench(size: BenchSize, resolution: int) -> StepBench:
    """The step configurations of ``size`` at ``resolution`` px on the meta device."""
    return StepBench(size, torch.device("meta"), torch.float32, unet=meta_unet(size), resolution=resolution)


def config_flops(step: StepBench) -> dict:
    """FLOPs of one call of every configuration of ``step``: ``{config: flops}``."""
    from torch.utils.flop_counter import FlopCounterMode

    flops = {}
    with torch.no_grad():   # FlopCounterMode sees nothing under inference_mode (torch 2.1)
        for name, config in step.configs.items():
            with FlopCounterMode(display=False) as counter:
                config.call()
            flops[name] = counter.get_total_flops()
    return flops


def count_flops(size: BenchSize, resolution: int) -> dict:
    """FLOPs of one call of every step configuration of ``size`` at ``resolution`` px."""
    return config_flops(meta_step_bench(size, resolution))


def flop_ratios(flops: dict) -> dict:
    """The figures of :data:`~bench.steps.RATIO_TERMS` as ratios of FLOP counts."""
    return {key: flops[num] / flops[den] for key, (num, den) in RATIO_TERMS.items()}
