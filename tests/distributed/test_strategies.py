"""`deltatune train` on two processes (torchrun, gloo) with each engine, against one process on the same global
batches: the loss curve, the saved delta and its merge must agree; a killed run resumes; a killed rank is an error.

Tolerances: step losses within 1e-6, relative to losses above 1 (float32 reductions in another order), saved tensors
within 1e-4. Ten AdamW steps at lr 1e-2 amplify the rounding differences of sharded reductions: up to 8e-6 in general,
and 2.4e-5 on one element of 262,144 (a prefix MLP under fully partitioned ZeRO-3, on an AVX-512 machine), where a
near-zero gradient makes Adam's normalised step sensitive to the last bit.  A lost gradient is far outside it: AdamW's
first step moves every element whose gradient is non-zero by lr = 1e-2 (m̂/√v̂ = ±1), a hundred times the tolerance.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file

from deltatune.cli import main

pytestmark = pytest.mark.distributed

TIMEOUT = 240  # seconds for one torchrun; a run takes about 10 here
RUN = ["--max-train-examples", "40", "--max-eval-examples", "20", "--batch-size", "8", "--epochs", "2",
       "--lr", "1e-2"]
FULLY_PARTITIONED = {"zero_optimization": {"stage3_param_persistence_threshold": 0}}  # no small parameter kept whole


def torchrun(*arguments: str, processes: int = 2, env: dict | None = None, **popen) -> subprocess.Popen:
    """``deltatune`` on ``processes`` ranks; a rank fails if a process-group thread outlives its command."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}",
               str(Path(__file__).with_name("deltatune_leaving_no_threads.py")), *arguments]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}, **popen)


def run_ok(*arguments: str) -> str:
    child = torchrun(*arguments)
    output, _ = child.communicate(timeout=TIMEOUT)
    assert child.returncode == 0, output[-3000:]
    return output


def single(backbone: Path, out: Path, *extra: str) -> Path:
    if not (out / "metrics.json").exists():
        assert main(["train", "--backbone", str(backbone), *RUN, *extra, "--out", str(out)]) == 0
    return out


def distributed(backbone: Path, out: Path, strategy: str, *extra: str) -> Path:
    run_ok("train", "--backbone", str(backbone), *RUN, *extra, "--strategy", strategy, "--out", str(out))
    return out


def assert_same_run(reference: Path, other: Path, tensors_within: float = 1e-4, steps: int = 10) -> None:
    ours, theirs = (json.loads((f / "metrics.json").read_text()) for f in (reference, other))
    assert len(ours["step_losses"]) == len(theirs["step_losses"]) == steps
    assert max(abs(a - b) / max(1.0, abs(a)) for a, b in zip(ours["step_losses"], theirs["step_losses"])) < 1e-6
    assert ours["best_epoch"] == theirs["best_epoch"] and ours["test"] == theirs["test"]
    a, b = (load_file(f / "delta" / "delta_model.safetensors") for f in (reference, other))
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].shape == b[key].shape and a[key].dtype == b[key].dtype, key  # whole tensors, never a shard
        torch.testing.assert_close(b[key], a[key], atol=tensors_within, rtol=0, msg=key)


@pytest.fixture(scope="module")
def reference(tiny_backbone, tmp_path_factory):
    return single(tiny_backbone, tmp_path_factory.mktemp("single") / "run")


# ZeRO-3 partitions the backbone while transformers loads it (HfDeepSpeedConfig): checked across its range too.
@pytest.mark.parametrize("strategy", ["ddp", "fsdp", "deepspeed-zero2",
                                      pytest.param("deepspeed-zero3", marks=pytest.mark.compat)])
def test_two_processes_train_what_one_trains(strategy, tiny_backbone, reference, tmp_path):
    extra = ["--grad-accum", "2"]  # two micro-batches per rank and step: the same global batch
    if strategy == "deepspeed-zero3":
        (tmp_path / "ds.json").write_text(json.dumps(FULLY_PARTITIONED))
        extra += ["--deepspeed-config", str(tmp_path / "ds.json")]
    out = distributed(tiny_backbone, tmp_path / "run", strategy, *extra)
    assert_same_run(reference, out)
    record = json.loads((out / "training.json").read_text())
    assert (record["strategy"], record["processes"]) == (strategy, 2)
    # the run folder is written once, by rank 0, with nothing left to resume from
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in reference.iterdir())
    # merged offline, the delta trained on shards gives the model the single-process delta gives
    logits = [_merged_logits(tiny_backbone, run, tmp_path / f"merged-{i}") for i, run in enumerate((reference, out))]
    torch.testing.assert_close(logits[1], logits[0], atol=1e-5, rtol=0)


def _merged_logits(backbone: Path, run: Path, out: Path) -> torch.Tensor:
    assert main(["merge", "--backbone", str(backbone), "--delta", str(run), "--out", str(out)]) == 0
    model = transformers.AutoModelForSequenceClassification.from_pretrained(out).eval()
    assert not any("deltas" in name for name, _ in model.named_parameters())  # a plain transformers checkpoint
    tokens = transformers.AutoTokenizer.from_pretrained(out)(["a moving film", "dull"], padding=True,
                                                            return_tensors="pt")
    with torch.no_grad():
        return model(**tokens).logits


@pytest.mark.parametrize("method", ["prefix", "soft_prompt"])
def test_zero3_on_a_fully_partitioned_backbone_trains_deltas_read_outside_their_module(method, tiny_backbone,
                                                                                         tmp_path):
    """Prefix tables and soft prompts are read by the modules they rewrite the call of: each delta's parameters are
    gathered with its host module's, in the forward and the backward."""
    (tmp_path / "ds.json").write_text(json.dumps(FULLY_PARTITIONED))
    reference = single(tiny_backbone, tmp_path / "single", "--delta", method)
    out = distributed(tiny_backbone, tmp_path / "zero3", "deepspeed-zero3", "--delta", method,
                      "--deepspeed-config", str(tmp_path / "ds.json"))
    assert_same_run(reference, out)


def test_fsdp_refuses_parameters_shared_across_layers(tiny_backbone, tmp_path):
    child = torchrun("train", "--backbone", str(tiny_backbone), *RUN, "--delta", "compacter", "--strategy", "fsdp",
                     "--out", str(tmp_path / "run"))
    output, _ = child.communicate(timeout=TIMEOUT)
    assert child.returncode != 0
    assert "is shared by several BertLayer blocks, which FSDP2 shards apart" in output
    assert "--strategy ddp, deepspeed-zero2 or deepspeed-zero3" in output
    assert not (tmp_path / "run" / "training.json").exists()  # refused before anything was written


LONG = ["--max-train-examples", "400", "--save-steps", "1"]  # 100 steps: time to kill the run mid-way


@pytest.mark.parametrize("strategy", ["fsdp", "deepspeed-zero2"])
def test_a_killed_distributed_run_resumes_to_the_same_result(strategy, tiny_backbone, tmp_path):
    """SIGKILL to every process mid-run (no handler runs); the same command with --resume finishes the run as one
    process does (the optimizer state in last.pt is whole for FSDP2, DeepSpeed's own checkpoint for ZeRO)."""
    reference = single(tiny_backbone, tmp_path / "single", *LONG)
    out = tmp_path / "run"
    arguments = ["train", "--backbone", str(tiny_backbone), *RUN, *LONG, "--strategy", strategy, "--out", str(out)]
    child = torchrun(*arguments)
    deadline = time.time() + TIMEOUT
    while not _saved_step(out) >= 3:
        assert child.poll() is None and time.time() < deadline, "the run ended before it could be killed"
        time.sleep(0.02)
    _kill_all(child)
    step = _saved_step(out)
    assert 3 <= step < 100, step
    assert not (out / "metrics.json").exists()
    run_ok(*arguments, "--resume")
    assert_same_run(reference, out, steps=100)


def _saved_step(out: Path) -> int:
    try:
        return torch.load(out / "last.pt", weights_only=True)["step"]
    except (FileNotFoundError, EOFError, RuntimeError):
        return -1


def _kill_all(child: subprocess.Popen) -> None:
    """The workers, then the launcher."""
    for pid in [*_descendants(child.pid), child.pid]:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    child.communicate(timeout=30)


def _descendants(root: int) -> list[int]:
    """Processes started by ``root`` (the launcher's workers start sessions of their own)."""
    parents = {}
    for entry in Path("/proc").iterdir():
        with contextlib.suppress(OSError, IndexError, ValueError):
            if entry.name.isdigit():
                parents[int(entry.name)] = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
    found, frontier = [], [root]
    while frontier:
        children = [pid for pid, parent in parents.items() if parent in frontier]
        found += children
        frontier = children
    return found


def test_a_killed_rank_is_an_error_not_a_hang(tiny_backbone, tmp_path):
    out = tmp_path / "run"
    child = torchrun("train", "--backbone", str(tiny_backbone), *RUN, *LONG, "--strategy", "ddp", "--out", str(out))
    deadline = time.time() + TIMEOUT
    while _saved_step(out) < 1:
        assert child.poll() is None and time.time() < deadline
        time.sleep(0.05)
    workers = _descendants(child.pid)
    rank1 = [pid for pid in workers if _environment(pid).get("RANK") == "1"]
    assert len(rank1) == 1
    started = time.time()
    os.kill(rank1[0], signal.SIGKILL)
    output, _ = child.communicate(timeout=120)
    assert child.returncode != 0 and time.time() - started < 120
    assert "exitcode: -9" in output and "local_rank: 1" in output
    time.sleep(1)
    assert not [pid for pid in workers if _alive(pid)]  # the other rank was stopped too


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _environment(pid: int) -> dict[str, str]:
    try:
        items = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return {}
    return dict(item.decode(errors="replace").split("=", 1) for item in items if b"=" in item)


@pytest.mark.real
def test_ddp_on_minilm_trains_what_one_process_trains(minilm_path, tmp_path):
    """Real weights: MiniLM-L6 (dropout off, so both runs draw no random masks), LoRA, two processes under DDP."""
    backbone = tmp_path / "minilm-no-dropout"
    shutil.copytree(minilm_path, backbone)
    config = json.loads((backbone / "config.json").read_text())
    config.update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    (backbone / "config.json").write_text(json.dumps(config))
    options = ["--max-train-examples", "48", "--max-eval-examples", "16", "--batch-size", "16", "--epochs", "1",
               "--max-length", "32"]
    assert main(["train", "--backbone", str(backbone), *options, "--out", str(tmp_path / "single")]) == 0
    run_ok("train", "--backbone", str(backbone), *options, "--strategy", "ddp", "--out", str(tmp_path / "ddp"))
    ours, theirs = (json.loads((tmp_path / n / "metrics.json").read_text()) for n in ("single", "ddp"))
    assert max(abs(a - b) for a, b in zip(ours["step_losses"], theirs["step_losses"])) < 1e-5
    assert ours["test"] == theirs["test"]
    a, b = (load_file(tmp_path / n / "delta" / "delta_model.safetensors") for n in ("single", "ddp"))
    for key in a:
        torch.testing.assert_close(b[key], a[key], atol=1e-5, rtol=0, msg=key)


def test_accelerate_launch_with_an_fsdp_config_trains_with_fsdp2(tiny_backbone, reference, tmp_path):
    config = tmp_path / "fsdp.yaml"
    config.write_text("compute_environment: LOCAL_MACHINE\ndistributed_type: FSDP\nfsdp_config:\n  fsdp_version: 2\n"
                      "mixed_precision: 'no'\nnum_machines: 1\nnum_processes: 2\n")
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config), "-m", "deltatune",
               "train", "--backbone", str(tiny_backbone), *RUN, "--out", str(tmp_path / "run")]
    done = subprocess.run(command, capture_output=True, text=True, timeout=TIMEOUT,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    assert "fsdp on 2 processes" in done.stdout
    assert json.loads((tmp_path / "run" / "training.json").read_text())["strategy"] == "fsdp"
    assert_same_run(reference, tmp_path / "run")


def test_a_delta_built_on_an_already_sharded_backbone_is_refused(tiny_backbone, tmp_path):
    """FSDP2 takes the parameters it shards when fully_shard runs: a delta built later would train unsynchronised."""
    script = tmp_path / "after.py"
    script.write_text(
        "import sys, torch.distributed as dist, transformers, deltatune\n"
        "from torch.distributed.fsdp import fully_shard\n"
        "dist.init_process_group('gloo')\n"
        f"model = transformers.AutoModelForSequenceClassification.from_pretrained({str(tiny_backbone)!r})\n"
        "fully_shard(model)\n"
        "try:\n    deltatune.LoraModel(model)\nexcept ValueError as error:\n    print('refused:', error)\n"
        "dist.destroy_process_group()\n")
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=1",
                           str(script)], capture_output=True, text=True, timeout=TIMEOUT)
    assert "refused: FSDPBertForSequenceClassification is already sharded by FSDP2 (fully_shard)" in done.stdout
    assert "build the delta first, then call fully_shard" in done.stdout


def test_zero3_trains_a_decoder_writing_label_words(tiny_decoder, tmp_path):
    """A causal LM (GQA, tied embeddings) on a fully partitioned ZeRO-3 backbone: the objective's own check that the
    model is causal runs a forward pass on the partitioned weights too."""
    (tmp_path / "ds.json").write_text(json.dumps(FULLY_PARTITIONED))
    options = ["--objective", "label-words", "--task", "sms_spam", "--max-length", "32"]
    reference = single(tiny_decoder, tmp_path / "single", *options)
    out = distributed(tiny_decoder, tmp_path / "zero3", "deepspeed-zero3", *options,
                      "--deepspeed-config", str(tmp_path / "ds.json"))
    assert_same_run(reference, out)
