"""Fully sharded data parallel training (FSDP2, ``torch.distributed.fsdp.fully_shard``) with its policy read off the
model.

Which modules become FSDP units is not a list of class names in a config: :func:`layer_classes` finds the model's
repeated transformer layers itself, as the classes of the entries of its ``nn.ModuleList`` stacks (vlm's ``Block``,
``GatedCrossAttentionBlock`` and ``PerceiverLayer``; a Hugging Face decoder's ``GPT2Block``, ``OPTDecoderLayer``,
``LlamaDecoderLayer``, ...) plus the classes a Hugging Face model names in ``_no_split_modules``. The same model
then shards the same way whatever decoder the config plugs in.

:class:`FSDP2Strategy` is Lightning's ``ModelParallelStrategy`` as plain data parallelism over every process (no
tensor parallelism): every rank reads its own batches, while parameters, gradients and optimizer states are
sharded across all ranks. It shards the task's model with :func:`shard_layers` when Lightning sets the strategy up,
the way Lightning's own ``FSDPStrategy`` wraps the model, and unlike that one it runs on CPUs (gloo) as well as
GPUs (NCCL). Frozen and trainable parameters may share a unit (FSDP2 keeps ``requires_grad`` per parameter), and the
optimizer only ever sees the trainable ones, so only they get optimizer state.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import timedelta
from typing import TYPE_CHECKING, Any, Literal

from lightning.pytorch.strategies import ModelParallelStrategy
from torch import nn

if TYPE_CHECKING:
    import lightning as L
    from torch.distributed.device_mesh import DeviceMesh

# Methods the tasks call on their model instead of ``forward`` (read-only ones: they see unsharded parameters).
ENTRY_METHODS = ("forward_hidden", "forward_features", "unembed", "encode_image", "encode_text", "encode_media",
                 "start_generation", "step")  # fmt: skip
CHECKPOINTING = ("none", "frozen", "all")


def layer_classes(model: nn.Module) -> set[type[nn.Module]]:
    """The classes of ``model``'s transformer layers: one FSDP unit (and activation-checkpointing unit) each.

    A layer class is the one class of all entries of an ``nn.ModuleList`` (a stack of repeated layers), or a class a
    Hugging Face model names in ``_no_split_modules`` and ``model`` contains.
    """
    classes: set[type[nn.Module]] = set()
    no_split: set[str] = set()
    for module in model.modules():
        no_split.update(getattr(module, "_no_split_modules", None) or ())
        if isinstance(module, nn.ModuleList) and len(module) > 0:
            kinds = {type(m) for m in module}
            if len(kinds) == 1 and not issubclass(next(iter(kinds)), nn.ModuleList | nn.ModuleDict):
                classes |= kinds
    classes |= {type(m) for m in model.modules() if type(m).__name__ in no_split}
    return classes


def layers_to_checkpoint(model: nn.Module, which: Literal["none", "frozen", "all"]) -> list[nn.Module]:
    """The layers (instances of :func:`layer_classes`) whose activations are recomputed in the backward pass.

    ``frozen``: the layers without trainable parameters. Gradients flowing *through* a frozen part (Flamingo's
    decoder, on their way to the cross-attention) still keep its activations; recomputing them saves that memory,
    and a frozen part that gradients never reach (the vision tower) costs nothing either way. ``all``: every layer.
    """
    if which not in CHECKPOINTING:
        raise ValueError(f"activation_checkpointing must be one of {', '.join(CHECKPOINTING)}, got {which!r}")
    if which == "none":
        return []
    classes = tuple(layer_classes(model))
    layers = [m for m in model.modules() if isinstance(m, classes)]
    if which == "frozen":
        layers = [m for m in layers if not any(p.requires_grad for p in m.parameters())]
    return [m for m in layers if not any(m is not o and _contains(o, m) for o in layers)]  # outermost only


def _contains(outer: nn.Module, inner: nn.Module) -> bool:
    return any(m is inner for m in outer.modules())


def shard_layers(model: nn.Module, mesh: DeviceMesh | None = None, checkpoint: Iterable[nn.Module] = (),
                 reshard_after_forward: bool = True) -> nn.Module:
    """Applies FSDP2 to ``model`` in place: activation checkpointing on the ``checkpoint`` layers, one unit per
    layer of :func:`layer_classes` (innermost first), then ``model`` itself as the root unit holding the rest
    (embeddings, norms, the Perceiver's latents, ...). Returns ``model``.

    ``model``'s :data:`ENTRY_METHODS` are registered with FSDP, so calling them (not only ``forward``) gathers the
    root's parameters first.
    """
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
        apply_activation_checkpointing,
        checkpoint_wrapper,
    )
    from torch.distributed.fsdp import FSDPModule, fully_shard, register_fsdp_forward_method

    if isinstance(model, FSDPModule):  # already sharded (a second fit or validate with the same trainer)
        return model
    classes = tuple(layer_classes(model))  # before checkpoint wrappers hide the layers in their ModuleLists
    chosen = list(checkpoint)
    if chosen:
        ids = {id(m) for m in chosen}
        apply_activation_checkpointing(model, checkpoint_wrapper_fn=checkpoint_wrapper, check_fn=lambda m: id(m) in ids)
    units = [m for m in model.modules() if isinstance(m, classes) and m is not model]
    for unit in reversed(units):  # children before the layers that hold them
        fully_shard(unit, mesh=mesh, reshard_after_forward=reshard_after_forward)
    scalars = _replicate_scalars(model, mesh)
    # The root keeps its parameters gathered from its first forward to its backward (FSDP's default for a root):
    # the entry methods call one another (forward_features -> encode_media, then unembed) within one step.
    fully_shard(model, mesh=mesh, ignored_params=scalars)
    for name in ENTRY_METHODS:
        if callable(getattr(model, name, None)):
            register_fsdp_forward_method(model, name)
    return model


def gather(model: nn.Module) -> None:
    """Gathers every FSDP unit's parameters of ``model`` and keeps them gathered until :func:`release`: evaluation
    and generation may then touch any submodule directly (generation projects the images through the cross-attention
    blocks' keys and values once, outside their ``forward``). Costs one full copy of the model per rank."""
    from torch.distributed.fsdp import FSDPModule

    for unit in (m for m in model.modules() if isinstance(m, FSDPModule)):
        if unit is not model:  # the root keeps its parameters after a forward anyway
            unit.set_reshard_after_forward(False, recurse=False)
        unit.unshard()


def release(model: nn.Module, reshard_after_forward: bool = True) -> None:
    """Undoes :func:`gather`: every unit back to its shard, resharded after each forward again."""
    from torch.distributed.fsdp import FSDPModule

    for unit in (m for m in model.modules() if isinstance(m, FSDPModule)):
        unit.reshard()
        if unit is not model:
            unit.set_reshard_after_forward(reshard_after_forward, recurse=False)


def _replicate_scalars(model: nn.Module, mesh: DeviceMesh | None) -> set[nn.Parameter]:
    """FSDP cannot shard a 0-dimensional parameter (CLIP's temperature and SigLIP's bias): each rank keeps a full
    copy, on the mesh's device, and its gradient is averaged over the ranks as soon as it is accumulated, as FSDP
    averages the others'."""
    import torch
    import torch.distributed as dist

    scalars = {p for p in model.parameters() if p.dim() == 0}
    if not scalars:
        return scalars
    group = mesh.get_group() if mesh is not None else None
    size = dist.get_world_size(group)
    device = torch.device("cuda", torch.cuda.current_device()) if mesh is not None and mesh.device_type == "cuda" \
        else torch.device("cpu")

    def average(p: nn.Parameter) -> None:
        dist.all_reduce(p.grad, group=group)
        p.grad.div_(size)

    for p in scalars:
        p.data = p.data.to(device)
        if p.requires_grad:
            p.register_post_accumulate_grad_hook(average)
    return scalars


class FSDP2Strategy(ModelParallelStrategy):
    """Fully sharded data parallel training over every process of every node, the policy read off the model.

    Use it as ``trainer.strategy`` (``class_path: vlm.tasks.sharding.FSDP2Strategy``) with any ``devices`` and
    ``num_nodes``; the task's ``model`` is sharded with :func:`shard_layers`.

    Args:
        activation_checkpointing: ``none``, ``frozen`` (the layers without trainable parameters, e.g. Flamingo's
            frozen decoder) or ``all`` (see :func:`layers_to_checkpoint`).
        reshard_after_forward: free each layer's gathered parameters after its forward (ZeRO-3 memory; gathered again
            for the backward); ``False`` keeps them until the backward (ZeRO-2-like: more memory, less traffic).
        save_distributed_checkpoint: each rank writes its own shard (a checkpoint directory); ``False``: rank 0
            writes one full ``.ckpt`` file that ``vlm.load`` and the scripts read.
        process_group_backend: ``gloo`` on CPUs, ``nccl`` on GPUs by default.
        timeout: for collective operations.
    """

    def __init__(
        self,
        activation_checkpointing: Literal["none", "frozen", "all"] = "none",
        reshard_after_forward: bool = True,
        save_distributed_checkpoint: bool = True,
        process_group_backend: str | None = None,
        timeout: timedelta | None = timedelta(minutes=30),
    ) -> None:
        if activation_checkpointing not in CHECKPOINTING:
            raise ValueError(f"activation_checkpointing must be one of {', '.join(CHECKPOINTING)}, "
                             f"got {activation_checkpointing!r}")
        super().__init__(data_parallel_size="auto", tensor_parallel_size=1,
                         save_distributed_checkpoint=save_distributed_checkpoint,
                         process_group_backend=process_group_backend, timeout=timeout)
        self.activation_checkpointing = activation_checkpointing
        self.reshard_after_forward = reshard_after_forward

    def setup_environment(self) -> None:
        self._data_parallel_size = self.num_nodes * self.num_processes  # every rank is a data-parallel replica
        super().setup_environment()

    def setup(self, trainer: L.Trainer) -> None:
        task = self.lightning_module
        model: Any = getattr(task, "model", None)
        if not isinstance(model, nn.Module):
            raise TypeError(f"{type(self).__name__} shards a task's `model`; {type(task).__name__} has none")
        checkpoint = layers_to_checkpoint(model, self.activation_checkpointing)
        shard_layers(model, self.device_mesh["data_parallel"], checkpoint, self.reshard_after_forward)
        super().setup(trainer)

    # Validation, test and prediction run on gathered parameters (see :func:`gather`): they generate, and nothing is
    # trained, so memory is not the constraint there.
    def _gather(self) -> None:
        gather(self.lightning_module.model)

    def _release(self) -> None:
        release(self.lightning_module.model, self.reshard_after_forward)

    def on_validation_start(self) -> None:
        super().on_validation_start()
        self._gather()

    def on_validation_end(self) -> None:
        self._release()
        super().on_validation_end()

    def on_test_start(self) -> None:
        super().on_test_start()
        self._gather()

    def on_test_end(self) -> None:
        self._release()
        super().on_test_end()

    def on_predict_start(self) -> None:
        super().on_predict_start()
        self._gather()

    def on_predict_end(self) -> None:
        self._release()
        super().on_predict_end()


__all__ = ["FSDP2Strategy", "gather", "layer_classes", "layers_to_checkpoint", "release", "shard_layers"]
