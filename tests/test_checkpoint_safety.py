"""Saving never loses a file: other files stay, symlinks are followed, kills leave the old or the new checkpoint."""

import json
import os
import random
import signal
import stat
import subprocess
import sys
import textwrap
import time
import warnings

import pytest
import torch

from deltatune import DeltaBase, LoraModel
from deltatune.checkpoint import CONFIG_FILE, WEIGHTS_FILE, read_config, read_tensors

from conftest import first_output, tiny_batch, tiny_model


def _lora(scale: float = 1.0) -> LoraModel:
    delta = LoraModel(tiny_model("bert"), ["query"])
    with torch.no_grad():
        for parameter in delta.delta_parameters():
            parameter.fill_(scale)
    return delta


def test_saving_over_a_checkpoint_keeps_the_other_files_in_its_folder(tmp_path):
    folder = tmp_path / "ckpt"
    _lora(1.0).save_finetuned(folder)
    (folder / "NOTES.md").write_text("my notes")
    (folder / "runs").mkdir()
    _lora(2.0).save_finetuned(folder)
    assert (folder / "NOTES.md").read_text() == "my notes" and (folder / "runs").is_dir()
    assert sorted(p.name for p in folder.iterdir()) == sorted(["NOTES.md", "runs", CONFIG_FILE, WEIGHTS_FILE])
    assert all(float(t.flatten()[0]) == 2.0 for t in read_tensors(folder).values())


def test_a_symlinked_checkpoint_folder_is_written_through(tmp_path):
    real = tmp_path / "real"
    _lora(1.0).save_finetuned(real)
    link = tmp_path / "link"
    link.symlink_to(real, target_is_directory=True)
    _lora(3.0).save_finetuned(link)
    assert link.is_symlink() and all(float(t.flatten()[0]) == 3.0 for t in read_tensors(real).values())


def test_leftovers_of_killed_saves_are_removed_by_the_next_save(tmp_path):
    folder = tmp_path / "ckpt"
    _lora().save_finetuned(folder)
    dead = 2**22 + 12345  # above any pid this machine hands out
    leftovers = [tmp_path / f".ckpt.tmp-{dead}-abcdef", tmp_path / f".ckpt.old-{dead}",
                 folder / f".{WEIGHTS_FILE}.tmp-{dead}-0a0b0c", folder / f".{CONFIG_FILE}.tmp-{dead}-0a0b0c"]
    for path in leftovers[:2]:
        path.mkdir()
        (path / WEIGHTS_FILE).write_text("half")
    for path in leftovers[2:]:
        path.write_text("half")
    unrelated = tmp_path / f".other.tmp-{dead}-abcdef"
    unrelated.mkdir()
    _lora().save_finetuned(folder)
    assert not any(path.exists() for path in leftovers)
    assert unrelated.exists(), "only this checkpoint's leftovers are removed"


def test_files_follow_the_umask_so_others_can_read_a_shared_checkpoint(tmp_path):
    old = os.umask(0o022)
    try:
        folder = _lora().save_finetuned(tmp_path / "shared")
    finally:
        os.umask(old)
    assert stat.S_IMODE(folder.stat().st_mode) == 0o755
    assert {stat.S_IMODE((folder / name).stat().st_mode) for name in (CONFIG_FILE, WEIGHTS_FILE)} == {0o644}


def test_a_crash_between_the_two_replacements_leaves_the_new_checkpoint(tmp_path, monkeypatch):
    folder = tmp_path / "ckpt"
    _lora(1.0).save_finetuned(folder)
    real_replace, calls = os.replace, []

    def crash_after_the_weights(source, target):
        calls.append(target)
        if len(calls) == 2:
            raise KeyboardInterrupt  # as if killed right after the weights were replaced
        real_replace(source, target)

    monkeypatch.setattr(os, "replace", crash_after_the_weights)
    new = _lora(4.0)
    new.config.lora_alpha = 4.0
    with pytest.raises(KeyboardInterrupt):
        new.save_finetuned(folder)
    monkeypatch.undo()
    assert json.loads((folder / CONFIG_FILE).read_text())["config"]["lora_alpha"] == 16  # the old file is still there
    with pytest.warns(UserWarning, match="belongs to an earlier save than the weights"):
        assert read_config(folder)["config"]["lora_alpha"] == 4.0
    assert [p.name for p in folder.iterdir() if p.name.startswith(".")] == [], "staged files removed on the way out"
    model = tiny_model("bert")
    with pytest.warns(UserWarning, match="earlier save"):
        DeltaBase.from_finetuned(folder, model)
    batch = tiny_batch("bert")
    torch.testing.assert_close(first_output(model, batch), first_output(new.backbone_model, batch))


SAVER = textwrap.dedent("""
    import sys, torch
    sys.path.insert(0, {tests!r})
    from conftest import tiny_model
    from deltatune import LoraModel
    delta = LoraModel(tiny_model("bert"), ["query", "value"], lora_r=32)
    for k in range(1, 10**6):
        with torch.no_grad():
            for parameter in delta.delta_parameters():
                parameter.fill_(k)
        delta.config.lora_alpha = float(k)  # the config says which weights belong to it
        delta.save_finetuned({folder!r})
        print(k, flush=True)
""")


def test_killed_saves_leave_a_complete_pair_and_never_touch_other_files(tmp_path):
    folder = tmp_path / "ckpt"
    _lora().save_finetuned(folder)
    (folder / "NOTES.md").write_text("keep")
    script = SAVER.format(tests=str(os.path.dirname(__file__)), folder=str(folder))
    rng = random.Random(0)
    kills = 4  # each kill is a fresh process (imports torch): a few seconds each
    for _ in range(kills):
        child = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
        child.stdout.readline()  # at least one save finished
        time.sleep(rng.uniform(0.0, 0.3))
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
        child.stdout.close()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # a kill between the two replacements is reported, and read right
            config = read_config(folder)
        tensors = read_tensors(folder)
        values = {float(t.flatten()[0]) for t in tensors.values()}
        assert values == {config["config"]["lora_alpha"]}, (values, config["config"], os.listdir(folder))
        assert (folder / "NOTES.md").read_text() == "keep"
    _lora().save_finetuned(folder)
    assert sorted(p.name for p in folder.iterdir()) == sorted(["NOTES.md", CONFIG_FILE, WEIGHTS_FILE]), (
        os.listdir(folder))
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], os.listdir(tmp_path)


DIES_WHILE_WRITING = textwrap.dedent("""
    import os, sys
    from pathlib import Path
    sys.path.insert(0, {tests!r})
    from conftest import tiny_model
    from deltatune import LoraModel, checkpoint

    def save_file(tensors, target, metadata):  # as safetensors does: a temporary file beside the target
        (Path(target).parent / ".tmpXy12Zw").write_bytes(b"half")
        os._exit(9)  # killed while writing

    checkpoint.save_file = save_file
    LoraModel(tiny_model("bert"), ["query"]).save_finetuned({folder!r})
""")


def test_a_kill_inside_the_tensor_writer_leaves_nothing_in_the_checkpoint_folder(tmp_path):
    folder = tmp_path / "ckpt"
    _lora().save_finetuned(folder)
    script = DIES_WHILE_WRITING.format(tests=str(os.path.dirname(__file__)), folder=str(folder))
    assert subprocess.run([sys.executable, "-c", script], timeout=120).returncode == 9
    left = sorted(p.name for p in folder.iterdir())
    assert left[1:] == [CONFIG_FILE, WEIGHTS_FILE] and left[0].startswith(f".{WEIGHTS_FILE}.tmp-"), left
    assert (folder / left[0] / ".tmpXy12Zw").exists(), "the writer's own temporary file is in the staging folder"
    _lora().save_finetuned(folder)  # and the next save removes the dead save's staging folder
    assert not [p for p in tmp_path.rglob(".*")], list(tmp_path.rglob("*"))


def _save_in_step(root, barrier, errors, which: int) -> None:
    from deltatune import checkpoint

    config = {"format_version": 1, "delta_type": "lora", "config": {}, "positions": [], "backbone": {}, "who": which}
    for i in range(20):
        barrier.wait()  # both processes create folder i at the same moment
        try:
            checkpoint.write(root / f"c{i}", config, {"t": torch.full((4,), float(which))})
        except Exception as error:  # noqa: BLE001 - reported to the test
            errors.put(f"{type(error).__name__}: {error}")


def test_two_processes_saving_to_one_folder_both_succeed_and_leave_a_matching_pair(tmp_path):
    import multiprocessing

    context = multiprocessing.get_context("fork")
    barrier, errors = context.Barrier(2), context.Queue()
    workers = [context.Process(target=_save_in_step, args=(tmp_path, barrier, errors, w)) for w in (1, 2)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=120)
    found = [errors.get() for _ in range(errors.qsize())]
    assert found == [] and all(w.exitcode == 0 for w in workers)
    for i in range(20):  # whichever save came last, its weights and config belong together
        assert read_tensors(tmp_path / f"c{i}")["t"][0].item() == read_config(tmp_path / f"c{i}")["who"]
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]
