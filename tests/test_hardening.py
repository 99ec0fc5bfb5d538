"""Hostile input against a real server (and imaging.load_rgb, which training decodes with too):
formats outside the allowlist never reach a decoder, big images cost bounded memory, a
manifest cannot name files outside its folder, payloads cannot name URLs or server paths."""
from __future__ import annotations

import http.server
import io
import json
import os
import threading
from importlib.metadata import version
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

import imaging
from conftest import ROOT
from serve.launch import running_app
from test_app import copy_models, start

EPS = (b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 16 16\n%%EndComments\n"
       b"newpath 0 0 moveto 16 16 lineto stroke\nshowpage\n%%EOF\n")
PDF = b"%PDF-1.4\n1 0 obj<</Type/Catalog>>endobj\ntrailer<</Root 1 0 R>>\n%%EOF\n"
SVG = b'<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"><rect width="10" height="10"/></svg>'
MB = 1024 * 1024


def fake_ghostscript(folder: Path) -> Path:
    """A `gs` on PATH that only records that it was started."""
    folder.mkdir()
    gs = folder / "gs"
    gs.write_text(f'#!/bin/sh\necho "$@" >> "{folder}/ran.txt"\nexit 1\n')
    gs.chmod(0o755)
    return folder / "ran.txt"


def test_fake_ghostscript_would_be_started_by_a_plain_pillow_open(tmp_path, monkeypatch):
    # The premise of the tests below: without the allowlist, Pillow runs `gs` for an EPS file.
    from PIL import EpsImagePlugin

    ran = fake_ghostscript(tmp_path / "bin")
    monkeypatch.setenv("PATH", f"{ran.parent}:{os.environ['PATH']}")
    monkeypatch.setattr(EpsImagePlugin, "gs_binary", None, raising=False)
    with pytest.raises(Exception):
        Image.open(io.BytesIO(EPS)).load()
    assert ran.exists()


@pytest.mark.parametrize("data", [EPS, PDF, SVG], ids=["eps", "pdf", "svg"])
def test_formats_outside_the_allowlist_are_refused_before_decoding(data, tmp_path, monkeypatch):
    ran = fake_ghostscript(tmp_path / "bin")
    monkeypatch.setenv("PATH", f"{ran.parent}:{os.environ['PATH']}")
    with pytest.raises(imaging.ImageError, match="not an image file in an accepted format"):
        imaging.load_rgb(data)
    assert not ran.exists()


def test_an_eps_upload_never_starts_ghostscript_in_the_server(exported_models, tmp_path):
    ran = fake_ghostscript(tmp_path / "bin")
    eps = tmp_path / "drawing.eps"
    eps.write_bytes(EPS)
    with running_app(exported_models, env={"PATH": f"{ran.parent}:{os.environ['PATH']}"}) as url:
        response = httpx.post(f"{url}/api/v1/classify", files={"file": ("drawing.eps", EPS)}, timeout=60)
        assert response.status_code == 400 and "accepted format" in response.json()["error"]
        from test_app import classify

        with pytest.raises(Exception, match="accepted format"):
            classify(url, eps)  # the page's door
    assert not ran.exists()


def test_exif_orientation_still_matches_pillows_exif_transpose():
    from PIL import ImageOps

    pixels = np.random.default_rng(0).integers(0, 256, (6, 10, 4), dtype=np.uint8)
    for orientation in range(1, 9):
        exif = Image.Exif()
        exif[0x0112] = orientation
        buffer = io.BytesIO()
        Image.fromarray(pixels, "RGBA").save(buffer, "PNG", exif=exif.tobytes())
        expected = imaging.to_rgb(ImageOps.exif_transpose(Image.open(io.BytesIO(buffer.getvalue()))))
        np.testing.assert_array_equal(np.asarray(imaging.load_rgb(buffer.getvalue())), np.asarray(expected))


def test_deep_greyscale_is_rounded_like_before():
    values = np.arange(65536, dtype=np.uint16).reshape(256, 256)
    got = np.asarray(imaging.to_rgb(Image.fromarray(values)))[..., 0]
    np.testing.assert_array_equal(got, np.clip(np.rint(values / 257.0), 0, 255).astype(np.uint8))
    floats = np.linspace(-10, 300, 1000, dtype=np.float32).reshape(10, 100)
    got = np.asarray(imaging.to_rgb(Image.fromarray(floats, "F")))[..., 0]
    np.testing.assert_array_equal(got, np.clip(np.rint(floats.astype(np.float64)), 0, 255).astype(np.uint8))


# --- memory -------------------------------------------------------------------------------------

W, H = 5000, 4000  # 20 megapixels, a few tens of kB each as PNG


def big_files(folder: Path) -> list[Path]:
    folder.mkdir()
    Image.fromarray(np.full((H, W), 1000, np.uint16)).save(folder / "deep.png")
    Image.new("RGBA", (W, H), (10, 20, 30, 128)).save(folder / "rgba.png")
    palette = Image.new("P", (W, H), 1)
    palette.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    palette.save(folder / "palette.png", transparency=0)
    return sorted(folder.iterdir())


def status_kb(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc")
def test_a_20_megapixel_image_costs_the_server_at_most_300_mb(exported_models, tmp_path):
    files = big_files(tmp_path / "big")
    assert all(f.stat().st_size < 200_000 for f in files)
    small = json.loads((exported_models / "manifest.json").read_text())["examples"][0]
    with running_app(exported_models) as url, httpx.Client(base_url=url, timeout=300) as http:
        pid = url.process.pid
        assert http.post("/api/v1/classify", files={"file": ("a.jpg", (exported_models / small).read_bytes())}
                         ).status_code == 200
        for path in files:
            resting = status_kb(pid, "VmRSS")
            Path(f"/proc/{pid}/clear_refs").write_text("5")  # restart the peak (VmHWM) count
            response = http.post("/api/v1/classify", files={"file": (path.name, path.read_bytes())})
            assert response.status_code == 200, response.text
            grew = (status_kb(pid, "VmHWM") - resting) / 1024
            print(f"{path.name}: peak {grew:.0f} MB above the resting size")
            assert grew <= 300, f"{path.name} grew the server by {grew:.0f} MB"


def test_the_serving_pixel_limit_refuses_what_would_cost_more(exported_models, tmp_path):
    path = tmp_path / "huge.png"
    Image.new("L", (8000, 5000)).save(path)  # 40 M pixels: under training's limit, over serving's
    with running_app(exported_models) as url:
        response = httpx.post(f"{url}/api/v1/classify", files={"file": ("huge.png", path.read_bytes())},
                              timeout=60)
    assert response.status_code == 400
    assert f"above the limit of {imaging.SERVING_MAX_PIXELS:,}" in response.json()["error"]


# --- the manifest -------------------------------------------------------------------------------

def example_outside(tmp_path, models):
    secret = tmp_path / "secret.jpg"
    Image.new("RGB", (8, 8)).save(secret)
    manifest = json.loads((models / "manifest.json").read_text())
    return manifest, secret


def point_example_up(tmp_path, models):
    manifest, _ = example_outside(tmp_path, models)
    manifest["examples"] = ["../secret.jpg"] + manifest["examples"]
    return manifest, "../secret.jpg"


def point_example_absolute(tmp_path, models):
    manifest, secret = example_outside(tmp_path, models)
    manifest["examples"].append(str(secret))
    return manifest, str(secret)


def point_model_absolute(tmp_path, models):
    manifest = json.loads((models / "manifest.json").read_text())
    elsewhere = tmp_path / "elsewhere.onnx"
    (models / manifest["models"][1]["file"]).rename(elsewhere)
    manifest["models"][1]["file"] = str(elsewhere)
    return manifest, str(elsewhere)


def point_example_through_a_symlink(tmp_path, models):
    manifest, secret = example_outside(tmp_path, models)
    (models / "examples" / "link.jpg").symlink_to(secret)
    manifest["examples"].append("examples/link.jpg")
    return manifest, "examples/link.jpg"


def point_check_image_absolute(tmp_path, models):
    manifest, secret = example_outside(tmp_path, models)
    manifest["check_images"] = [str(secret)]  # refused even where no engine choice reads them
    return manifest, str(secret)


@pytest.mark.parametrize("breakage", [point_example_up, point_example_absolute, point_model_absolute,
                                      point_example_through_a_symlink, point_check_image_absolute])
def test_a_manifest_naming_files_outside_its_folder_stops_start_up(exported_models, tmp_path, breakage):
    models = copy_models(exported_models, tmp_path)
    manifest, named = breakage(tmp_path, models)
    (models / "manifest.json").write_text(json.dumps(manifest))
    code, lines = start(models)
    assert code == 2
    assert len(lines) == 1 and lines[0].startswith("error:") and "outside" in lines[0] and named in lines[0], lines


# --- payloads naming URLs or server paths ---------------------------------------------------------

class Recorder(http.server.BaseHTTPRequestHandler):
    hits: list[str] = []

    def do_GET(self):
        Recorder.hits.append(self.path)
        self.send_response(200)
        self.send_header("content-type", "image/png")
        buffer = io.BytesIO()
        Image.new("RGB", (8, 8)).save(buffer, "PNG")
        self.end_headers()
        self.wfile.write(buffer.getvalue())

    do_HEAD = do_GET

    def log_message(self, *args):
        pass


@pytest.fixture
def recorder():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Recorder)
    Recorder.hits = []
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def call_classify(url: str, path: str) -> httpx.Response:
    """/classify as a client could call it by hand, naming any "path" in the payload."""
    payload = {"data": [{"path": path, "meta": {"_type": "gradio.FileData"}}]}
    with httpx.Client(base_url=url, timeout=60) as client:
        started = client.post("/gradio_api/call/classify", json=payload)
        if started.status_code != 200:
            return started
        return client.get(f"/gradio_api/call/classify/{started.json()['event_id']}")


def test_payloads_naming_urls_or_server_paths_are_refused(app_url, exported_models, recorder, tmp_path):
    outside = tmp_path / "elsewhere.png"  # a real image, but not an upload
    Image.new("RGB", (8, 8)).save(outside)
    manifest = json.loads((exported_models / "manifest.json").read_text())
    for path in (f"{recorder}/cat.png", str(outside), str(exported_models / manifest["examples"][0]),
                 "/etc/hostname", str(ROOT / "pyproject.toml")):
        response = call_classify(app_url, path)
        assert response.status_code == 400, (path, response.status_code, response.text)
        assert "only uploaded files are accepted" in response.json()["error"]
        assert "Traceback" not in response.text
    from gradio_client import Client, handle_file

    with pytest.raises(Exception):
        Client(app_url, verbose=False).predict(handle_file(f"{recorder}/dog.png"), api_name="/classify")
    assert Recorder.hits == []  # nothing was fetched
    # An uploaded file through the same door still works.
    from test_app import classify

    assert len(classify(app_url, outside)) == 3


def test_gradio_floor_has_the_open_redirect_fix():
    text = (ROOT / "pyproject.toml").read_text()
    floor = text.split('"gradio>=')[1].split(",")[0].split('"')[0]
    as_tuple = lambda v: tuple(int(x) for x in v.split(".")[:3])  # noqa: E731
    assert as_tuple(floor) >= (6, 20, 0)  # gradio-app/gradio#13596 shipped in 6.20.0
    assert as_tuple(version("gradio")) >= as_tuple(floor)


def test_floors_exclude_the_known_advisories_and_the_lock_meets_them():
    import tomllib

    from packaging.requirements import Requirement
    from packaging.version import Version

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = [Requirement(r) for r in project["dependencies"] + project["optional-dependencies"]["serve"]]
    floors = {r.name: min((Version(s.version) for s in r.specifier if s.operator == ">="), default=None)
              for r in wanted}
    for name, safe in (("pillow", "11.3.0"), ("starlette", "1.3.1"), ("python-multipart", "0.0.31"),
                       ("gradio", "6.20.0")):
        assert floors[name] is not None and floors[name] >= Version(safe), (name, floors[name])
    lock = (ROOT / "requirements" / "serve.lock").read_text()
    pinned = {}
    for block in lock.split("\n"):
        if "==" in block and not block.startswith((" ", "#")):
            name, _, rest = block.partition("==")
            pinned[name.strip().lower()] = Version(rest.split()[0])
    assert "--hash=sha256:" in lock
    for r in wanted:  # scripts/lock-serve regenerates it after a change to these lists
        assert r.name.lower() in pinned, f"{r.name} is not in requirements/serve.lock"
        assert r.specifier.contains(pinned[r.name.lower()]), (r, pinned[r.name.lower()])


# --- memory per format ----------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc")
def test_the_decode_cost_estimate_bounds_the_measured_peak_of_every_kind(tmp_path):
    from benchmarks.decode_memory import KINDS, measure

    for kind in KINDS:  # per pixel, plus a few MB that any decode takes (buffers, allocator arenas)
        row = measure(kind, tmp_path, 8_000_000)
        assert row["peak_bytes"] <= row["predicted_bytes"] + 8 * 2**20, row


def test_what_would_take_too_much_memory_is_refused_from_the_header(tmp_path):
    from benchmarks.decode_memory import write

    # Under the pixel limit, but more memory than the bound in these layouts.
    cases = {"webp-lossy": 20_000_000, "png-grey-alpha": 32_000_000, "tiff-float": 32_000_000}
    for kind, pixels in cases.items():
        width = int((pixels * 4 / 3) ** 0.5)
        path = tmp_path / f"big.{kind.split('-')[0]}"
        write(kind, path, width, pixels // width)
        assert imaging.decode_cost(path) > imaging.SERVING_MAX_DECODE_BYTES
        with pytest.raises(imaging.ImageError, match="MB to decode, above the limit of 300 MB"):
            imaging.load_rgb(path, imaging.SERVING_MAX_PIXELS, imaging.SERVING_MAX_DECODE_BYTES)
    small = tmp_path / "fine.webp"
    write("webp-lossy", small, 400, 300)
    assert imaging.load_rgb(small, imaging.SERVING_MAX_PIXELS, imaging.SERVING_MAX_DECODE_BYTES).size == (400, 300)
