"""The server as an outsider meets it: nothing a client sends multiplies the server's work, the
guard reads HTTP as HTTP, nothing is fetched for anyone, uploads and the upload folder are
bounded, a hung request meets the deadline, readiness tells the truth, every response carries a
request id. Real server processes, as the other hardening tests."""
from __future__ import annotations

import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from PIL import Image

from conftest import ROOT
from serve.launch import running_app
from test_hardening import Recorder, recorder  # noqa: F401 - the fixture

pytestmark = pytest.mark.slow


def png(size=(16, 16), colour=(10, 200, 30)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, "PNG")
    return buffer.getvalue()


def files_in(folder: Path) -> set[Path]:
    return {p for p in folder.rglob("*") if p.is_file()} if folder.exists() else set()


@pytest.fixture(scope="module")
def door(exported_models, tmp_path_factory):
    """A server whose upload folder is known (GRADIO_TEMP_DIR) and capped at 1 MB."""
    folder = tmp_path_factory.mktemp("uploads")
    with running_app(exported_models, "--upload-folder-mb", "1", env={"GRADIO_TEMP_DIR": str(folder)}) as url:
        with httpx.Client(base_url=url, timeout=120) as http:
            yield url, http, folder


def upload(http, *files: bytes) -> httpx.Response:
    return http.post("/gradio_api/upload", files=[("files", (f"f{i}.png", data, "image/png"))
                                                 for i, data in enumerate(files)])


def alive(http) -> bool:
    return http.get("/healthz").status_code == 200 and http.get("/readyz").status_code == 200


def test_the_pages_events_take_no_results_from_the_client(door):
    url, http, folder = door
    config = http.get("/config").json()
    image = next(c["id"] for c in config["components"] if c.get("props", {}).get("elem_id") == "image")
    picker = next(c["id"] for c in config["components"] if c.get("props", {}).get("elem_id") == "heatmap-class")
    examples = {c["id"] for c in config["components"] if c.get("type") == "dataset"}  # an index
    for dependency in config["dependencies"]:  # every step reads only what a person chose
        assert set(dependency["inputs"]) <= {image, picker, *examples}, dependency
    # Fabricated results sent to every step by its fn_index, as any client could.
    [path] = upload(http, png()).json()
    payload = {"path": path, "meta": {"_type": "gradio.FileData"}}
    fake = [{"model": f"m{i}", "top_class": "x", "confidences": {"x": 1.0}, "milliseconds": 1.0,
             "heatmap": [[1.0] * 7] * 7} for i in range(200)]
    for index in range(len(config["dependencies"])):
        for data in ([fake, payload], [payload, fake], [fake]):
            answer = http.post("/gradio_api/run/predict", json={"fn_index": index, "data": data,
                                                                 "session_hash": "x"})
            if answer.status_code == 200:  # (Gradio answers a malformed input 4xx or 500)  # at most one picture per served model came back
                pictures = [v for v in answer.json().get("data", []) if isinstance(v, dict) and v.get("path")]
                assert len(pictures) <= 3
    assert alive(http)


@pytest.mark.parametrize("headers", [{"content-type": "application/JSON"},
                                     {"content-type": "Application/Json; charset=utf-8"}])
def test_a_capitalised_content_type_is_still_inspected(door, recorder, headers):  # noqa: F811
    _, http, _ = door
    body = json.dumps({"data": [{"path": f"{recorder}/cat.png", "meta": {"_type": "gradio.FileData"}}]})
    answer = http.post("/gradio_api/call/classify", content=body, headers=headers)
    assert answer.status_code == 400 and "not URLs" in answer.json()["error"]
    big = json.dumps({"data": ["x" * (2 << 20)]})  # the event body limit holds too
    assert http.post("/gradio_api/call/classify", content=big, headers=headers).status_code == 413
    assert Recorder.hits == []


def test_missing_duplicate_or_foreign_content_types_are_refused(door, recorder):  # noqa: F811
    url, http, _ = door
    body = json.dumps({"data": [{"path": f"{recorder}/cat.png", "meta": {"_type": "gradio.FileData"}}]}).encode()
    host = url.removeprefix("http://")
    for headers in ([], [("Content-Type", "application/json"), ("Content-Type", "text/plain")],
                    [("Content-Type", "text/plain")]):
        raw = b"".join(f"{k}: {v}\r\n".encode() for k, v in headers)
        answer = raw_request(host, b"POST /gradio_api/call/classify HTTP/1.1\r\nHost: x\r\n" + raw +
                             f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode() + body)
        assert answer.split(b" ")[1] in (b"400", b"415"), answer[:200]
    assert Recorder.hits == []


def raw_request(host: str, data: bytes, close_early: bool = False) -> bytes:
    name, port = host.split(":")
    with socket.create_connection((name, int(port)), timeout=30) as sock:
        sock.sendall(data)
        if close_early:
            return b""
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def test_file_routes_never_fetch_a_url_or_serve_other_files(door, recorder):  # noqa: F811
    _, http, folder = door
    for target in (f"{recorder}/dog.png", recorder.replace("http://", "http:/") + "/dog.png",
                   "/etc/hostname", str(ROOT / "pyproject.toml")):
        for route in ("/gradio_api/file=", "/gradio_api/file/"):
            answer = http.get(route + target)
            assert answer.status_code == 404, (route, target, answer.status_code)
    assert http.get(f"/gradio_api/proxy={recorder}/dog.png").status_code == 404
    assert Recorder.hits == []  # nothing was fetched
    [path] = upload(http, png()).json()  # a file this server wrote is still served
    assert http.get(f"/gradio_api/file={path}").status_code == 200


def test_uploads_take_one_whole_file_and_the_folder_stays_bounded(door):
    url, http, folder = door
    before = files_in(folder)
    answer = upload(http, png(), png())
    assert answer.status_code == 400 and "one file" in answer.json()["error"]
    # A request cut off mid-upload leaves nothing behind.
    boundary = "cut"
    head = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"files\"; filename=\"a.png\"\r\n"
            "Content-Type: image/png\r\n\r\n").encode()
    raw_request(url.removeprefix("http://"),
                b"POST /gradio_api/upload HTTP/1.1\r\nHost: x\r\n"
                + f"Content-Type: multipart/form-data; boundary={boundary}\r\n".encode()
                + b"Content-Length: 4000000\r\n\r\n" + head + b"\0" * 200_000, close_early=True)
    time.sleep(1)
    assert files_in(folder) == before
    # Many uploads: the folder stays under its 1 MB cap (plus the newest file).
    noise = lambda seed: Image.effect_noise((300, 300), 60 + seed).convert("RGB")  # noqa: E731
    for seed in range(8):
        buffer = io.BytesIO()
        noise(seed).save(buffer, "PNG")
        assert upload(http, buffer.getvalue()).status_code == 200
    time.sleep(1)  # the last eviction runs after its response
    total = sum(p.stat().st_size for p in files_in(folder) if p.exists())
    assert total <= (1 << 20) + 300_000, total
    assert alive(http)


def test_every_response_carries_a_request_id_and_one_access_line(door):
    url, http, _ = door
    assert http.get("/healthz", headers={"X-Request-ID": "trace-42"}).headers["x-request-id"] == "trace-42"
    minted = http.get("/healthz", headers={"X-Request-ID": 'bad id", "status": 200'}).headers["x-request-id"]
    assert '"' not in minted and len(minted) == 32
    secret = png(colour=(1, 2, 3))
    http.post("/api/v1/classify?token=hidden", files={"file": ("secret.png", secret)},
              headers={"X-Request-ID": "upload-7"})
    time.sleep(0.5)
    lines = [json.loads(line) for line in url.output().splitlines() if line.startswith("{")]
    [entry] = [e for e in lines if e["request_id"] == "upload-7"]
    assert entry["method"] == "POST" and entry["path"] == "/api/v1/classify" and entry["status"] == 200
    assert entry["bytes"] > 0 and entry["ms"] > 0
    assert "hidden" not in url.output() and "secret.png" not in url.output()


HANG = '''
import time
import numpy as np
import serve.predictor as predictor

original = predictor.Predictor.predict

def predict(self, image, *args, **kwargs):
    if np.asarray(image)[0, 0].tolist() == [255, 0, 255]:  # a magenta corner: hang
        time.sleep(float(__import__("os").environ["HANG_SECONDS"]))
    return original(self, image, *args, **kwargs)

predictor.Predictor.predict = predict
'''


def test_a_hung_request_meets_the_deadline_and_readiness_says_so(exported_models, tmp_path):
    (tmp_path / "sitecustomize.py").write_text(HANG)
    env = {"PYTHONPATH": f"{tmp_path}{os.pathsep}{ROOT}", "HANG_SECONDS": "8"}
    with running_app(exported_models, "--deadline", "2", env=env) as url, \
            httpx.Client(base_url=url, timeout=60) as http:
        started = time.monotonic()
        stuck = http.post("/api/v1/classify", files={"file": ("m.png", png(colour=(255, 0, 255)))})
        assert stuck.status_code == 503 and "longer than 2 s" in stuck.json()["error"]
        assert time.monotonic() - started < 7  # answered at the deadline, not when the run ended
        ready = http.get("/readyz")
        assert ready.status_code == 503 and "running for more than" in ready.json()["error"]
        assert http.get("/healthz").status_code == 200
        # The slot was freed: another image is classified while the hung run goes on.
        assert http.post("/api/v1/classify", files={"file": ("g.png", png())}).status_code == 200
        deadline = time.monotonic() + 30
        while http.get("/readyz").status_code != 200:  # ready again once the hung run returned
            assert time.monotonic() < deadline
            time.sleep(0.5)


def test_sigterm_turns_readiness_off_while_it_drains(exported_models):
    with running_app(exported_models, "--drain-seconds", "4") as url, \
            httpx.Client(base_url=url, timeout=30) as http:
        assert http.get("/readyz").status_code == 200
        url.process.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        ready = http.get("/readyz")
        assert ready.status_code == 503 and "shutting down" in ready.json()["error"]
        assert http.get("/healthz").status_code == 200  # still serving while it drains
        assert http.post("/api/v1/classify", files={"file": ("g.png", png())}).status_code == 200
        url.process.wait(timeout=30)
    assert url.process.returncode is not None


def test_the_http_api_imports_without_gradio(tmp_path):
    (tmp_path / "gradio").mkdir()
    (tmp_path / "gradio" / "__init__.py").write_text("raise ImportError('gradio is not installed')\n")
    code = ("import sys, serve.http_api, serve.service, serve.predict, serve.evaluate; "
            "assert 'gradio' not in sys.modules; print('ok')")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{ROOT}"}, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-2000:]


def test_connections_beyond_the_limit_get_503_and_slow_bodies_hold_no_slot(exported_models):
    # --concurrency 1 --queue-size 1: 2 x (1 + 1) + 32 = 36 connections at once.
    with running_app(exported_models, "--concurrency", "1", "--queue-size", "1") as url, \
            httpx.Client(base_url=url, timeout=60) as http:
        name, port = url.removeprefix("http://").split(":")
        held = []
        try:
            for _ in range(36):  # uploads that never finish their body
                sock = socket.create_connection((name, int(port)), timeout=30)
                sock.sendall(b"POST /api/v1/classify HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
                             b"Content-Length: 1000000\r\n\r\n" + b"\0" * 1000)
                held.append(sock)
                time.sleep(0.05)  # each is parsed before the next arrives
            time.sleep(1)
            assert httpx.get(f"{url}/healthz", timeout=30).status_code == 503
        finally:
            for sock in held:
                sock.close()
        time.sleep(1)
        # None of them held the one classification slot: an image is classified at once.
        assert http.post("/api/v1/classify", files={"file": ("g.png", png())}).status_code == 200


def test_the_upload_folder_keeps_few_enough_files_to_walk(tmp_path, monkeypatch):
    import serve.guard as guard

    monkeypatch.setattr(guard, "MAX_FOLDER_FILES", 10)
    (tmp_path / "example.png").write_bytes(b"e")  # there at start: kept
    folder = guard.UploadFolder(lambda: tmp_path, max_bytes=1 << 30)
    for i in range(30):  # tiny files, far under the byte cap
        path = tmp_path / f"u{i:02d}" / "f.png"
        path.parent.mkdir()
        path.write_bytes(b"x")
        os.utime(path, (1000 + i, 1000 + i))
    folder.trim()
    left = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*.png"))
    assert "example.png" in left and len(left) == 10
    assert [p for p in left if p != "example.png"] == [f"u{i:02d}/f.png" for i in range(21, 30)]  # the newest
