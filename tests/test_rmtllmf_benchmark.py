"""The R-MTLLMF benchmark script end to end on tiny-bert (its real run uses MiniLM; see README)."""

import importlib.util
import json
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "rmtllmf_benchmark.py"


@pytest.mark.slow
def test_benchmark_produces_the_four_results(tmp_path):
    spec = importlib.util.spec_from_file_location("rmtllmf_benchmark", SCRIPT)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    bench.main(["--quick", "--model", "tiny-bert", "--tasks", "topic", "question", "--steps", "5",
                "--max-test", "40", "--powers", "0", "60", "--adamerging-steps", "2", "--out", str(tmp_path)])
    results = json.loads((tmp_path / "results.json").read_text())
    ideal = results["ideal"]
    assert ideal["individual"]["normalized_accuracy"] == 1.0
    for row in ("zero-shot", "task arithmetic", "TIES", "DARE", "R-MTLLMF", "task arithmetic, LoRA B@A",
                "task arithmetic, LoRA factors summed"):  # normalised = per-task accuracy / the task's own model's
        per_task = [ideal[row][f"accuracy/{t}"] / ideal[row][f"individual_accuracy/{t}"] for t in ("topic", "question")]
        assert ideal[row]["normalized_accuracy"] == pytest.approx(sum(per_task) / 2), row
    jammed = results["jammed"]
    assert len(jammed) == 2 * 2 * 5  # jammers x powers x methods
    assert {"AdaMerging (layer-wise)", "R-MTLLMF + layer-wise coefficients"} <= {r["method"] for r in jammed}
    for row in ("Fisher", "RegMean", "AdaMerging (task-wise)", "Breadcrumbs"):
        assert row in ideal
    uplink = results["uplink_bytes"]
    d = next(v for k, v in uplink.items() if k.startswith("task vector, all layers")) // 4
    assert uplink["task vector + fisher (its rule)"] == 4 * 2 * d  # a Fisher is one value per sent value
    n = len(results["cosine_similarity"])
    assert n == 2 and all(abs(results["cosine_similarity"][i][i] - 1) < 1e-9 for i in range(n))
    mse = {(r["jammer"], r["power_db"]): r["relative_mse"] for r in jammed if r["method"] == "task arithmetic"}
    assert mse[("worst_case", 60.0)] > 100 * mse[("worst_case", 0.0)]  # ZF: the error grows with the jammer
    assert set(results["target"]) == {"worst_case", "strongest_user"}
    wd = results["wd_vs_mse"]
    from scipy.stats import spearmanr

    points = wd["points"]
    assert wd["n"] == len(points) == 4
    assert wd["spearman_rho"] == pytest.approx(spearmanr([p["relative_mse"] for p in points],
                                                         [p["wd_error"] for p in points]).statistic)
    assert {r["group"] for r in results["sensitivity"]["rows"]} == {"embeddings", "attention", "feed_forward",
                                                                     "layernorm"}
    table = (tmp_path / "table.md").read_text()
    assert "Spearman" in table and "Sensitivity" in table and "LoRA B@A" in table
    assert all((tmp_path / f).stat().st_size > 0 for f in ("jammed.png", "wd_vs_mse.png", "sensitivity.png"))


@pytest.mark.slow
def test_realignment_study_runs_every_setting_and_leaves_the_model_as_it_found_it(tmp_path):
    spec = importlib.util.spec_from_file_location("realign_study", SCRIPT.parent / "realign_study.py")
    study = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(study)
    study.main(["--quick", "--model", "tiny-bert", "--tasks", "topic", "question", "--steps", "5", "--max-test", "40",
                "--powers", "60", "60", "--shots", "2", "--out", str(tmp_path)])
    rows = json.loads((tmp_path / "realign.json").read_text())["rows"]
    per_power = 1 + 3 + 1  # no realignment, three scopes, layer-wise coefficients
    assert len(rows) == 3 * per_power
    # the same jammer twice: the second pass follows the first's whole-model realignment, and must not see it
    at_60 = [r for r in rows if r["power_db"] == 60.0]
    assert [r["normalized_accuracy"] for r in at_60[:per_power]] == [r["normalized_accuracy"] for r in at_60[per_power:]]
    assert len({r["normalized_accuracy"] for r in rows}) > 1  # realignment changes the model
    assert "| R-MTLLMF | all | 2 |" in (tmp_path / "realign.md").read_text()
