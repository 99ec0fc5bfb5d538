"""``serve.evaluate``'s intervals and pairwise tests: the same module and words as the training
comparison (no trained models needed: the predictors' answers are given)."""
from __future__ import annotations

import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
from statsmodels.stats.contingency_tables import mcnemar
from statsmodels.stats.proportion import proportion_confint

from common import statistics
from conftest import ROOT
from serve import evaluate


def predictor(name, precision="fp32"):
    return SimpleNamespace(name=name, precision=precision, display_name=name.upper())


def test_pairwise_tests_are_mcnemar_with_holm_and_the_comparison_sentence():
    models = [predictor("plain34"), predictor("resnet34"), predictor("resnet34", "int8")]
    truth_right = {"plain34.fp32": np.array([True] * 40 + [False] * 60),
                   "resnet34.fp32": np.array([True] * 75 + [False] * 25),
                   "resnet34.int8": np.array([True] * 74 + [False] * 26)}
    pairs = evaluate.pairwise(models, truth_right)
    assert [(p["a"], p["b"]) for p in pairs] == [("resnet34.fp32", "plain34.fp32"), ("resnet34.int8", "plain34.fp32"),
                                                 ("resnet34.fp32", "resnet34.int8")]  # the one ahead first
    first = pairs[0]
    assert (first["a_ahead"], first["b_ahead"]) == (35, 0)
    assert first["p_value"] == pytest.approx(mcnemar([[40, 0], [35, 25]], exact=True).pvalue)
    assert [p["p_holm"] for p in pairs] == pytest.approx(statistics.holm([p["p_value"] for p in pairs]))
    assert first["sentence"].startswith("RESNET34 (fp32) beats PLAIN34 (fp32) by 35.0 points (95% CI ")
    assert "not training randomness" in first["sentence"] and "Holm-adjusted over 3 pairs" in first["sentence"]
    assert "cannot tell them apart" in pairs[2]["sentence"]  # 1 image of 100 between the twins
    report = {"data": "d", "split": None, "images": 100, "unusable": [], "agreement": [], "int8_vs_fp32": [], "engines": [],
              "pairwise": pairs, "models": [
                  {"display_name": m.display_name, "engine": "onnxruntime", "precision": m.precision,
                   "accuracy": float(r.mean()),
                   "accuracy_ci": [statistics.wilson(int(r.sum()), 100).low, statistics.wilson(int(r.sum()), 100).high],
                   "macro_f1": 0.5, "confusion_png": "c.png", "per_class": {}}
                  for m, r in zip(models, truth_right.values())]}
    text = evaluate.markdown(report)
    assert all(p["sentence"] in text for p in pairs) and "## What the data supports" in text
    low, high = proportion_confint(75, 100, method="wilson")
    assert f"0.7500 ({low:.4f}–{high:.4f})" in text


def test_the_statistics_import_without_torch_or_training():
    code = ("import sys, serve.evaluate, common.statistics; "
            "bad = [m for m in sys.modules if m.split('.')[0] in ('torch', 'training', 'export')]; "
            "assert not bad, bad")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
