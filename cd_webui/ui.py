"""The ColorizeDiffusion accordion of the txt2img and img2img tabs.

:func:`build_ui` returns the script's input components in the order of :data:`cd_webui.args.UI_ORDER`, which
is also the positional API (``alwayson_scripts.ColorizeDiffusion.args``); it only ever grows at the end:

====  ==============================  =================================================================
 #    slot                            component
====  ==============================  =================================================================
 0    enabled                         InputAccordion (the accordion's checkbox)
 1    sketch                          Image (PIL); API: base64 string
 2    reference                       Image (PIL); API: base64 string
 3    use_init_image                  Checkbox (img2img only; hidden and ignored in txt2img)
 4    sketch_mode                     Radio none / invert / extract
 5    line_extractor                  Dropdown (shown for extract)
 6-9  reference_guidance, sketch_guidance, sketch_strength, reference_strength   Sliders
10-12 level_scales.encoder / .middle / .low                                      Sliders
13    accurate_layer_scales           Checkbox: use the 16 per-layer sliders instead of the levels
14-29 layer_scales[0] .. [15]         Sliders
30-34 pad_reference, guidance_start, guidance_end, no_guidance_start, no_guidance_end   Sliders
35-38 injection, injection_reference_fidelity, injection_sketch_fidelity, injection_start
39-41 crop_result, return_sketch, return_heatmap                                 Checkboxes
42    manipulations                   Textbox: the manipulation sequence, one group per line
43-58 style_enhance ... return_masks  the enhance section (:mod:`cd_webui.enhance_ui`, args.ENHANCE_SLOTS)
59-62 sketch_strength_1 .. 4          Sliders (XL models)
63    sketch_rope                     Radio cos / rotation (XL models)
64    infotext_enabled                Checkbox (hidden): ``enabled`` as pasted from an infotext (see args)
65-73 form.target, form.anchor, form.control, form.scale, form.enhance, form.thresholds[0..3]
                                      the manipulation form
====  ==============================  =================================================================

The accordion adapts to the selected checkpoint (:func:`visibility_for`): the XL rows show only for the XL
models; the 16 per-layer sliders, the middle level scale, text manipulation and its heat map only for the SD2.1
models (sdxl also hides the low level scale). It updates when the accordion is opened and when the checkpoint
list changes (:func:`bind_checkpoint_dropdown`).

The manipulation form (target / anchor / control prompts, target scale, enhance, thresholds) is the group being
edited. As in the original app it takes effect when its target prompt is not empty: it runs after the groups of
the sequence. "Add" moves it into the sequence (and empties it); "Visualize" shows what its control prompt selects.
Pasting a ColorizeDiffusion infotext empties the form's target, so the pasted sequence runs as it was.

``build_ui`` has no side effects beyond the components and their events (the webui calls ``ui()`` several
times per tab). It sets ``script.infotext_fields`` and ``script.paste_field_names``.
"""
from __future__ import annotations

from typing import Any, Callable, Optional

import gradio as gr

from lib_colorize.errors import ColorizeError, InvalidInput
from lib_colorize.infotext import CONDITIONAL_FIELDS, FIELD_BY_INFOTEXT, has_colorize_params, infotext_to_values
from lib_colorize.manipulation import (format_manipulation_line, format_manipulation_sequence,
                                       parse_manipulation_sequence)
from lib_colorize.options import (DEFAULT_THRESHOLDS, FIELD_BY_NAME, LEVEL_NAMES, MAX_MANIPULATIONS,
                                  SKETCH_LEVEL_FIELDS, LevelScales, applies_to, check_thresholds,
                                  parse_manipulation, parse_manipulations)
from modules.ui_components import InputAccordion

from . import model
from .args import (ACCURATE_SLOT, FORM_SLOTS, FORM_TARGET_SLOT, INFOTEXT_ENABLED_SLOT, LAYER_NAMES, LAYER_SLOTS,
                   LEVEL_LABELS, LEVEL_SLOTS, MANIPULATIONS_SLOT, SCALE_RANGE, UI_ORDER, USE_INIT_IMAGE_SLOT,
                   ui_defaults)

__all__ = ["build_ui", "NOTICE", "PASTE_FUNCTIONS", "TEXT_PASTE_SLOTS", "slot_elem_id", "add_manipulation",
           "visualize"]

TITLE = "ColorizeDiffusion"
NOTICE = ("While ColorizeDiffusion is enabled, the reference and sketch guidance scales replace the webui's "
          "CFG scale, and the prompt and negative prompt have no effect. It needs a ColorizeDiffusion "
          "checkpoint selected as the Stable Diffusion checkpoint.")
SEQUENCE_INFO = ("One manipulation group per line, applied in order; edit freely. The form above runs after these "
                 "groups while its target prompt is not empty; Add moves it here.")
FORM_NOTE = ("The group in this form is used too while its target prompt is filled in, after the sequence below. "
             "Add moves it into the sequence.")
INIT_SKETCH_NOTE = "The sketch is the img2img init image above (\"Use init image as sketch\" is on)."
TARGET_SCALE = (0.0, 15.0, 0.25)
THRESHOLD_RANGE = (0.01, 0.99, 0.01)
HEATMAP_HEIGHT = 320
IMAGE_HEIGHT = 280

#: Scalar slots pasted by their infotext key as plain text: always written while enabled, and numbers and the
#: sketch mode convert safely with ``type(component.value)`` (booleans do not in the API: ``bool("False")``).
#: Every other slot pastes through a function, which also gives defaults for keys left out.
TEXT_PASTE_SLOTS = tuple(spec.name for spec in FIELD_BY_INFOTEXT.values()
                         if (spec.kind is float or spec.name == "sketch_mode")
                         and spec.name not in CONDITIONAL_FIELDS)
#: Slots that never come from an infotext (images, display options), but travel with "Send to img2img".
_CARRY_ONLY_SLOTS = ("sketch", "reference", "return_sketch", "return_heatmap",
                     "background", "sketch_mask", "reference_mask", "return_masks")
#: Slots outside the infotext and "Send to": the img2img switch and the form (only its target is emptied).
_UNPASTED_SLOTS = (USE_INIT_IMAGE_SLOT,) + tuple(slot for slot in FORM_SLOTS if slot != FORM_TARGET_SLOT)


# ------------------------------------------------------------------------------------- paste functions
def _slot_value(values: dict, slot: str) -> Any:
    if slot in LEVEL_SLOTS:
        return values["level_scales"][LEVEL_NAMES[LEVEL_SLOTS.index(slot)]]
    if slot == ACCURATE_SLOT:
        return values["layer_scales"] is not None
    if slot in LAYER_SLOTS:
        layers = values["layer_scales"]
        return float(layers[LAYER_SLOTS.index(slot)]) if layers is not None else 1.0
    if slot == MANIPULATIONS_SLOT:
        return format_manipulation_sequence(parse_manipulations(values["manipulations"]))
    if slot == INFOTEXT_ENABLED_SLOT:
        return values["enabled"]
    if slot == FORM_TARGET_SLOT:
        return ""           # the infotext's groups are all in its sequence
    return values[slot]


def _make_paste_function(slot: str) -> Callable[[dict], Any]:
    def paste(params: dict) -> Any:
        if slot in _CARRY_ONLY_SLOTS:
            return None
        if not has_colorize_params(params):
            return False if slot in ("enabled", INFOTEXT_ENABLED_SLOT) else None  # a plain SD infotext: off
        try:
            return _slot_value(infotext_to_values(params, strict=False), slot)
        except ColorizeError:
            return None

    paste.__name__ = paste.__qualname__ = f"paste_{slot}"
    return paste


#: One function per pasted slot, created once at import so that both tabs share them: the webui matches
#: ``paste_field_names`` against these objects when "Send to img2img" copies values across tabs.
PASTE_FUNCTIONS: dict[str, Callable[[dict], Any]] = {
    slot: _make_paste_function(slot) for slot in UI_ORDER
    if slot not in _UNPASTED_SLOTS and slot not in TEXT_PASTE_SLOTS
}


def _paste_target(slot: str):
    return FIELD_BY_NAME[slot].infotext if slot in TEXT_PASTE_SLOTS else PASTE_FUNCTIONS[slot]


# ------------------------------------------------------------------------------------- button handlers
def _group_from_form(target, anchor, control, scale, enhance, t0, t1, t2, t3):
    return parse_manipulation({"target": target or "", "anchor": anchor or "", "control": control or "",
                               "scale": scale, "enhance": bool(enhance), "thresholds": [t0, t1, t2, t3]})


def add_manipulation(sequence, target, anchor, control, scale, enhance, t0, t1, t2, t3):
    """"Add": append the form's group to the sequence (validated) and clear the form's prompts. A form without a
    target prompt is refused (it would add a group that changes nothing useful)."""
    try:
        if not (target or "").strip():
            raise InvalidInput("manipulations", "the form's target prompt is empty: type what the selected regions "
                                                "should become (e.g. 'red hair'), then press Add")
        existing = parse_manipulation_sequence(sequence or "")
        if len(existing) >= MAX_MANIPULATIONS:
            raise InvalidInput("manipulations", f"the sequence already holds {MAX_MANIPULATIONS} groups, the most "
                                                "allowed")
        line = format_manipulation_line(_group_from_form(target, anchor, control, scale, enhance,
                                                         t0, t1, t2, t3))
    except ColorizeError as error:
        raise gr.Error(str(error)) from None
    kept = [raw.rstrip() for raw in (sequence or "").splitlines() if raw.strip()]
    return "\n".join(kept + [line]), "", "", ""


def visualize(reference, sequence, control, t0, t1, t2, t3):
    """"Visualize": the heat map of the control prompt over the reference, without generating."""
    if reference is None:
        gr.Warning("ColorizeDiffusion: upload a reference image first.")
        return None
    try:
        thresholds = check_thresholds("thresholds", [t0, t1, t2, t3])
        from cd_webui import api as cd_api

        return cd_api.visualize_heatmap(reference, sequence or "", control or "", thresholds)
    except ColorizeError as error:
        raise gr.Error(str(error)) from None


# ------------------------------------------------------------------------------------- model adaptation
#: What each adaptive part of the accordion shows for: the option whose :func:`applies_to` decides.
ADAPTIVE_PARTS = (("xl_row", "sketch_rope"), ("layers_accordion", "layer_scales"),
                  ("manipulation_accordion", "manipulations"), ("return_heatmap", "return_heatmap"),
                  ("level_scales.middle", "level_scales.middle"), ("level_scales.low", "level_scales.low"))


def version_of_checkpoint(title: Optional[str]) -> Optional[str]:
    """The ColorizeDiffusion version of a checkpoint-list entry (its file header), None when unknown."""
    if not title:
        return None
    try:
        from modules import sd_models

        from cd_webui import model as cd_model

        info = sd_models.get_closet_checkpoint_match(str(title))
        filename = getattr(info, "filename", None)
        return cd_model.checkpoint_info(filename).version if filename else None
    except Exception:  # noqa: BLE001 - not a ColorizeDiffusion file, or no such entry: show everything
        return None


def selected_version() -> Optional[str]:
    """The version of the loaded checkpoint, else of the one selected in the settings."""
    try:
        from modules import shared

        from cd_webui import model as cd_model

        sd_model = getattr(shared, "sd_model", None)
        if sd_model is not None:
            return cd_model.checkpoint_info(cd_model.checkpoint_path(sd_model)).version
        return version_of_checkpoint(getattr(shared.opts, "sd_model_checkpoint", None))
    except Exception:  # noqa: BLE001
        return None


#: The slots inside each adaptive part. A hidden part's slots go back to their defaults: the model check refuses a
#: non-default value of an option the model does not use (a sequence typed for v1, then an XL checkpoint chosen),
#: and the user could not reach the hidden control to clear it.
HIDDEN_DEFAULT_SLOTS = {"xl_row": (*SKETCH_LEVEL_FIELDS, "sketch_rope"), "layers_accordion": (ACCURATE_SLOT,),
                        "manipulation_accordion": (MANIPULATIONS_SLOT, FORM_TARGET_SLOT),
                        "return_heatmap": ("return_heatmap",), "level_scales.middle": ("level_scales.middle",),
                        "level_scales.low": ("level_scales.low",)}


def reset_slots() -> list:
    """``(part, slot)`` of every slot a hidden part resets that is not the part itself, in output order (after
    the :data:`ADAPTIVE_PARTS`)."""
    return [(part, slot) for part, _ in ADAPTIVE_PARTS for slot in HIDDEN_DEFAULT_SLOTS.get(part, ()) if slot != part]


def visibility_for(version: Optional[str]) -> list:
    """The updates for a model version (None: all shown): ``visible`` of each :data:`ADAPTIVE_PARTS` entry, then
    the :func:`reset_slots`, set to their defaults where their part is hidden (left alone where it is shown)."""
    defaults = ui_defaults()
    shown = {part: applies_to(option, version) for part, option in ADAPTIVE_PARTS}
    # a part that is itself a slot (a checkbox, a slider) takes its default in the same update
    updates = [gr.update(visible=True) if shown[part] else
               gr.update(visible=False, **({"value": defaults[part]} if part in HIDDEN_DEFAULT_SLOTS[part] else {}))
               for part, _ in ADAPTIVE_PARTS]
    updates += [gr.update() if shown[part] else gr.update(value=defaults[slot]) for part, slot in reset_slots()]
    return updates


def bind_checkpoint_dropdown(script, dropdown) -> None:
    """Adapt the accordion when the webui's checkpoint dropdown changes (called from ``after_component``)."""
    parts = getattr(script, "cd_adaptive_parts", None)
    if not parts:
        return
    try:
        dropdown.change(fn=lambda title: visibility_for(version_of_checkpoint(title)), inputs=[dropdown],
                        outputs=parts, show_progress=False)
    except Exception as error:  # noqa: BLE001 - a webui without that dropdown: opening the accordion adapts it
        print(f"ColorizeDiffusion: the accordion will adapt when opened ({error})")


# -------------------------------------------------------------------------------------------- building
def slot_elem_id(script, slot: str) -> str:
    """HTML id of a slot's component (``script_<tab>_colorizediffusion_<slot>``; brackets and dots become _)."""
    clean = slot.replace(".", "_").replace("[", "_").replace("]", "")
    return script.elem_id(clean)


def _tooltip(component, text: Optional[str]):
    # The webui shows ``tooltip=`` as the element's title (it keeps it in ``webui_tooltip``); setting the
    # attribute after construction works the same there and leaves plain gradio quiet.
    if text:
        component.webui_tooltip = text
    return component


def _field_slider(script, name: str, **kwargs):
    spec = FIELD_BY_NAME[name]
    slider = gr.Slider(minimum=spec.minimum, maximum=spec.maximum, step=spec.step, value=spec.default,
                       label=spec.label, elem_id=slot_elem_id(script, name), **kwargs)
    return _tooltip(slider, spec.tooltip)


def _field_checkbox(script, name: str, **kwargs):
    spec = FIELD_BY_NAME[name]
    box = gr.Checkbox(value=spec.default, label=spec.label, elem_id=slot_elem_id(script, name), **kwargs)
    return _tooltip(box, spec.tooltip)


def _tab_name(script, is_img2img: bool) -> str:
    return "img2img" if is_img2img else "txt2img"


def build_ui(script, is_img2img: bool, notice: str = NOTICE, host_controls: Optional[Callable] = None) -> list:
    """Create the accordion inside the current gradio Blocks; return its inputs in :data:`UI_ORDER`.

    A host adapter adds its own controls with ``host_controls(script, is_img2img)``, called inside the accordion
    below the ``notice``: it returns ``(components, infotext_fields)``; the components follow the
    :data:`UI_ORDER` ones in the returned list (and the positional API)."""
    c: dict[str, Any] = {}
    parts: dict[str, Any] = {}
    version = selected_version()
    shown = {part: applies_to(option, version) for part, option in ADAPTIVE_PARTS}
    levels = LevelScales()
    host_components, host_fields = [], []
    with InputAccordion(False, label=TITLE, elem_id=script.elem_id("enabled")) as enabled:
        c["enabled"] = enabled
        gr.HTML(f'<p class="cd-notice">{notice}</p>', elem_id=script.elem_id("notice"))
        if host_controls is not None:
            host_components, host_fields = host_controls(script, is_img2img)

        with gr.Row(elem_classes="cd-images"):
            # image_mode None: gradio hands over the image as PIL opened it (16-bit grey, palette, alpha), and
            # lib_colorize.images.decode_image converts it by the same rules as API and command-line images
            c["sketch"] = gr.Image(label="Sketch (line art)", type="pil", source="upload", image_mode=None,
                                   height=IMAGE_HEIGHT, elem_id=slot_elem_id(script, "sketch"), elem_classes="cd-image")
            init_note = gr.HTML(f'<p class="cd-notice">{INIT_SKETCH_NOTE}</p>', visible=False,
                                elem_id=script.elem_id("init_sketch_note"), elem_classes="cd-image")
            c["reference"] = gr.Image(label="Reference", type="pil", source="upload", image_mode=None,
                                      height=IMAGE_HEIGHT, elem_id=slot_elem_id(script, "reference"),
                                      elem_classes="cd-image")
        with gr.Row(elem_classes="cd-image-tools"):
            c[USE_INIT_IMAGE_SLOT] = _tooltip(
                gr.Checkbox(False, label="Use init image as sketch", visible=is_img2img,
                            elem_id=slot_elem_id(script, USE_INIT_IMAGE_SLOT)),
                "Colorize the img2img init image instead of the sketch above.")
            size_button = gr.Button("Use sketch size", size="sm", elem_id=script.elem_id("use_sketch_size"),
                                    elem_classes="cd-size-button")
            _tooltip(size_button, "Set width and height to the sketch's aspect ratio at the loaded model's native "
                                  "size (512 x 512 pixels for v1 and v1.5, 768 x 768 for v2; multiples of 64; XL "
                                  "models: the XL app's autofit, about 1024 x 1024, multiples of 32). With \"Use "
                                  "init image as sketch\", the init image's.")
            native = gr.Number(value=model.DEFAULT_NATIVE_SIZE, visible=False, precision=0,
                               elem_id=script.elem_id("native_size"))
            c[INFOTEXT_ENABLED_SLOT] = gr.Checkbox(False, visible=False,
                                                   elem_id=slot_elem_id(script, INFOTEXT_ENABLED_SLOT))

        mode = FIELD_BY_NAME["sketch_mode"]
        extractor = FIELD_BY_NAME["line_extractor"]
        with gr.Row():
            c["sketch_mode"] = _tooltip(gr.Radio(list(mode.choices), value=mode.default, label=mode.label,
                                                 elem_id=slot_elem_id(script, "sketch_mode")), mode.tooltip)
            c["line_extractor"] = _tooltip(
                gr.Dropdown(list(extractor.choices), value=extractor.default, label=extractor.label,
                            visible=mode.default == "extract", elem_id=slot_elem_id(script, "line_extractor")),
                extractor.tooltip)
        with gr.Row():
            for name in ("reference_guidance", "sketch_guidance"):
                c[name] = _field_slider(script, name)
        with gr.Row():
            for name in ("sketch_strength", "reference_strength"):
                c[name] = _field_slider(script, name)
        with gr.Row(visible=shown["xl_row"], elem_id=script.elem_id("xl_row")) as parts["xl_row"]:
            for name in SKETCH_LEVEL_FIELDS:
                c[name] = _field_slider(script, name)
            rope = FIELD_BY_NAME["sketch_rope"]
            c["sketch_rope"] = _tooltip(gr.Radio(list(rope.choices), value=rope.default, label=rope.label,
                                                 elem_id=slot_elem_id(script, "sketch_rope")), rope.tooltip)
        with gr.Row():
            for level, slot in zip(LEVEL_NAMES, LEVEL_SLOTS):
                label, tip = LEVEL_LABELS[level]
                c[slot] = _tooltip(gr.Slider(minimum=SCALE_RANGE[0], maximum=SCALE_RANGE[1], step=SCALE_RANGE[2],
                                             value=getattr(levels, level), label=label,
                                             visible=shown.get(slot, True), elem_id=slot_elem_id(script, slot)), tip)
                if slot in shown:
                    parts[slot] = c[slot]
        with gr.Accordion("Per-layer cross-attention scales", open=False, visible=shown["layers_accordion"],
                          elem_id=script.elem_id("layers_accordion")) as parts["layers_accordion"]:
            c[ACCURATE_SLOT] = _tooltip(
                gr.Checkbox(False, label="Accurate per-layer control", elem_id=slot_elem_id(script, ACCURATE_SLOT)),
                "Use these 16 sliders (one per cross-attention layer) instead of the three level scales; "
                "reference strength is not applied to them.")
            for row in range(0, len(LAYER_SLOTS), 4):
                with gr.Row():
                    for i in range(row, row + 4):
                        c[LAYER_SLOTS[i]] = gr.Slider(minimum=SCALE_RANGE[0], maximum=SCALE_RANGE[1],
                                                      step=SCALE_RANGE[2], value=1.0, label=f"{i} {LAYER_NAMES[i]}",
                                                      elem_id=slot_elem_id(script, LAYER_SLOTS[i]))
        with gr.Row():
            c["pad_reference"] = _field_slider(script, "pad_reference")
            c["crop_result"] = _field_checkbox(script, "crop_result")
        with gr.Accordion("Reference window", open=False, elem_id=script.elem_id("window_accordion")):
            with gr.Row():
                for name in ("guidance_start", "guidance_end"):
                    c[name] = _field_slider(script, name)
            with gr.Row():
                for name in ("no_guidance_start", "no_guidance_end"):
                    c[name] = _field_slider(script, name)
        with gr.Group(elem_classes="cd-injection"):
            c["injection"] = _field_checkbox(script, "injection")
            injection_default = FIELD_BY_NAME["injection"].default
            with gr.Row():
                for name in ("injection_reference_fidelity", "injection_sketch_fidelity", "injection_start"):
                    c[name] = _field_slider(script, name, visible=injection_default)
        with gr.Row():
            c["return_sketch"] = _field_checkbox(script, "return_sketch")
            c["return_heatmap"] = parts["return_heatmap"] = _field_checkbox(script, "return_heatmap",
                                                                            visible=shown["return_heatmap"])

        with gr.Accordion("Text manipulation", open=False, visible=shown["manipulation_accordion"],
                          elem_id=script.elem_id("manipulation_accordion")) as parts["manipulation_accordion"]:
            gr.HTML(f'<p class="cd-notice">{FORM_NOTE}</p>', elem_id=script.elem_id("form_note"))
            with gr.Row():
                target = gr.Textbox(label="Target prompt", placeholder="none", lines=1,
                                    elem_id=script.elem_id("target_prompt"))
                anchor = gr.Textbox(label="Anchor prompt", placeholder="none", lines=1,
                                    elem_id=script.elem_id("anchor_prompt"))
                control = gr.Textbox(label="Control prompt", placeholder="none", lines=1,
                                     elem_id=script.elem_id("control_prompt"))
            _tooltip(target, "What the selected reference regions should become, e.g. 'red hair'.")
            _tooltip(anchor, "What they are now (optional), e.g. 'blonde hair'; the shift goes from anchor to "
                             "target.")
            _tooltip(control, "Selects the reference regions to change, e.g. 'hair'. Visualize shows them.")
            with gr.Row():
                scale = _tooltip(gr.Slider(minimum=TARGET_SCALE[0], maximum=TARGET_SCALE[1], step=TARGET_SCALE[2],
                                           value=0.0, label="Target scale", elem_id=script.elem_id("target_scale")),
                                 "How far the selected tokens move towards the target. Manipulation runs only "
                                 "if some group's scale is above 0.")
                enhance = _tooltip(gr.Checkbox(False, label="Enhance", elem_id=script.elem_id("enhance")),
                                   "With an anchor: measure the shift from the anchor and push harder.")
            with gr.Row():
                thresholds = [
                    _tooltip(gr.Slider(minimum=THRESHOLD_RANGE[0], maximum=THRESHOLD_RANGE[1],
                                       step=THRESHOLD_RANGE[2], value=value, label=f"Threshold {i}",
                                       elem_id=script.elem_id(f"threshold_{i}")),
                             "Similarity thresholds (strictly increasing): tokens below threshold 0 are pushed "
                             "away, above threshold 3 get the full shift.")
                    for i, value in enumerate(DEFAULT_THRESHOLDS)]
            with gr.Row():
                add_button = gr.Button("Add", size="sm", elem_id=script.elem_id("add_manipulation"))
                clear_button = gr.Button("Clear", size="sm", elem_id=script.elem_id("clear_manipulations"))
                visualize_button = gr.Button("Visualize", size="sm", elem_id=script.elem_id("visualize"))
            c[MANIPULATIONS_SLOT] = _tooltip(
                gr.Textbox(label="Manipulation sequence", value="", lines=3, max_lines=MAX_MANIPULATIONS,
                           placeholder="[target] ...; [anchor] ...; [control] ...; [scale] 0.0; [enhanced] False; "
                                       "[ts0] 0.5; [ts1] 0.55; [ts2] 0.65; [ts3] 0.95",
                           elem_id=slot_elem_id(script, MANIPULATIONS_SLOT)),
                SEQUENCE_INFO)
            heatmap = gr.Image(label="Manipulation heat map", type="pil", interactive=False, height=HEATMAP_HEIGHT,
                               elem_id=script.elem_id("heatmap_preview"))

        from .enhance_ui import build_enhance_section

        build_enhance_section(script, c, slot_elem_id, enabled)   # slots args.ENHANCE_SLOTS

    # ------------------------------------------------------------------------------------------- events
    c["sketch_mode"].change(fn=lambda m: gr.update(visible=m == "extract"), inputs=[c["sketch_mode"]],
                            outputs=[c["line_extractor"]], show_progress=False)
    injection_sliders = [c[n] for n in ("injection_reference_fidelity", "injection_sketch_fidelity",
                                        "injection_start")]
    c["injection"].change(fn=lambda on: [gr.update(visible=bool(on))] * len(injection_sliders),
                          inputs=[c["injection"]], outputs=injection_sliders, show_progress=False)
    form = [target, anchor, control, scale, enhance, *thresholds]
    c.update(zip(FORM_SLOTS, form))
    add_button.click(fn=add_manipulation, inputs=[c[MANIPULATIONS_SLOT], *form],
                     outputs=[c[MANIPULATIONS_SLOT], target, anchor, control], show_progress=False)
    clear_button.click(fn=lambda: "", inputs=[], outputs=[c[MANIPULATIONS_SLOT]], show_progress=False)
    visualize_button.click(fn=visualize, inputs=[c["reference"], c[MANIPULATIONS_SLOT], control, *thresholds],
                           outputs=[heatmap])
    c[USE_INIT_IMAGE_SLOT].change(fn=lambda on: [gr.update(visible=not on), gr.update(visible=bool(on))],
                                  inputs=[c[USE_INIT_IMAGE_SLOT]], outputs=[c["sketch"], init_note],
                                  show_progress=False)
    tab = _tab_name(script, is_img2img)
    size_button.click(fn=model.native_size, inputs=[], outputs=[native], show_progress=False).then(
        fn=None, inputs=[native, c[USE_INIT_IMAGE_SLOT]], outputs=None,
        _js=f"function(native, useInit){{ colorizeDiffusionUseSketchSize('{tab}', "
            f"'{slot_elem_id(script, 'sketch')}', native, useInit, '{script.elem_id('xl_row')}'); return []; }}")

    adaptive = [parts[part] for part, _ in ADAPTIVE_PARTS] + [c[slot] for _, slot in reset_slots()]
    enabled.change(fn=lambda _on: visibility_for(selected_version()), inputs=[enabled], outputs=adaptive,
                   show_progress=False)
    script.cd_adaptive_parts = adaptive

    # ---------------------------------------------------------------------------------- infotext / paste
    script.infotext_fields = [(c[slot], _paste_target(slot)) for slot in UI_ORDER if slot not in _UNPASTED_SLOTS]
    script.infotext_fields += list(host_fields)
    script.paste_field_names = [target for _, target in script.infotext_fields]
    return [c[slot] for slot in UI_ORDER] + list(host_components)
