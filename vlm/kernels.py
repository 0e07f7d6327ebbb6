"""CPU speed-ups for vlm's models, applied from outside them: :func:`use_cpu_kernels`.

The models are plain ``nn.Module`` s. On the CPU two things make them faster, and neither pays on a GPU:

- **oneDNN linear products.** PyTorch's MKL picks its AVX-512 GEMM kernels only on CPUs that report
  ``GenuineIntel``; on other x86 CPUs it runs a generic AVX2 path at about half the speed, while oneDNN, bundled in
  the same PyTorch build, dispatches on the instruction set alone. With oneDNN chosen, every ``nn.Linear`` runs its
  large fp32 products (forward and both backward GEMMs) there, an MLP's GELU is applied inside its first product at
  inference, and :class:`~vlm.models.decoder.DecoderLM`'s tied unembedding runs there too.
- **No fresh activation buffers at inference.** Without autograd, an MLP's activation overwrites its first
  product and a block's residual sums are written into the branch outputs, so the allocator hands out fewer large
  new buffers (each of which the kernel must fault in page by page). The values are the same.

The swap only changes the classes of modules (``nn.Linear``, :class:`~vlm.models.layers.MLP`,
:class:`~vlm.models.layers.Block`, :class:`~vlm.models.decoder.DecoderLM`) to the subclasses below, in place: the
Parameter objects, state-dict keys, optimizers and checkpoints are untouched. ``backend="off"`` restores the plain
classes.
"""

from __future__ import annotations

import functools
import platform

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vlm.models.decoder import DecoderLM
from vlm.models.layers import MLP, Block, QuickGELU

BACKENDS = ("auto", "onednn", "blas", "off")

# A oneDNN call costs more than a BLAS one, which only pays off from about a million multiply-adds per product:
# smaller products stay on BLAS.
_ONEDNN_MIN_MACS = 1 << 20


@functools.cache
def onednn_available() -> bool:
    """Whether this PyTorch build has oneDNN's linear kernel (``torch.ops.mkldnn._linear_pointwise``)."""
    try:
        x, w = torch.ones(2, 3), torch.ones(4, 3)
        return torch.allclose(torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], ""), F.linear(x, w))
    except (AttributeError, RuntimeError):
        return False


def _mkl_runs_its_generic_path() -> bool:
    """Whether torch's BLAS is MKL on an x86 CPU that is not Intel's (where MKL skips its AVX-512 kernels)."""
    if not torch.backends.mkl.is_available() or platform.machine().lower() not in ("x86_64", "amd64"):
        return False
    try:
        with open("/proc/cpuinfo") as f:
            vendors = {line.split(":", 1)[1].strip() for line in f if line.startswith("vendor_id")}
    except OSError:  # not Linux: keep PyTorch's own choice
        return False
    return bool(vendors) and vendors != {"GenuineIntel"}


def resolve_backend(backend: str = "auto") -> str:
    """What ``backend`` means on this machine: ``onednn``, ``blas`` or ``off``.

    ``auto`` is oneDNN where PyTorch's BLAS is MKL on a non-Intel x86 CPU, BLAS elsewhere: a fixed rule rather than
    a timing probe, so that runs repeat bit for bit on one machine. Raises ``ValueError`` for an unknown name and
    ``RuntimeError`` for ``onednn`` on a build without it.
    """
    name = backend.lower()
    if name not in BACKENDS:
        raise ValueError(f"the CPU kernel backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if name == "auto":
        return "onednn" if _mkl_runs_its_generic_path() and onednn_available() else "blas"
    if name == "onednn" and not onednn_available():
        raise RuntimeError("this PyTorch build has no oneDNN linear kernel (torch.ops.mkldnn._linear_pointwise)")
    return name


# ------------------------------------------------------------------------------------------- oneDNN products
def _onednn_pays(x: Tensor, weight: Tensor) -> bool:
    """A large fp32 CPU product of plain tensors, outside autocast and torch.compile (which have their own paths)."""
    return (
        x.dim() >= 2
        and x.numel() // max(x.shape[-1], 1) * weight.numel() >= _ONEDNN_MIN_MACS
        and x.device.type == "cpu"
        and x.dtype == weight.dtype == torch.float32
        and type(weight) in (Tensor, nn.Parameter)
        and not torch.is_autocast_enabled("cpu")
        and not torch.compiler.is_compiling()
    )


def _onednn_mm(x: Tensor, weight: Tensor, bias: Tensor | None, act: str = "none", approx: str = "") -> Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, act, [], approx)


class _OneDNNLinearFunction(torch.autograd.Function):
    """``x @ w.T + b`` for 2-D ``x`` with all three GEMMs (forward, input and weight gradients) on oneDNN."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return _onednn_mm(x, weight, bias)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
        x, weight = ctx.saved_tensors
        grad_x = _onednn_mm(grad, weight.t(), None) if ctx.needs_input_grad[0] else None  # grad @ w
        grad_w = _onednn_mm(grad.t(), x.t(), None) if ctx.needs_input_grad[1] else None  # grad.T @ x
        grad_b = grad.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return grad_x, grad_w, grad_b


def _linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """``F.linear`` with large fp32 CPU products on oneDNN; the same values to rounding."""
    if not _onednn_pays(x, weight):
        return F.linear(x, weight, bias)
    if torch.is_grad_enabled() and (
        x.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad)
    ):
        out = _OneDNNLinearFunction.apply(x.reshape(-1, x.shape[-1]), weight, bias)  # (b*n, out)
        return out.view(*x.shape[:-1], weight.shape[0])
    return _onednn_mm(x, weight, bias)


class OneDNNLinear(nn.Linear):
    """:class:`torch.nn.Linear` (same parameters and state dict) whose large fp32 CPU products run on oneDNN."""

    def forward(self, x: Tensor) -> Tensor:
        return _linear(x, self.weight, self.bias)


class OneDNNDecoderLM(DecoderLM):
    """:class:`~vlm.models.decoder.DecoderLM` whose tied unembedding runs on oneDNN."""

    def unembed(self, hidden: Tensor, token_ids: Tensor | None = None) -> Tensor:
        weight = self.token_embedding.weight
        return _linear(hidden, weight if token_ids is None else weight[token_ids])


# ------------------------------------------------------------------------------ no fresh buffers at inference
def _activation_(act: nn.Module, x: Tensor) -> Tensor:
    """``act(x)`` written into ``x`` for the activations of :func:`vlm.models.layers.make_activation`."""
    if isinstance(act, nn.GELU):
        return torch.ops.aten.gelu_(x, approximate=act.approximate)
    if isinstance(act, nn.ReLU):
        return x.relu_()
    if isinstance(act, QuickGELU):
        return x.mul_(torch.sigmoid(1.702 * x))
    return act(x)


class CPUMLP(MLP):
    """:class:`~vlm.models.layers.MLP` that, where autograd does not need fc1's output, writes the activation into it
    (and, with fc1 on oneDNN, applies GELU inside fc1's product as it writes its output): the same ``forward``,
    another :meth:`hidden`."""

    def hidden(self, x: Tensor) -> Tensor:
        fc1 = self.fc1
        if (
            not torch.is_grad_enabled()
            and isinstance(fc1, OneDNNLinear)
            and isinstance(self.act, nn.GELU)
            and _onednn_pays(x, fc1.weight)
        ):
            return _onednn_mm(x, fc1.weight, fc1.bias, "gelu", self.act.approximate)
        h = fc1(x)
        # Autograd needs an activation's input for its backward: in place only where no gradient flows.
        return self.act(h) if h.requires_grad else _activation_(self.act, h)


def _residual(x: Tensor, branch: Tensor) -> Tensor:
    """``x + branch``, written into ``branch`` (a fresh tensor nothing else holds; ``x + a == a + x`` exactly) where
    no gradient flows. Out of place under autograd (an in-place add on a linear layer's output view would make the
    backward rebuild its base) and when the branch's dtype differs (autocast: the stream keeps the promoted dtype)."""
    if branch.requires_grad or branch.dtype != x.dtype:
        return x + branch
    return branch.add_(x)


class CPUBlock(Block):
    """:class:`~vlm.models.layers.Block` whose residual sums, where no gradient flows, reuse the branch outputs: the
    same ``forward``, another :meth:`add_residual`."""

    add_residual = staticmethod(_residual)


# ------------------------------------------------------------------------------------------------- the swap
_PLAIN: dict[type[nn.Module], type[nn.Module]] = {
    OneDNNLinear: nn.Linear,
    OneDNNDecoderLM: DecoderLM,
    CPUMLP: MLP,
    CPUBlock: Block,
}
_FAST: dict[str, dict[type[nn.Module], type[nn.Module]]] = {
    "off": {},
    "blas": {MLP: CPUMLP, Block: CPUBlock},
    "onednn": {nn.Linear: OneDNNLinear, DecoderLM: OneDNNDecoderLM, MLP: CPUMLP, Block: CPUBlock},
}


def use_cpu_kernels(module: nn.Module, backend: str = "auto") -> nn.Module:
    """Switches ``module`` and every submodule to the CPU kernels of ``backend``, in place; returns ``module``.

    Only the classes change (to subclasses with the same parameters and state-dict keys): the Parameter objects,
    and so optimizers and checkpoints, are untouched, and calling it again with another backend switches again.
    Modules whose exact class is not ``nn.Linear``, ``MLP``, ``Block`` or ``DecoderLM`` are left as they are.

    Args:
        module: any module (a model, a LightningModule); its ``modules()`` are switched.
        backend: ``auto`` (oneDNN where PyTorch's MKL runs its generic path, BLAS elsewhere: see
            :func:`resolve_backend`), ``onednn`` (every linear layer on oneDNN, GELU fused at inference), ``blas``
            (plain ``nn.Linear``; no fresh activation buffers at inference) or ``off`` (the plain model).
    """
    fast = _FAST[resolve_backend(backend)]
    for m in module.modules():
        plain = _PLAIN.get(type(m), type(m))
        target = fast.get(plain, plain)
        if type(m) is not target:
            m.__class__ = target
    return module


__all__ = ["BACKENDS", "CPUBlock", "CPUMLP", "OneDNNDecoderLM", "OneDNNLinear", "onednn_available",
           "resolve_backend", "use_cpu_kernels"]  # fmt: skip
