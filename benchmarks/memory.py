"""Peak resident memory of training steps, measured in a fresh process per variant:

    python -m benchmarks.memory SETTING_INDEX VARIANT BATCH [--smoke]

prints ``{"before_mb": …, "peak_mb": …}``: RSS with the model built, and the peak RSS over three training steps
(the kernel's high-water mark is reset after building, so loading does not count)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from deltatune.study.memory import rss_mb


def main(argv: list[str]) -> None:
    from .models import quiet, settings
    from .training import build_training

    index, variant, batch = int(argv[0]), argv[1], int(argv[2])
    torch.set_num_threads(2)
    quiet()
    setting = settings("--smoke" in argv)[index]
    step = build_training(setting, variant, setting.inputs(batch))
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak (VmHWM) to the current RSS
    before = rss_mb("VmRSS")
    for _ in range(3):
        step()
    print(json.dumps({"before_mb": round(before, 1), "peak_mb": round(rss_mb("VmHWM"), 1)}))


if __name__ == "__main__":
    main(sys.argv[1:])
