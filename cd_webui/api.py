"""HTTP route and the manipulation heat map (method §7.5) for the UI's "Visualize" button and API clients.

``POST /colorize/v1/visualize`` (registered in ``on_app_started``; also served with ``--nowebui``)::

    {"reference": "<base64 PNG/JPEG or data URL>",
     "sequence": "<manipulation prompt sequence, one group per line; may be empty>",
     "control": "<control prompt>",
     "thresholds": [0.5, 0.55, 0.65, 0.95]}          # optional
    -> 200 {"image": "<base64 PNG>"}
    -> 422 {"detail": "ColorizeDiffusion: <field>: <problem>"}   bad input (a user-fixable ColorizeError)

It takes the webui's queue lock, like generation, because it runs the OpenCLIP encoders.
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

from lib_colorize.errors import ColorizeError, InvalidInput
from lib_colorize.options import DEFAULT_THRESHOLDS, check_thresholds

from . import model

ROUTE = "/colorize/v1/visualize"


def visualize_heatmap(reference: Any, sequence_text: str, control: str,
                      thresholds: Sequence[float] = DEFAULT_THRESHOLDS):
    """Heat map of ``control`` over ``reference`` after the groups of ``sequence_text`` (PIL image).

    ``reference``: PIL image, numpy array, gradio dict or base64 string. Raises
    :class:`~lib_colorize.errors.ColorizeError` for bad input or missing weights.
    """
    from lib_colorize.images import decode_image
    from lib_colorize.manipulation import manipulation_heatmap, parse_manipulation_sequence

    if reference is None:
        raise InvalidInput("reference", "the heat map needs a reference image")
    image = decode_image(reference, "reference")
    groups = parse_manipulation_sequence(sequence_text or "")
    thresholds = check_thresholds("thresholds", list(thresholds))
    return manipulation_heatmap(image, groups, control or "", thresholds,
                                lambda tensor: model.encode_reference_full(tensor).float(),
                                lambda texts: model.encode_text(texts).float())


def heatmaps_for_options(options) -> list:
    """The gallery heat maps of a generation, one per group: what "Visualize" shows for that group, the regions
    its control prompt selects before it is applied (:func:`lib_colorize.manipulation.group_heatmaps`)."""
    from lib_colorize.manipulation import group_heatmaps

    groups = list(options.manipulations)
    if not groups or options.reference is None:
        raise InvalidInput("manipulations", "the heat map needs a reference and at least one manipulation group")
    return group_heatmaps(options.reference, groups, lambda tensor: model.encode_reference_full(tensor).float(),
                          lambda texts: model.encode_text(texts).float())


def _request_model():
    from pydantic import BaseModel, Field

    class VisualizeRequest(BaseModel):
        reference: str = Field(..., description="reference image, base64 PNG/JPEG or data URL")
        sequence: str = Field("", description="manipulation prompt sequence (one group per line)")
        control: str = Field("", description="control prompt: which regions to show")
        thresholds: Optional[list] = Field(None, description="4 thresholds strictly increasing inside (0, 1)")

    return VisualizeRequest


def visualize_endpoint(request: dict) -> dict:
    """The route's work, outside FastAPI (tests call it directly). Raises ColorizeError on bad input."""
    from lib_colorize.images import encode_png_base64
    from modules.call_queue import queue_lock

    thresholds = request.get("thresholds") or DEFAULT_THRESHOLDS
    with queue_lock:
        image = visualize_heatmap(request.get("reference"), request.get("sequence") or "",
                                  request.get("control") or "", thresholds)
    return {"image": encode_png_base64(image)}


def on_app_started(demo, app) -> None:
    """Register the routes on the webui's FastAPI app (``demo`` is None with ``--nowebui``)."""
    from fastapi import HTTPException

    VisualizeRequest = _request_model()

    def visualize(request: VisualizeRequest):
        try:
            return visualize_endpoint(request.dict())
        except ColorizeError as error:
            raise HTTPException(status_code=422, detail=str(error)) from None

    visualize.__annotations__["request"] = VisualizeRequest
    app.add_api_route(ROUTE, visualize, methods=["POST"], response_model=None,
                      summary="ColorizeDiffusion: manipulation heat map of a reference image")
