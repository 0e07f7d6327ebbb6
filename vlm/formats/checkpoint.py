"""Lightning checkpoints (``vlm fit``'s ``.ckpt``): reading them without unpickling code, and tasks built from configs.

A task's hyper-parameters are its constructor config (``class_path`` / ``init_args`` dicts, exactly what
LightningCLI saw), so a checkpoint holds only tensors and plain containers: it is read with
``torch.load(weights_only=True)`` (a file whose unpickling would run code is refused), memory-mapped (its tensors
are not read until they are copied), and its config goes through :func:`vlm.formats.build.build_checked`.
"""

from __future__ import annotations

import contextlib
import io
import pickle
import warnings
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from vlm.data.files import UnsafeFileError, check_regular
from vlm.formats.build import CheckpointError, build

if TYPE_CHECKING:  # Lightning is imported only where a task is built: reading a checkpoint does not need it
    from lightning import LightningModule

CHECKPOINT_LIMIT = 1 << 40  # bytes; the tensors are memory-mapped, so this only refuses absurd sizes
PICKLE_LIMIT = 256 << 20  # bytes of a checkpoint's pickle (its structure; the tensors are separate members)
MAX_VALUES = 1 << 20  # values a checkpoint holds in all (tensors, numbers, containers), shared references counted
INFERENCE_KEY = "inference"  # the resolved settings inference needs, beside the weights (see vlm.formats.settings)

# A task's arguments that only training uses, dropped by name from any config read from a file (the task's defaults
# stand in): the optimizer and schedule (callables LightningCLI builds), torch.compile's options (which reach
# TorchInductor, whose options name compilers to run and folders to write), and the paths of the weights a run
# starts from (the file holds the weights; an export never carries its author's paths).
TRAINING_ONLY = ("optimizer", "lr_scheduler", "compile", "init_weights", "vision_weights", "decoder_weights")
_OPTIMIZER_VALUES = ("lr", "weight_decay", "betas", "eps", "warmup_steps", "min_lr_ratio")
# Arguments of tasks in checkpoints written by earlier versions of vlm, per task, which its class no longer takes:
# the optimizer's and schedule's values (now the training-only optimizer / lr_scheduler: dropped), the language
# model's unused image settings (dropped), and a task's context_length, which with the tokenizer named by a string
# becomes a CausalLMTokenizer config (see current_config).
LEGACY_ARGUMENTS: dict[str, tuple[str, ...]] = {
    "vlm.tasks.contrastive.ContrastiveTask": _OPTIMIZER_VALUES,
    "vlm.tasks.language.LanguageModelTask": (*_OPTIMIZER_VALUES, "context_length", "image_size", "image_mean",
                                             "image_std"),
    "vlm.tasks.captioning.FlamingoTask": (*_OPTIMIZER_VALUES, "context_length"),
}


# Weight names an earlier vlm wrote that have another name today, so that one concept has one name while the files
# written before load unchanged (see current_weight_names). CLIP's image tower and its projection, which an earlier
# vlm named ``visual`` / ``visual_proj`` (open_clip's name), are ``vision`` / ``vision_proj``: the name of the CLIP
# and Flamingo constructors' argument and of the Flamingo's tower. A learned position embedding is ``pos_embed``
# everywhere (timm's name, the ViT's): the text tower's was ``positional_embedding`` (open_clip's name), the
# decoder's ``position_embedding`` (an nn.Embedding, so ``position_embedding.weight``). Names as a model's own state
# dict holds them (a task's are under ``model.``): prefixes, which rename everything under them ...
LEGACY_WEIGHT_NAMES = {"visual.": "vision.", "visual_proj.": "vision_proj."}
# ... and whole keys, which rename that key only: a CLIP's text tower, a language model's DecoderLM, a Flamingo's.
LEGACY_WEIGHT_KEYS = {"text.positional_embedding": "text.pos_embed", "position_embedding.weight": "pos_embed.weight",
                      "decoder.position_embedding.weight": "decoder.pos_embed.weight"}
# A bare state dict's (no ``model.``) whole keys: those, and a TextTransformer's own position embedding. Each is
# renamed only where the tower before it (the prefix: none, a CLIP's ``text.``, a Flamingo's ``decoder.``) is a vlm
# TextTransformer or DecoderLM (see _earlier_bare_names).
_BARE_KEYS = {**LEGACY_WEIGHT_KEYS, "positional_embedding": "pos_embed"}


def _renamed(key: str, prefixes: dict[str, str], keys: dict[str, str]) -> str:
    if key in keys:
        return keys[key]
    for old, new in prefixes.items():
        if key.startswith(old):
            return new + key[len(old):]
    return key


def current_weight_name(key: str, bare: bool = False) -> str:
    """``key`` under today's names: a task's ``model.visual...`` becomes ``model.vision...`` (works on a prefix too:
    ``model.visual.``), and its ``model.text.positional_embedding``, ``model.position_embedding.weight`` and
    ``model.decoder.position_embedding.weight`` end in ``pos_embed`` / ``pos_embed.weight`` (whole keys only). With
    ``bare`` (the key is an earlier vlm model's own state dict's, see :func:`current_weight_names`) the same names
    without ``model.`` are renamed too, and a TextTransformer's own ``positional_embedding``."""
    if key.startswith("model."):
        return "model." + _renamed(key[len("model."):], LEGACY_WEIGHT_NAMES, LEGACY_WEIGHT_KEYS)
    return _renamed(key, LEGACY_WEIGHT_NAMES, _BARE_KEYS) if bare else key


def _earlier_bare_names(weights: dict[str, Any]) -> tuple[dict[str, str], dict[str, str]]:
    """The prefixes and whole keys of a bare state dict to rename: the ``visual`` prefixes where it has
    ``visual_proj.weight`` (an earlier vlm CLIP: open_clip's checkpoints name their tower ``visual.`` too), and each
    earlier position embedding (:data:`_BARE_KEYS`) whose tower also has vlm's ``token_embedding.weight`` and
    ``blocks.0.`` keys (open_clip's text tower has ``transformer.resblocks``, Hugging Face's models other names)."""
    def vlm_tower(tower: str) -> bool:
        return tower + "token_embedding.weight" in weights and any(k.startswith(tower + "blocks.0.") for k in weights)

    keys = {old: new for old, new in _BARE_KEYS.items() if old in weights and vlm_tower(old[:old.index("position")])}
    return LEGACY_WEIGHT_NAMES if "visual_proj.weight" in weights else {}, keys


def current_weight_names(weights: dict[str, Any]) -> dict[str, Any]:
    """``weights`` (names to tensors or shapes: a task's state dict, or a model's own) with every name an earlier vlm
    wrote (:data:`LEGACY_WEIGHT_NAMES`, :data:`LEGACY_WEIGHT_KEYS`) under today's; the same dict when none is there.
    A task's (``model.``) names are renamed as :func:`current_weight_name` says. A bare state dict's only where it is
    clearly an earlier vlm model's: its ``visual.`` / ``visual_proj.`` when it has ``visual_proj.weight`` (an earlier
    CLIP), a position embedding only beside the same tower's ``token_embedding.weight`` and ``blocks.0.`` keys
    (a TextTransformer or DecoderLM: its own, ``text.`` or ``decoder.``). Names of models vlm wraps (Hugging Face's
    ``...embeddings.position_embedding.weight``) and of the files it converts (open_clip's) are never renamed."""
    prefixes, keys = _earlier_bare_names(weights)

    def name(key: str) -> str:
        return current_weight_name(key) if key.startswith("model.") else _renamed(key, prefixes, keys)

    if not any(name(k) != k for k in weights):
        return weights
    return {name(k): v for k, v in weights.items()}


def legacy_arguments(hparams: dict[str, Any]) -> list[str]:
    """The arguments in a task's saved hyper-parameters that its class no longer takes (an earlier vlm's)."""
    legacy = LEGACY_ARGUMENTS.get(hparams.get("_class_path"), ())
    found = [name for name in legacy if name in hparams]
    if "context_length" in legacy and isinstance(hparams.get("tokenizer"), str):
        found.append("tokenizer")  # a Hugging Face name, now a tokenizer config
    return found


def current_config(config: dict[str, Any]) -> dict[str, Any]:
    """A task's ``{"class_path", "init_args"}`` config in the current form (an earlier vlm's arguments migrated, see
    :data:`LEGACY_ARGUMENTS`), without its training-only arguments: what a file's task is built from."""
    init_args = config.get("init_args") or {}
    legacy = LEGACY_ARGUMENTS.get(config.get("class_path"), ())
    args = {k: v for k, v in init_args.items() if k not in legacy and k not in TRAINING_ONLY}
    name, length = init_args.get("tokenizer"), init_args.get("context_length")
    if "context_length" in legacy and (isinstance(name, str) or (name is None and length is not None)):
        args["tokenizer"] = {"class_path": "vlm.data.gpt2_tokenizer.CausalLMTokenizer",
                             "init_args": {"name_or_path": name, "context_length": length}}
    return {**config, "init_args": args}


def build_task(config: dict[str, Any], where: str = "config") -> LightningModule:
    """Builds a task from ``{"class_path": ..., "init_args": {...}}`` (vlm's tasks only, nested models and
    tokenizers as ``class_path`` dicts) for inference: its training-only arguments (:data:`TRAINING_ONLY`) are left
    out. Its hyper-parameters are the config it was built from, so its checkpoints load back."""
    init_args = {k: v for k, v in (config.get("init_args") or {}).items() if k not in TRAINING_ONLY}
    config = {**config, "init_args": init_args}
    with task_hparams_quiet():
        return with_config(build(config, where, ("task",)), config)


@contextlib.contextmanager
def task_hparams_quiet() -> Iterator[None]:
    """A task's ``save_hyperparameters()`` warns that its model argument is a module; :func:`with_config` then
    replaces those hyper-parameters with the config, so the warning says nothing true."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Attribute .* is an instance of `nn.Module`")
        yield


def with_config(task: LightningModule, config: dict[str, Any]) -> LightningModule:
    """Records ``config`` as the task's hyper-parameters (as LightningCLI does) instead of the built objects."""
    hparams = {"_class_path": config["class_path"], **(config.get("init_args") or {})}
    task.save_hyperparameters(hparams)
    return task


def task_config(hparams: dict[str, Any], where: str = "the checkpoint") -> dict[str, Any]:
    """The ``{"class_path", "init_args"}`` config of a task from its saved hyper-parameters, in the current form
    (an earlier vlm's arguments migrated, see :data:`LEGACY_ARGUMENTS`) and without its training-only arguments."""
    if not isinstance(hparams, dict):
        raise CheckpointError(f"{where}: refused hyper_parameters: not a mapping")
    hp = dict(hparams)
    class_path = hp.pop("_class_path", None)
    hp.pop("_instantiator", None)
    if class_path is None:
        raise CheckpointError(
            f"{where} does not record its task class (was the task built with vlm fit or vlm.formats.build_task?)"
        )
    return current_config({"class_path": class_path, "init_args": hp})


def read_archive(path: str | Path, what: str = "checkpoint") -> Any:
    """The contents of a file written by ``torch.save``, read without trusting it: a regular file (no FIFO, device
    or kernel pseudo-file) within :data:`CHECKPOINT_LIMIT`, whose zip members are stored uncompressed as ``torch.save``
    writes them (a compressed member could inflate a few MB into many GB) with a pickle of at most
    :data:`PICKLE_LIMIT` bytes, unpickled with ``weights_only=True`` and memory-mapped, then walked within one budget
    of :data:`MAX_VALUES` values (shared references counted at each place) and every tensor held to
    :func:`check_tensor`. What it holds then costs at most the file's own size when read.

    Raises:
        CheckpointError: naming the file and what is wrong with it.
    """
    path = Path(path)
    try:
        check_regular(path, what)
    except UnsafeFileError as e:
        raise CheckpointError(str(e)) from None
    size = path.stat().st_size
    if size > CHECKPOINT_LIMIT:
        raise CheckpointError(f"{path} is larger than {CHECKPOINT_LIMIT:,} bytes")
    if not zipfile.is_zipfile(path):  # torch.save has written zip archives since PyTorch 1.6
        raise CheckpointError(f"{path} is not a readable {what} (not a PyTorch checkpoint archive)")
    records = _check_members(path, size)
    try:
        contents = _load_mapped(path, size, records)
    except CheckpointError:
        raise
    except pickle.UnpicklingError as e:
        # torch explains at length; the line naming the refused global is the one that matters
        lines = [ln.strip() for ln in str(e).splitlines() if "Unsupported" in ln] or ["it holds Python objects"]
        raise CheckpointError(
            f"{path} is not a safe {what}: refused to unpickle it ({lines[0][:300]}); vlm loads only tensors and "
            "plain containers"
        ) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError, KeyError, TypeError, IndexError,
            AttributeError, OverflowError, MemoryError, RecursionError) as e:  # fmt: skip
        raise CheckpointError(
            f"{path} is not a readable {what}: {str(e).splitlines()[0][:300] if str(e) else type(e).__name__}"
        ) from None
    _check_values(contents, str(path))
    return contents


def _check_members(path: Path, size: int) -> dict[str, tuple[int, int]]:
    """Checks the archive's members (see :func:`read_archive`); returns each member's name -> (where its data
    starts in the file, its size)."""
    try:
        with zipfile.ZipFile(path) as archive:
            members = archive.infolist()
            records = {}
            with open(path, "rb") as f:
                for info in members:  # the data follows the local header, whose name and extra lengths may differ
                    f.seek(info.header_offset)
                    header = f.read(30)
                    if len(header) < 30 or header[:4] != b"PK\x03\x04":
                        raise CheckpointError(f"{path}: refused archive member {info.filename[:200]!r}: no local "
                                              "header where the directory says")
                    start = info.header_offset + 30 + int.from_bytes(header[26:28], "little") + int.from_bytes(
                        header[28:30], "little")
                    if start + info.file_size > size:
                        raise CheckpointError(f"{path}: refused archive member {info.filename[:200]!r}: it runs "
                                              "past the end of the file")
                    records[info.filename] = (start, info.file_size)
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as e:
        raise CheckpointError(f"{path} is not a readable checkpoint archive: {str(e)[:200]}") from None
    names = set()
    for info in members:
        name = info.filename[:200]
        if info.filename in names:
            raise CheckpointError(f"{path}: refused archive member {name!r}: it appears twice")
        names.add(info.filename)
        if info.compress_type != zipfile.ZIP_STORED or info.file_size != info.compress_size:
            raise CheckpointError(f"{path}: refused archive member {name!r}: it is compressed ({info.compress_size:,} "
                                  f"bytes for {info.file_size:,}); torch.save stores every member as it is")
        if info.file_size > size:
            raise CheckpointError(f"{path}: refused archive member {name!r}: {info.file_size:,} bytes in a file of "
                                  f"{size:,}")
        if info.filename.endswith(".pkl") and info.file_size > PICKLE_LIMIT:
            raise CheckpointError(f"{path}: refused archive member {name!r}: a pickle of {info.file_size:,} bytes "
                                  f"(at most {PICKLE_LIMIT:,})")
    return records


def _load_mapped(path: Path, size: int, records: dict[str, tuple[int, int]]) -> Any:
    """What ``torch.load(path, weights_only=True, mmap=True)`` returns, read by torch's own ``weights_only``
    unpickler, with one check torch does not make: each storage the pickle names claims no more bytes (its dtype's
    size x its element count) than the archive record it is mapped from holds. A storage that claimed more would
    read past its record, or past the end of the file (a crash, or another record's bytes)."""
    from torch import _weights_only_unpickler

    pickles = [name for name in records if name.endswith("data.pkl")]
    if len(pickles) != 1:
        raise CheckpointError(f"{path}: refused: expected one data.pkl in the archive, found {len(pickles)}")
    prefix = pickles[0][: -len("data.pkl")]
    order = records.get(f"{prefix}byteorder")
    with zipfile.ZipFile(path) as archive:
        data = archive.read(pickles[0])
        if order is not None and archive.read(f"{prefix}byteorder") != b"little":
            raise CheckpointError(f"{path}: refused: written on a big-endian machine")
    mapped = torch.UntypedStorage.from_file(str(path), False, size)  # private: pages are read only when touched
    loaded: dict[str, Any] = {}

    def persistent_load(saved_id: Any) -> Any:
        if not (isinstance(saved_id, tuple) and len(saved_id) == 5 and saved_id[0] in ("storage", b"storage")):
            raise CheckpointError(f"{path}: refused: a storage reference that is not torch's")
        _, storage_type, key, _, numel = saved_id
        dtype = torch.uint8 if storage_type is torch.UntypedStorage else getattr(storage_type, "dtype", None)
        if not isinstance(dtype, torch.dtype) or not isinstance(numel, int) or numel < 0 or not isinstance(key, str):
            raise CheckpointError(f"{path}: refused: a storage reference that is not torch's")
        nbytes = numel * torch._utils._element_size(dtype)
        offset, held = records.get(f"{prefix}data/{key}", (0, None))
        if held is None or nbytes > held:
            raise CheckpointError(f"{path}: refused: storage {key[:50]!r} claims {nbytes:,} bytes but its record "
                                  f"holds {'none' if held is None else f'{held:,}'}")
        if key not in loaded:
            loaded[key] = mapped[offset:offset + nbytes]
        untyped = loaded[key]
        if untyped.nbytes() < nbytes:
            raise CheckpointError(f"{path}: refused: storage {key[:50]!r} is named with two sizes")
        return torch.storage.TypedStorage(wrap_storage=untyped, dtype=dtype, _internal=True)

    unpickler = _weights_only_unpickler.Unpickler(io.BytesIO(data), encoding="utf-8")
    unpickler.persistent_load = persistent_load
    return unpickler.load()


def check_tensor(tensor: torch.Tensor, where: str, key: str) -> None:
    """Refuses a tensor that is not an ordinary dense, contiguous CPU tensor: sparse, quantized, meta or nested
    tensors, and strides that repeat stored values (a stride of 0 describes any shape over one stored value).
    Contiguous views into a larger storage pass (a sharded optimizer's state is written that way); that views do not
    claim more bytes than the file stores is :func:`_check_values`'s check over all of them.

    Raises:
        CheckpointError: naming the file, the key and why.
    """
    def refuse(why: str) -> CheckpointError:
        return CheckpointError(f"{where}: refused tensor {key[:200]}: {why}")

    if tensor.layout != torch.strided or tensor.is_nested:
        raise refuse(f"its layout is {tensor.layout} (only dense tensors are read)")
    if tensor.is_quantized:
        raise refuse("it is quantized (only plain dense tensors are read)")
    if tensor.device.type != "cpu":
        raise refuse(f"it is on the {tensor.device.type} device, not stored in the file")
    if not tensor.is_contiguous():
        raise refuse(f"shape {tuple(tensor.shape)} with strides {tensor.stride()} is not contiguous (strides that "
                     "repeat stored values describe more than the file holds)")


def _check_values(contents: Any, where: str) -> None:
    """Walks everything ``contents`` holds within :data:`MAX_VALUES` visits, checking each tensor, and refuses
    tensors that together claim more bytes than their storages hold (overlapping views of one stored block).
    The same view under two names (a tied weight) counts once."""
    budget = MAX_VALUES
    stack: list[tuple[Any, str]] = [(contents, "")]
    storages: dict[int, int] = {}  # storage address -> its bytes
    views: set[tuple[int, int, tuple[int, ...], torch.dtype]] = set()
    claimed = 0
    while stack:
        value, key = stack.pop()
        budget -= 1
        if budget < 0:
            raise CheckpointError(f"{where}: refused: it holds more than {MAX_VALUES:,} values in all (shared "
                                  "references count each time)")
        if isinstance(value, torch.Tensor):
            check_tensor(value, where, key or "(top level)")
            storage = value.untyped_storage()
            address = storage.data_ptr()
            storages[address] = storage.nbytes()
            view = (address, value.storage_offset(), tuple(value.shape), value.dtype)
            if view not in views:
                views.add(view)
                claimed += value.numel() * value.element_size()
        elif isinstance(value, dict):
            stack.extend((v, f"{key}.{k}" if key else str(k)) for k, v in value.items())
        elif isinstance(value, list | tuple):
            stack.extend((v, f"{key}[{i}]") for i, v in enumerate(value))
    stored = sum(storages.values())
    if claimed > stored:
        raise CheckpointError(f"{where}: refused: its tensors claim {claimed:,} bytes over {stored:,} stored "
                              "(views that overlap one another)")


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """Loads a ``vlm fit`` checkpoint with :func:`read_archive` (tensors memory-mapped, every bound checked); errors
    become :class:`CheckpointError`."""
    path = Path(path)
    ckpt = read_archive(path)
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("state_dict"), dict) or "hyper_parameters" not in ckpt:
        raise CheckpointError(f"{path} is not a vlm training checkpoint (no state_dict / hyper_parameters)")
    if not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in ckpt["state_dict"].items()):
        raise CheckpointError(f"{path}: refused state_dict: it holds entries that are not named tensors")
    return ckpt


__all__ = ["CheckpointError", "INFERENCE_KEY", "LEGACY_ARGUMENTS", "LEGACY_WEIGHT_KEYS", "LEGACY_WEIGHT_NAMES",
           "TRAINING_ONLY", "build_task", "check_tensor", "current_config", "current_weight_name",
           "current_weight_names", "legacy_arguments", "read_archive", "read_checkpoint", "task_config"]
