"""Use an unmodified ``transformers.Trainer``: this callback writes the delta checkpoint beside each of its saves.

``delta.freeze_module(set_state_dict=True)`` already makes the Trainer's own ``model.safetensors`` hold only the
trainable tensors; the callback adds ``<checkpoint>/delta/`` in deltatune's format, which
``DeltaBase.from_finetuned`` (or ``AutoDeltaModel.from_finetuned``) loads onto a fresh backbone.
"""

from __future__ import annotations

from pathlib import Path

from transformers import TrainerCallback

from .base import DeltaBase

PREFIX_CHECKPOINT_DIR = "checkpoint"  # the Trainer's folder name: <output_dir>/checkpoint-<step>


class DeltaCheckpointCallback(TrainerCallback):
    def __init__(self, delta: DeltaBase, folder_name: str = "delta") -> None:
        self.delta, self.folder_name = delta, folder_name

    def on_save(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            checkpoint = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
            self.delta.save_finetuned(checkpoint / self.folder_name)
        return control
