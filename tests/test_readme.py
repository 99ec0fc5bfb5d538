"""The documentation's code for other apps must run as printed, and its links must resolve."""
import ast
import re
import shutil

from conftest import ROOT, run_python

README_MAX_LINES = 210
LINK = re.compile(r"\]\(([^)\s]+)")  # the target of a markdown link or image: ](target
FENCED_CODE = re.compile(r"^```.*?^```", re.S | re.M)


def doc_pages():
    """README.md and every page under docs/."""
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def readme_block(marker: str) -> str:
    """The code block marked ``<!-- readme-snippet: MARKER ... -->``, wherever it lives."""
    pattern = re.compile(rf"<!-- readme-snippet: {marker} [^>]*-->\s*```python\n(.*?)```", re.S)
    found = [(page, m.group(1)) for page in doc_pages() for m in pattern.finditer(page.read_text())]
    assert len(found) == 1, (f"expected one snippet marked {marker} in README.md and docs/*.md, found "
                             f"{len(found)}: {[str(page.relative_to(ROOT)) for page, _ in found]}")
    return found[0][1]


def an_example(exported_models):
    return next(p for p in sorted((exported_models / "examples").iterdir()) if p.suffix == ".jpg")


def test_onnx_snippet_runs_with_only_onnxruntime_numpy_pillow(exported_models, tmp_path):
    from serve.predictor import Predictor

    from PIL import Image

    (tmp_path / "models").mkdir()
    shutil.copy(exported_models / "resnet34.onnx", tmp_path / "models" / "resnet34.onnx")
    # A phone photo: stored 60 x 40, with EXIF orientation 6 (shown turned, 40 x 60), as the app
    # and training see it.
    with Image.open(an_example(exported_models)) as example:
        exif = Image.Exif()
        exif[0x0112] = 6
        example.convert("RGB").resize((60, 40)).save(tmp_path / "photo.jpg", exif=exif)
    (tmp_path / "snippet.py").write_text(readme_block("onnx-app"))
    # Only the three libraries: the project's own packages are not on the path here.
    result = run_python(["snippet.py"], cwd=tmp_path, env={"PYTHONPATH": ""})
    assert result.returncode == 0, result.stderr
    printed = ast.literal_eval(result.stdout.strip().splitlines()[-1])

    expected = Predictor(tmp_path / "models" / "resnet34.onnx").predict_file(tmp_path / "photo.jpg")
    assert list(printed) == list(expected.probabilities)
    for name, p in expected.probabilities.items():
        assert abs(printed[name] - round(p, 3)) <= 0.0011  # printed rounded to 3 decimals
    # The heatmap is drawn over the photo as shown: EXIF orientation applied first.
    with Image.open(tmp_path / "heatmap.png") as drawn:
        assert drawn.size == (40, 60)


def run_client_snippet(marker: str, app_url: str, photo, tmp_path) -> str:
    """Run the snippet marked ``marker`` as printed, against ``app_url``, on ``photo.jpg``; its stdout."""
    shutil.copy(photo, tmp_path / "photo.jpg")
    code = readme_block(marker).replace("http://127.0.0.1:7860", app_url.rstrip("/"))
    (tmp_path / "client.py").write_text(code)
    result = run_python(["client.py"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_api_snippet_gets_one_result_per_model(app_url, exported_models, tmp_path):
    printed = run_client_snippet("api-client", app_url, an_example(exported_models), tmp_path)
    lines = [line for line in printed.splitlines() if "{" in line]  # not the client's own notes
    assert [line.split()[0] for line in lines] == ["Plain-34", "ResNet-34", "ResNet-34-Modified"]
    for line in lines:
        confidences = ast.literal_eval(line[line.index("{"):line.rindex("}") + 1])
        assert abs(sum(confidences.values()) - 1) < 1e-4


def test_readme_is_short():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines; move details to docs/"


def test_relative_links_point_to_files_that_exist():
    broken = []
    for page in doc_pages():
        prose = FENCED_CODE.sub("", page.read_text())  # code blocks hold no links
        for target in LINK.findall(prose):
            if target.startswith(("http://", "https://", "mailto:", "#")):
                continue
            path = target.split("#", 1)[0]
            if not (page.parent / path).exists():
                broken.append(f"{page.relative_to(ROOT)}: {target}")
    assert not broken, "links to missing files: " + ", ".join(broken)


PACKAGES = ("imaging", "common", "training", "export", "serve")


def test_code_map_names_every_module_and_only_those():
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Code map"):]
    section = section[:section.index("\n## ", 1)]
    named, package = {}, None
    for line in section.splitlines():
        top = re.match(r"- `(\w+)/`", line)
        if top:
            package = top.group(1)
        elif package in PACKAGES:
            named.setdefault(package, set()).update(re.findall(r"`(\w+\.py)`", line))
    for package in PACKAGES:
        files = {p.name for p in (ROOT / package).glob("*.py")}
        listed = named.get(package, set())
        assert listed - files == set(), f"the code map names {package}/ modules that do not exist"
        assert files - {"__init__.py"} - listed == set(), f"the code map misses {package}/ modules"
