"""Property-based tests of the engine: random sequences of build, attach, detach, merge, unmerge, save/load, dtype
round trips and torch.compile over several deltas of different methods on one tiny model.

Invariants checked after every step: the backbone's own state-dict keys never change; a merge keeps the outputs
(1e-5); a dtype round trip and a compiled model give the same outputs; saving every attached delta and loading them
onto a fresh model reproduces the outputs bit for bit; and at the end, taking every delta off gives the bare model
back (bit for bit unless a merge was undone by subtraction, then within 1e-5).  A second test allows every
operation in every state, on deltas that overlap on one module: each either keeps the invariants or is refused
without changing anything.  Examples are derandomized and bounded, so the suite stays fast and reproducible.
"""

import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from deltatune import AdapterModel, BitFitModel, DeltaBase, IA3Model, LoraModel, PrefixModel, SoftPromptModel

from conftest import first_output, tiny_batch, tiny_model

# Positions chosen so that merges are exact in composition: LoRA and BitFit are additive on the same module; the
# adapter and the call rewrites sit elsewhere (merging under another output rewrite is its own issue).
BUILDERS = {
    "lora": lambda m: LoraModel(m, ["query", "value"], lora_r=2),
    "bitfit": lambda m: BitFitModel(m, ["query", "LayerNorm"]),
    "adapter": lambda m: AdapterModel(m, ["attention.output"], bottleneck_dim=4),
    "soft_prompt": lambda m: SoftPromptModel(m, soft_token_num=2),
    "prefix": lambda m: PrefixModel(m, prefix_token_num=2, reparameterize=False),
}
STEPS = ["build", "detach", "attach", "merge", "unmerge", "save_load", "dtype", "compile"]
BATCH = tiny_batch("bert")


def _output(model):
    return first_output(model, BATCH)


def _randomize(delta: DeltaBase, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in delta.delta_parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.1)


def _reload_all(deltas: list[DeltaBase]) -> torch.Tensor:
    """Outputs of a fresh backbone with every attached delta saved and loaded in creation order."""
    fresh = tiny_model("bert")
    with tempfile.TemporaryDirectory() as folder:
        for i, delta in enumerate(d for d in deltas if d.attached and not d.merged):
            DeltaBase.from_finetuned(delta.save_finetuned(Path(folder) / str(i)), fresh, name=delta.name)
    return _output(fresh)


@settings(max_examples=60, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.sampled_from(STEPS), st.sampled_from(sorted(BUILDERS)), st.integers(0, 7),
                          st.booleans()), min_size=1, max_size=10))
def test_random_lifecycles_keep_every_invariant(steps):
    model = tiny_model("bert")
    bare = _output(model)
    keys = set(model.state_dict())
    deltas: list[DeltaBase] = []
    exact: dict[int, bool] = {}  # per merged delta: were the original weights kept?
    subtracted = False  # an unmerge by subtraction is exact only up to round-off
    for step, method, index, flag in steps:
        delta = deltas[index % len(deltas)] if deltas else None
        before = _output(model)
        prefixed = any(isinstance(d, PrefixModel) and d.attached for d in deltas)
        if (step == "build" or delta is None) and method == "prefix" and prefixed:
            with pytest.raises(ValueError, match="a module takes one Prefix, and one is attached here already"):
                BUILDERS[method](model)
        elif step == "build" or delta is None:
            delta = BUILDERS[method](model)
            _randomize(delta, len(deltas))
            deltas.append(delta)
        elif step == "detach" and (delta.attached or delta.merged):
            subtracted |= delta.merged and not exact[id(delta)]
            delta.detach()
        elif step == "attach" and not delta.attached and isinstance(delta, PrefixModel) and prefixed:
            with pytest.raises(ValueError, match="a module takes one Prefix"):
                delta.attach()
        elif step == "attach" and not delta.attached and not delta.merged:
            delta.attach()
        elif step == "merge" and delta.mergeable and delta.attached and not delta.merged:
            delta.merge(exact=flag)
            exact[id(delta)] = flag
            torch.testing.assert_close(_output(model), before, rtol=0, atol=1e-5)
        elif step == "unmerge" and delta.merged:
            subtracted |= not exact[id(delta)]
            delta.unmerge()
            torch.testing.assert_close(_output(model), before, rtol=0, atol=1e-5)
        elif step == "save_load" and not any(d.merged for d in deltas):
            # Bit for bit, unless an unmerge by subtraction left round-off in this backbone's weights.
            torch.testing.assert_close(_reload_all(deltas), before, rtol=0, atol=1e-5 if subtracted else 0)
        elif step == "dtype":
            model.double()
            torch.testing.assert_close(_output(model).float(), before, rtol=0, atol=1e-5)
            model.float()
            assert torch.equal(_output(model), before), "float32 -> float64 -> float32 is exact"
        elif step == "compile":
            torch.testing.assert_close(first_output(torch.compile(model, backend="eager"), BATCH), before,
                                       rtol=0, atol=1e-5)
        assert {k for k in model.state_dict() if "deltas" not in k.split(".")} == keys, "backbone keys changed"
    for delta in deltas:
        if delta.attached or delta.merged:
            subtracted |= delta.merged and not exact[id(delta)]
            delta.detach()
    if subtracted:
        torch.testing.assert_close(_output(model), bare, rtol=0, atol=1e-5)
    else:
        assert torch.equal(_output(model), bare), "taking every delta off gives the bare model back"
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


# Unrestricted: any operation on any delta in any state, with deltas that overlap on one module (LoRA, DoRA,
# (IA)³, BitFit on the query projection).  Each operation either keeps every invariant or is refused with an error
# that changes nothing: the same outputs, the same states.
ANY_BUILDERS = {
    **BUILDERS,
    "dora": lambda m: LoraModel(m, ["query"], lora_r=2, use_dora=True),
    "ia3": lambda m: IA3Model(m, ["query", "value"]),
}
ANY_STEPS = ["build", "detach", "attach", "merge", "merge_exact", "unmerge", "save_load", "dtype"]
REFUSALS = (ValueError, RuntimeError, TypeError)


def _state(deltas: list[DeltaBase]) -> list[tuple[bool, bool]]:
    return [(d.attached, d.merged) for d in deltas]


@settings(max_examples=200, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.sampled_from(ANY_STEPS), st.sampled_from(sorted(ANY_BUILDERS)), st.integers(0, 7)),
                min_size=3, max_size=14))
def test_unrestricted_lifecycles_keep_every_invariant_or_refuse_without_changing_anything(steps):
    model = tiny_model("bert")
    bare = _output(model)
    deltas: list[DeltaBase] = []
    for step, method, index in steps:
        delta = deltas[index % len(deltas)] if deltas else None
        before, states = _output(model), _state(deltas)
        try:
            if step == "build" or delta is None:
                delta = ANY_BUILDERS[method](model)
                _randomize(delta, len(deltas))
                deltas.append(delta)
                continue
            if step == "save_load":
                with tempfile.TemporaryDirectory() as folder:
                    DeltaBase.from_finetuned(delta.save_finetuned(folder), tiny_model("bert"), name=delta.name)
            elif step == "dtype":
                model.double()
                model.float()
            else:
                {"detach": delta.detach, "attach": delta.attach, "merge": delta.merge, "unmerge": delta.unmerge,
                 "merge_exact": lambda: delta.merge(exact=True)}[step]()
        except REFUSALS as error:
            assert str(error), "a refusal says why"
            assert _state(deltas) == states, f"refused {step} changed a delta's state: {error}"
            assert torch.equal(_output(model), before), f"refused {step} changed the outputs: {error}"
            continue
        if step in ("merge", "merge_exact", "unmerge", "dtype", "save_load"):
            torch.testing.assert_close(_output(model), before, rtol=0, atol=1e-5)
    for delta in deltas:
        if delta.attached or delta.merged:
            delta.detach()
    torch.testing.assert_close(_output(model), bare, rtol=0, atol=1e-5)
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
