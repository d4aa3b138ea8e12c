"""Row forms of the weight deltas: the same delta type of several deltas at one module, stacked along a new first
axis, so each row of a batch reads its own delta's weights by one gather — no loop over rows or over deltas.

For ``K`` deltas a stack holds ``K + 1`` entries; the last is the identity (zeros for added terms, ones for
scales), read by rows that name no delta of this type here.  With ``i`` the (batch,) index of each row's entry::

    LoRA        h_b <- h_b + x_b A[i_b]ᵀ B[i_b]ᵀ          A: (K+1, R, in), B: (K+1, out, R), α/r folded into B
    DoRA        h_b <- s[i_b] ⊙ (h_b - b + x_b A[i_b]ᵀ B[i_b]ᵀ) + b,   s = m / ‖W + B A‖_row (ones for plain LoRA)
    (IA)³       t_b <- t_b ⊙ l[i_b]
    BitFit      h_b <- h_b + Δb[i_b]
    adapters    h_b <- h_b + up[i_b](act(down[i_b](t_b))),  t = h (sequential) or x (parallel, scale folded into up)

Ranks and bottlenecks of different sizes are padded with zeros, which add nothing.  A stack is a snapshot of its
deltas' weights, made by :class:`~deltatune.bank.DeltaBank` (which rebuilds it when they change).  When every row
of a batch reads one delta, the stack hands the batch to that delta's own module instead (``Stack.alone``):
the cost of an attached delta, without gathered copies.
"""

from __future__ import annotations

import torch
from torch import nn

from ..methods.adapter import AdapterLayer
from ..methods.bitfit import BiasShift
from ..methods.compacter import PHMLinear
from ..methods.bottleneck import LowRankLinear
from ..methods.ia3 import Rescale
from ..methods.lora import LoraLayer
from ..methods.parallel_adapter import PairedAdapterLayer, ParallelAdapterLayer
from ..routing import Route


class Stack(nn.Module):
    """The row form of one delta type at one module; :meth:`select` sets which entry each row of a batch reads.

    Called with the tensors of its route (``t`` or ``(x, h)``), the last
    of which holds the batch: it passes them through when no row reads it, hands them to the one delta's own
    module when every row reads one (``alone``), and otherwise computes :meth:`mixed` with the rows' index."""

    route: Route
    rewrites_call = False

    def __init__(self, layers: list[nn.Module] = ()) -> None:
        super().__init__()
        self.index: torch.Tensor | None = None  # None: no row of the batch uses this stack, pass through
        self._members = tuple(layers)  # a tuple: the deltas' own modules are not the stack's submodules
        self.__dict__["alone"] = None

    def select(self, index: torch.Tensor | None, entry: int | None = None) -> None:
        """Row ``b`` reads entry ``index[b]``; ``entry``: the one entry every row reads, if they all read one."""
        # Plain attributes, set past nn.Module.__setattr__ (a route() selects every stack; ``alone`` is no
        # submodule of the stack).
        self.__dict__.update(index=index, alone=self._alone(entry))

    @property
    def device(self) -> torch.device:
        return self._like().device

    def _like(self) -> torch.Tensor:
        """A tensor of the stack's, which follows the model's dtype and device."""
        return next(t for t in self._buffers.values() if t is not None)

    def _alone(self, entry: int | None) -> nn.Module | None:
        """When every row reads one delta, that delta's own module, which computes the batch as if attached
        (no gathered copies of its weights: at batch 1 the cost of an attached delta); None otherwise, or if the
        module has not followed the model to the stack's dtype and device (the model moved after the build) or is
        in training mode (dropout: detached, it does not follow ``model.eval()``)."""
        if entry is None or entry >= len(self._members):
            return None
        member = self._members[entry]
        weight = next((t for t in member._parameters.values() if t is not None), None)  # no module walk
        weight = next(member.parameters(), None) if weight is None else weight
        like = self._like()
        if weight is None or member.training or (weight.dtype, weight.device) != (like.dtype, like.device):
            return None
        return member

    def forward(self, *tensors: torch.Tensor) -> torch.Tensor:
        target = tensors[-1]
        if self.index is None:
            return target
        i = self.rows(target)
        return self.alone(*tensors) if self.alone is not None else self.mixed(i, *tensors)

    def mixed(self, i: torch.Tensor, *tensors: torch.Tensor) -> torch.Tensor:
        """The route's output when row ``b`` reads entry ``i[b]``."""
        raise NotImplementedError

    def rows(self, t: torch.Tensor) -> torch.Tensor:
        """The row index, checked against the batch ``t`` holds on its first axis."""
        if t.shape[0] != len(self.index):
            raise ValueError(f"route() named {len(self.index)} rows, but a module of the model got a batch of "
                             f"{t.shape[0]} (shape {tuple(t.shape)}); mixed batches need the batch on the first "
                             "axis and one name per row (generate() with num_beams or num_return_sequences k > 1 "
                             "multiplies the rows: route(names, repeat=k))")
        return self.index


def _with_identity(vectors: list[torch.Tensor], fill: float) -> torch.Tensor:
    return torch.stack([*vectors, torch.full_like(vectors[0], fill)])


def _broadcast(values: torch.Tensor, like: torch.Tensor, axis: int = -1) -> torch.Tensor:
    """(batch, size) values shaped to broadcast over ``like`` along ``axis`` (-1, or 1 for channel-first maps)."""
    shape = [values.shape[0]] + [1] * (like.dim() - 1)
    shape[axis] = values.shape[1]
    return values.view(shape)


class LoraStack(Stack):
    route = Route.INPUT_OUTPUT

    def __init__(self, layers: list[LoraLayer], host: nn.Module) -> None:
        super().__init__(layers)
        first = layers[0]
        self.embedding = first.embedding
        rank = max(layer.lora_A.shape[0] for layer in layers)
        factory = {"device": first.lora_A.device, "dtype": first.lora_A.dtype}
        # A transposed, (K+1, in, R): x @ A[i] directly; for an embedding (K+1, vocab, R), indexed by token id.
        a = torch.zeros(len(layers) + 1, first.lora_A.shape[1], rank, **factory)
        b = torch.zeros(len(layers) + 1, rank, first.out_features, **factory)
        dora = any(layer.magnitude is not None for layer in layers)
        scale = torch.ones(len(layers) + 1, first.out_features, **factory) if dora else None
        with torch.no_grad():
            for k, layer in enumerate(layers):
                r = layer.lora_A.shape[0]
                a[k, :, :r] = layer.lora_A.t()
                b[k, :r] = (layer._full_B() * layer.scaling).t()
                if layer.magnitude is not None:
                    scale[k] = layer._dora_scale()
        self.register_buffer("a", a, persistent=False)
        self.register_buffer("b", b, persistent=False)
        self.register_buffer("scale", scale, persistent=False)
        self._host = (host,)  # DoRA rescales W x but not the bias: h = s ⊙ (h - bias + update) + bias

    def mixed(self, i: torch.Tensor, x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        if self.embedding:
            a = self.a[i.view(-1, *[1] * (x.dim() - 1)), x]  # (batch, tokens, R)
        else:
            a = torch.bmm(x.reshape(len(i), -1, x.shape[-1]), self.a[i])
        h3 = h.reshape(len(i), -1, h.shape[-1])
        if self.scale is None:
            return torch.baddbmm(h3, a, self.b[i]).view(h.shape)
        bias = self._host[0].bias
        update = torch.bmm(a, self.b[i])
        s = self.scale[i][:, None, :]
        tuned = s * (h3 + update) if bias is None else s * (h3 - bias + update) + bias
        return tuned.view(h.shape)


class ScaleStack(Stack):
    """(IA)³: output features, or the inputs of a feed-forward module (``on_input``)."""

    def __init__(self, layers: list[Rescale], host: nn.Module) -> None:
        super().__init__(layers)
        self.route = Route.INPUT_INPUT if layers[0].on_input else Route.OUTPUT_OUTPUT
        with torch.no_grad():
            self.register_buffer("scales", _with_identity([layer._full_scale() for layer in layers], 1.0),
                                 persistent=False)

    def mixed(self, i: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return t * _broadcast(self.scales[i], t)


class ShiftStack(Stack):
    """BitFit: a shift of the output features (channels on axis 1 of a channel-first map)."""

    route = Route.OUTPUT_OUTPUT

    def __init__(self, layers: list[BiasShift], host: nn.Module) -> None:
        super().__init__(layers)
        self.axis = -1 if len(layers[0].view) == 1 else 1
        with torch.no_grad():
            self.register_buffer("shifts", _with_identity([layer._full_bias() for layer in layers], 0.0),
                                 persistent=False)

    def mixed(self, i: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        return h + _broadcast(self.shifts[i], h, self.axis)


def _dense(projection: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight (out, in), bias) of an adapter projection: a Linear, a low-rank or a PHM layer."""
    if isinstance(projection, nn.Linear):
        return projection.weight, projection.bias
    if isinstance(projection, LowRankLinear):
        return projection.left @ projection.right, projection.bias
    if isinstance(projection, PHMLinear):
        return projection.weight(), projection.bias
    raise TypeError(f"an adapter projection of type {type(projection).__name__} has no row form")


class BottleneckStack(Stack):
    """Sequential (output -> output) and parallel (input -> output) adapters, Compacter and the low-rank adapter."""

    def __init__(self, layers: list[AdapterLayer | ParallelAdapterLayer], host: nn.Module) -> None:
        super().__init__(layers)
        self.route = Route.INPUT_OUTPUT if isinstance(layers[0], ParallelAdapterLayer) else Route.OUTPUT_OUTPUT
        self.act = layers[0].act
        with torch.no_grad():
            projections = [(*_dense(layer.down), *_dense(layer.up), getattr(layer, "scaled", 1.0))
                           for layer in layers]
            width = max(down.shape[0] for down, *_ in projections)
            first_down, _, first_up, _, _ = projections[0]
            factory = {"device": first_down.device, "dtype": first_down.dtype}
            count = len(layers) + 1
            down = torch.zeros(count, first_down.shape[1], width, **factory)  # transposed: t @ down[i]
            down_bias = torch.zeros(count, 1, width, **factory)
            up = torch.zeros(count, width, first_up.shape[0], **factory)
            up_bias = torch.zeros(count, 1, first_up.shape[0], **factory)
            for k, (dw, db, uw, ub, scaled) in enumerate(projections):
                m = dw.shape[0]
                down[k, :, :m], down_bias[k, 0, :m] = dw.t(), db
                up[k, :m], up_bias[k, 0] = uw.t() * scaled, ub * scaled
        for name, tensor in (("down", down), ("down_bias", down_bias), ("up", up), ("up_bias", up_bias)):
            self.register_buffer(name, tensor, persistent=False)

    def mixed(self, i: torch.Tensor, t: torch.Tensor, h: torch.Tensor | None = None) -> torch.Tensor:
        """``t`` feeds the bottleneck; the update adds to ``h`` (parallel) or to ``t`` itself (sequential)."""
        target = t if h is None else h
        hidden = self.act(torch.baddbmm(self.down_bias[i], t.reshape(len(i), -1, t.shape[-1]), self.down[i]))
        return target + torch.baddbmm(self.up_bias[i], hidden, self.up[i]).view(target.shape)


def activation_key(layer: nn.Module) -> tuple[str, str]:
    return type(layer.act).__name__, repr(layer.act)


def stack_kind(layer: nn.Module) -> tuple[type[Stack], tuple] | None:
    """The stack class a delta module goes into and what must agree within one stack; None: no row form."""
    if isinstance(layer, LoraLayer):
        return LoraStack, ("embedding" if layer.embedding else "linear",)
    if isinstance(layer, Rescale):
        return ScaleStack, (layer.on_input,)
    if isinstance(layer, BiasShift):
        return ShiftStack, (layer.view,)
    if isinstance(layer, PairedAdapterLayer):
        return None
    if isinstance(layer, (AdapterLayer, ParallelAdapterLayer)):
        return BottleneckStack, (isinstance(layer, ParallelAdapterLayer), *activation_key(layer))
    return None
