"""The serving engine: requests for any deltas queue up, and one worker thread runs them as mixed batches.

The worker takes the first waiting request, then every request that arrives within ``window`` seconds (up to
``max_batch``) with the same sampling settings, and runs them as one left-padded ``generate()`` inside
``bank.route([...])``: each row with its own delta.  Rows stop at their own ``max_tokens`` or end-of-sequence
token; tokens are handed to each request as they are made (streaming).  The queue is bounded: a full queue refuses
at once (HTTP 429), so latency stays bounded under overload.

With ``continuous=True`` a batch does not run to its longest row: requests join the running batch at its next
step (whatever their sampling settings) and leave it when done (:mod:`.continuous`), for deltas that add no
positions (soft prompts and prefixes are refused).

A sequence-classification backbone is served the same way: :class:`Classification` requests for any deltas run as
one right-padded forward pass, each row through its delta and its delta's own head (see
:mod:`deltatune.bank.heads`), and get the probabilities of that head's labels.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from transformers import StoppingCriteria, StoppingCriteriaList

from .. import auto
from ..bank.registry import DeltaRegistry
from ..compat import BaseStreamer
from ..routing import Route
from .continuous import RunningBatch, check_model


class QueueFull(Exception):
    """More requests wait than the queue holds."""


@dataclass
class Request:
    """One completion: prompt token ids, the delta (None: the bare backbone) and its sampling settings."""

    prompt: list[int]
    delta: str | None
    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()  # the row ends once its text contains one (the text is cut before it by the API)
    on_token: Callable[[int], None] = lambda token: None
    on_done: Callable[[list[int] | None, str, BaseException | None], None] = lambda tokens, reason, error: None

    def sampling(self) -> tuple:
        return (self.temperature > 0, self.temperature, self.top_p) if self.temperature > 0 else (False,)


@dataclass
class Classification:
    """One text (token ids) to classify with a delta and the head it was trained with."""

    tokens: list[int]
    delta: str
    on_done: Callable[[list[float] | None, str, BaseException | None], None] = lambda probabilities, reason, error: None

    def sampling(self) -> tuple:
        return ("classify",)  # classifications batch together, never with generations


class _RowsDone(StoppingCriteria):
    """Row b is done when the streamer says so: its own ``max_tokens``, a stop string, or its end-of-sequence token
    (which generate() also handles)."""

    def __init__(self, streamer: _RowStreamer) -> None:
        self.streamer = streamer

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
        return torch.tensor(self.streamer.finished, device=input_ids.device)


class _Row:
    """One request's generated tokens, and whether and why it is done."""

    def __init__(self, request: Request) -> None:
        self.request, self.tokens, self.finished, self.reason = request, [], False, "length"

    def take(self, token: int, eos: set[int], tokenizer) -> None:
        """The row's next token: the end of the sequence, or one more token handed to the request (which may end it
        by its own ``max_tokens`` or a stop string)."""
        if self.finished:
            return
        if token in eos:
            self.finished, self.reason = True, "stop"
            return
        self.tokens.append(token)
        self.request.on_token(token)
        stop = self.request.stop
        if stop and any(s in tokenizer.decode(self.tokens, skip_special_tokens=True) for s in stop):
            self.finished, self.reason = True, "stop"
        elif len(self.tokens) >= self.request.max_tokens:
            self.finished = True


class _RowStreamer(BaseStreamer):
    """Hands each row's new tokens to its request while generate() runs, and knows which rows are done."""

    def __init__(self, requests: list[Request], eos: set[int], tokenizer) -> None:
        self.rows, self.eos, self.tokenizer = [_Row(r) for r in requests], eos, tokenizer
        self.prompt_seen = False

    @property
    def finished(self) -> list[bool]:
        return [row.finished for row in self.rows]

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:  # generate() passes the prompt first
            self.prompt_seen = True
            return
        for row, token in zip(self.rows, value.view(len(self.rows), -1)[:, -1].tolist()):
            row.take(token, self.eos, self.tokenizer)

    def end(self) -> None:
        pass


class Engine:
    """A causal LM (or a sequence classifier), its tokenizer and a registry of deltas, served by one worker
    thread."""

    def __init__(self, model: nn.Module, tokenizer, registry: DeltaRegistry, *, max_batch: int = 16,
                 window: float = 0.01, max_queue: int = 256, continuous: bool = False) -> None:
        if max_batch < 1 or window < 0 or max_queue < 1:
            raise ValueError("max_batch and max_queue must be at least 1 and window at least 0")
        self.model, self.tokenizer, self.registry = model.eval(), tokenizer, registry
        self.max_batch, self.window, self.continuous = max_batch, window, continuous
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.task = "generate" if model.can_generate() else "classify"
        if continuous:
            if self.task != "generate":
                raise ValueError("continuous batching is for generation; a classifier's batch is one forward pass")
            check_model(self.model)
        eos = model.generation_config.eos_token_id if self.task == "generate" else None
        self.eos = set(eos if isinstance(eos, list) else [eos]) - {None}
        self._queue: queue.Queue[Request | None] = queue.Queue(maxsize=max_queue)
        self._held: list[Request | None] = []  # taken from the queue for the next batch (None: stop after it)
        self.stats = {"requests": 0, "batches": 0, "tokens": 0, "failed": 0}
        self.active = 0  # rows being generated or classified now
        self._worker = threading.Thread(target=self._run, name="deltatune-serve", daemon=True)
        self._worker.start()

    def submit(self, request: Request | Classification) -> None:
        wanted = "classify" if isinstance(request, Classification) else "generate"
        if wanted != self.task:
            raise ValueError(f"this engine's backbone ({type(self.model).__name__}) can only "
                             f"{'classify' if self.task == 'classify' else 'generate text'}")
        if request.delta is not None:
            self.check_servable(request.delta)
        if wanted == "classify" and self.registry.labels(request.delta) is None:
            raise ValueError(f"delta {request.delta!r} was registered without the labels of its head")
        try:
            self._queue.put_nowait(request)
        except queue.Full:
            raise QueueFull(f"{self._queue.maxsize} requests are waiting; try again later") from None

    def check_servable(self, name: str) -> None:
        """Raise KeyError for an unknown delta, ValueError for one that continuous batching cannot serve."""
        self.registry.require(name)
        kind = self.registry.delta_type(name)
        if self.continuous and auto.method_for(kind).route is Route.INPUT_INPUT:
            raise ValueError(f"delta {name!r} is a {kind}, which adds positions to its rows: continuous batching "
                             "serves deltas that act on weights and activations only; serve it without --continuous")

    def queued(self) -> int:
        return self._queue.qsize()

    def close(self, timeout: float = 60.0) -> None:
        """Finish the queued requests, then stop the worker."""
        self._queue.put(None)
        self._worker.join(timeout)

    # ------------------------------------------------------------------------------------------- worker
    def _next_batch(self) -> list[Request] | None:
        first = self._held.pop() if self._held else self._queue.get()
        if first is None:
            return None
        batch, deadline = [first], time.monotonic() + self.window
        while len(batch) < self.max_batch:
            try:
                request = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                break
            if request is None or request.sampling() != first.sampling():
                self._held.append(request)  # starts the next batch (None: the stop, after this batch)
                break
            batch.append(request)
        return batch

    def _run(self) -> None:
        if self.continuous:
            return self._run_continuous()
        while True:
            batch = self._next_batch()
            if batch is None:
                return
            self.active = len(batch)
            try:
                with self.registry.lock:  # no delta loads (its probe pass) during the batch
                    results = self.classify(batch) if self.task == "classify" else self.generate(batch)
            except Exception as error:  # the requests get the error; the server keeps serving
                self.stats["failed"] += len(batch)
                for request in batch:
                    request.on_done(None, "error", error)
                continue
            finally:
                self.active = 0
            for request, (value, reason) in zip(batch, results):
                request.on_done(value, reason, None)

    def _run_continuous(self) -> None:
        running = RunningBatch(self.model, self.registry.bank, self.pad)
        stopping = False
        while running or not stopping:
            arrivals = [] if stopping else self._arrivals(wait=not running, room=self.max_batch - len(running))
            if arrivals and arrivals[-1] is None:  # close(): finish what came before, take nothing after
                stopping, arrivals = True, arrivals[:-1]
            if arrivals:
                with self.registry.lock:
                    self._join(running, arrivals)
                running.keep(self._finished)  # rows done at their first token take no step
                self.active = len(running)
            if running:
                try:
                    with self.registry.lock:
                        tokens = running.step().tolist()
                except Exception as error:  # the running requests get the error; the server keeps serving
                    self.stats["failed"] += len(running)
                    for row in running.rows:
                        row.request.on_done(None, "error", error)
                    running = RunningBatch(self.model, self.registry.bank, self.pad)
                    self.active = 0
                    continue
                for row, token in zip(running.rows, tokens):
                    row.take(token, self.eos, self.tokenizer)
            running.keep(self._finished)
            self.active = len(running)

    def _arrivals(self, wait: bool, room: int) -> list[Request | None]:
        """Up to ``room`` queued requests (a None, close()'s mark, ends the list); with ``wait``, block for the
        first, then take what arrives within ``window``."""
        taken: list[Request | None] = [self._queue.get()] if wait else []
        deadline = time.monotonic() + (self.window if wait else 0.0)
        while len(taken) < room and (not taken or taken[-1] is not None):
            timeout = deadline - time.monotonic()
            try:
                taken.append(self._queue.get(timeout=timeout) if timeout > 0 else self._queue.get_nowait())
            except queue.Empty:
                break
        return taken

    def _join(self, running: RunningBatch, requests: list[Request]) -> None:
        rows = [_Row(r) for r in requests]
        try:
            self.registry.acquire(running.deltas + [r.delta for r in requests])  # keeps the running rows' deltas
            first = running.join(rows, [r.prompt for r in requests], [r.delta for r in requests],
                                 [r.sampling() for r in requests])
        except Exception as error:  # these requests get the error; the running ones go on
            self.stats["failed"] += len(requests)
            for request in requests:
                request.on_done(None, "error", error)
            return
        self.stats["batches"] += 1
        self.stats["requests"] += len(requests)
        for row, token in zip(rows, first.tolist()):
            row.take(token, self.eos, self.tokenizer)

    def _finished(self, row: _Row) -> bool:
        if row.finished:
            self.stats["tokens"] += len(row.tokens)
            row.request.on_done(row.tokens, row.reason, None)
        return row.finished

    def _padded(self, rows: list[list[int]], left: bool) -> dict[str, torch.Tensor]:
        """``input_ids`` and ``attention_mask`` of token rows padded to the longest, on the model's device."""
        width = max(map(len, rows))
        ids = torch.full((len(rows), width), self.pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for b, row in enumerate(rows):
            place = slice(width - len(row), width) if left else slice(0, len(row))
            ids[b, place], mask[b, place] = torch.tensor(row), 1
        device = next(self.model.parameters()).device
        return {"input_ids": ids.to(device), "attention_mask": mask.to(device)}

    def classify(self, batch: list[Classification]) -> list[tuple[list[float], str]]:
        """One mixed batch of classifications; returns (probabilities of the row's labels, "stop") per row."""
        self.registry.acquire([r.delta for r in batch])
        # Right padding: a classification head reads the first token, or the last one that is not padding.
        inputs = self._padded([r.tokens for r in batch], left=False)
        with torch.no_grad(), self.registry.bank.route([r.delta for r in batch]):
            logits = self.model(**inputs).logits
        self.stats["batches"] += 1
        self.stats["requests"] += len(batch)
        counts = [len(self.registry.labels(r.delta)) for r in batch]
        return [(row[:n].float().softmax(-1).tolist(), "stop") for row, n in zip(logits, counts)]

    def generate(self, batch: list[Request]) -> list[tuple[list[int], str]]:
        """One mixed batch: each row with its own delta; returns (new tokens, finish reason) per row."""
        self.registry.acquire([r.delta for r in batch])
        inputs = self._padded([r.prompt for r in batch], left=True)  # every row's next token at the same column
        streamer = _RowStreamer(batch, self.eos, self.tokenizer)
        sampling = batch[0].sampling()
        options = {"do_sample": True, "temperature": sampling[1], "top_p": sampling[2]} if sampling[0] else {
            "do_sample": False, "temperature": None, "top_p": None, "top_k": None}
        with torch.no_grad(), self.registry.bank.route([r.delta for r in batch]):
            self.model.generate(
                **inputs, max_new_tokens=max(r.max_tokens for r in batch),
                stopping_criteria=StoppingCriteriaList([_RowsDone(streamer)]),
                streamer=streamer, pad_token_id=self.pad, **options)
        self.stats["batches"] += 1
        self.stats["requests"] += len(batch)
        self.stats["tokens"] += sum(len(row.tokens) for row in streamer.rows)
        return [(row.tokens, row.reason) for row in streamer.rows]
