"""The benchmark harness in its smoke form (tiny random models, one repeat): output format, not speed."""

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks import (compare, compiled_generation, continuous, decode_step, label_words, mixed,  # noqa: E402
                        moe_lora, prompt_ablation)

ROW_KEYS = {"benchmark", "setting", "metric", "ours", "peft", "reference", "reference_is", "ours/peft",
            "ours/reference", "note"}


def test_smoke_run_writes_json_and_markdown_with_every_row(tmp_path, capsys):
    results = compare.main(["--smoke", "--out", str(tmp_path)])
    saved = json.loads((tmp_path / "smoke.json").read_text())
    assert saved == json.loads(json.dumps(results))
    assert {"date", "command", "cpu", "cores", "threads", "versions"} <= set(saved["machine"])
    assert set(saved["machine"]["versions"]) == {"torch", "transformers", "peft", "deltatune"}
    rows = saved["rows"]
    assert all(set(r) == ROW_KEYS for r in rows)
    measured = [r for r in rows if r["peft"] is not None]
    assert all(r["ours"] > 0 and r["peft"] > 0 and r["ours/peft"] == round(r["ours"] / r["peft"], 3) for r in measured)
    # PEFT's own failures (its prefix tuning on transformers >= 5.24, say) are reported, never a silent blank.
    failed = [r for r in rows if r["peft"] is None]
    assert all(r["ours/peft"] is None and r["note"].startswith("PEFT fails: ") for r in failed)
    assert all(r["note"] == "" for r in measured)
    kinds = {(r["benchmark"], r["setting"]) for r in rows}
    for setting in ("tiny BERT", "tiny LLaMA"):
        for benchmark in ("training step", "peak memory", "inference", "checkpoint size", "construction"):
            assert (benchmark, setting) in kinds
    assert ("switching", "tiny LLaMA") in kinds
    assert [r["metric"] for r in rows if r["benchmark"] == "training step"][:4] == [
        "lora, s/step", "ia3, s/step", "prefix, s/step", "prompt, s/step"]
    table = (tmp_path / "smoke.md").read_text()
    assert table.count("\n| ") == len(rows) + 1 and table.count("\n- ") == len(failed) and "| ours ÷ PEFT |" in table and saved["machine"]["cpu"] in table


def test_mixed_smoke_run_reports_every_benchmark_with_its_reference(tmp_path):
    results = mixed.main(["--smoke", "--out", str(tmp_path)])
    saved = json.loads((tmp_path / "mixed-smoke.json").read_text())
    assert saved == json.loads(json.dumps(results))
    assert saved["machine"]["command"] == f"python -m benchmarks.mixed --smoke --out {tmp_path}"
    rows = saved["rows"]
    groups: dict[str, dict[str, dict]] = {}
    for row in rows:
        assert row["value"] > 0, row
        groups.setdefault(row["benchmark"], {})[row["variant"]] = row
    encoder, generation, switching, serving = groups.values()
    assert encoder["one LoRA attached"]["ratio"] == 1.0 and len(encoder) == 9
    assert all(r["ratio"] == r["value"] / encoder["one LoRA attached"]["value"] for r in encoder.values())
    assert list(generation) == ["bare", "a forward hook that changes nothing", "ours, LoRA unmerged",
                                "ours, from a bank of 2 (route)", "PEFT, LoRA unmerged"]
    assert all(r["unit"] == "ms/token" and r["ratio_to"] == "bare model" for r in generation.values())
    assert len(switching) == 3 and all(r["unit"] == "ms" and r["ratio"] is None for r in switching.values())
    swap = serving["swap one attached delta per batch of 4"]
    assert len(serving) == 6 and swap["ratio"] == 1.0 and all(r["mean_latency_s"] > 0 for r in serving.values())
    table = (tmp_path / "mixed-smoke.md").read_text()
    assert table.count("\n| ") == len(rows) + 1 and saved["machine"]["cpu"] in table


def test_prompt_ablation_writes_one_row_per_variant(tmp_path, tiny_backbone):
    prompt_ablation.main(["--backbone", str(tiny_backbone), "--tasks", "trec,sms_spam", "--train-examples", "8",
                          "--eval-examples", "8", "--epochs", "1", "--only", "1,3,4", "--work", str(tmp_path / "w"),
                          "--out", str(tmp_path)])
    saved = json.loads((tmp_path / "prompt_ablation.json").read_text())
    assert [row["variant"] for row in saved["rows"]] == [prompt_ablation.VARIANTS[i][0] for i in (0, 2, 3)]
    assert [row["pooling"] for row in saved["rows"]] == ["auto", "auto", "model"]
    assert saved["rows"][1]["results"]["trec"]["trainable_parameters"] == 20 * 32 + 32 * 6 + 6  # prompt + head
    table = (tmp_path / "prompt_ablation.md").read_text()
    assert "| variant | lr | pooling | trec | sms_spam | average test |" in table
    assert table.count("\n| ") == 1 + 3 and saved["machine"]["cpu"] in table


def test_compiled_generation_smoke_run_checks_tokens_and_times_every_variant(tmp_path):
    results = compiled_generation.main(["--smoke", "--out", str(tmp_path)])
    saved = json.loads((tmp_path / "compiled_generation-smoke.json").read_text())
    assert saved == json.loads(json.dumps(results))
    assert [r["variant"] for r in saved["rows"]] == ["bare", "LoRA", "bare, layers compiled", "LoRA, layers compiled"]
    assert saved["rows"][0]["ratio"] == 1.0 and all(r["value"] > 0 for r in saved["rows"])
    # The tuned model compiled beside the bare one runs its own deltas (see tests/test_compile.py).
    assert saved["lora_effect_on_logits"] > 0.01  # so a compiled graph without the LoRA would fail the check below
    for check in saved["compiled_vs_uncompiled"].values():
        assert check["same_tokens"] and check["max_logit_difference"] < 1e-4
    assert "LoRA, layers compiled against uncompiled: same tokens True" in (
        tmp_path / "compiled_generation-smoke.md").read_text()


def test_decode_step_smoke_run_times_every_variant_and_checks_their_tokens(tmp_path):
    results = decode_step.main(["--smoke", "--out", str(tmp_path)])
    saved = json.loads((tmp_path / "decode_step-smoke.json").read_text())
    assert saved == json.loads(json.dumps(results))
    variants = [r["variant"] for r in saved["rows"]]
    assert variants[:4] == ["bare", "a forward hook that changes nothing", "LoRA attached", "LoRA merged"]
    assert variants[4].startswith("bound, not in the library") and variants[5:] == ["merge(exact=True)", "unmerge()"]
    assert saved["rows"][0]["ratio"] == 1.0 and all(r["value"] > 0 for r in saved["rows"])
    assert all(r["samples"] == decode_step.STEPS for r in saved["rows"][:5])
    assert saved["same_tokens_as_attached"] == dict.fromkeys(variants[3:5], True)
    assert saved["lora_effect_on_logits"] > 0.01


def test_continuous_smoke_run_serves_the_stream_both_ways_with_the_same_tokens(tmp_path):
    results = continuous.main(["--smoke", "--out", str(tmp_path)])
    saved = json.loads((tmp_path / "continuous-smoke.json").read_text())
    assert saved == json.loads(json.dumps(results))
    assert [r["variant"] for r in saved["rows"]] == ["dynamic batching (up to 16 rows)",
                                                     "continuous batching (up to 16 rows)"]
    assert saved["rows"][0]["ratio"] == 1.0
    assert all(r["value"] > 0 and r["mean_latency_s"] > 0 and r["p95_latency_s"] > 0 for r in saved["rows"])
    assert saved["same_tokens"] is True


def test_label_words_smoke_run_times_both_heads_after_checking_they_agree(tmp_path):
    results = label_words.main(["--smoke", "--out", str(tmp_path)])
    saved = json.loads((tmp_path / "label_words-smoke.json").read_text())
    assert saved == json.loads(json.dumps(results))
    assert [r["variant"] for r in saved["rows"]] == [
        "head at the label words (deltatune)", "head at every position (transformers' loss)",
        "head at each prompt's end (deltatune)", "head at every position"]
    assert [r["ratio"] for r in saved["rows"]][1::2] == [1.0, 1.0] and all(r["value"] > 0 for r in saved["rows"])
    kept, every = saved["loss_kept_vs_every_position"]
    assert abs(kept - every) < 1e-5 and saved["same_predictions"] is True


def test_moe_lora_smoke_run_checks_ours_against_peft_before_timing(tmp_path):
    result = moe_lora.main(["--smoke", "--out", str(tmp_path)])
    assert result["ours_vs_peft_max_logit_difference"] <= 1e-5 < result["lora_effect_on_logits"]
    assert {(row["benchmark"].split(",")[0], row["variant"]) for row in result["rows"]} == {
        ("forward", "bare"), ("forward", "ours"), ("forward", "PEFT"), ("training step (forward + backward)", "ours"),
        ("training step (forward + backward)", "PEFT"), ("greedy decode step", "bare"), ("greedy decode step", "ours"),
        ("greedy decode step", "PEFT")}
    assert (tmp_path / "moe_lora-smoke.md").read_text().startswith("# LoRA on fused MoE expert weights")
