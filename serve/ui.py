"""The Gradio page and its API: one image in, every model's answer side by side.

``classify`` is the API (``/classify``): it takes the uploaded file's path, decodes it with
imaging.load_rgb (the same checks as training: allowed formats, pixel limit before decoding,
first frame, any mode to RGB) and returns one plain dict per model. The page shows that result
in a collapsed "API result" box and then draws the model columns from it in a second, unqueued
step. The HTTP API (serve/http_api.py) calls the same ``classify_source``.
"""
from __future__ import annotations

import logging
from pathlib import Path

import anyio
import gradio as gr
import numpy as np
from PIL import Image

import imaging
from imaging.heatmap import overlay
from serve.catalog import Catalog
from serve.gate import Gate

log = logging.getLogger("serve")
TITLE = "ResNet-34 variants side by side"
UPLOAD_CACHE_SECONDS = 3600  # uploaded files are deleted after an hour
NO_IMAGE = "Choose an image first (upload, paste or take a photo)."
TOP_CLASS = "each model's top class"
PREVIEW_PIXELS = 320  # overlays are drawn on a copy this size (longer side), small images enlarged


class ClassifyError(Exception):
    """A request that gets no result: ``status`` 400 for the client's file, 500 for ours."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


def upload_cache() -> Path:
    """Where Gradio keeps uploaded files (and its copies of the examples)."""
    return Path(gr.utils.get_upload_folder())


def foreign_file(path: str) -> str | None:
    """Why ``path`` (from a /classify payload) is not an uploaded file, or None if it is one."""
    if "://" in path or path.startswith("data:"):
        return "only uploaded files are accepted, not URLs"
    try:
        inside = Path(path).resolve().is_relative_to(upload_cache().resolve())
    except (OSError, ValueError):
        inside = False
    return None if inside else "only uploaded files are accepted, not paths on the server"


def uploaded_file(payload: dict | None) -> str | None:
    """The uploaded file's path in Gradio's cache, not decoded yet.

    The Classify event runs with preprocess=False: Gradio's own image conversion would open
    the file first and fail on non-images with an unreadable error, so one decoder,
    imaging.load_rgb, checks every file and words every refusal. A payload naming anything but
    a file in the upload cache is refused (serve/guard.py stops URLs before Gradio sees them).
    """
    path = payload.get("path") if payload else None
    if path is not None:
        problem = foreign_file(str(path))
        if problem:
            raise gr.Error(f"Cannot classify this file: {problem}.", print_exception=False)
    return path


def classify_source(catalog: Catalog, source, max_pixels: int) -> list[dict]:
    """Every model's answer for one image file (path, bytes or file object), in the catalog's
    order; ClassifyError with the readable reason when there is none."""
    if source is None:
        raise ClassifyError(NO_IMAGE)
    try:
        image = imaging.load_rgb(source, max_pixels)
    except (imaging.ImageError, OSError) as exc:
        raise ClassifyError(f"Cannot classify this file: {exc}.") from None
    results = []
    for model in catalog.predictors:
        try:
            prediction = model.predict(image)
        except Exception:  # noqa: BLE001 - log it here, tell the user one line
            log.exception("%s failed", model.name)
            raise ClassifyError(f"{model.display_name} failed on this image; see the server log.",
                                status=500) from None
        result = {
            "model": model.name,
            "display_name": model.display_name,
            "precision": model.precision,
            "top_class": prediction.top_class,
            "confidences": prediction.probabilities,
            "milliseconds": round(prediction.milliseconds, 3),
        }
        if prediction.heatmaps is not None:  # the top class's Grad-CAM map, h x w in [0, 1]
            result["heatmap"] = np.round(prediction.heatmap(), 4).tolist()
        results.append(result)
    return results


def classify_image(catalog: Catalog, source, max_pixels: int) -> list[dict]:
    """``classify_source`` for the page: refusals become gr.Error, shown as they are worded."""
    try:
        return classify_source(catalog, source, max_pixels)
    except ClassifyError as exc:
        raise gr.Error(str(exc), print_exception=False) from None


def preview(source, max_pixels: int) -> Image.Image:
    return fit_preview(imaging.load_rgb(source, max_pixels))


def fit_preview(image: Image.Image) -> Image.Image:
    """A copy whose longer side is PREVIEW_PIXELS, to draw a heatmap on."""
    scale = PREVIEW_PIXELS / max(image.size)
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    return image.resize(size, Image.Resampling.BILINEAR)


def overlays_of(results: list[dict], source, max_pixels: int) -> list[Image.Image | None]:
    """Each model's top-class heatmap (from its /classify result) over the image."""
    image = preview(source, max_pixels)
    return [overlay(image, np.asarray(r["heatmap"])) if "heatmap" in r else None for r in results]


def overlays_for_class(catalog: Catalog, source, max_pixels: int, class_name: str) -> list[Image.Image | None]:
    """Each model's heatmap of ``class_name`` (or of its own top class) over the image."""
    image = imaging.load_rgb(source, max_pixels)
    small = fit_preview(image)
    out = []
    for model in catalog.predictors:
        prediction = model.predict(image)
        chosen = None if class_name == TOP_CLASS else class_name
        out.append(overlay(small, prediction.heatmap(chosen)) if prediction.heatmaps is not None else None)
    return out


def verdict(results: list[dict], precision: str) -> str:
    """One line: do the models agree, and which precision is served."""
    tops = [r["top_class"] for r in results]
    if len(results) == 1:
        text = f"One model loaded: **{tops[0]}**."
    elif len(set(tops)) == 1:
        text = f"All {len(results)} models agree: **{tops[0]}**."
    else:
        text = "The models disagree: " + ", ".join(f"{r['display_name']} says **{r['top_class']}**"
                                                  for r in results) + "."
    return f"{text} ({precision.upper()} models)"


def build_demo(catalog: Catalog, max_pixels: int = imaging.SERVING_MAX_PIXELS,
               gate: Gate | None = None) -> gr.Blocks:
    models = catalog.predictors
    classes = catalog.class_names
    gate = gate or Gate(limit=1, max_waiting=64)

    async def classify(image_payload):
        source = uploaded_file(image_payload)
        async with gate.slot():  # shared with the HTTP API
            return await anyio.to_thread.run_sync(classify_image, catalog, source, max_pixels)

    def show(results, image_payload):
        values = [verdict(results, catalog.precision)]
        for r, picture in zip(results, overlays_of(results, uploaded_file(image_payload), max_pixels)):
            values += [r["top_class"], r["confidences"], f"{r['milliseconds']:.1f} ms", picture]
        return values + [TOP_CLASS]  # a new result shows every model's own top class

    async def explain(image_payload, class_name):
        """The heatmaps of the class picked for all models (their models run again)."""
        source = uploaded_file(image_payload)
        if source is None:
            return [None] * len(models)
        async with gate.slot():
            try:
                return await anyio.to_thread.run_sync(overlays_for_class, catalog, source, max_pixels, class_name)
            except (imaging.ImageError, OSError) as exc:
                raise gr.Error(f"Cannot classify this file: {exc}.", print_exception=False) from None

    def clear():
        return [""] + ["", None, "", None] * len(models)

    with gr.Blocks(title=TITLE, analytics_enabled=False,
                   delete_cache=(UPLOAD_CACHE_SECONDS, UPLOAD_CACHE_SECONDS)) as demo:
        gr.Markdown(f"# {TITLE}\n{len(models)} model(s), {catalog.precision.upper()}, "
                    f"{len(classes)} classes: {', '.join(classes)}. "
                    "Upload, paste or photograph an image and press Classify.")
        with gr.Row():
            with gr.Column(scale=1, min_width=260):
                image = gr.Image(type="filepath", image_mode=None, label="Image", height=280,
                                 sources=["upload", "clipboard", "webcam"], elem_id="image")
                button = gr.Button("Classify", variant="primary", elem_id="classify")
                if catalog.examples:
                    gr.Examples([[str(p)] for p in catalog.examples], inputs=[image],
                                example_labels=[p.stem for p in catalog.examples],
                                label="Examples (click one)")
            with gr.Column(scale=max(2, len(models))):
                agreement = gr.Markdown(elem_id="verdict")
                heat_class = gr.Dropdown([TOP_CLASS, *classes], value=TOP_CLASS, label="Heatmaps show",
                                         info="where each model looks (Grad-CAM on its last stage)",
                                         elem_id="heatmap-class", visible=any(m.has_heatmaps for m in models))
                outputs, pictures = [agreement], []
                with gr.Row(equal_height=True):
                    for model in models:
                        with gr.Column(min_width=200, elem_id=f"model-{model.name}"):
                            gr.Markdown(f"### {model.display_name}")
                            outputs += [
                                gr.Textbox(label="Top class", interactive=False,
                                           elem_id=f"top-{model.name}"),
                                gr.Label(num_top_classes=len(classes), label="Probabilities",
                                         show_heading=False, elem_id=f"probs-{model.name}"),
                                gr.Textbox(label="Time", interactive=False,
                                           elem_id=f"ms-{model.name}"),
                            ]
                            pictures.append(gr.Image(label="Where it looks", interactive=False, height=220,
                                                     buttons=[], elem_id=f"heat-{model.name}",
                                                     visible=model.has_heatmaps))
                            outputs.append(pictures[-1])
        with gr.Accordion("API result", open=False):
            api_result = gr.JSON(label="/classify", elem_id="api-result")

        button.click(classify, inputs=image, outputs=api_result, api_name="classify",
                     preprocess=False).success(
            show, inputs=[api_result, image], outputs=outputs + [heat_class], queue=False,
            show_progress="hidden", api_visibility="private", preprocess=False)
        # .input: only the person's choice re-runs the models, not show() resetting the picker.
        heat_class.input(explain, inputs=[image, heat_class], outputs=pictures, preprocess=False,
                         show_progress="hidden", api_visibility="private")
        image.change(clear, outputs=outputs, queue=False, show_progress="hidden",
                     api_visibility="private")
    return demo
