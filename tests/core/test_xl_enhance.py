"""The XL models' low-level injection (method-xl §5.5, §6) on the enhance machinery: one guided U-Net call of each
variant against the original restated from method-xl.md -- sdxl's additive-bias split attention (μ = 0, the
strengths not acting) and its merged two-attention form (μ > 0), xlv2's merged background LoRA ``W + U·D``, its
soft blend and the ReferenceNet banks read by the decoder's self-attention -- and the pipeline around it."""
from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

from lib_colorize.cache import ContentCache
from lib_colorize.checkpoint import UNET_PREFIX, load_checkpoint, read_tensors
from lib_colorize.conditioning import xl_vector
from lib_colorize.denoiser import GenerationPlan
from lib_colorize.enhance import MaskInputs
from lib_colorize.enhance_xl import load_xlv2_lora, prepare_xl_enhance
from lib_colorize.errors import InvalidInput
from lib_colorize.guidance import guidance_mode
from lib_colorize.options import ColorizeOptions
from lib_colorize.processors import decoder_transformer_blocks, for_generation, transformer_blocks
from lib_colorize.testing.xl_checkpoints import make_xl_checkpoint
from test_xl_method import SCHEDULE, prepared, restated_rows, restated_v_denoiser
from test_guidance_hooks import restated_combine
from test_xl_reference_net import restated_masked_attention

torch.set_num_threads(1)
CTX = 64


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("xl")
    return {"sdxl": make_xl_checkpoint(folder / "sdxl-tiny.safetensors", "sdxl", seed=31),
            "xlv2": make_xl_checkpoint(folder / "xlv2-tiny.safetensors", "xlv2", seed=32)}


def inputs_for(seed=0, size=128):
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(1, 1, size, size)
    mask[..., size // 4: 3 * size // 4, size // 5: 4 * size // 5] = 1.0
    reference = torch.rand(1, 3, 96, 80, generator=g) * 2 - 1
    reference_mask = (torch.rand(1, 1, 96, 80, generator=g) > 0.4).float()
    return MaskInputs(sketch_mask=mask, reference=reference, reference_mask=reference_mask)


def fake_encoder(seed):
    table = {}

    def encode(image):
        key = float(image.sum())
        if key not in table:
            table[key] = torch.randn(1, 196, CTX, generator=torch.Generator().manual_seed(seed + len(table)))
        return table[key]

    return encode


def soft_split_forward(attn, mask, beta_f, beta_b, mu, threshold, mode):
    """The original's split attn2 forward (attention.py masked_forward / lora.py soft blend), over context
    [K_ref ‖ K_bg]: ``mode`` "bias" (μ = 0, one attention with -inf bias), "hard" (μ > 0) or "soft" (xlv2)."""
    def forward(x, context=None):
        b, n, _ = x.shape
        side = int(math.isqrt(n * 256 // mask.numel())) if mask.numel() >= n else None
        m = F.interpolate(mask, scale_factor=side / mask.shape[-1], mode="bicubic").flatten(2).transpose(1, 2)
        heads = attn.heads

        def attention(q, k, v, bias=None):
            q, k, v = (t.view(b, -1, heads, t.shape[-1] // heads).transpose(1, 2) for t in (q, k, v))
            s = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
            if bias is not None:
                s = s + bias[:, None]
            return (torch.softmax(s, -1) @ v).transpose(1, 2).reshape(b, n, -1)

        if mode == "bias":
            length = context.shape[1]
            fg, bg = torch.zeros(b, n, length), torch.zeros(b, n, length)
            fg[:, :, length // 2:] = float("-inf")
            bg[:, :, :length // 2] = float("-inf")
            out = attention(attn.to_q(x), attn.to_k(context), attn.to_v(context), torch.where(m > threshold, fg, bg))
            return attn.to_out(out)
        c1, c2 = context.chunk(2, dim=1)
        bg = attention(attn.to_q(x), attn.to_k(c2), attn.to_v(c2)) * beta_b
        fg = attention(attn.to_q(x), attn.to_k(c1), attn.to_v(c1)) * beta_f
        fg = fg * (1 - mu) + bg * mu
        out = torch.where(m < threshold, bg, fg) if mode == "hard" else m * fg + (1 - m) * bg
        return attn.to_out(out)

    return forward


def reader_forward(attn, bank, mask):
    def forward(a, context=None):
        side = int(math.isqrt(a.shape[1] * 256 // mask.numel()))
        m = F.interpolate(mask, scale_factor=side / mask.shape[-1], mode="bicubic").flatten(2).transpose(1, 2)
        return restated_masked_attention(attn, a, bank, m, 0.05)

    return forward


def run_call(unet, plan, enhance_plan, x, sigma):
    from lib_colorize.denoiser import guided_call
    from lib_colorize.family import XL
    from lib_colorize.schedule import make_denoiser

    denoiser = make_denoiser(lambda xi, t, context, y: unet(xi, t, context, y), "v", SCHEDULE)
    with for_generation(unet, enhance=enhance_plan, hint_blocks=XL.hint_blocks) as processors:
        return guided_call(plan, processors, lambda xi, si, c, y: denoiser(xi, si, context=c, y=y), x, sigma,
                           SCHEDULE.sigma_to_t(sigma))


@pytest.mark.parametrize("variant,mu", [("sdxl", 0.0), ("sdxl", 0.4), ("xlv2", 0.3)])
def test_one_guided_call_with_low_level_injection_equals_the_restated_original(files, variant, mu):
    components = ("unet", "sketch_encoder", "vae") + (("reference_net",) if variant == "xlv2" else ())
    ck = load_checkpoint(files[variant], components=components)
    unet = ck.unet.eval()
    options = ColorizeOptions(enabled=True, bg_enhance=True, foreground_strength=0.7, background_strength=0.6,
                              merging_scale=mu, sketch_mask_threshold=0.05)
    sketch, hints, blank, raw, tokens = prepared(ck.sketch_encoder)
    inputs = inputs_for(1)
    loras = None
    if variant == "xlv2":
        loras = load_xlv2_lora(read_tensors(files[variant], UNET_PREFIX, keep=lambda k: ".lora_" in k))
    encode = fake_encoder(5)
    enhance_plan, context = prepare_xl_enhance(
        variant, options, tokens, inputs, encode_context=encode, vae_encode=ck.vae.encode, seeds=[7],
        size=(128, 128), cache=ContentCache(), reference_net=lambda: ck.reference_net, loras=loras)
    assert context.shape == (1, 392, CTX)
    torch.testing.assert_close(context[:, 196:], encode(inputs.masked_reference(0.5)))
    y = xl_vector(128, 128)
    plan = GenerationPlan(mode=guidance_mode(4.0, 1.0), reference_guidance=4.0, sketch_guidance=1.0,
                          reference_tokens=context, sketch_hints=hints, blank_hints=blank, vector=y,
                          enhance=enhance_plan)
    x, sigma = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(9)) * 3, torch.tensor([2.0])
    ours = run_call(unet, plan, enhance_plan, x, sigma)

    reference = copy.deepcopy(unet)
    mask = F.interpolate(inputs.sketch_mask, scale_factor=0.125)        # nearest: the original's smask for the U-Net
    mode = {"sdxl": "bias" if mu == 0 else "hard", "xlv2": "soft"}[variant]
    names = {id(m): n for n, m in reference.named_modules()}
    for block in transformer_blocks(reference):
        attn = block.attn2
        if loras is not None:     # the original merges W + U·D into the 210 linears for the generation
            lora = loras[names[id(attn)]]
            with torch.no_grad():
                for proj in ("to_q", "to_k", "to_v"):
                    side = lora.projections[proj].sides["bg"]
                    getattr(attn, proj).weight += side.up.weight @ side.down.weight
        attn.forward = soft_split_forward(attn, mask, 0.7, 0.6, mu, 0.05, mode)
    if variant == "xlv2":
        banks = enhance_plan.reference_net_banks[0]
        for index, block in enumerate(decoder_transformer_blocks(reference)):
            block.attn1.forward = reader_forward(block.attn1, banks[index], mask)
    a = [0.8 * s for s in (1.0, 0.5, 2.0, 1.5)]
    roles, ctx, ctl = restated_rows(plan.mode, context, raw, a, True)
    with torch.no_grad():
        out = restated_v_denoiser(reference, x.repeat(2, 1, 1, 1), sigma.repeat(2), ctx, y.expand(2, -1), ctl)
    expected = restated_combine(out.chunk(2), roles, 4.0, 1.0)
    assert (ours - expected).abs().max() <= 1e-4 * expected.abs().max()
    # it can fail: the default mode (no split) and, for xlv2, the split without its LoRA differ
    plain_plan = GenerationPlan(**{**plan.__dict__, "enhance": None, "reference_tokens": tokens,
                                   "stats": {"unet_calls": 0, "unet_rows": 0, "write_rows": 0}})
    assert (run_call(unet, plain_plan, None, x, sigma) - expected).abs().max() > 1e-3 * expected.abs().max()
    if loras is not None:
        enhance_plan.modules.lora = {}
        without = run_call(unet, plan, enhance_plan, x, sigma)
        assert (without - expected).abs().max() > 1e-4 * expected.abs().max()
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in unet.modules())


def test_xlv2_low_level_injection_and_attention_injection_are_refused_together():
    with pytest.raises(InvalidInput, match="injection"):
        prepare_xl_enhance("xlv2", ColorizeOptions(enabled=True, bg_enhance=True, injection=True),
                           torch.zeros(1, 196, CTX), inputs_for(), encode_context=fake_encoder(1), vae_encode=None,
                           seeds=[1], size=(128, 128), cache=ContentCache())


@pytest.fixture(scope="module")
def colorizers(files, tmp_path_factory):
    from lib_colorize.pipeline import Colorizer
    from lib_colorize.testing.xl_checkpoints import TINY_BIGG_CONFIG, make_xl_encoder_weights

    models = tmp_path_factory.mktemp("models")
    make_xl_encoder_weights(models, seed=8)
    return {v: Colorizer.from_xl_files(files[v], models_dir=str(models), clip_config=TINY_BIGG_CONFIG)
            for v in files}


def sketch_image():
    image = Image.new("RGB", (96, 64), "white")
    ImageDraw.Draw(image).ellipse((10, 8, 86, 56), outline="black", width=3)
    return image


def mask_image(size, box):
    image = Image.new("L", size, 0)
    ImageDraw.Draw(image).rectangle(box, fill=255)
    return image


@pytest.mark.parametrize("variant", ["sdxl", "xlv2"])
def test_low_level_injection_in_the_pipeline(colorizers, variant):
    from lib_colorize.pipeline import SamplingOptions

    colorizer = colorizers[variant]
    options = ColorizeOptions(enabled=True, sketch=sketch_image(), reference=Image.new("RGB", (60, 80), (200, 40, 40)),
                              reference_guidance=4.0, sketch_mask=mask_image((96, 64), (20, 10, 70, 54)),
                              reference_mask=mask_image((60, 80), (10, 10, 50, 70)))
    sampling = SamplingOptions(width=64, height=64, steps=1, seed=2, sampler="Euler")
    plain = colorizer.colorize(options, sampling)
    low_level = colorizer.colorize(options.replace(bg_enhance=True), sampling)
    again = colorizer.colorize(options.replace(bg_enhance=True), sampling)
    a, b, c = (np.asarray(r.images[0], dtype=np.float64) for r in (plain, low_level, again))
    assert np.abs(a - b).max() > 0 and np.array_equal(b, c)
    if variant == "xlv2":
        assert colorizer.enhance_cache.computed["reference net"] == 1        # once, its banks kept
        with pytest.raises(InvalidInput, match="injection"):
            colorizer.colorize(options.replace(bg_enhance=True, injection=True), sampling)
    with pytest.raises(InvalidInput, match="style_enhance"):
        colorizer.colorize(options.replace(style_enhance=True), sampling)
