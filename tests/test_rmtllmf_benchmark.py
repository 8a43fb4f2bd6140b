"""The R-MTLLMF benchmark script end to end on tiny-bert (its real run uses MiniLM; see README)."""

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from fedllm.core.vectors import get_tensors, set_tensors

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
    assert len(jammed) == 2 * 2 * 12  # jammers x powers x methods (every fused row but three variants)
    assert {"AdaMerging (layer-wise)", "AdaMerging (layer-wise, labelled shots)",
            "AdaMerging (layer-wise, labelled shots, from 0)", "R-MTLLMF + layer-wise coefficients"} <= {r["method"] for r in jammed}
    specs = bench.method_specs(2)
    assert set(ideal) == {"zero-shot", "individual", "individual, LoRA", *specs}  # every fused row, one table
    assert {r["method"] for r in jammed} == {k for k, m in specs.items() if m.jammed}
    assert {"Fisher", "RegMean", "TIES", "DARE", "Breadcrumbs"} <= {r["method"] for r in jammed}
    seconds = results["server_seconds"]
    assert {"ties", "adamerging-labelled", "jammed Fisher", "jammed R-MTLLMF"} <= set(seconds)  # jammed merges too
    # the layer-wise coefficients each AdaMerging merge learnt, per tensor and summarised by group and layer
    learnt = results["coefficients"]["worst_case 60 dB"]["AdaMerging (layer-wise, labelled shots, from 0)"]
    assert set(learnt["by_group_and_layer"]["attention"]) == {"0", "1"}  # tiny-bert's two layers, each its own
    assert learnt["by_group_and_layer"] == bench.coefficients_by_layer(learnt["per_tensor"],
                                                                       bench.ARCHITECTURES["bert"]["groups"])
    assert "adamerging (task-wise)" not in {k.lower() for k in results["coefficients"]["ideal"]}  # no layers there
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
    assert "Layer-wise coefficients learnt by AdaMerging (layer-wise) (worst_case 0 dB" in table
    assert all((tmp_path / f).stat().st_size > 0 for f in ("jammed.png", "wd_vs_mse.png", "sensitivity.png"))
    assert results["complete"] is True


@pytest.mark.slow
def test_realignment_study_runs_every_setting_and_leaves_the_model_as_it_found_it(tmp_path, monkeypatch):
    spec = importlib.util.spec_from_file_location("realign_study", SCRIPT.parent / "realign_study.py")
    study = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(study)
    realign_all, discards = study.realign_all, []

    def counted(*args, discard=False):
        discards.append(discard)
        return realign_all(*args, discard=discard)

    monkeypatch.setattr(study, "realign_all", counted)
    study.main(["--quick", "--model", "tiny-bert", "--tasks", "topic", "question", "--steps", "5", "--max-test", "40",
                "--powers", "60", "60", "--shots", "2", "--out", str(tmp_path)])
    rows = json.loads((tmp_path / "realign.json").read_text())["rows"]
    per_power = 1 + 3 + 1 + 1  # no realignment, three scopes, layer-wise coefficients, uplink discarded
    assert len(rows) == 3 * per_power
    # the same jammer twice: the second pass follows the first's whole-model realignment, and must not see it
    at_60 = [r for r in rows if r["power_db"] == 60.0]
    assert [r["normalized_accuracy"] for r in at_60[:per_power]] == [r["normalized_accuracy"] for r in at_60[per_power:]]
    assert len({r["normalized_accuracy"] for r in rows}) > 1  # realignment changes the model
    assert "| R-MTLLMF | all | 2 |" in (tmp_path / "realign.md").read_text()
    discarded = [r for r in rows if r["method"].startswith("uplink discarded")]
    assert len(discarded) == 3 and len({r["normalized_accuracy"] for r in discarded}) == 1
    assert discards.count(True) == 1  # the same model at every power (lambda 0): realigned once, not per power
    # ... which holds because the discard ignores what arrived: the ideal and a jammed uplink give the same model
    bench = study.bench
    cfg = bench.experiment(["topic", "question"], "frozen", 5, 40, "tiny-bert")
    workload = bench.Classification(cfg)
    bundle = workload.build_model()
    fam = bench.Fusion(cfg, workload, bundle, bench.task_vectors(cfg, bundle, workload.suite, tmp_path / "cache"))
    jammed = fam.received({"kind": "mimo_mac", "nt": 8, "receiver": "zf", "jammer": "worst_case",
                           "jammer_power_db": 60.0})
    pristine = get_tensors(bundle.model, [n for n, _ in bundle.model.named_parameters()])
    clean = realign_all(fam, fam.received(None), 2, 3, 1e-3, discard=True)
    set_tensors(bundle.model, pristine)
    assert all(torch.equal(clean[n], t) for n, t in realign_all(fam, jammed, 2, 3, 1e-3, discard=True).items())
    set_tensors(bundle.model, pristine)
    kept = realign_all(fam, jammed, 2, 3, 1e-3)  # lambda searched: the jammed update is in it
    assert not all(torch.equal(clean[n], t) for n, t in kept.items())
    # cut to a budget: one jammed power, one scope, one setting
    study.main(["--model", "tiny-bert", "--tasks", "topic", "question", "--steps", "5", "--max-test", "40",
                "--powers", "60", "--shots", "2", "--scopes", "transmitted", "--settings", "3:1e-3", "--no-ideal",
                "--out", str(tmp_path)])
    rows = json.loads((tmp_path / "realign.json").read_text())["rows"]
    assert [(r["power_db"], r["scope"], r["steps"]) for r in rows] == [
        (60.0, "-", 0), (60.0, "transmitted", 3), (60.0, "norms_biases", 20), (60.0, "all", 3)]
    study.main(["--model", "tiny-bert", "--tasks", "topic", "question", "--steps", "5", "--max-test", "40",
                "--powers", "60", "--shots", "2", "--scopes", "transmitted", "--settings", "3:1e-3", "--no-ideal",
                "--no-coefficients", "--out", str(tmp_path)])
    rows = json.loads((tmp_path / "realign.json").read_text())["rows"]
    assert [r["method"] for r in rows] == ["task arithmetic (no realignment)", "R-MTLLMF",
                                           "uplink discarded (pretrained model) + realignment"]
    with pytest.raises(SystemExit):
        study.main(["--settings", "100-1e-3"])  # argparse names --settings and the form it wants


@pytest.mark.slow
def test_benchmark_runs_on_a_llama_model_with_its_own_module_names(tmp_path):
    """SmolLM2 is a Llama: its embeddings are embed_tokens, its norms RMSNorms, LoRA goes on q_proj/v_proj.
    A two-layer Llama folder with MiniLM's tokenizer stands in for it (same names, seconds to run)."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaModel

    from fedllm.core.store import embedded_model_dir

    folder = tmp_path / "tiny-llama"
    tokenizer = AutoTokenizer.from_pretrained(embedded_model_dir())
    tokenizer.save_pretrained(folder)
    LlamaModel(LlamaConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                           num_key_value_heads=1, intermediate_size=64, max_position_embeddings=128,
                           pad_token_id=tokenizer.pad_token_id)).save_pretrained(folder)
    spec = importlib.util.spec_from_file_location("rmtllmf_benchmark", SCRIPT)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "out"
    bench.main(["--quick", "--model", str(folder), "--tasks", "topic", "question", "--steps", "3", "--max-test", "20",
                "--validation", "8", "--families", "full", "frozen", "--methods", "task arithmetic", "R-MTLLMF",
                "--powers", "60", "--jammers", "worst_case", "--skip", "wd", "--no-statistics", "--out", str(out),
                "--set", "task arithmetic:lr_grid=[0.0]"])
    results = json.loads((out / "results.json").read_text())
    assert results["model"] == str(folder)
    # --set reached the rule: lambda 0 is the pretrained model, scored exactly as the zero-shot row
    assert results["ideal"]["task arithmetic"]["accuracy"] == results["ideal"]["zero-shot"]["accuracy"]
    assert results["overrides"] == [["task arithmetic", "lr_grid", [0.0]]]
    assert set(results["ideal"]) == {"zero-shot", "individual", "task arithmetic", "R-MTLLMF"}
    assert {r["method"] for r in results["jammed"]} == {"task arithmetic", "R-MTLLMF"}
    assert {r["jammer"] for r in results["jammed"]} == {"worst_case"}
    uplink = results["uplink_bytes"]
    embed = tokenizer.vocab_size * 32  # R-MTLLMF keeps embed_tokens home, and nothing else
    assert (uplink["task vector, all layers (task arithmetic, TIES, DARE, Breadcrumbs, AdaMerging)"]
            - uplink["task vector, embeddings kept home (R-MTLLMF)"]) == 4 * embed
    groups = {r["group"]: r["values"] for r in results["sensitivity"]["rows"]}
    assert groups["embeddings"] == embed and groups["layernorm"] == 32 * (2 * 2 + 1)  # two RMSNorms a layer + final
    assert groups["attention"] == 2 * (32 * 32 * 2 + 32 * 16 * 2)  # q, o: 32x32; k, v: one 16-wide KV head
    table = (out / "table.md").read_text()
    assert "WD error vs" not in table and "Sensitivity" in table and "Jammer worst_case" in table
    assert "strongest_user" not in table and (out / "jammed.png").is_file()


def test_cosine_matrix_from_column_blocks_equals_the_whole_rows_in_float64():
    import torch

    spec = importlib.util.spec_from_file_location("rmtllmf_benchmark", SCRIPT)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    rows = torch.randn(4, 1000, generator=torch.Generator().manual_seed(0))
    rows[1] = -2 * rows[0] + 0.01 * rows[1]  # nearly opposite to row 0
    unit = torch.nn.functional.normalize(rows.double(), dim=1)
    blocks = bench.cosine_matrix(rows, block=64)  # 64 does not divide 1000: a ragged last block
    assert torch.allclose(blocks, unit @ unit.T, atol=1e-12)
    assert blocks[0, 1] < -0.99


def test_coefficients_summarised_by_group_and_layer():
    spec = importlib.util.spec_from_file_location("rmtllmf_benchmark", SCRIPT)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    groups = bench.ARCHITECTURES["bert"]["groups"]
    coeffs = {"embeddings.word_embeddings.weight": 0.1, "embeddings.LayerNorm.weight": 0.3,
              "encoder.layer.0.attention.self.query.weight": 0.2, "encoder.layer.0.attention.self.value.weight": 0.4,
              "encoder.layer.10.intermediate.dense.weight": 0.5, "encoder.layer.2.output.dense.bias": 0.7,
              "encoder.layer.2.attention.output.LayerNorm.bias": 0.9, "pooler.dense.weight": 1.0}
    assert bench.coefficients_by_layer(coeffs, groups) == {
        "embeddings": {"-": pytest.approx(0.2)},  # the embeddings' LayerNorm counts with the embeddings (first group)
        "attention": {"0": pytest.approx(0.3)},
        "feed_forward": {"2": 0.7, "10": 0.5},  # layers in numeric order, not as strings ("10" < "2")
        "layernorm": {"2": 0.9}, "other": {"-": 1.0}}
    assert list(bench.coefficients_by_layer(coeffs, groups)["feed_forward"]) == ["2", "10"]
    records = {"AdaMerging (task-wise)": {"adamerging_coefficients": [0.3, 0.4]},  # one per task: no layers
               "R-MTLLMF + layer-wise coefficients": {"adamerging_coefficients": coeffs}, "TIES": {"server_lr": 0.3}}
    assert list(bench.coefficient_summaries(records, groups)) == ["R-MTLLMF + layer-wise coefficients"]


@pytest.mark.parametrize("argv, message", [
    (["--set", "TIES k=0.1"], "--set wants 'METHOD:KEY=VALUE'"),
    (["--set", "Tie:k=0.1"], "no method 'Tie'"),
    (["--set", "TIES:k=2"], "strategy.k"),  # the rule's own check: a fraction in (0, 1]
    (["--set", "AdaMerging (layer-wise):lrr=0.1"], "unknown key"),
    (["--methods", "task arithmetic", "TIE"], "--methods 'TIE': no such method"),
])
def test_bad_method_options_stop_before_any_fine_tuning(argv, message, tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("rmtllmf_benchmark", SCRIPT)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    with pytest.raises(SystemExit) as exc:
        bench.main([*argv, "--out", str(tmp_path / "out")])
    assert message in str(exc.value) + capsys.readouterr().err
    assert not (tmp_path / "out").exists()  # nothing started


def test_method_override_reads_json_values_and_keeps_colons_in_method_names():
    spec = importlib.util.spec_from_file_location("rmtllmf_benchmark", SCRIPT)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert bench.method_override("AdaMerging (layer-wise, labelled shots, from 0):lr=0.005") == (
        "AdaMerging (layer-wise, labelled shots, from 0)", "lr", 0.005)
    assert bench.method_override("a:b:objective=labelled") == ("a:b", "objective", "labelled")
    assert bench.method_override("TIES:lr_grid=[0, 0.5]") == ("TIES", "lr_grid", [0, 0.5])


@pytest.mark.slow
def test_a_run_stopped_mid_sweep_keeps_every_jammed_row_it_finished(tmp_path, monkeypatch):
    spec = importlib.util.spec_from_file_location("rmtllmf_benchmark", SCRIPT)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    run_method, calls = bench.run_method, []

    def stopped_at_the_fourth_jammed_merge(fam, received, method, label):
        if label.startswith("jammed"):
            calls.append(received)
            if len(calls) == 4:
                raise KeyboardInterrupt
        return run_method(fam, received, method, label)

    monkeypatch.setattr(bench, "run_method", stopped_at_the_fourth_jammed_merge)
    with pytest.raises(KeyboardInterrupt):
        bench.main(["--model", "tiny-bert", "--tasks", "topic", "question", "--steps", "3", "--max-test", "20",
                    "--families", "full", "--methods", "task arithmetic", "TIES", "--jammers", "worst_case",
                    "--powers", "0", "60", "--skip", "wd", "sensitivity", "--no-statistics", "--out", str(tmp_path)])
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["complete"] is False
    assert [(r["power_db"], r["method"]) for r in results["jammed"]] == [
        (0.0, "task arithmetic"), (0.0, "TIES"), (60.0, "task arithmetic")]
    assert set(results["ideal"]) == {"zero-shot", "individual", "task arithmetic", "TIES"}  # the ideal table too
    # one transmission per power: both rules of a power fused the very same received batch
    assert calls[0] is calls[1] and calls[2] is calls[3] and calls[1] is not calls[2]


def test_the_readme_plot_is_drawn_from_the_readme_tables(tmp_path):
    spec = importlib.util.spec_from_file_location("plot_jammed_tables", SCRIPT.parent / "plot_jammed_tables.py")
    plots = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(plots)
    text = "\n".join(["intro", "| worst-case jammer (dB) | 0 | 20 |", "| --- | --- | --- |",
                      "| task arithmetic | 0.9370 | **0.7368** |", "| TIES (k = 0.2) | — | 0.7118 |",
                      "| relative MSE of the task vectors | 415 | 3.81e4 |", "", "| other | 1 |"])
    powers, rows = plots.markdown_table(text, "worst-case jammer (dB)")
    assert powers == [0.0, 20.0]
    assert rows == {"task arithmetic": [0.937, 0.7368], "TIES (k = 0.2)": [None, 0.7118]}
    with pytest.raises(ValueError, match="row 'a' has 1 values for 2 powers"):
        plots.markdown_table("| worst-case jammer (dB) | 0 | 20 |\n| --- | --- | --- |\n| a | 1 |", "worst-case jammer (dB)")
    # README's own tables parse (a broken row would stop the plot) and every row has a value
    plots.main(["--out", str(tmp_path / "jammed.png")])
    readme = (SCRIPT.parents[1] / "README.md").read_text(encoding="utf-8")
    for title in plots.TABLES:
        _, rows = plots.markdown_table(readme, title)
        assert "task arithmetic" in rows and all(any(v is not None for v in vs) for vs in rows.values())
    assert (tmp_path / "jammed.png").stat().st_size > 0
