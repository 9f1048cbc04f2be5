"""experiments/bench_seeds.py: arm means and ensembles of several seeds' embeddings."""
import argparse

import numpy as np
import pytest

from scripts_loader import load_experiment

bench = load_experiment("bench_seeds")


def _embedded(q: np.ndarray, g: np.ndarray) -> dict:
    return {"toy": (q / np.linalg.norm(q, axis=1, keepdims=True), ["a", "b"],
                    g / np.linalg.norm(g, axis=1, keepdims=True), ["a", "a", "b", "b"])}


def test_an_ensemble_ranks_by_the_mean_cosine_of_its_models():
    g = np.array([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]])
    right = _embedded(np.array([[1.0, 0.05], [0.05, 1.0]]), g)  # each query nearest its class
    wrong = _embedded(np.array([[0.0, 1.0], [1.0, 0.0]]), g)  # each query nearest the other class
    assert bench.scores([right])["toy"]["mAP@all"] == 1.0
    assert bench.scores([wrong])["toy"]["mAP@all"] < 0.5
    assert bench.scores([right, right]) == bench.scores([right])  # a model with itself is itself
    # two models: the ranking of the mean of their cosines
    from sbir_core.eval.metrics import retrieval_report

    (qr, ql, gr, gl), (qw, _, gw, _) = right["toy"], wrong["toy"]
    mean = retrieval_report((qr @ gr.T + qw @ gw.T) / 2, ql, gl)
    assert bench.scores([right, wrong])["toy"] == {k: round(mean[k], 4) for k in ("hit@5", "mAP@all")}


def test_arms_are_named_lists_of_checkpoints():
    assert bench.parse_arm("kd=a.safetensors,b.safetensors") == ("kd", ["a.safetensors", "b.safetensors"])
    for bad in ("a.safetensors", "=a", "kd="):
        with pytest.raises(argparse.ArgumentTypeError):
            bench.parse_arm(bad)


def test_rows_give_each_seed_the_arm_mean_and_the_ensembles(monkeypatch):
    g = np.array([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]])
    fake = {"good": _embedded(np.array([[1.0, 0.05], [0.05, 1.0]]), g),
            "bad": _embedded(np.array([[0.0, 1.0], [1.0, 0.0]]), g)}
    monkeypatch.setattr(bench, "create_encoder", lambda checkpoint: checkpoint)
    monkeypatch.setattr(bench, "embedded_benchmarks", lambda enc, data: fake[enc])
    rows = bench.run(None, {"x": ["good", "bad"], "y": ["good"]}, ensemble=True)
    assert list(rows) == ["x: good", "x: bad", "x: mean of 2", "x: ensemble of 2", "y: good", "all: ensemble of 2"]
    mean = rows["x: mean of 2"]["toy"]["mAP@all"]
    assert mean == pytest.approx((rows["x: good"]["toy"]["mAP@all"] + rows["x: bad"]["toy"]["mAP@all"]) / 2, abs=1e-4)
    assert "| x: mean of 2 |" in bench.table(rows)
