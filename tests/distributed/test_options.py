"""The distributed options, checked in one process: what each is refused with, and what accumulation keeps."""

from __future__ import annotations

import json

import pytest

from deltatune.cli import main
from deltatune.distributed import World, make_strategy
from deltatune.distributed.accelerate_config import requested
from deltatune.training.loop import split


def test_micro_batches_cover_the_rows_in_order_and_some_may_be_empty():
    rows = list(range(7))
    assert split(rows, 3) == [[0, 1, 2], [3, 4], [5, 6]]
    assert split(rows[:2], 3) == [[0], [1], []]
    assert sum(split(rows, 4), []) == rows


@pytest.mark.parametrize("name, world, options, message", [
    ("zero9", World(), {}, "unknown strategy 'zero9'; choose one of single, ddp, fsdp, deepspeed-zero2"),
    ("single", World(0, 2), {}, "2 processes were started but --strategy is single"),
    ("ddp", World(), {"precision": "fp16"}, "unknown precision 'fp16'; choose fp32 or bf16"),
    ("fsdp", World(), {"deepspeed_config": "x.json"}, "--deepspeed-config is for --strategy deepspeed-zero2 or"),
])
def test_bad_strategy_options_are_named(name, world, options, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        make_strategy(name, world, **options)


def test_a_deepspeed_config_may_add_settings_but_not_contradict_the_command_line(tmp_path):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"gradient_clipping": 5.0}))
    with pytest.raises(ValueError, match=r"sets gradient_clipping=5.0, but this run uses 1.0"):
        make_strategy("deepspeed-zero2", World(), deepspeed_config=path)
    path.write_text(json.dumps({"gradient_accumulation_steps": 4}))  # agrees with the run: accepted
    assert make_strategy("deepspeed-zero2", World(), deepspeed_config=path, accumulation=4).config[
        "gradient_accumulation_steps"] == 4
    with pytest.raises(ValueError, match=r"sets gradient_accumulation_steps=4, but this run uses 2 \(from --grad-acc"):
        make_strategy("deepspeed-zero2", World(), deepspeed_config=path, accumulation=2)
    path.write_text(json.dumps({"zero_optimization": {"stage": 3}}))
    with pytest.raises(ValueError, match="asks for ZeRO stage 3, --strategy for 2"):
        make_strategy("deepspeed-zero2", World(), deepspeed_config=path)
    path.write_text("[1]")
    with pytest.raises(ValueError, match="must be a JSON object"):
        make_strategy("deepspeed-zero3", World(), deepspeed_config=path)
    path.write_text(json.dumps({"zero_optimization": {"offload_param": {"device": "cpu"}}}))
    config = make_strategy("deepspeed-zero3", World(), deepspeed_config=path).config
    assert config["zero_optimization"] == {"offload_param": {"device": "cpu"}, "stage": 3}


def test_accumulated_micro_batches_take_the_steps_of_whole_batches(tiny_backbone, tmp_path):
    options = ["--backbone", str(tiny_backbone), "--max-train-examples", "24", "--max-eval-examples", "8",
               "--batch-size", "8", "--max-length", "16", "--delta", "bitfit", "--lr", "1e-2"]
    for accumulation in ("1", "3"):
        assert main(["train", *options, "--grad-accum", accumulation, "--out", str(tmp_path / accumulation)]) == 0
    whole, accumulated = (json.loads((tmp_path / n / "metrics.json").read_text()) for n in ("1", "3"))
    assert max(abs(a - b) for a, b in zip(whole["step_losses"], accumulated["step_losses"])) < 1e-6
    assert whole["test"] == accumulated["test"]


def test_grad_accum_must_be_positive(minilm_path, tmp_path, capsys):
    assert main(["train", "--backbone", str(minilm_path), "--grad-accum", "0", "--out", str(tmp_path)]) == 2
    assert "grad_accum must be at least 1, got 0" in capsys.readouterr().err


def test_an_accelerate_config_chooses_the_engine_and_what_it_cannot_run_is_named():
    assert requested({}) == {}
    assert requested({"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2", "ACCELERATE_MIXED_PRECISION": "bf16"}) == \
        {"strategy": "fsdp", "precision": "bf16"}
    assert requested({"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "3",
                      "ACCELERATE_DEEPSPEED_CONFIG_FILE": "ds.json"}) == \
        {"strategy": "deepspeed-zero3", "deepspeed_config": "ds.json"}
    with pytest.raises(ValueError, match="FSDP version 1; deltatune trains with FSDP2"):
        requested({"ACCELERATE_USE_FSDP": "true"})
    with pytest.raises(ValueError, match="ZeRO stage 1; deltatune runs stages 2 and 3"):
        requested({"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "1"})
    with pytest.raises(ValueError, match="fp16 mixed precision; deltatune trains in fp32 or bf16"):
        requested({"ACCELERATE_MIXED_PRECISION": "fp16"})
