"""Masks of the enhance modes (method-enhance §4): the extractors' pre/post-processing restated from the spec,
user masks, remove-foreground / remove-background, weights, and the content cache."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from lib_colorize import masks
from lib_colorize.enhance import prepare_mask_inputs, remove_background
from lib_colorize.errors import MissingWeights
from lib_colorize.masks.isnet import ISNet
from lib_colorize.options import ColorizeOptions
from lib_colorize.testing.masks import make_isnet_weights, make_mask_extractor_files


class Grey(torch.nn.Module):
    """A "network" whose mask is its input's channel mean: it shows what the extractor was fed."""

    def __init__(self):
        super().__init__()
        self.probe = torch.nn.Parameter(torch.zeros(()))
        self.inputs = []

    def forward(self, x):
        self.inputs.append(x)
        return x.mean(dim=1, keepdim=True) + self.probe


def test_isnet_has_the_released_size_and_a_small_file_loads_by_its_shapes(tmp_path):
    assert sum(p.numel() for p in ISNet().parameters()) == 44_046_790     # IS-Net (DIS): about 44 M
    path = make_isnet_weights(tmp_path / "isnetis.safetensors", divisor=8)
    net = masks.load_mask_extractor("ISNet", models_dir=tmp_path, allow_download=False)
    out = net(torch.rand(1, 3, 64, 48) * 2 - 1)
    assert out.shape == (1, 1, 64, 48) and 0 <= float(out.min()) and float(out.max()) <= 1
    assert masks.load_mask_extractor("ISNet", models_dir=tmp_path, allow_download=False) is net   # cached
    assert path.endswith("isnetis.safetensors")
    masks.unload_mask_extractors()


def test_sketch_mask_resizes_to_1024_runs_the_net_and_comes_back_clamped():
    net = Grey()
    white = torch.rand(1, 3, 64, 96, generator=torch.Generator().manual_seed(0)) * 4 - 2   # outside [-1, 1]
    mask = masks.sketch_mask(net, white, (64, 96))
    fed = net.inputs[0]
    assert fed.shape == (1, 3, 1024, 1024)
    assert torch.allclose(fed, F.interpolate(white, size=(1024, 1024), mode="bicubic"))   # fed as is, [-1, 1] scale
    expected = F.interpolate(fed.mean(1, keepdim=True), size=(64, 96), mode="bicubic").clamp(0, 1)
    assert torch.allclose(mask, expected, atol=1e-6) and float(mask.max()) <= 1 and float(mask.min()) >= 0
    latent = masks.latent_mask(torch.rand(1, 1, 64, 96) * 2)
    assert latent.shape == (1, 1, 8, 12) and float(latent.max()) > 1, "the latent mask is not clamped (Q9)"


def test_isnet_crop_mode_inverts_pads_with_one_cuts_back_and_dilates():
    net = Grey()
    image = torch.rand(1, 3, 60, 40, generator=torch.Generator().manual_seed(1)) * 2 - 1
    mask = masks.isnet_mask(net, image, dilated=False)
    canvas = net.inputs[0]
    scale = 1024 / 60
    scaled = F.interpolate(image, scale_factor=scale, mode="bicubic")
    sh, sw = scaled.shape[-2:]
    top, left = (1024 - sh) // 2, (1024 - sw) // 2
    assert torch.allclose(canvas[:, :, top:top + sh, left:left + sw], 1 - (scaled + 1) / 2, atol=1e-6)   # Q7
    assert float(canvas[:, :, :, :left].min()) == 1.0 == float(canvas[:, :, :, left + sw:].max())       # pad −1 → 1
    expected = F.interpolate(canvas[:, :, top:top + sh, left:left + sw].mean(1, keepdim=True), size=(60, 40),
                             mode="bicubic").clamp(0, 1)
    assert torch.allclose(mask, expected, atol=1e-6)
    dilated = masks.isnet_mask(Grey(), image, dilated=True)
    assert torch.allclose(dilated, F.max_pool2d(expected, 11, stride=1, padding=5), atol=1e-6)
    assert not torch.allclose(dilated, mask)


def test_rmbg_mask_normalises_takes_the_last_output_and_dilates():
    class Outputs(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.probe = torch.nn.Parameter(torch.zeros(()))

        def forward(self, x):
            self.seen = x
            return [x[:, :1] * 0 - 9, x[:, :1] + self.probe]

    net = Outputs()
    image = torch.rand(1, 3, 50, 70, generator=torch.Generator().manual_seed(2)) * 2 - 1
    mask = masks.rmbg_mask(net, image, dilated=True)
    x = F.interpolate((image + 1) / 2, size=(1024, 1024), mode="bilinear", antialias=True)
    assert torch.allclose(net.seen, (x - torch.tensor(masks.IMAGENET_MEAN).view(1, 3, 1, 1))
                          / torch.tensor(masks.IMAGENET_STD).view(1, 3, 1, 1), atol=1e-5)
    expected = F.max_pool2d(F.interpolate(torch.sigmoid(net.seen[:, :1]), size=(50, 70), mode="bilinear",
                                          antialias=True), 11, stride=1, padding=5).clamp(0, 1)
    assert torch.allclose(mask, expected, atol=1e-5)


def test_user_masks_follow_the_sketch_box_and_the_reference_padding():
    drawn = Image.new("L", (20, 10), 0)
    drawn.paste(255, (0, 0, 10, 10))                       # left half = character
    canvas = masks.mask_from_image(drawn, (32, 64), box=(12, 6, 40, 20))
    assert canvas.shape == (1, 1, 32, 64)
    assert float(canvas[..., :6, :].max()) == 0.0 and float(canvas[..., :, :12].max()) == 0.0   # padding = 0
    assert float(canvas[0, 0, 15, 14]) == 1.0 and float(canvas[0, 0, 15, 48]) == 0.0
    padded = masks.pad_mask_with_margin(drawn, 1.5)
    assert padded.size == (30, 10) and padded.getpixel((4, 5)) == 0 and padded.getpixel((6, 5)) == 255


class NoExtraction:
    """Mask extractors that must not run (user masks, or a mode that reads no mask)."""

    def sketch(self, *args):
        raise AssertionError("the sketch mask was extracted")

    def reference(self, *args, **kwargs):
        raise AssertionError("a reference mask was extracted")


def images():
    rng = np.random.default_rng(0)
    sketch = Image.fromarray(np.full((32, 32, 3), 255, np.uint8))
    reference = Image.fromarray(rng.integers(0, 255, (24, 32, 3), dtype=np.uint8))
    background = Image.fromarray(rng.integers(0, 255, (32, 24, 3), dtype=np.uint8))
    return sketch, reference, background


def test_prepare_mask_inputs_uses_user_masks_and_extracts_only_what_a_mode_reads():
    sketch_image, reference, background = images()
    sketch = -torch.ones(1, 3, 64, 64)
    half = Image.new("L", (32, 24), 0)
    half.paste(255, (0, 0, 16, 24))
    options = ColorizeOptions(enabled=True, sketch=sketch_image, reference=reference, bg_enhance=True,
                              sketch_mask=Image.new("L", (8, 8), 255), reference_mask=half, pad_reference=1.25)
    inputs = prepare_mask_inputs(options, sketch, (0, 0, 64, 64), NoExtraction())
    assert inputs.latent_mask.shape == (1, 1, 8, 8) and torch.allclose(inputs.latent_mask, torch.ones(1, 1, 8, 8))
    assert inputs.reference.shape == (1, 3, 24, 40) and inputs.reference_mask.shape == (1, 1, 24, 40)
    ref_bg = inputs.masked_reference(0.5)
    assert torch.all(ref_bg[..., 4:20] == 1.0), "the character is whitened"
    assert torch.equal(ref_bg[..., 24:36], inputs.reference[..., 24:36])
    # with a background image the reference mask is not needed (Q13), so nothing is extracted
    with_bg = options.replace(reference_mask=None, background=background)
    assert prepare_mask_inputs(with_bg, sketch, (0, 0, 64, 64), NoExtraction()).reference_mask is None
    # style enhance alone reads no mask
    style = ColorizeOptions(enabled=True, sketch=sketch_image, reference=reference, style_enhance=True)
    assert prepare_mask_inputs(style, sketch, (0, 0, 64, 64), NoExtraction()).latent_mask is None


def test_remove_foreground_whitens_the_background_and_remove_background_the_result(tmp_path):
    make_mask_extractor_files(tmp_path)
    extractors = masks.MaskExtractors(tmp_path, allow_download=False)
    sketch_image, reference, background = images()
    options = ColorizeOptions(enabled=True, sketch=sketch_image, reference=reference, background=background,
                              bg_enhance=True, remove_foreground=True, reference_mask_threshold=0.5)
    inputs = prepare_mask_inputs(options, -torch.ones(1, 3, 64, 64), (0, 0, 64, 64), extractors)
    keep = inputs.background_mask < 0.5
    from lib_colorize.preprocess import image_to_tensor

    original = image_to_tensor(background)
    assert torch.equal(inputs.background, torch.where(keep, original, torch.ones_like(original)))
    assert extractors.cache.computed == {"sketch mask": 1, "reference mask": 1}
    prepare_mask_inputs(options, -torch.ones(1, 3, 64, 64), (0, 0, 64, 64), extractors)
    assert extractors.cache.computed == {"sketch mask": 1, "reference mask": 1}, "cached by content"
    result = Image.fromarray(np.random.default_rng(3).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    mask = extractors.reference("ISNet", image_to_tensor(result), dilated=False)
    threshold = float(mask.median())   # random weights: a threshold that splits this mask
    (cleaned,) = remove_background([result], lambda x: extractors.reference("ISNet", x, dilated=False), threshold)
    got = np.asarray(cleaned)
    character = (mask[0, 0] >= threshold).numpy()
    assert character.any() and (~character).any()
    assert (got[~character] == 255).all() and (got[character] == np.asarray(result)[character]).all()
    masks.unload_mask_extractors()


def test_missing_weights_name_the_file_and_rmbg_says_it_is_gated(tmp_path):
    with pytest.raises(MissingWeights, match=r"mask extractor 'ISNet-sketch' needs the weight file "
                                             r"sketch-segment\.safetensors"):
        masks.load_mask_extractor("ISNet-sketch", models_dir=tmp_path, allow_download=False)
    with pytest.raises(MissingWeights, match=r"rmbg-v2.*non-commercial.*gated.*ISNet"):
        masks.load_mask_extractor("rmbg-v2", models_dir=tmp_path)
    assert masks.MASK_EXTRACTORS["ISNet"].licence.startswith("Apache-2.0")
