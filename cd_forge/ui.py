"""The Forge-only controls of the shared accordion (:func:`cd_webui.ui.build_ui`) and their script arg.

Forge's checkpoint list cannot run ColorizeDiffusion files (:mod:`cd_forge.model`), so the accordion has its own
"ColorizeDiffusion checkpoint" dropdown, and says what the webui's checkpoint is still for. The dropdown is the
script's last positional arg (after :data:`cd_webui.args.UI_ORDER`) and the named API key ``checkpoint``; its
infotext key is ``CD checkpoint``.
"""
from __future__ import annotations

from typing import Any, Mapping, Optional, Sequence

import gradio as gr

from cd_webui.args import UI_ORDER

from .model import AUTOMATIC, INFOTEXT_CHECKPOINT

CHECKPOINT_KEY = "checkpoint"
#: Position of the checkpoint in the positional API (right after the shared slots).
CHECKPOINT_SLOT = len(UI_ORDER)

NOTICE = ("While ColorizeDiffusion is enabled, the reference and sketch guidance scales replace the CFG scale, and "
          "the prompt and negative prompt have no effect. In Forge the ColorizeDiffusion checkpoint chosen below "
          "runs on the extension's own U-Net and VAE; the webui's checkpoint (an SD 1.x or 2.x model) stays loaded "
          "as the host: Forge samples with its noise schedule, and its U-Net, VAE and text encoder are not used.")
CHECKPOINT_INFO = ("ColorizeDiffusion files from models/Stable-diffusion and models/ColorizeDiffusion. Automatic: the "
                   "file chosen in Forge's checkpoint list (Forge keeps its host model loaded then), else the only "
                   "one found.")


def checkpoint_choices() -> list:
    from .model import colorize_checkpoints

    try:
        names = sorted(colorize_checkpoints())
    except Exception as error:  # noqa: BLE001 - a broken file must not break the UI
        print(f"ColorizeDiffusion: cannot list ColorizeDiffusion checkpoints: {error}")
        names = []
    return [AUTOMATIC] + names


def _paste_checkpoint(params: Mapping[str, Any]) -> Optional[str]:
    """The pasted ``CD checkpoint`` when that file is here (else the dropdown keeps its value)."""
    value = params.get(INFOTEXT_CHECKPOINT)
    return str(value) if value is not None and str(value) in checkpoint_choices() else None


def host_controls(script, is_img2img: bool):
    """The checkpoint dropdown and its refresh button; returns ``(components, infotext_fields)``."""
    from cd_webui.ui import slot_elem_id

    from modules.ui_components import ToolButton

    with gr.Row(elem_classes="cd-checkpoint"):
        dropdown = gr.Dropdown(checkpoint_choices(), value=AUTOMATIC, label="ColorizeDiffusion checkpoint",
                               elem_id=slot_elem_id(script, CHECKPOINT_KEY))
        dropdown.webui_tooltip = CHECKPOINT_INFO
        refresh = ToolButton(value="\U0001f504", elem_id=script.elem_id("refresh_checkpoints"))
    refresh.click(fn=lambda: gr.update(choices=checkpoint_choices()), inputs=[], outputs=[dropdown],
                  show_progress=False)
    return [dropdown], [(dropdown, _paste_checkpoint)]


def split_args(args: Sequence[Any]) -> tuple:
    """``(shared_args, checkpoint)`` from the script args: the named dict's ``checkpoint`` key (removed from a
    copy of the dict), else the positional slot after the shared ones; ``Automatic`` when neither is given."""
    args = tuple(args or ())
    positional = args[CHECKPOINT_SLOT] if len(args) > CHECKPOINT_SLOT else None
    # extra positions beyond the accordion's stay, so that the shared parser names the problem
    shared = args[:CHECKPOINT_SLOT] + args[CHECKPOINT_SLOT + 1:]
    if shared and isinstance(shared[0], Mapping) and CHECKPOINT_KEY in shared[0]:
        named = dict(shared[0])
        choice = named.pop(CHECKPOINT_KEY)
        return (named,) + shared[1:], choice or AUTOMATIC
    return shared, positional or AUTOMATIC
