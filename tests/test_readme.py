"""The README's code for other apps must run as printed."""
import ast
import re
import shutil

from conftest import ROOT, run_python


def readme_block(marker: str) -> str:
    text = (ROOT / "README.md").read_text()
    match = re.search(rf"<!-- readme-snippet: {marker} [^>]*-->\s*```python\n(.*?)```", text, re.S)
    assert match, f"README has no snippet marked {marker}"
    return match.group(1)


def an_example(exported_models):
    return next(p for p in sorted((exported_models / "examples").iterdir()) if p.suffix == ".jpg")


def test_onnx_snippet_runs_with_only_onnxruntime_numpy_pillow(exported_models, tmp_path):
    from serve.predictor import Predictor

    (tmp_path / "models").mkdir()
    shutil.copy(exported_models / "resnet34.onnx", tmp_path / "models" / "resnet34.onnx")
    shutil.copy(an_example(exported_models), tmp_path / "photo.jpg")
    (tmp_path / "snippet.py").write_text(readme_block("onnx-app"))
    # Only the three libraries: the project's own packages are not on the path here.
    result = run_python(["snippet.py"], cwd=tmp_path, env={"PYTHONPATH": ""})
    assert result.returncode == 0, result.stderr
    printed = ast.literal_eval(result.stdout.strip().splitlines()[-1])

    expected = Predictor(tmp_path / "models" / "resnet34.onnx").predict_file(tmp_path / "photo.jpg")
    assert list(printed) == list(expected.probabilities)
    for name, p in expected.probabilities.items():
        assert abs(printed[name] - round(p, 3)) <= 0.0011  # printed rounded to 3 decimals


def test_api_snippet_gets_one_result_per_model(app_url, exported_models, tmp_path):
    shutil.copy(an_example(exported_models), tmp_path / "photo.jpg")
    code = readme_block("api-client").replace("http://127.0.0.1:7860/", app_url)
    (tmp_path / "client.py").write_text(code)
    result = run_python(["client.py"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    lines = [line for line in result.stdout.splitlines() if "{" in line]  # not the client's own notes
    assert [line.split()[0] for line in lines] == ["Plain-34", "ResNet-34", "ResNet-34-Modified"]
    for line in lines:
        confidences = ast.literal_eval(line[line.index("{"):line.rindex("}") + 1])
        assert abs(sum(confidences.values()) - 1) < 1e-4
