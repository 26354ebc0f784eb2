"""The accordion's "Enhance" section: BG / FG / style enhance, their strengths, thresholds, images and masks.

It shows only what the loaded checkpoint can do (:func:`lib_colorize.enhance.capabilities`) and says why the rest
is hidden; a hidden control is also reset to its default, so it never sends a value the model would refuse. The
section refreshes when the accordion is switched on, when its refresh button is pressed, and when the webui's
checkpoint dropdown changes (:func:`on_after_component` finds that dropdown; :func:`on_before_ui` forgets the
previous page's). Its components fill the slots
:data:`cd_webui.args.ENHANCE_SLOTS`.
"""
from __future__ import annotations

from typing import Any, Optional

import gradio as gr

from lib_colorize.enhance import VERSION_LABELS, VERSION_NEEDS, capabilities
from lib_colorize.options import FIELD_BY_NAME, STRUCTURED_FIELDS

__all__ = ["build_enhance_section", "visibility_updates", "notice_for", "on_after_component", "on_before_ui",
           "CHECKPOINT_ELEM_ID",
           "VERSION_DEPENDENT"]

CHECKPOINT_ELEM_ID = "setting_sd_model_checkpoint"
#: controls shown or hidden by the loaded version, in the order of :func:`visibility_updates`
VERSION_DEPENDENT = tuple(VERSION_NEEDS)
_LABELS = {"style_enhance": "Style enhance", "fg_enhance": "FG enhance", "background_factor": "Background factor"}
IMAGE_HEIGHT = 200

#: every built section: its refresh outputs, so a checkpoint dropdown found later can drive it
_sections: list = []
_dropdowns: list = []


def notice_for(version: Optional[str]) -> str:
    """The section's note: the loaded version and what is hidden because of it."""
    if version is None:
        return ("No ColorizeDiffusion checkpoint is loaded: every enhance control is shown. BG enhance works with "
                "every version (XL included), FG enhance with v1.5 and v2, Style enhance and Background factor with v2 "
                "only.")
    can = capabilities(version)
    hidden = [f"{_LABELS[k]} (needs {' or '.join(VERSION_LABELS[v] for v in VERSION_NEEDS[k])})"
              for k in VERSION_DEPENDENT if not can[k]]
    text = f"Loaded checkpoint: {VERSION_LABELS.get(version, version)}."
    return text + (" Hidden: " + "; ".join(hidden) + "." if hidden else " Every enhance mode is available.")


def visibility_updates(version: Optional[str]) -> list:
    """gradio updates: the notice, then each of :data:`VERSION_DEPENDENT` (hidden ones reset to the default)."""
    can = capabilities(version) if version is not None else {k: True for k in VERSION_DEPENDENT}
    updates = [gr.update(value=f'<p class="cd-notice">{notice_for(version)}</p>')]
    for key in VERSION_DEPENDENT:
        if can[key]:
            updates.append(gr.update(visible=True))
        else:
            updates.append(gr.update(visible=False, value=FIELD_BY_NAME[key].default))
    return updates


def _version_of_title(title: Any) -> Optional[str]:
    """Version of the checkpoint a dropdown title names (header only), else the loaded one's."""
    from . import enhance

    if title:
        try:
            from modules import sd_models

            info = sd_models.get_closet_checkpoint_match(str(title))
            if info is not None:
                from lib_colorize.checkpoint import inspect_checkpoint

                return inspect_checkpoint(info.filename).version
        except Exception:  # noqa: BLE001 - not a ColorizeDiffusion file, or no webui: the loaded model decides
            return None
    return enhance.loaded_version()


def _refresh(title: Any = None) -> list:
    return visibility_updates(_version_of_title(title))


def _wire(dropdown, outputs) -> None:
    dropdown.change(fn=_refresh, inputs=[dropdown], outputs=outputs, show_progress=False)


def on_before_ui() -> None:
    """``script_callbacks.on_before_ui``: a new page is about to be built (start or "Reload UI"): forget the old
    page's sections and dropdowns."""
    _sections.clear()
    _dropdowns.clear()


def on_after_component(component, **kwargs) -> None:
    """``script_callbacks.on_after_component``: remember the checkpoint dropdown (quicksettings or the settings
    page) and drive every section of this page with it. The webui builds the txt2img/img2img tabs in their own
    Blocks and renders them into the page later, so sections and dropdown meet here whatever their order."""
    if kwargs.get("elem_id") != CHECKPOINT_ELEM_ID:
        return
    _dropdowns.append(component)
    for outputs in _sections:
        _wire(component, outputs)


def _tooltip(component, text: Optional[str]):
    if text:
        component.webui_tooltip = text
    return component


def build_enhance_section(script, c: dict, slot_elem_id, enabled) -> None:
    """Create the section's components into ``c`` (by slot name) inside the current gradio Blocks."""
    from . import enhance

    version = enhance.loaded_version()
    can = capabilities(version) if version is not None else {k: True for k in VERSION_DEPENDENT}

    def checkbox(name, **kwargs):
        spec = FIELD_BY_NAME[name]
        return _tooltip(gr.Checkbox(value=spec.default, label=spec.label, elem_id=slot_elem_id(script, name),
                                    **kwargs), spec.tooltip)

    def slider(name, **kwargs):
        spec = FIELD_BY_NAME[name]
        return _tooltip(gr.Slider(minimum=spec.minimum, maximum=spec.maximum, step=spec.step, value=spec.default,
                                  label=spec.label, elem_id=slot_elem_id(script, name), **kwargs), spec.tooltip)

    def image(name, label):
        return _tooltip(gr.Image(label=label, type="pil", source="upload", image_mode="RGB", height=IMAGE_HEIGHT,
                                 elem_id=slot_elem_id(script, name), elem_classes="cd-image"), STRUCTURED_FIELDS[name])

    with gr.Accordion("Enhance: background, foreground, style", open=False,
                      elem_id=script.elem_id("enhance_accordion")):
        notice = gr.HTML(f'<p class="cd-notice">{notice_for(version)}</p>', elem_id=script.elem_id("enhance_notice"))
        with gr.Row():
            c["bg_enhance"] = checkbox("bg_enhance")
            c["fg_enhance"] = checkbox("fg_enhance", visible=can["fg_enhance"])
            c["style_enhance"] = checkbox("style_enhance", visible=can["style_enhance"])
            refresh = gr.Button("↻", size="sm", elem_id=script.elem_id("enhance_refresh"))
            _tooltip(refresh, "Show the controls of the checkpoint loaded now.")
        with gr.Row():
            for name in ("foreground_strength", "background_strength", "merging_scale"):
                c[name] = slider(name)
            c["background_factor"] = slider("background_factor", visible=can["background_factor"])
        with gr.Row():
            c["reference_mask_threshold"] = slider("reference_mask_threshold")
            c["sketch_mask_threshold"] = slider("sketch_mask_threshold")
            spec = FIELD_BY_NAME["reference_mask_extractor"]
            c["reference_mask_extractor"] = _tooltip(
                gr.Dropdown(list(spec.choices), value=spec.default, label=spec.label,
                            elem_id=slot_elem_id(script, "reference_mask_extractor")), spec.tooltip)
        with gr.Row(elem_classes="cd-images"):
            c["background"] = image("background", "Background image (optional)")
            c["sketch_mask"] = image("sketch_mask", "Sketch mask (optional, white = character)")
            c["reference_mask"] = image("reference_mask", "Reference mask (optional, white = character)")
        with gr.Row():
            for name in ("remove_foreground", "remove_background", "return_masks"):
                c[name] = checkbox(name)
        gr.HTML('<p class="cd-notice">Masks: ISNet-sketch (sketch) and ISNet (reference, Apache-2.0) are '
                'downloaded into models/ColorizeDiffusion on first use. rmbg-v2 (BRIA RMBG-2.0) is gated and '
                'non-commercial (CC BY-NC 4.0): accept BRIA\'s terms on Hugging Face and download it into '
                'models/ColorizeDiffusion/RMBG-2.0 yourself.</p>', elem_id=script.elem_id("enhance_licences"))

    outputs = [notice] + [c[k] for k in VERSION_DEPENDENT]
    refresh.click(fn=lambda: _refresh(None), inputs=[], outputs=outputs, show_progress=False)
    enabled.change(fn=lambda on: _refresh(None), inputs=[enabled], outputs=outputs, show_progress=False)
    _sections.append(outputs)
    for dropdown in _dropdowns:
        _wire(dropdown, outputs)
