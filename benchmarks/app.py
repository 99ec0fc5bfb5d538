"""``python -m benchmarks.app``: what the app adds to the models' own time, per request.

In one process, in alternating blocks, the same image:
- ``models``: the app's models run directly, one after another, as the app runs them;
- ``client``: one ``/classify`` request through gradio_client with its defaults;
- ``client_local``: the same with ``ssl_verify=False``. gradio_client verifies TLS even for
  http:// URLs, and every call builds three fresh HTTP clients (upload, queue, event stream),
  each parsing the CA bundle: 30-120 ms per call here, nothing a loopback caller needs;
- ``http``: the same request as plain HTTP on one kept-open connection (upload, then
  ``/gradio_api/call/classify`` and its event stream): the app's own share, without the
  client library's (which also polls for the answer every 50 ms);
- ``api``: one ``POST /api/v1/classify`` (the plain HTTP API, multipart) on one kept-alive
  connection (target: <= 1.10x).
Each ratio is a request's median over the models' median (target for ``client``: <= 1.25x).

The Open Inference Protocol carries an already-preprocessed tensor, one model a request, so its
baseline is ``tensor_models``: every model's ``Predictor.run`` of all its outputs on that tensor,
directly. Against it (ratio: the protocol's median over that one):
- ``oip``: one ``POST /v2/models/{name}/infer`` per model through ``tritonclient.http`` with its
  defaults (binary tensors in and out), one kept-alive connection;
- ``oip_json``: the same with JSON tensors in and out.

The app is started here on a free loopback port, with Gradio's request profiling on to split
the server's share into phases, unless ``--url`` names one already serving the same ``--models``.
Prints a table and writes benchmarks/results/app.json (see ``--out``).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import httpx  # noqa: E402
from gradio_client import Client, handle_file  # noqa: E402

import imaging  # noqa: E402
from benchmarks.common import (RESULTS_DIR, command_line, interleaved, machine,  # noqa: E402
                               markdown_table, median_ms, write_json)
from serve.catalog import PRECISIONS, load_catalog  # noqa: E402
from serve.launch import running_app  # noqa: E402

CONTENDERS = ("models", "client", "client_local", "http", "api", "tensor_models", "oip", "oip_json")
BASELINE = {"oip": "tensor_models", "oip_json": "tensor_models"}  # the rest: "models"
OUTPUTS = ("logits", "probabilities", "heatmaps")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.app", description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="models", help="models folder (default: models)")
    parser.add_argument("--precision", choices=PRECISIONS, default="fp32")
    parser.add_argument("--url", help="an app already serving --models on this machine "
                                      "(default: start one on a free port)")
    parser.add_argument("--image", help="image to classify (default: the first example in the manifest)")
    parser.add_argument("--rounds", type=int, default=8, help="alternating rounds (default: 8)")
    parser.add_argument("--per-block", type=int, default=3, help="calls per block (default: 3)")
    parser.add_argument("--out", default=str(RESULTS_DIR / "app.json"), help="JSON results file")
    return parser.parse_args(argv)


class PlainHttp:
    """/classify as plain HTTP on one kept-open connection, as curl or a browser would call it."""

    def __init__(self, url: str):
        self.url = url
        self.http = httpx.Client(verify=False, timeout=120)

    def upload(self, path: Path) -> str:
        with open(path, "rb") as f:
            response = self.http.post(f"{self.url}/gradio_api/upload", files={"files": (path.name, f)})
        response.raise_for_status()
        return response.json()[0]

    def classify(self, path: Path) -> None:
        payload = {"data": [{"path": self.upload(path), "meta": {"_type": "gradio.FileData"}}]}
        started = self.http.post(f"{self.url}/gradio_api/call/classify", json=payload)
        started.raise_for_status()
        event_url = f"{self.url}/gradio_api/call/classify/{started.json()['event_id']}"
        with self.http.stream("GET", event_url) as events:
            for line in events.iter_lines():
                if line.startswith("event: error"):
                    raise RuntimeError("the app answered with an error")
                if line.startswith("event: complete"):
                    return

    def api(self, path: Path, data: bytes) -> None:
        response = self.http.post(f"{self.url}/api/v1/classify", files={"file": (path.name, data)})
        response.raise_for_status()

    def profile(self, clear: bool = False) -> dict | None:
        """Gradio's own per-phase medians (queue wait, preprocess, fn call, postprocess, upload)."""
        if clear:
            self.http.post(f"{self.url}/gradio_api/profiling/clear")  # 404 when profiling is off
            return None
        response = self.http.get(f"{self.url}/gradio_api/profiling/summary")
        if response.status_code != 200:
            return None
        summary = response.json()
        phases = {name: p["p50"] for name, p in summary.get("phases", {}).items() if p.get("p50")}
        if summary.get("upload", {}).get("p50"):
            phases["upload"] = summary["upload"]["p50"]
        return phases


class Protocol:
    """Every model through the Open Inference Protocol, as a tritonclient.http program calls it."""

    def __init__(self, url: str, catalog, tensor):
        import tritonclient.http as httpclient
        from common.tensor_names import model_name

        self.httpclient = httpclient
        self.client = httpclient.InferenceServerClient(url.removeprefix("http://"), network_timeout=120)
        self.names = [model_name(p.path) for p in catalog.predictors]
        self.tensor = tensor

    def infer(self, binary: bool) -> None:
        image = self.httpclient.InferInput("image", list(self.tensor.shape), "FP32")
        image.set_data_from_numpy(self.tensor, binary_data=binary)
        outputs = None if binary else [self.httpclient.InferRequestedOutput(o, binary_data=False)
                                       for o in OUTPUTS]
        for name in self.names:
            self.client.infer(name, [image], outputs=outputs)


def measure(url: str, catalog, image_path: Path, rounds: int, per_block: int) -> dict:
    image = imaging.load_rgb(image_path)
    tensor = catalog.predictors[0].preprocess(image)
    protocol = Protocol(url, catalog, tensor)
    clients = {"client": Client(url, verbose=False),
               "client_local": Client(url, verbose=False, ssl_verify=False)}
    plain = PlainHttp(url)
    models_inside_app: list[float] = []

    def through(name):
        def request():
            results = clients[name].predict(handle_file(str(image_path)), api_name="/classify")
            models_inside_app.append(sum(r["milliseconds"] for r in results))
        return request

    def models_alone():
        for predictor in catalog.predictors:
            predictor.predict(image)

    def models_on_the_tensor():
        for predictor in catalog.predictors:
            predictor.run(list(OUTPUTS), tensor)

    data = image_path.read_bytes()
    plain.profile(clear=True)
    times = interleaved({"models": models_alone, "client": through("client"),
                         "client_local": through("client_local"), "http": lambda: plain.classify(image_path),
                         "api": lambda: plain.api(image_path, data), "tensor_models": models_on_the_tensor,
                         "oip": lambda: protocol.infer(binary=True), "oip_json": lambda: protocol.infer(binary=False)},
                        rounds=rounds, per_block=per_block)
    ms = {name: median_ms(times[name]) for name in CONTENDERS}
    return {
        "median_ms": ms,
        "ratio": {name: ms[name] / ms[BASELINE.get(name, "models")] for name in CONTENDERS
                  if name not in ("models", "tensor_models")},
        "models_inside_app_ms": statistics.median(models_inside_app),
        "server_phases_p50_ms": plain.profile(),
        "samples": {name: len(samples) for name, samples in times.items()},
    }


def main(argv=None) -> int:
    args = parse_args(argv)
    catalog = load_catalog(args.models, args.precision)
    image_path = Path(args.image) if args.image else (catalog.examples[0] if catalog.examples else None)
    if image_path is None:
        print("error: no --image given and no examples in the manifest", file=sys.stderr)
        return 1
    started = time.perf_counter()
    if args.url:
        result = measure(args.url, catalog, image_path, args.rounds, args.per_block)
    else:
        os.environ["GRADIO_PROFILING"] = "1"  # inherited by the app started here
        with running_app(args.models, "--precision", args.precision) as url:
            result = measure(url, catalog, image_path, args.rounds, args.per_block)
    size = catalog.predictors[0].input_size
    print(f"{len(catalog.predictors)} {args.precision} models at {size[0]}x{size[1]}, "
          f"image {image_path.name}")
    ms, ratio = result["median_ms"], result["ratio"]
    print(markdown_table(
        ["models alone (ms)", "gradio_client (ms)", "ratio", "gradio_client, ssl_verify=False (ms)",
         "ratio", "plain HTTP, Gradio's protocol (ms)", "ratio", "HTTP API /api/v1/classify (ms)", "ratio"],
        [[ms["models"], ms["client"], f"{ratio['client']:.2f}x", ms["client_local"],
          f"{ratio['client_local']:.2f}x", ms["http"], f"{ratio['http']:.2f}x",
          ms["api"], f"{ratio['api']:.2f}x"]]))
    print(markdown_table(
        ["models alone on the tensor (ms)", "Open Inference Protocol, binary (ms)", "ratio",
         "Open Inference Protocol, JSON (ms)", "ratio", "HTTP API's ratio, for comparison"],
        [[ms["tensor_models"], ms["oip"], f"{ratio['oip']:.2f}x", ms["oip_json"],
          f"{ratio['oip_json']:.2f}x", f"{ratio['api']:.2f}x"]]))
    phases = result["server_phases_p50_ms"] or {}
    print(f"inside the app: models {result['models_inside_app_ms']:.1f} ms; server phases (p50, ms): "
          + (", ".join(f"{k} {v:.1f}" for k, v in phases.items()) or "not profiled"))
    out = write_json(Path(args.out), {
        "command": command_line(argv, "benchmarks.app"), "machine": machine(),
        "models": [p.name for p in catalog.predictors], "precision": args.precision,
        "input_size": list(size), "image": str(image_path), **result,
        "wall_s": time.perf_counter() - started,
    })
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
