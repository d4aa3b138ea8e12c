"""The regression store: every method on every tiny family, with every weight set deterministically (not by
transformers' initialisers, which change between releases), must give the outputs stored in the repository within
1e-5.  An engine change or a dependency update that moves a result fails here; run at both ends of the supported
transformers range, it also shows that every release gives the same numbers.

After a deliberate change of results, rewrite the store and say why in the commit:
``DELTATUNE_UPDATE_REGRESSION=1 .venv/bin/python -m pytest tests/test_regression.py``.
"""

import os
import zlib
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import FAMILIES, first_output, tiny_batch, tiny_model
from methods.test_families import METHODS, build

pytestmark = pytest.mark.compat  # the same numbers at both ends of the supported transformers range

STORE = Path(__file__).parent / "regression" / "outputs.safetensors"
UPDATE = os.environ.get("DELTATUNE_UPDATE_REGRESSION") == "1"
CASES = [(family, method) for family in sorted(FAMILIES) for method in sorted(METHODS)]
KEPT_LOGITS = 16  # of each position's vocabulary or classes: enough to see any drift, small enough to commit


def _fill(model: torch.nn.Module) -> None:
    """Every parameter (backbone and delta) from a generator seeded by its name."""
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            generator = torch.Generator().manual_seed(zlib.crc32(name.encode()))
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.1)


def _outputs(family: str, method: str) -> torch.Tensor:
    model = tiny_model(family)
    build(method, family, model)
    _fill(model)
    return first_output(model, tiny_batch(family))[..., :KEPT_LOGITS].contiguous()


@pytest.fixture(scope="module")
def stored():
    if UPDATE:
        outputs = {f"{family}/{method}": _outputs(family, method) for family, method in CASES}
        STORE.parent.mkdir(exist_ok=True)
        save_file(outputs, STORE)
    if not STORE.exists():
        pytest.fail(f"{STORE} is missing; write it with DELTATUNE_UPDATE_REGRESSION=1")
    return load_file(STORE)


@pytest.mark.parametrize("family, method", CASES)
def test_outputs_match_the_store(family, method, stored):
    key = f"{family}/{method}"
    assert key in stored, f"no stored outputs for {key}; rewrite the store with DELTATUNE_UPDATE_REGRESSION=1"
    # float32 round-off of one forward pass is ~1e-6 here; a change of behaviour is orders of magnitude larger.
    torch.testing.assert_close(_outputs(family, method), stored[key], rtol=0, atol=1e-5)
