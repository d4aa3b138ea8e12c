"""The engine an ``accelerate launch`` config asks for, read from the variables the launcher sets, so
``accelerate launch --config_file fsdp.yaml -m deltatune train`` trains with FSDP2 without repeating it.

``--strategy``, ``--precision`` and ``--deepspeed-config`` on the command line win over the config.
"""

from __future__ import annotations

import os


def requested(environment: os._Environ | dict | None = None) -> dict[str, str]:
    """``strategy``, ``precision`` and ``deepspeed_config`` as the launcher's config sets them (only those set)."""
    env = os.environ if environment is None else environment
    found: dict[str, str] = {}
    if env.get("ACCELERATE_USE_FSDP", "").lower() == "true":
        if env.get("FSDP_VERSION", "1") != "2":
            raise ValueError("the accelerate config asks for FSDP version 1; deltatune trains with FSDP2 "
                             "(fully_shard): set fsdp_version: 2 in the fsdp_config")
        found["strategy"] = "fsdp"
    if env.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true":
        stage = env.get("ACCELERATE_DEEPSPEED_ZERO_STAGE", "2")
        if stage not in ("2", "3"):
            raise ValueError(f"the accelerate config asks for ZeRO stage {stage}; deltatune runs stages 2 and 3")
        found["strategy"] = f"deepspeed-zero{stage}"
        if env.get("ACCELERATE_DEEPSPEED_CONFIG_FILE") not in (None, "", "none"):
            found["deepspeed_config"] = env["ACCELERATE_DEEPSPEED_CONFIG_FILE"]
    precision = env.get("ACCELERATE_MIXED_PRECISION", "no")
    if precision == "bf16":
        found["precision"] = "bf16"
    elif precision not in ("no", ""):
        raise ValueError(f"the accelerate config asks for {precision} mixed precision; deltatune trains in fp32 or bf16")
    return found
