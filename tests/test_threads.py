"""Threads: forward passes run in parallel; a change of deltas under another thread's pass is refused."""

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from deltatune import LoraModel

from conftest import first_output, tiny_batch, tiny_model


def _lora(model):
    delta = LoraModel(model, ["query", "value"])
    with torch.no_grad():
        for parameter in delta.delta_parameters():
            parameter.normal_()
    return delta


def test_forward_passes_in_several_threads_give_the_single_thread_result():
    model = tiny_model("bert")
    _lora(model)
    batch = tiny_batch("bert")
    expected = first_output(model, batch)
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda _: first_output(model, batch), range(16)))
    assert all(torch.equal(result, expected) for result in results)


def test_a_change_while_another_thread_runs_a_forward_pass_is_refused():
    model = tiny_model("bert")
    delta = _lora(model)
    batch = tiny_batch("bert")
    tuned = first_output(model, batch)
    inside, release, seen = threading.Event(), threading.Event(), []

    def block(module, args, output):
        inside.set()
        release.wait(10)

    blocker = model.bert.encoder.layer[0].register_forward_hook(block)
    worker = threading.Thread(target=lambda: seen.append(first_output(model, batch)))
    worker.start()
    assert inside.wait(10)
    for change in (delta.detach, delta.merge):
        with pytest.raises(RuntimeError, match="cannot (detach|merge) while another thread runs this model's forward"):
            change()
    release.set()
    worker.join(10)
    blocker.remove()
    assert torch.equal(seen[0], tuned), "the pass in the other thread ran with the whole delta"
    delta.detach()  # no pass runs now
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
