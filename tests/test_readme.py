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


def test_onnx_snippet_runs_with_only_onnxruntime_numpy_pillow(exported_models, tmp_path):
    from serve.predictor import Predictor

    (tmp_path / "models").mkdir()
    shutil.copy(exported_models / "resnet34.onnx", tmp_path / "models" / "resnet34.onnx")
    example = next(p for p in sorted((exported_models / "examples").iterdir()) if p.suffix == ".jpg")
    shutil.copy(example, tmp_path / "photo.jpg")
    (tmp_path / "snippet.py").write_text(readme_block("onnx-app"))
    # Only the three libraries: the project's own packages are not on the path here.
    result = run_python(["snippet.py"], cwd=tmp_path, env={"PYTHONPATH": ""})
    assert result.returncode == 0, result.stderr
    printed = ast.literal_eval(result.stdout.strip().splitlines()[-1])

    expected = Predictor(tmp_path / "models" / "resnet34.onnx").predict_file(tmp_path / "photo.jpg")
    assert list(printed) == list(expected.probabilities)
    for name, p in expected.probabilities.items():
        assert abs(printed[name] - round(p, 3)) <= 0.0011
    assert max(printed, key=printed.get) == expected.top_class or \
        sorted(printed.values())[-1] == sorted(printed.values())[-2]
