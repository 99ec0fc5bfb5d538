"""The Gradio page and its API: one image in, every model's answer side by side.

Every step of the page is one call of the classification service (serve/service.py), which
decodes the upload once, runs the models and draws the heatmaps inside one gated, deadline-
bounded call: the page never sends results back for the server to act on. ``/classify`` is the
same call for API clients (gradio_client): it returns one plain dict per model. Uploads are
taken as the path Gradio saved them to and decoded by imaging.load_rgb only (preprocess=False:
Gradio's own image conversion would open the file first and fail on non-images with an
unreadable error); a payload naming anything but a file in the upload folder is refused
(serve/guard.py stops it before Gradio sees it, this is the second check).
"""
from __future__ import annotations

import logging
from pathlib import Path

import gradio as gr

from serve.catalog import Catalog
from serve.gate import Gate
from serve.guard import foreign
from serve.service import Classification, ClassifyError, Service

log = logging.getLogger("serve")
TITLE = "ResNet-34 variants side by side"
UPLOAD_CACHE_SECONDS = 3600  # uploaded files are deleted after an hour (and sooner: serve/guard.py)
TOP_CLASS = "each model's top class"


def upload_folder() -> Path:
    """Where Gradio keeps uploaded files, its copies of the examples and the page's pictures."""
    return Path(gr.utils.get_upload_folder())


def uploaded_file(payload: dict | None) -> str | None:
    """The uploaded file's path in Gradio's upload folder, not decoded yet."""
    path = payload.get("path") if isinstance(payload, dict) else None
    if path is not None:
        problem = foreign(str(path), upload_folder())
        if problem:
            raise gr.Error(f"Cannot classify this file: {problem}.", print_exception=False)
    return path


def verdict(classification: Classification, precision: str) -> str:
    """One line: do the models agree, how many are unsure, and which precision is served."""
    results = classification.results
    sure = [r for r in results if not r.unsure]
    unsure = len(results) - len(sure)
    tops = [r.top_class for r in sure]
    if not sure:
        text = (f"{'The model is' if len(results) == 1 else f'All {len(results)} models are'} unsure "
                "(best guess: " + ", ".join(f"{r.display_name} {r.top_class}" for r in results) + ").")
    elif len(results) == 1:
        text = f"One model loaded: **{tops[0]}**."
    elif unsure == 0 and len(set(tops)) == 1:
        text = f"All {len(results)} models agree: **{tops[0]}**."
    elif len(set(tops)) == 1:
        text = f"{len(sure)} of {len(results)} models say **{tops[0]}**, {unsure} {'is' if unsure == 1 else 'are'} unsure."
    else:
        text = ("The models disagree: " + ", ".join(f"{r.display_name} says **{r.top_class}**" for r in sure)
                + (f"; {unsure} {'is' if unsure == 1 else 'are'} unsure." if unsure else "."))
    return f"{text} ({precision.upper()} models)"


def engine_line(model) -> str:
    """Which engine runs the model, at which precision, and why (``--engine auto``'s measurement)."""
    choice = model.choice or {}
    if choice.get("mode") == "auto" and choice.get("speedup"):
        return (f"{model.engine} {model.precision}: {choice['speedup']:.1f}x {choice['reference']}, "
                f"measured at start-up")
    return f"{model.engine} {model.precision}"


def served_precisions(catalog: Catalog) -> str:
    return "/".join(dict.fromkeys(p.precision.upper() for p in catalog.predictors))


def top_line(result) -> str:
    """The top class, marked when the model is unsure of it (its probabilities stay visible)."""
    return f"unsure (best guess: {result.top_class})" if result.unsure else result.top_class


def build_demo(catalog: Catalog, service: Service | None = None) -> gr.Blocks:
    models = catalog.predictors
    classes = catalog.class_names
    service = service or Service(catalog, Gate(limit=1, max_waiting=64))

    async def classified(image_payload, heatmap_class: str | None = None, overlays: bool = False):
        """The service's answer; its refusals become gr.Error, shown as they are worded. The
        page's requests wait in Gradio's queue, so they are never turned away by the gate."""
        try:
            return await service.classify(uploaded_file(image_payload), heatmap_class, overlays,
                                          turn_away_when_full=False)
        except ClassifyError as exc:
            raise gr.Error(str(exc), print_exception=False) from None

    async def classify_api(image_payload) -> list[dict]:
        """/classify: one result per model, as plain dicts."""
        return [r.model_dump(exclude_none=True) for r in (await classified(image_payload)).results]

    async def classify_page(image_payload):
        classification = await classified(image_payload, overlays=True)
        values = [[r.model_dump(exclude_none=True) for r in classification.results],
                  verdict(classification, served_precisions(catalog))]
        for r, picture in zip(classification.results, classification.overlays):
            values += [top_line(r), r.confidences, f"{r.milliseconds:.1f} ms", picture]
        return values + [TOP_CLASS]  # a new result shows every model's own top class

    async def explain(image_payload, class_name):
        """The heatmaps of the class picked, for all models (their models run again)."""
        if uploaded_file(image_payload) is None:
            return [None] * len(models)
        chosen = None if class_name == TOP_CLASS else class_name
        return (await classified(image_payload, chosen, overlays=True)).overlays

    def clear():
        return [""] + ["", None, "", None] * len(models)

    with gr.Blocks(title=TITLE, analytics_enabled=False,
                   delete_cache=(UPLOAD_CACHE_SECONDS, UPLOAD_CACHE_SECONDS)) as demo:
        gr.Markdown(f"# {TITLE}\n{len(models)} model(s), {served_precisions(catalog)}, "
                    f"{len(classes)} classes: {', '.join(classes)}. "
                    "Upload, paste or photograph an image and press Classify.")
        with gr.Row():
            with gr.Column(scale=1, min_width=260):
                image = gr.Image(type="filepath", image_mode=None, label="Image", height=280,
                                 sources=["upload", "clipboard", "webcam"], elem_id="image")
                button = gr.Button("Classify", variant="primary", elem_id="classify")
                api_button = gr.Button(visible=False)  # /classify's own trigger: API clients only
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
                            gr.Markdown(f"### {model.display_name}\n<small>{engine_line(model)}</small>",
                                        elem_id=f"engine-{model.name}")
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

        api_button.click(classify_api, inputs=image, outputs=api_result, api_name="classify",
                         preprocess=False)
        button.click(classify_page, inputs=image, outputs=[api_result, *outputs, heat_class],
                     api_visibility="private", preprocess=False)
        # .input: only the person's choice re-runs the models, not a new result resetting the picker.
        heat_class.input(explain, inputs=[image, heat_class], outputs=pictures, preprocess=False,
                         show_progress="hidden", api_visibility="private")
        image.change(clear, outputs=outputs, queue=False, show_progress="hidden",
                     api_visibility="private")
    return demo
