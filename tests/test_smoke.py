import json


def test_tiny_pipeline_end_to_end(trained_run, exported_models):
    manifest = json.loads((exported_models / "manifest.json").read_text())
    assert [m["name"] for m in manifest["models"]] == ["plain34", "resnet34", "resnet34_modified"]
    for entry in manifest["models"]:
        assert (exported_models / entry["file"]).is_file()
        assert entry["parity"]["passed"]
