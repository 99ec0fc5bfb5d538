"""Calibration: the maths against hand-computed values, the temperature and threshold fitted after
training, the out-of-distribution set kept apart, and the exported files applying both."""
from __future__ import annotations

import csv
import json
import shutil

import numpy as np
import onnxruntime as ort
import pytest

from common import calibration as cal
from conftest import TINY_SIZE

MODELS = ("plain34", "resnet34", "resnet34_modified")


# --- the maths ------------------------------------------------------------------------------------

# Bins of width 1/15; 0.4 = 6/15 is a right edge, so it belongs to bin 6 of 15 (index 5);
# 0.5 and 0.52 share bin 8 (index 7, (7/15, 8/15]), where one is right and one wrong.
CONFIDENCE = [0.1, 0.4, 0.5, 0.52, 0.95, 0.97, 1.0]
CORRECT = [0, 1, 1, 0, 1, 1, 1]


def test_reliability_bins_by_hand():
    bins = cal.reliability_bins(CONFIDENCE, CORRECT)
    assert len(bins) == 15 and bins[0]["low"] == 0 and bins[-1]["high"] == 1
    filled = {i: b for i, b in enumerate(bins) if b["count"]}
    assert sorted(filled) == [1, 5, 7, 14]
    assert (filled[5]["count"], filled[5]["accuracy"], filled[5]["confidence"]) == (1, 1.0, 0.4)
    assert filled[7]["count"] == 2 and filled[7]["accuracy"] == 0.5
    assert filled[7]["confidence"] == pytest.approx(0.51)
    assert filled[14]["count"] == 3 and filled[14]["confidence"] == pytest.approx((0.95 + 0.97 + 1) / 3)
    assert bins[6]["count"] == 0 and bins[6]["accuracy"] is None


def test_ece_by_hand():
    # Bin gaps weighted by their share of the 7 images: 1 x 0.1 (bin 2), 1 x 0.6 (bin 6),
    # 2 x |0.5 - 0.51| (bin 8), 3 x |1 - 0.97333| (bin 15): 0.8 / 7.
    assert cal.ece(CONFIDENCE, CORRECT) == pytest.approx(0.8 / 7, abs=1e-12)
    assert cal.ece([0.9] * 10, [1] * 9 + [0]) == pytest.approx(0.0, abs=1e-12)  # calibrated
    assert cal.ece([0.99] * 4, [0, 1, 0, 1]) == pytest.approx(0.49)


def test_ece_a_calibrated_model_would_show():
    # Four images at confidence 0.5, each right with probability 0.5: k right of 4 ~ B(4, 1/2),
    # ECE = |k / 4 - 0.5|, whose mean is (2 x 0.5 + 8 x 0.25) / 16 = 3 / 16.
    floor = cal.ece_if_calibrated([0.5] * 4, resamples=20000)
    assert floor["mean"] == pytest.approx(3 / 16, abs=0.005) and floor["p95"] == 0.5
    assert cal.ece_if_calibrated([1.0] * 10)["mean"] == 0.0  # always right: no spread at all


def test_nll_and_brier_by_hand():
    p = np.array([[0.7, 0.2, 0.1], [0.5, 0.25, 0.25]])
    labels = [0, 2]
    assert cal.nll(p, labels) == pytest.approx(-(np.log(0.7) + np.log(0.25)) / 2)
    # (0.3^2 + 0.2^2 + 0.1^2 + 0.5^2 + 0.25^2 + 0.75^2) / 2
    assert cal.brier(p, labels) == pytest.approx((0.09 + 0.04 + 0.01 + 0.25 + 0.0625 + 0.5625) / 2)


@pytest.mark.parametrize("temperature", [0.4, 2.5])
def test_temperature_fit_recovers_a_known_temperature(temperature):
    """Labels drawn from softmax(z / T): minimising the NLL must find T again."""
    rng = np.random.default_rng(1)
    z = rng.normal(0, 3, (6000, 5))
    p = cal.softmax(z, temperature)
    labels = (rng.random((len(z), 1)) > np.cumsum(p, 1)).sum(1)
    fitted = cal.fit_temperature(z, labels)
    assert fitted == pytest.approx(temperature, rel=0.06)
    assert cal.nll(cal.softmax(z, fitted), labels) < cal.nll(cal.softmax(z), labels)


def test_threshold_reaches_its_target_with_the_most_kept():
    rng = np.random.default_rng(2)
    confidence = rng.uniform(0.2, 1, 400)
    correct = rng.random(400) < confidence  # calibrated: right as often as confident
    for target in (0.8, 0.9, 0.95):
        chosen = cal.abstention_threshold(confidence, correct, target)
        kept = confidence >= chosen.threshold
        assert chosen.reached and correct[kept].mean() >= target
        assert chosen.coverage == kept.mean() and chosen.accuracy == correct[kept].mean()
        # Any lower threshold (the next less confident image kept too) misses the target.
        lower = confidence[confidence < chosen.threshold]
        for t in np.sort(lower)[::-1][:20]:
            assert correct[confidence >= t].mean() < target


def test_threshold_edge_cases():
    everything = cal.abstention_threshold([0.3, 0.6, 0.9], [1, 1, 1], 0.95)
    assert (everything.threshold, everything.coverage) == (0.0, 1.0)
    nothing = cal.abstention_threshold([0.3, 0.6, 0.9], [1, 1, 0], 0.95)
    assert (nothing.threshold, nothing.reached, nothing.coverage) == (1.0, False, 0.0)
    # A tie is kept or dropped whole: 0.8 holds one right and one wrong image. The threshold
    # lies halfway to the next image dropped (0.5).
    tie = cal.abstention_threshold([0.9, 0.8, 0.8, 0.5], [1, 1, 0, 0], 0.6)
    assert (tie.threshold, tie.coverage, tie.accuracy) == (0.65, 0.75, 2 / 3)
    with pytest.raises(ValueError):
        cal.abstention_threshold([0.5], [1], 1.5)


def test_risk_coverage_by_hand():
    coverage, accuracy = cal.risk_coverage([0.9, 0.3, 0.7, 0.7], [1, 1, 0, 1])
    assert coverage.tolist() == [0.25, 0.75, 1.0]  # the two 0.7s enter together
    assert accuracy.tolist() == pytest.approx([1.0, 2 / 3, 0.75])


def test_auroc_by_hand():
    # Pairs (in, ood): (0.9, 0.85) yes, (0.9, 0.1) yes, (0.8, 0.85) no, (0.8, 0.1) yes; a tie counts half.
    assert cal.auroc([0.9, 0.8], [0.85, 0.1]) == 0.75
    assert cal.auroc([0.5], [0.5]) == 0.5
    assert cal.auroc([0.1, 0.2], [0.8, 0.9]) == 0.0


def test_bootstrap_interval_brackets_the_value_and_shrinks_with_more_images():
    rng = np.random.default_rng(3)
    small, large = (rng.normal(1, 1, n) for n in (50, 2000))
    a, b = cal.bootstrap(np.mean, small), cal.bootstrap(np.mean, large)
    assert a.low < a.value < a.high and b.low < b.value < b.high
    assert (b.high - b.low) < (a.high - a.low) / 3
    assert cal.bootstrap(np.mean, small) == a  # seeded: the same interval every time


# --- after training --------------------------------------------------------------------------------

def _logits(run, name, split):
    from training.reports import read_logits

    classes = json.loads((run / "splits.json").read_text())["class_names"]
    return read_logits(run / name / "logits.csv", classes)[split]


@pytest.mark.parametrize("name", MODELS)
def test_checkpoint_holds_the_temperature_fitted_on_validation(trained_run, name):
    from training import checkpoint

    record = checkpoint.load(trained_run / name / "best.pt")["calibration"]
    val = _logits(trained_run, name, "val")
    assert record["temperature"] == pytest.approx(cal.fit_temperature(val["logits"], val["labels"]), rel=1e-6)
    assert record["images"] == len(val["labels"]) == len(record["val_confidence"])
    after = cal.softmax(val["logits"], record["temperature"])
    assert record["val_ece_after"] == pytest.approx(cal.ece(cal.top_confidence(after), cal.correctness(after, val["labels"])), abs=1e-6)
    assert record["val_nll_after"] <= record["val_nll_before"] + 1e-9  # T = 1 was a candidate
    report = json.loads((trained_run / name / "report.json").read_text())["calibration"]
    assert report["temperature"] == record["temperature"] and "val_confidence" not in report


@pytest.mark.parametrize("name", MODELS)
def test_logits_are_the_ones_behind_the_predictions(trained_run, name):
    """logits.csv holds the evaluated model's logits, row for row with predictions.csv."""
    with open(trained_run / name / "predictions.csv", newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["split"] == "val"]
    val = _logits(trained_run, name, "val")
    assert val["paths"] == [r["path"] for r in rows]
    classes = json.loads((trained_run / "splits.json").read_text())["class_names"]
    probs = np.array([[float(r[f"prob_{c}"]) for c in classes] for r in rows])
    assert cal.softmax(val["logits"]) == pytest.approx(probs, abs=2e-6)


def test_ood_images_are_never_trained_or_fitted_on(trained_run, ood_images, tiny_dataset):
    splits = json.loads((trained_run / "splits.json").read_text())
    listed = {p for key in ("train", "val", "test") for p, _ in splits.get(key, [])}
    ood_files = {str(p) for p in ood_images.iterdir()}
    assert ood_files and not listed & ood_files
    assert all(not p.startswith(str(ood_images)) for p in listed)
    assert splits["class_names"] == sorted(p.name for p in tiny_dataset.iterdir() if p.is_dir())
    for name in MODELS:
        with open(trained_run / name / "ood.csv", newline="") as f:
            rows = list(csv.DictReader(f))
        assert {r["path"] for r in rows} == ood_files and {r["label"] for r in rows} == {""}


def test_the_builtin_ood_set_lies_outside_the_builtin_dataset():
    from training import synthetic

    assert synthetic.DEFAULT_DIR not in synthetic.DEFAULT_OOD_DIR.parents
    assert synthetic.DEFAULT_OOD_DIR != synthetic.DEFAULT_DIR


def test_an_ood_folder_overlapping_the_data_is_refused(tiny_dataset, tmp_path):
    from training.calibrate import load_ood
    from training.config import ConfigError, make_config
    from training.trainer import preprocessing_for

    inside = make_config({"data": str(tiny_dataset), "ood_data": str(tiny_dataset / "dots"), "image_size": TINY_SIZE})
    with pytest.raises(ConfigError, match="overlaps the data folder"):
        load_ood(inside, [], preprocessing_for(inside))
    linked = tmp_path / "elsewhere"
    linked.mkdir()
    source = next(p for p in (tiny_dataset / "rings").iterdir() if p.suffix == ".jpg")
    (linked / source.name).symlink_to(source)  # the same file under another name
    shared = make_config({"data": str(tiny_dataset), "ood_data": str(linked), "image_size": TINY_SIZE})
    with pytest.raises(ConfigError, match="holds 1 file"):
        load_ood(shared, [str(source)], preprocessing_for(shared))


def test_comparison_reports_calibration_per_model(trained_run):
    summary = json.loads((trained_run / "comparison.json").read_text())["sections"]["calibration"]
    assert set(summary["models"]) == set(MODELS)
    for name, m in summary["models"].items():
        val = m["splits"]["val"]
        assert val["before"]["ece"]["low"] <= val["before"]["ece"]["value"] <= val["before"]["ece"]["high"]
        assert m["ood"]["images"] == 10 and 0 <= m["ood"]["unsure_share"] <= 1
    text = (trained_run / "comparison.md").read_text()
    assert "## Calibration" in text and "AUROC" in text
    assert (trained_run / "calibration.png").stat().st_size > 10_000


def _summary(ece_after: float, auroc: tuple[float, float, float], split_name: str = "test") -> dict:
    ece = lambda v: {"value": v, "low": v, "high": v, "n": 80}  # noqa: E731
    split = {"images": 80, "accuracy": 0.8, "mean_confidence_before": 0.6,
             "before": {"ece": ece(0.2), "nll": ece(0.6)}, "after": {"ece": ece(ece_after), "nll": ece(0.5)},
             "ece_if_calibrated": {"mean": 0.09, "p95": 0.12}, "kept_at_threshold": {"coverage": 0.75}}
    return {"display_name": "M", "temperature": 0.5, "splits": {split_name: split},
            "ood": {"unsure_share": 0.3, "in_distribution_split": split_name,
                    "auroc": dict(zip(("value", "low", "high"), auroc))}}


@pytest.mark.parametrize("ece_after, auroc, says", [
    (0.11, (0.5, 0.4, 0.6), ["as calibrated as these images can show",
                             "no better than chance at telling them from the test images"]),
    (0.13, (0.8, 0.7, 0.9), ["still above what a calibrated model shows", "better than chance"]),
    (0.11, (0.3, 0.2, 0.4), ["more confident on them than on the test images"]),
])
def test_calibration_sentence_says_what_its_numbers_support(ece_after, auroc, says):
    from training.calibration_report import sentence

    text = sentence(_summary(ece_after, auroc), "test")
    assert all(phrase in text for phrase in says), text
    assert "0.200 to " + f"{ece_after:.3f}" in text and "on 25% of the test images" in text


def test_calibration_sentence_names_the_split_it_compares_with():
    """A run without a test split compares the out-of-distribution images with validation."""
    from training.calibration_report import sentence

    text = sentence(_summary(0.11, (0.5, 0.4, 0.6), "val"), "val")
    assert "test" not in text and "telling them from the validation images" in text


# --- the exported files ---------------------------------------------------------------------------

def _outputs(path, x):
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    meta = session.get_modelmeta().custom_metadata_map
    logits, probs = session.run(["logits", "probabilities"], {"image": x})
    return meta, logits, probs


@pytest.mark.parametrize("name", MODELS)
def test_exported_probabilities_are_softmax_of_logits_over_the_temperature(trained_run, exported_models, name):
    from training import checkpoint

    temperature = checkpoint.load(trained_run / name / "best.pt")["calibration"]["temperature"]
    x = np.random.default_rng(0).standard_normal((5, 3, TINY_SIZE, TINY_SIZE)).astype(np.float32) * 3
    meta, logits, probs = _outputs(exported_models / f"{name}.onnx", x)
    assert float(meta["temperature"]) == pytest.approx(temperature, rel=1e-6)
    assert abs(temperature - 1) > 1e-3  # else this test could not tell calibrated from plain
    assert probs == pytest.approx(cal.softmax(logits, float(meta["temperature"])), abs=1e-5)
    parity = json.loads((exported_models / f"{name}.parity.json").read_text())
    assert parity["temperature"] == float(meta["temperature"]) and parity["passed"]
    assert parity["max_abs_calibrated_probability_diff"] <= 1e-5


def test_parity_fails_for_a_file_without_the_temperature(trained_run, exported_models, tmp_path):
    """A plain-softmax file checked against its calibrated checkpoint fails parity."""
    from export.onnx_export import export_model
    from export.parity import check_parity
    from serve.predictor import create_session
    from training import checkpoint

    ckpt = checkpoint.load(trained_run / "resnet34" / "best.pt")
    plain = {k: v for k, v in ckpt.items() if k != "calibration"}
    tmp = export_model(plain, "0" * 64, tmp_path / "plain.onnx")
    model = checkpoint.rebuild_model(ckpt)
    report = check_parity(model, create_session(tmp), np.empty((0, 3, TINY_SIZE, TINY_SIZE), np.float32),
                          random_inputs=4, batch_sizes=(2,), temperature=ckpt["calibration"]["temperature"])
    assert not report.passed and report.max_abs_probability_diff > 1e-3


@pytest.mark.parametrize("name", MODELS)
def test_metadata_threshold_is_the_one_chosen_on_validation(trained_run, exported_models, name):
    from training import checkpoint

    record = checkpoint.load(trained_run / name / "best.pt")["calibration"]
    meta = _outputs(exported_models / f"{name}.onnx", np.zeros((1, 3, TINY_SIZE, TINY_SIZE), np.float32))[0]
    expected = cal.abstention_threshold(record["val_confidence"], record["val_correct"], 0.95)
    assert float(meta["abstain_threshold"]) == expected.threshold
    assert float(meta["abstain_target_accuracy"]) == 0.95
    assert float(meta["val_ece_before"]) == pytest.approx(record["val_ece_before"], abs=1e-6)
    assert float(meta["val_ece_after"]) == pytest.approx(record["val_ece_after"], abs=1e-6)


def test_abstain_accuracy_flag_sets_the_threshold(easy_run, tmp_path):
    """On decisive models a lower target keeps more: the flag reaches the metadata."""
    from export.run import main
    from serve.predictor import Predictor
    from training import checkpoint

    thresholds = {}
    for target in ("0.99", "0.6"):
        out = tmp_path / target
        assert main(["--run", str(easy_run), "--out", str(out), "--models", "resnet34",
                     "--abstain-accuracy", target]) == 0
        predictor = Predictor(out / "resnet34.onnx")
        thresholds[target] = predictor.abstain_threshold
        assert float(predictor.metadata["abstain_target_accuracy"]) == float(target)
    record = checkpoint.load(easy_run / "resnet34" / "best.pt")["calibration"]
    for target, threshold in thresholds.items():
        chosen = cal.abstention_threshold(record["val_confidence"], record["val_correct"], float(target))
        assert threshold == chosen.threshold
        kept = np.asarray(record["val_confidence"]) >= threshold
        assert not chosen.reached or np.asarray(record["val_correct"])[kept].mean() >= float(target)
    assert thresholds["0.6"] <= thresholds["0.99"]


def test_bad_abstain_accuracy_is_refused(capsys):
    from export.run import parse_args

    with pytest.raises(SystemExit):
        parse_args(["--abstain-accuracy", "1.5"])
    assert "at most 1" in capsys.readouterr().err


# --- serving --------------------------------------------------------------------------------------

def test_prediction_says_unsure_below_the_threshold(exported_models, tmp_path):
    from PIL import Image

    from serve.predictor import Predictor
    from test_app import edit_metadata

    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 40, 3), dtype=np.uint8))
    source = exported_models / "resnet34.onnx"
    top = max(Predictor(source).predict(image).probabilities.values())
    for threshold, unsure in ((top + 1e-4, True), (top - 1e-4, False)):
        path = tmp_path / f"{threshold}.onnx"
        shutil.copy(source, path)
        edit_metadata(path, lambda props: props.update(abstain_threshold=repr(threshold)))
        predictor = Predictor(path)
        assert predictor.abstain_threshold == threshold
        assert predictor.predict(image).unsure is unsure
    older = tmp_path / "older.onnx"
    shutil.copy(source, older)
    edit_metadata(older, lambda props: props.pop("abstain_threshold"))
    assert Predictor(older).abstain_threshold is None and Predictor(older).predict(image).unsure is None


def test_batch_predictions_carry_unsure(exported_models, tiny_dataset, tmp_path):
    from serve.predict import main
    from serve.predictor import Predictor

    images = sorted(p for p in (tiny_dataset / "checks").iterdir() if p.stat().st_size > 1000)[:3]
    out = tmp_path / "out.jsonl"
    assert main([*map(str, images), "--models", str(exported_models), "--out", str(out), "--workers", "0"]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    for row in rows:
        for name in MODELS:
            expected = Predictor(exported_models / f"{name}.onnx").predict_file(row["path"]).unsure
            assert isinstance(expected, bool) and row["models"][name]["unsure"] is expected
    csv_out = tmp_path / "out.csv"
    assert main([*map(str, images), "--models", str(exported_models), "--out", str(csv_out), "--workers", "0"]) == 0
    with open(csv_out, newline="") as f:
        got = list(csv.DictReader(f))
    assert [r["resnet34.unsure"] for r in got] == [str(r["models"]["resnet34"]["unsure"]).lower() for r in rows]
