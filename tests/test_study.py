"""`deltatune study`: a smoke study on a tiny BERT (two steps per cell) checks the report's contents, the cache and
the refusals; model selection is checked on made-up records.  Accuracy is not asserted here."""

from __future__ import annotations

import argparse
import json
import shutil

import pytest
import torch
import transformers

from deltatune.cli import main
from deltatune.cli import study as study_cli
from deltatune.machine import cpu_and_versions, cpu_name
from deltatune.study.protocol import BUDGETS, combinations, parse_method
from deltatune.study.report import write_report
from deltatune.study.results import summarize
from deltatune.study.runner import Study
from deltatune.training.data import Task

SMOKE = ["--max-train-examples", "8", "--max-eval-examples", "8", "--epochs", "1", "--batch-size", "4"]


def _untimed(cell: dict) -> dict:
    """A cell's record without what depends on the machine's speed and the threads it was given."""
    return {k: v for k, v in cell.items() if k not in ("cpu_seconds", "wall_seconds", "threads")}


def _study(backbone, out, *extra: str) -> int:
    return main(["study", "--backbone", str(backbone), "--out", str(out), *SMOKE, *extra])


@pytest.fixture(scope="module")
def smoke(tmp_path_factory, tiny_backbone):
    out = tmp_path_factory.mktemp("study")
    assert _study(tiny_backbone, out, "--tasks", "rotten_tomatoes,trec", "--methods", "ft,lora,soft_prompt",
                  "--combinations", "--memory-batches", "1,2",
                  "--delta-config", '{"soft_prompt": {"soft_token_num": 4}}') == 0
    return out, json.loads((out / "results.json").read_text())


def test_every_cell_is_in_the_results(smoke, tiny_backbone):
    out, results = smoke
    subsets = ["none", "soft_prompt", "bitfit", "adapter", "soft_prompt+bitfit", "soft_prompt+adapter",
               "bitfit+adapter", "soft_prompt+bitfit+adapter"]
    assert results["combinations"] == subsets
    assert results["cells"] == 2 * 10  # ft, lora and the 8 subsets (soft_prompt among them) on two tasks
    assert sorted(results["table"]) == ["rotten_tomatoes", "trec"]
    model = transformers.AutoModelForSequenceClassification.from_pretrained(tiny_backbone, num_labels=6)
    head = sum(p.numel() for n, p in model.named_parameters() if n.startswith("classifier."))
    for task, row in results["table"].items():
        assert sorted(row) == sorted(["ft", "lora", *subsets])
        for entry in row.values():
            assert entry["steps"] == 2 and entry["seeds"] == 1
            assert entry["near_best_step"] <= entry["best_step"] <= entry["steps"]
            assert [step for step, _ in entry["curve"]] == [0, 1, 2]
            assert 0 <= entry["test_mean"] <= 1 and entry["test_std"] == 0
    trec = results["table"]["trec"]
    assert trec["ft"]["trainable_parameters"] == sum(p.numel() for p in model.parameters())
    assert trec["none"]["trainable_parameters"] == head
    assert trec["soft_prompt"]["trainable_parameters"] == head + 4 * 32
    assert trec["soft_prompt+bitfit"]["trainable_parameters"] == (
        trec["soft_prompt"]["trainable_parameters"] + trec["bitfit"]["trainable_parameters"] - head)
    assert trec["lora"]["rates"] == {"lora": 1e-3, "head": 1e-3}
    assert trec["soft_prompt"]["rates"] == {"soft_prompt": 3e-2, "head": 3e-2}
    assert trec["soft_prompt+bitfit"]["rates"] == {"soft_prompt": 3e-2, "bitfit": 1e-3, "head": 3e-2}
    assert trec["none"]["rates"] == {"head": 1e-2}


def test_the_report_shows_every_section(smoke):
    out, results = smoke
    report = (out / "report.md").read_text()
    for title in ("Overall comparison (the survey's Table 3)", "Peak memory against batch size",
                  "Convergence (the survey's Fig. 6)", "Combinations (the survey's Tables 5–6)"):
        assert f"## {title}" in report
    ft = results["table"]["trec"]["ft"]
    assert f"| trec (8 train / 8 validation / 8 test) | {100 * results['tasks']['trec']['majority']:.1f} | " \
           f"{100 * ft['test_mean']:.1f} |" in report
    assert "| soft_prompt |  | ✓ |  |  | ✓ | ✓ |  | ✓ |" in report
    assert "| survey: RoBERTa-large, GLUE average" in report and "77.7" in report
    machine = f"{cpu_name()}, torch {torch.__version__}, transformers {transformers.__version__}"
    assert cpu_and_versions() == machine
    assert results["cell_machines"] == [[machine, 20]]  # the machine that trained the cells, not only the report's
    assert f"CPU hours, trained on {machine} (20 cells). Report written " in report
    page = (out / "report.html").read_text()
    assert page.startswith("<!doctype html>")
    assert page.count("<table>") == sum(1 for line in report.splitlines() if line.startswith("|---|"))
    for figure in ("memory.png", "convergence-trec.png", "convergence-rotten_tomatoes.png"):
        assert (out / figure).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"]({figure})" in report and f'src="{figure}"' in page


def test_memory_is_measured_per_method_and_batch(smoke):
    _, results = smoke
    points = {(p["method"], p["batch"]): p for p in results["memory"]}
    assert sorted(points) == [(m, b) for m in ("ft", "lora", "soft_prompt") for b in (1, 2)]
    for point in points.values():
        assert 0 < point["before_mb"] <= point["peak_mb"]


def test_a_rerun_takes_every_cell_from_the_cache(smoke, tiny_backbone, capsys):
    out, results = smoke
    cells = sorted((out / "cells").iterdir())
    stamps = [p.stat().st_mtime_ns for p in cells]
    before = json.loads(cells[0].read_text())
    cells[0].unlink()  # as if the study had been killed while this cell ran
    capsys.readouterr()
    assert _study(tiny_backbone, out, "--tasks", "rotten_tomatoes,trec", "--methods", "ft,lora,soft_prompt",
                  "--combinations", "--memory-batches", "1,2",
                  "--delta-config", '{"soft_prompt": {"soft_token_num": 4}}') == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("[")]
    done = [line for line in lines if ", test " in line]
    assert len(done) == 20 and sum("cached" not in line for line in done) == 1
    assert sum(line.endswith(": training") for line in lines) == 1
    assert [p.stat().st_mtime_ns for p in cells[1:]] == stamps[1:]
    assert _untimed(json.loads(cells[0].read_text())) == _untimed(before)


def test_cells_trained_two_at_a_time_equal_those_trained_one_after_another(smoke, tiny_backbone, tmp_path, capfd):
    out = tmp_path / "study"
    assert _study(tiny_backbone, out, "--tasks", "trec", "--methods", "ft,lora,soft_prompt", "--memory-batches",
                  "none", "--delta-config", '{"soft_prompt": {"soft_token_num": 4}}', "--jobs", "2") == 0
    lines = capfd.readouterr().out.splitlines()
    assert sorted(line for line in lines if line.endswith(": training")) == [
        "[1/3] trec/ft/lr=5e-05/seed=0: training", "[2/3] trec/lora/lr=0.001/seed=0: training",
        "[3/3] trec/soft_prompt/lr=0.03/seed=0: training"]
    assert "    trec/lora/lr=0.001/seed=0 step 2: validation " in "\n".join(lines)  # a worker's line names its cell
    for path in sorted((out / "cells").iterdir()):  # one thread each: on a tiny model the same sums
        alone = json.loads((smoke[0] / "cells" / path.name).read_text())
        assert _untimed(json.loads(path.read_text())) == _untimed(alone)
    assert json.loads((out / "study.json").read_text()) == json.loads((smoke[0] / "study.json").read_text())


def test_a_cell_failing_in_a_worker_stops_the_study_with_its_message(minilm_path, tmp_path, capfd):
    out = tmp_path / "study"
    assert main(["study", "--backbone", str(minilm_path), "--objective", "label-words", "--out", str(out), *SMOKE,
                 "--tasks", "trec", "--methods", "lora,bitfit", "--memory-batches", "none", "--jobs", "2"]) == 2
    captured = capfd.readouterr()
    assert "--objective label-words needs a causal language model; " in captured.err
    assert "seed=0 failed; stopping once the cells running beside it are kept" in captured.out  # in a worker
    assert not out.exists()


def test_a_cell_failing_in_a_worker_keeps_the_cell_trained_beside_it(smoke, tiny_backbone, tmp_path, capfd):
    out = tmp_path / "study"
    # The soft prompt fails as it is built (more prompt tokens than positions); BitFit trains in the other worker.
    assert _study(tiny_backbone, out, "--tasks", "trec", "--methods", "bitfit,soft_prompt", "--memory-batches",
                  "none", "--delta-config", '{"soft_prompt": {"soft_token_num": 600}}', "--jobs", "2") == 2
    captured = capfd.readouterr()
    assert "soft_token_num=600 and 2 token(s) of input need 602 positions, but the model embeds only 512" in \
        captured.err
    assert "trec/soft_prompt/lr=0.03/seed=0 failed; stopping once the cells running beside it are kept" in captured.out
    # Whichever worker finishes first (both orders were seen), BitFit's cell is kept whole: the cell trained alone.
    name = "trec__bitfit__lr=0.001__seed=0.json"
    assert [p.name for p in (out / "cells").iterdir()] == [name]
    kept, alone = (json.loads((folder / "cells" / name).read_text()) for folder in (out, smoke[0]))
    assert _untimed(kept) == _untimed(alone)


def test_a_study_with_other_settings_is_refused_in_the_same_folder(smoke, tiny_backbone, capsys):
    out, _ = smoke
    assert main(["study", "--backbone", str(tiny_backbone), "--out", str(out), *SMOKE[:-2], "--batch-size", "2",
                 "--tasks", "trec", "--methods", "lora", "--memory-batches", "none"]) == 2
    assert "holds a study with other settings (budget.batch_size, delta_configs.soft_prompt.soft_token_num " \
           "differ)" in capsys.readouterr().err


@pytest.mark.parametrize("options, message", [
    (["--methods", "lora,dora"], "unknown or repeated method 'dora'; methods: ft, none, adapter, bitfit"),
    (["--methods", "lora+lora"], "unknown or repeated method 'lora+lora'"),
    (["--tasks", "sst2"], "unknown task(s) sst2; built-in tasks: rotten_tomatoes"),
    (["--seeds", "0,x"], "--seeds takes comma-separated integers, got '0,x'"),
    (["--seeds", "0,-1"], "--seeds must be at least 0 each, got 0,-1"),
    (["--seeds", ""], "--seeds takes comma-separated integers, got ''"),  # not the budget's seeds
    (["--seeds", "0,1,0"], "--seeds repeats 0"),
    (["--tasks", "trec, sms_spam,trec"], "--tasks repeats trec"),
    (["--methods", "lora,bitfit,lora"], "--methods repeats lora"),
    (["--memory-batches", "0"], "--memory-batches must be at least 1 each"),
    (["--delta-config", '{"lora": {"rank": 4}}'], "rank"),
    (["--delta-config", '{"loraa": {}}'], "--delta-config maps delta types (adapter, bitfit"),
    (["--epochs", "0"], "--epochs must be at least 1"),
    (["--jobs", "0"], "--jobs must be at least 1, got 0"),
    (["--max-train-examples", "0"], "--max-train-examples must be at least 1, got 0"),
    (["--max-eval-examples", "half"], "--max-eval-examples takes a number or 'all', got 'half'"),
    (["--backbone", "/no/such/folder"], "'/no/such/folder' is not a model asset (minilm-l6, smollm2-135m), a "
                                        "local folder, or a hub id of the form owner/name"),
    (["--objective", "label-words", "--pooling", "mean"], "--pooling mean is for --objective classify"),
])
def test_bad_options_are_refused_before_anything_runs(tmp_path, options, message, capsys):
    out = tmp_path / "study"
    assert main(["study", "--out", str(out), *options]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_a_study_refused_by_its_first_cell_leaves_no_folder(minilm_path, tmp_path, capsys):
    # MiniLM-L6 declares mean pooling, which label words do not use: the refusal is its being an encoder.
    out = tmp_path / "study"
    assert main(["study", "--backbone", str(minilm_path), "--objective", "label-words", "--out", str(out), *SMOKE,
                 "--tasks", "trec", "--methods", "lora", "--memory-batches", "none"]) == 2
    assert "--objective label-words needs a causal language model; " in capsys.readouterr().err
    assert not out.exists()


def test_all_examples_and_counts_override_the_budget():
    parser = argparse.ArgumentParser()
    study_cli.add_arguments(parser)
    quick = study_cli.make_study(parser.parse_args(["--max-train-examples", "all", "--max-eval-examples", "200"]))
    assert (quick.budget.train_examples, quick.budget.eval_examples, quick.budget.epochs) == (None, 200, 3)
    assert study_cli.make_study(parser.parse_args([])).budget == BUDGETS["quick"]
    assert study_cli.make_study(parser.parse_args(["--rates", "grid"])).budget.rates(parse_method("lora")) == (
        3.33e-4, 1e-3, 3e-3)
    full = study_cli.make_study(parser.parse_args(["--budget", "full", "--rates", "default"])).budget
    assert full.rates(parse_method("lora")) == (1e-3,) and full.seeds == (0, 1, 2)


def test_rate_factors_widen_the_grid_and_bad_ones_are_refused():
    parser = argparse.ArgumentParser()
    study_cli.add_arguments(parser)

    def budget(*rates: str, methods: str = "ft,lora,prefix,soft_prompt+bitfit"):
        return study_cli.make_study(parser.parse_args(
            ["--budget", "full", "--methods", methods, *(a for r in rates for a in ("--rates", r))])).budget

    wide = budget("3, 1/9,1,1/3")  # any order: a tie goes to the lower rate, so they are sorted
    assert wide.rates(parse_method("prefix")) == (1.11e-4, 3.33e-4, 1e-3, 3e-3)
    assert wide.rates(parse_method("soft_prompt+bitfit")) == (0.111, 0.333, 1.0, 3.0)  # factors on every part
    assert budget("1/3,1,3") == budget("grid") == BUDGETS["full"]
    assert budget("0.5").rates(parse_method("ft")) == (2.5e-5,)
    with pytest.raises(ValueError, match="the rate factors 1, 1.0001 give lora the same rate twice: 0.001, 0.001"):
        budget("1,1.0001").rates(parse_method("lora"))  # cells are named by their rate's three digits
    # one method's own factors; the others keep theirs
    own = budget("prefix=1/9,1/3,1,3", "default")
    assert own.rates(parse_method("prefix")) == (1.11e-4, 3.33e-4, 1e-3, 3e-3)
    assert own.rates(parse_method("ft")) == (5e-5,) and own.rates(parse_method("lora")) == (1e-3,)
    assert budget("soft_prompt+bitfit=1,3").rates(parse_method("soft_prompt+bitfit")) == (1.0, 3.0)
    for rates, message in [(("1e-3x",), "--rates takes default, grid, or comma-separated factors on each method's "
                                        "default rate such as 1/9,1/3,1,3; got '1e-3x'"),
                           (("1/0",), "got '1/0'"), (("1,,3",), "got '1,,3'"), (("1/3,1,2/6",), "--rates repeats 1/3"),
                           (("0,1",), "--rates factors must be positive, got 0,1"),
                           (("prefx=1",), "--rates prefx=...: 'prefx' is not among the study's methods (ft, lora, "
                                          "prefix, soft_prompt+bitfit)"),
                           (("prefix=1", "prefix=1,3"), "--rates METHOD=... repeats prefix"),
                           (("grid", "default"), "--rates without a method is given twice: grid, default"),
                           (("prefix=0",), "--rates factors must be positive, got 0")]:
        with pytest.raises(ValueError) as error:
            budget(*rates)
        assert message in str(error.value)


def test_rates_that_repeat_a_cell_are_refused_before_any_cell_trains(tiny_backbone, tmp_path, capsys):
    out = tmp_path / "study"
    assert _study(tiny_backbone, out, "--tasks", "trec", "--methods", "lora", "--rates", "1,1.0001") == 2
    assert "the rate factors 1, 1.0001 give lora the same rate twice: 0.001, 0.001" in capsys.readouterr().err
    assert not out.exists()


def test_the_grid_added_to_a_study_reuses_its_default_rate_cells(smoke, tiny_backbone, tmp_path, capsys):
    out = tmp_path / "study"
    shutil.copytree(smoke[0], out)
    capsys.readouterr()
    assert _study(tiny_backbone, out, "--tasks", "trec", "--methods", "lora", "--rates", "grid",
                  "--memory-batches", "none", "--delta-config", '{"soft_prompt": {"soft_token_num": 4}}') == 0
    done = [line for line in capsys.readouterr().out.splitlines() if line.startswith("[") and ", test " in line]
    # the cached cell is listed first, then the cells trained, each under its number in the grid
    assert [(line[:5], "lr=0.001" in line, "cached" in line) for line in done] == [
        ("[2/3]", True, True), ("[1/3]", False, False), ("[3/3]", False, False)]
    results = json.loads((out / "results.json").read_text())
    cells = [json.loads(p.read_text()) for p in (out / "cells").glob("trec__lora__*")]
    assert results["rate_factors"] == {"lora": [1 / 3, 1, 3]} and results["cells"] == 3
    assert sorted(c["lr"] for c in cells) == [3.33e-4, 1e-3, 3e-3]
    best = max(cells, key=lambda c: c["validation_accuracy"])
    assert results["table"]["trec"]["lora"]["validation_mean"] == best["validation_accuracy"]
    report = (out / "report.md").read_text()
    assert "the learning-rate grid (each method's default ×1/3, ×1 and ×3), chosen" in report
    # widened below: the three cells are reused and one more is trained
    assert _study(tiny_backbone, out, "--tasks", "trec", "--methods", "lora", "--rates", "lora=1/9,1/3,1,3",
                  "--memory-batches", "none", "--delta-config", '{"soft_prompt": {"soft_token_num": 4}}') == 0
    done = [line for line in capsys.readouterr().out.splitlines() if line.startswith("[") and ", test " in line]
    assert [(line[:5], "cached" in line) for line in done] == [
        ("[2/4]", True), ("[3/4]", True), ("[4/4]", True), ("[1/4]", False)]
    results = json.loads((out / "results.json").read_text())
    assert results["rate_factors"] == {"lora": [1 / 9, 1 / 3, 1, 3]} and results["cells"] == 4
    assert ("the learning-rate grid (each method's default ×1/9, ×1/3, ×1 and ×3), chosen by validation accuracy"
            in (out / "report.md").read_text())


def _record(task, method, lr, seed, validation, test, steps=4, best_step=2):
    return {"task": task, "method": method, "lr": lr, "seed": seed, "validation_accuracy": validation,
            "test_accuracy": test, "test_f1": test, "rates": {}, "trainable_parameters": 10, "cpu_seconds": 1.0,
            "steps": steps, "best_step": best_step, "steps_per_epoch": 2,
            "curve": [[0, validation - 0.1], [best_step // 2, validation - 0.005], [best_step, validation]]}


def test_selection_takes_the_best_validation_rate_per_seed(tmp_path):
    budget = BUDGETS["full"].with_overrides(seeds=(0, 1))
    study = Study("b", ["t"], [parse_method("lora")], budget, tmp_path)
    records = [_record("t", "lora", 3e-4, 0, 0.80, 0.70), _record("t", "lora", 1e-3, 0, 0.90, 0.81, 40, 30),
               _record("t", "lora", 3e-3, 0, 0.90, 0.60),  # a tie: the earlier rate is kept
               _record("t", "lora", 3e-4, 1, 0.95, 0.85, 20, 10), _record("t", "lora", 1e-3, 1, 0.50, 0.99),
               _record("t", "lora", 3e-3, 1, 0.70, 0.10)]
    results = summarize(study, records, [], {}, 0.0)
    assert results["cell_machines"] == [("unrecorded machines", 6)]  # cells from before records named their machine
    entry = results["table"]["t"]["lora"]
    assert entry["lrs"] == [1e-3, 3e-4]
    assert entry["test_mean"] == pytest.approx(0.83)
    assert entry["test_std"] == pytest.approx(torch.tensor([0.81, 0.85]).std().item())
    assert entry["grid_cpu_seconds"] == 6.0
    # the chosen cells' means, all over the same seeds; within a point of the best at half its step
    assert (entry["steps"], entry["best_step"], entry["near_best_step"]) == (30, 20, 10)


def _tiny_task() -> Task:
    return Task("t", ["no", "yes"], [("a", 0)], [("b", 1)], [("c", 0), ("d", 1)])


@pytest.mark.parametrize("accuracies, edge, chosen", [
    ({0: (0.9, 0.8, 0.7), 1: (0.8, 0.7, 0.6)}, "lowest", "0.000333"),
    ({0: (0.7, 0.8, 0.9), 1: (0.5, 0.6, 0.7)}, "highest", "0.003"),
    ({0: (0.9, 0.8, 0.7), 1: (0.7, 0.8, 0.6)}, None, "0.000333 (1), 0.001 (1)"),  # seed 1 chose the middle
    ({0: (0.9, 0.8, 0.7), 1: (0.8, 0.8, 0.6)}, None, "0.000333"),  # seed 1's lowest rate won only a tie
    ({0: (0.9, 0.8, 0.7), 1: (0.8, 0.7, 0.9)}, None, "0.000333 (1), 0.003 (1)"),  # different ends
])
def test_the_report_names_a_grid_end_chosen_in_every_seed(tmp_path, accuracies, edge, chosen):
    study = Study("b", ["t"], [parse_method("lora")], BUDGETS["full"].with_overrides(seeds=(0, 1)), tmp_path)
    records = [_record("t", "lora", lr, seed, accuracies[seed][i], 0.5)
               for seed in (0, 1) for i, lr in enumerate((3.33e-4, 1e-3, 3e-3))]
    results = summarize(study, records, [], {"t": _tiny_task()}, 0.0)
    assert results["table"]["t"]["lora"]["edge"] == edge
    write_report(tmp_path, results)
    text = (tmp_path / "report.md").read_text()
    assert (f"seeds, so the best rate may lie beyond it: lora on t (the {edge})." in text) == (edge is not None)
    widened = {"lowest": "`--rates lora=1/9,1/3,1,3`", "highest": "`--rates lora=1/3,1,3,9`"}.get(edge)
    assert (f"To try one rate beyond: {widened}." in text) == (edge is not None)
    assert f"when they differ):\n\n| task | lora |\n|---|---|\n| t | {chosen} |\n" in text
    two_rates = summarize(study, [r for r in records if r["lr"] != 3e-3], [], {"t": _tiny_task()}, 0.0)
    assert two_rates["table"]["t"]["lora"]["edge"] is None  # with two rates every choice is an end


def test_the_report_widens_a_grid_at_both_ends_when_tasks_chose_both(tmp_path):
    budget = BUDGETS["full"].with_overrides(seeds=(0,), method_rate_factors=(("lora", (1 / 3, 1.0, 3.0, 9.0)),))
    study = Study("b", ["t", "u"], [parse_method("lora")], budget, tmp_path)
    lrs = budget.rates(parse_method("lora"))
    records = [_record(task, "lora", lr, 0, accuracy, 0.5) for task, accuracies in (("t", (0.9, 0.8, 0.7, 0.6)),
                                                                                     ("u", (0.6, 0.7, 0.8, 0.9)))
               for lr, accuracy in zip(lrs, accuracies)]
    write_report(tmp_path, summarize(study, records, [], {"t": _tiny_task(), "u": _tiny_task()}, 0.0))
    text = (tmp_path / "report.md").read_text()
    assert "the one seed, so the best rate may lie beyond it: lora on t (the lowest); lora on u (the highest)." in text
    assert "To try one rate beyond: `--rates lora=1/9,1/3,1,3,9,27`." in text


ONE_RATE, CHOSEN = "The learning rate of each method:", "The learning rate chosen on validation (with the number"


@pytest.mark.parametrize("shared, own, words, title", [
    ((1.0,), (), "each method's default learning rate", ONE_RATE),
    ((1.0,), (("ft", (3.0,)),), "one learning rate per method (ft: default ×3; lora, prefix: default ×1)", ONE_RATE),
    ((1 / 3, 1.0, 3.0), (("prefix", (1 / 9, 1 / 3, 1.0, 3.0)),),
     "the learning-rate grid (ft, lora: default ×1/3, ×1 and ×3; prefix: default ×1/9, ×1/3, ×1 and ×3), chosen by "
     "validation accuracy", CHOSEN),
])
def test_the_report_names_the_rates_each_method_tried(tmp_path, shared, own, words, title):
    budget = BUDGETS["quick"].with_overrides(rate_factors=shared, method_rate_factors=own)
    methods = [parse_method(name) for name in ("ft", "lora", "prefix")]
    study = Study("b", ["t"], methods, budget, tmp_path)
    records = [_record("t", m.name, lr, 0, 0.5, 0.5) for m in methods for lr in budget.rates(m)]
    write_report(tmp_path, summarize(study, records, [], {"t": _tiny_task()}, 0.0))
    text = (tmp_path / "report.md").read_text()
    assert f"1 seed(s); {words}; test accuracy" in text
    other = CHOSEN if title == ONE_RATE else ONE_RATE
    assert title in text and other not in text


def test_the_report_title_names_what_the_command_changed_in_the_budget(tmp_path):
    budget = BUDGETS["full"].with_overrides(seeds=(0,), epochs=10, batch_size=16, train_examples=1000)
    study = Study("b", ["t"], [parse_method("lora")], budget, tmp_path)
    records = [_record("t", "lora", lr, 0, 0.5, 0.5) for lr in budget.rates(parse_method("lora"))]
    write_report(tmp_path, summarize(study, records, [], {"t": _tiny_task()}, 0.0))
    assert ("# Delta-tuning study: b (full budget; train examples 1,000 instead of all; epochs 10 instead of 5; "
            "batch size 16 instead of 32)\n") in (tmp_path / "report.md").read_text()


def test_combinations_and_grids():
    assert [m.name for m in combinations()][:4] == ["none", "soft_prompt", "bitfit", "adapter"]
    assert parse_method("soft_prompt+adapter").rates(3.0) == {"soft_prompt": 0.09, "adapter": 3e-3, "head": 0.09}
    assert BUDGETS["quick"].rates(parse_method("ft")) == (5e-5,)
    assert BUDGETS["full"].rates(parse_method("bitfit")) == (3.33e-4, 1e-3, 3e-3)
    assert BUDGETS["full"].rates(parse_method("soft_prompt")) == (1e-2, 3e-2, 9e-2)


def test_a_label_word_study_records_its_lead_tokens_and_refuses_a_folder_from_before_them(tmp_path, minilm_path,
                                                                                          capsys):
    backbone = tmp_path / "llama-bos"  # a tiny decoder whose tokenizer (MiniLM's) puts [CLS] first
    tokenizer = transformers.AutoTokenizer.from_pretrained(minilm_path)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=64)).save_pretrained(backbone)
    tokenizer.save_pretrained(backbone)
    out = tmp_path / "study"
    options = ["--objective", "label-words", "--tasks", "trec", "--methods", "lora", "--memory-batches", "none"]
    assert _study(backbone, out, *options) == 0
    protocol = json.loads((out / "study.json").read_text())
    assert protocol["lead_tokens"] == [tokenizer.cls_token_id]

    del protocol["lead_tokens"]  # as a study begun before label words put them first
    (out / "study.json").write_text(json.dumps(protocol))
    capsys.readouterr()
    assert _study(backbone, out, *options) == 2
    assert "holds a study with other settings (lead_tokens differ)" in capsys.readouterr().err
