"""The Docker image, built and run with podman through the shared container tools.

The build context is made in a temporary folder (the repository's Dockerfile, .dockerignore,
pyproject.toml and packages, with the exported test models as models/), so the test never
depends on a models/ folder in the checkout. The first build downloads the serving
dependencies and takes minutes; later builds reuse that layer.
"""
from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import time
from pathlib import Path

import httpx
import pytest
from gradio_client import Client, handle_file

from conftest import ROOT
from serve.launch import free_port

pytestmark = pytest.mark.container

TOOLS = Path(os.environ.get("CONTAINER_TOOLS", ROOT.parent / "shared" / "tools"))
TAG = "resnet-trio:test"
CONTEXT_FILES = ("Dockerfile", ".dockerignore", "pyproject.toml", "README.md", "requirements/serve.lock",
                 "requirements/serve-openvino.lock")
CONTEXT_PACKAGES = ("common", "imaging", "serve")
HEALTH_TIMEOUT = 300


@pytest.fixture(scope="module")
def podman_env():
    if not (TOOLS / "container-build").is_file():
        pytest.skip(f"container tools not found in {TOOLS} (set CONTAINER_TOOLS)")
    setup = subprocess.run([str(TOOLS / "container-setup")], capture_output=True, text=True,
                           env={**os.environ, "CTR_QUIET": "1"}, timeout=1800)
    assert setup.returncode == 0, setup.stderr[-2000:]
    env = dict(os.environ)
    for line in setup.stdout.splitlines():  # "export NAME=value" lines
        name, _, value = line.removeprefix("export ").partition("=")
        env[name] = shlex.split(value)[0] if value else ""
    return env


def podman(env, *args, timeout=120) -> subprocess.CompletedProcess:
    return subprocess.run(["podman", *args], env=env, capture_output=True, text=True, timeout=timeout)


def image_id(env, tag: str) -> str:
    return podman(env, "image", "inspect", "--format", "{{.Id}}", tag).stdout.strip()


@pytest.fixture(scope="module")
def image(podman_env, exported_models, tmp_path_factory):
    context = tmp_path_factory.mktemp("container") / "context"
    context.mkdir()
    for name in CONTEXT_FILES:
        if (ROOT / name).exists():
            (context / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(ROOT / name, context / name)
    for package in CONTEXT_PACKAGES:
        shutil.copytree(ROOT / package, context / package,
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    shutil.copytree(exported_models, context / "models")
    previous = image_id(podman_env, TAG)
    build = subprocess.run([str(TOOLS / "container-build"), TAG, str(context)],
                           capture_output=True, text=True, timeout=3600)
    assert build.returncode == 0, (build.stdout + build.stderr)[-4000:]
    if previous and previous != image_id(podman_env, TAG):
        podman(podman_env, "rmi", previous)  # the last run's image, now untagged: free its disk
    return TAG


def wait_healthy(env, name: str) -> None:
    """Run the image's HEALTHCHECK on demand (no systemd timer here) until it passes."""
    deadline = time.monotonic() + HEALTH_TIMEOUT
    while time.monotonic() < deadline:
        if podman(env, "healthcheck", "run", name).returncode == 0:
            return
        state = podman(env, "inspect", "--format", "{{.State.Status}}", name).stdout.strip()
        if state not in ("running", "created"):
            logs = podman(env, "logs", name)
            pytest.fail(f"container {name} is {state}:\n{(logs.stdout + logs.stderr)[-3000:]}")
        time.sleep(2)
    logs = podman(env, "logs", name)
    pytest.fail(f"container {name} not healthy in {HEALTH_TIMEOUT} s:\n{(logs.stdout + logs.stderr)[-3000:]}")


def run_container(env, image: str, *podman_args: str):
    """Start the image with a free loopback port published; returns (name, url)."""
    port = free_port()
    name = f"resnet-trio-test-{port}"
    started = subprocess.run([str(TOOLS / "container-run"), name, "-p", f"127.0.0.1:{port}:7860",
                              *podman_args, image], env=env, capture_output=True, text=True, timeout=300)
    assert started.returncode == 0, started.stderr[-2000:]
    return name, f"http://127.0.0.1:{port}"


def stop(name: str) -> None:
    subprocess.run([str(TOOLS / "container-run"), "--stop", name], capture_output=True, timeout=120)


def test_image_serves_the_three_models(podman_env, image, exported_models, tmp_path):
    inspected = json.loads(podman(podman_env, "image", "inspect", image).stdout)[0]
    config = inspected["Config"]
    assert config.get("User") not in (None, "", "root", "0")
    assert "7860/tcp" in config.get("ExposedPorts", {})
    assert inspected.get("Healthcheck") or config.get("Healthcheck")  # podman keeps it at the top
    manifest = json.loads((exported_models / "manifest.json").read_text())
    name, url = run_container(podman_env, image)
    try:
        wait_healthy(podman_env, name)
        results = Client(url, verbose=False).predict(
            handle_file(str(exported_models / manifest["examples"][0])), api_name="/classify")
        assert [r["model"] for r in results] == [e["name"] for e in manifest["models"]]
        for r in results:
            assert sum(r["confidences"].values()) == pytest.approx(1.0, abs=1e-4)
        # The plain HTTP API: the same answers, its models list, its error JSON.
        example = (exported_models / manifest["examples"][0]).read_bytes()
        with httpx.Client(base_url=url, timeout=60) as http:
            assert http.get("/readyz").status_code == 200
            answer = http.post("/api/v1/classify", files={"file": ("photo.jpg", example)})
            assert answer.status_code == 200, answer.text
            assert [r["top_class"] for r in answer.json()["results"]] == [r["top_class"] for r in results]
            listed = http.get("/api/v1/models").json()["models"]
            assert [m["sha256"] for m in listed] == [e["sha256"] for e in manifest["models"]]
            refused = http.post("/api/v1/classify", files={"file": ("notes.txt", b"not an image")})
            assert refused.status_code == 400 and "not an image" in refused.json()["error"]
        # torch stays out of the image
        probe = podman(podman_env, "exec", name, "python", "-c",
                       "import importlib.util as u; print(u.find_spec('torch') is None)")
        assert probe.stdout.strip() == "True", probe.stderr
    finally:
        stop(name)
    size = int(podman(podman_env, "image", "inspect", "--format", "{{.Size}}", image).stdout.strip())
    print(f"\nimage {image}: {size / 1e6:.0f} MB")
    (tmp_path / "container.json").write_text(json.dumps({"image": image, "size_bytes": size}))


def test_a_mounted_models_folder_replaces_the_built_in_one(podman_env, image, exported_models, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(exported_models, other)
    manifest = json.loads((other / "manifest.json").read_text())
    manifest["models"] = manifest["models"][1:2]
    (other / "manifest.json").write_text(json.dumps(manifest))
    name, url = run_container(podman_env, image, "-v", f"{other}:/app/models:ro")
    try:
        wait_healthy(podman_env, name)
        results = Client(url, verbose=False).predict(
            handle_file(str(other / manifest["examples"][0])), api_name="/classify")
        assert [r["model"] for r in results] == [manifest["models"][0]["name"]]
        listed = httpx.get(f"{url}/api/v1/models", timeout=60).json()["models"]
        assert [m["name"] for m in listed] == [manifest["models"][0]["name"]]
    finally:
        stop(name)
