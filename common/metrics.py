"""Classification metrics from true and predicted class indices (numpy only), for training's
reports and serve.evaluate alike."""
from __future__ import annotations

import numpy as np


def confusion_matrix(labels, predictions, num_classes: int) -> np.ndarray:
    """Rows: true class, columns: predicted class; each cell counts images."""
    matrix = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(matrix, (np.asarray(labels), np.asarray(predictions)), 1)
    return matrix


def per_class_metrics(matrix: np.ndarray, class_names: list[str]) -> dict:
    """{class: precision, recall, F1, support (its true images)} for every class; a figure
    whose denominator is 0 (never predicted, or no true images) is 0.0."""
    out = {}
    for i, name in enumerate(class_names):
        tp = int(matrix[i, i])
        predicted, support = int(matrix[:, i].sum()), int(matrix[i].sum())
        precision = tp / predicted if predicted else 0.0
        recall = tp / support if support else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        out[name] = {"precision": precision, "recall": recall, "f1": f1, "support": support}
    return out


def macro_f1(per_class: dict) -> float:
    """The mean F1 over the classes present in the true labels (support > 0): a class the data
    lacks has no recall to measure, so it neither lowers nor raises the score."""
    return float(np.mean([c["f1"] for c in per_class.values() if c["support"]]))
