"""Structure-aware fuzzing of the files vlm reads from strangers: checkpoints, exports, indexes, metadata files and
images (used by ``tests/test_fuzz_files.py``).

Seeds are the real files the tests make (the tiny CLIP and Flamingo checkpoints of ``conftest.py``, their
``vlm export`` folders, a ``vlm index`` of a few images, an imagefolder ``metadata.jsonl`` and the images). Each case
is one seed changed by one or two mutators that know the file's structure (a checkpoint's zip members and its
``data.pkl`` object tree: hyper-parameters, tensors' storages, strides, offsets, sizes, dtypes; safetensors headers;
JSON configs and records; PNG chunks with their CRCs, JPEG markers, BMP and GIF headers; paths that name special
files), chosen by ``random.Random(f"{seed}:{kind}:{case}")``, so a case is reproduced from its three numbers.

The contract each case is held to (:data:`TARGETS`): every loader step ends in a result or in one of the error
classes that step documents (the ones the command-line tools turn into one error line), never another exception;
within :data:`CASE_TIMEOUT` seconds (more on a machine so busy that the genuine seeds load slowly: at least
:data:`TIMEOUT_FACTOR` times the slowest genuine load); with a peak memory within :data:`MEMORY_SLACK_MIB` of what
loading the genuine seed costs; and without tripping a wire (importing a module the file names, asking on the
terminal, reaching for the network, starting a process).

The cases run in child processes (``--child``, :data:`JOBS` side by side) with an address-space limit, so a memory
bomb fails its case instead of the machine; the parent restarts a child after a case that kills or hangs it, and
reports that case. From a shell::

    python tests/fuzz_cases.py --cases 2000                 # a campaign; prints the distinct failure classes
    python tests/fuzz_cases.py --reproduce checkpoint 0 17  # one case: its file kept, its traceback shown
"""

from __future__ import annotations

import argparse
import builtins
import contextlib
import copy
import functools
import io
import json
import os
import pickle
import random
import re
import resource
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
import traceback
import zipfile
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent
SHARES = {"checkpoint": 0.22, "export": 0.16, "index": 0.14, "metadata": 0.14, "image": 0.34}  # of the cases
CASE_MARK = "fuzz case: "  # the child's stderr line before each case, so a crash report shows that case's output
MAX_RESTARTS = 20  # per child: after that many cases that killed or hung it, the rest are not run (and reported)
JOBS = int(os.environ.get("VLM_FUZZ_JOBS", str(min(2, os.cpu_count() or 1))))  # child processes side by side
CASE_TIMEOUT = float(os.environ.get("VLM_FUZZ_CASE_TIMEOUT", "8"))  # seconds per case (a genuine one: ~0.1 s)
TIMEOUT_FACTOR = 40  # the time limit is also at least this many times the slowest genuine case on this machine
MEMORY_SLACK_MIB = float(os.environ.get("VLM_FUZZ_MEMORY_MIB", "100"))  # over a genuine load's peak growth
ADDRESS_SPACE_GIB = float(os.environ.get("VLM_FUZZ_ADDRESS_SPACE_GIB", "4"))  # over the warmed-up child's size
LABELS = ["a red circle", "a blue square"]


# ============================================================================================ the contract
@dataclass(frozen=True)
class Step:
    """One loader call of a case: ``run(path, state)`` (``state`` carries what earlier steps returned) may return a
    result or raise one of ``accepted`` (dotted class names); anything else is a failure."""

    name: str
    run: Callable[[Path, dict], Any]
    accepted: tuple[str, ...]


def _cls(name: str) -> type:
    import importlib

    module, _, attr = name.rpartition(".")
    return getattr(importlib.import_module(module), attr)


def _read_export(path: Path, state: dict) -> None:
    from vlm.formats.load import read_task_file

    read_task_file(path).weights()


def _load(path: Path, state: dict) -> None:
    import vlm

    state["predictor"] = vlm.load(path)


def _classifier(path: Path, state: dict) -> None:  # zero_shot.py builds it where a ValueError is one error line
    from vlm.inference import CLIPPredictor

    if isinstance(state.get("predictor"), CLIPPredictor):
        state["predictor"].zero_shot_classifier(LABELS)


def _classify(path: Path, state: dict) -> None:  # then classifies in a loop that catches nothing
    from vlm.inference import CLIPPredictor

    if isinstance(state.get("predictor"), CLIPPredictor):
        out = state["predictor"].classify([_image()], LABELS, top_k=2)
        assert len(out) == 1 and len(out[0]) == 2, f"classify gave {out!r}"


def _caption(path: Path, state: dict) -> None:  # caption.py turns a ValueError here into one error line
    from vlm.inference import CaptionPredictor

    if isinstance(state.get("predictor"), CaptionPredictor):
        out = state["predictor"].caption([_image()])
        assert len(out) == 1 and isinstance(out[0], str), f"caption gave {out!r}"


def _load_task(path: Path, state: dict) -> None:  # what `vlm export` does with the file
    from vlm.formats import export_task, load_task

    if state.get("case", 0) % 3 == 0:  # a third of the cases: Lightning's task path costs another build
        export_task(load_task(path), state["scratch"] / "re-export")


def _load_index(path: Path, state: dict) -> None:
    from vlm.index import load_index

    state["index"] = load_index(path)


def _search(path: Path, state: dict) -> None:
    from vlm.index import search

    results = search(state["index"], state["clip"], "a red circle", top_k=3)
    assert all(isinstance(s, float) for _, s in results), results


def _read_metadata(path: Path, state: dict) -> None:
    from vlm.inputs import read_metadata

    warnings_ = []
    read_metadata(path / "metadata.jsonl", warnings_.append)
    assert len(warnings_) <= 1, f"{len(warnings_)} warnings for one file (one promised): {warnings_[:3]}"


def _read_captions(path: Path, state: dict) -> None:
    from vlm.index import read_captions

    warnings_ = []
    read_captions(path, warnings_.append)
    # one for the malformed lines, one for captions over the per-image cap: never one per line
    assert len(warnings_) <= 2, f"{len(warnings_)} warnings for one file (at most two promised): {warnings_[:3]}"


def _load_image(path: Path, state: dict) -> None:
    from vlm.data.images import load_image

    state["image"] = load_image(path)


def _embed_image(path: Path, state: dict) -> None:
    state["clip"].embed_images(state["image"])


CHECKPOINT_ERROR = "vlm.formats.CheckpointError"
# The loaders each kind of file goes through, in order, and the errors each may end in: the classes the scripts and
# commands catch at that point and print as one line (scripts/zero_shot.py, scripts/caption.py, vlm export, vlm
# search, vlm retrieval). A step whose file an earlier step refused is not run. Adjust here when the API changes.
TARGETS: dict[str, tuple[Step, ...]] = {
    "checkpoint": (  # vlm.load reads the file with vlm.formats.read_checkpoint
        Step("vlm.load", _load, (CHECKPOINT_ERROR,)),
        Step("zero_shot_classifier", _classifier, (CHECKPOINT_ERROR, "builtins.ValueError")),
        Step("classify", _classify, ()),
        Step("caption", _caption, ("builtins.ValueError",)),
        Step("load_task+export_task", _load_task, (CHECKPOINT_ERROR,)),
    ),
    "export": (
        Step("read_export", _read_export, (CHECKPOINT_ERROR,)),
        Step("vlm.load", _load, (CHECKPOINT_ERROR,)),
        Step("zero_shot_classifier", _classifier, (CHECKPOINT_ERROR, "builtins.ValueError")),
        Step("classify", _classify, ()),
        Step("caption", _caption, ("builtins.ValueError",)),
        Step("load_task+export_task", _load_task, (CHECKPOINT_ERROR,)),
    ),
    "index": (
        Step("load_index", _load_index, ("vlm.index.IndexFileError",)),
        Step("search", _search, ("builtins.ValueError",)),
    ),
    "metadata": (
        Step("read_metadata", _read_metadata, ()),
        Step("read_captions", _read_captions, ("vlm.data.files.UnsafeFileError",)),
    ),
    "image": (
        Step("load_image", _load_image, ("vlm.data.images.ImageLoadError",)),
        Step("embed_images", _embed_image, ()),
    ),
}


# ============================================================================================ seeds
def make_seeds(root: str | os.PathLike) -> Path:
    """Writes the seed files under ``root`` (once; a complete folder is reused) and returns it."""
    root = Path(root)
    if (root / "DONE").exists():
        return root
    import torch
    from conftest import write_tiny_checkpoints
    from PIL import Image, ImageDraw

    from vlm.formats import export_task, load_task
    from vlm.index import build_index

    root.mkdir(parents=True, exist_ok=True)
    ckpts = write_tiny_checkpoints(root)
    for name, path in ckpts.items():
        export_task(load_task(path), root / f"{name}_export")
    images = root / "images"
    images.mkdir(exist_ok=True)
    base = Image.new("RGB", (20, 16), (250, 250, 250))
    ImageDraw.Draw(base).ellipse((3, 3, 15, 12), fill=(220, 30, 30))
    base.save(images / "red.png")
    base.convert("RGBA").save(images / "alpha.png")
    base.convert("P", palette=Image.Palette.ADAPTIVE, colors=8).save(images / "palette.png", transparency=0)
    Image.fromarray((torch.arange(16 * 20).reshape(16, 20) * 200).numpy().astype("uint16")).save(images / "grey16.png")
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotated, as phone photos are stored
    base.save(images / "photo.jpg", quality=90, exif=exif)
    base.save(images / "progressive.jpg", progressive=True)
    base.save(images / "picture.bmp")
    base.convert("P").save(images / "anim.gif", save_all=True, append_images=[base.convert("P")], duration=50)
    base.save(images / "picture.tiff")
    rows = [{"file_name": p.name, "caption": f"a picture called {p.stem}", "label": p.stem}
            for p in sorted(images.iterdir())]  # fmt: skip
    rows.append({"file_name": "red.png", "captions": ["a red circle", "a round red thing"]})
    (images / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    build_index(ckpts["clip"], images, root / "clip.index", progress=False)
    _make_planted(root / "planted")
    (root / "DONE").write_text("")
    return root


TRIPWIRE_MODULE = "fuzz_tripwire"


def _make_planted(folder: Path) -> None:
    """What a file may name: a module that marks its import, Hugging Face folders with remote code, a Hub kernel
    and a torch attribute as the dtype, a FIFO."""
    folder.mkdir(parents=True, exist_ok=True)
    marker = folder / "RAN"
    (folder / f"{TRIPWIRE_MODULE}.py").write_text(
        f"import pathlib\npathlib.Path({str(marker)!r}).touch()\n"
        "class Evil:\n    def __init__(self, *a, **k):\n        pass\n"
    )
    remote = folder / "hf_remote_tokenizer"
    remote.mkdir(exist_ok=True)
    (remote / "tokenizer_config.json").write_text(json.dumps(
        {"auto_map": {"AutoTokenizer": [f"{TRIPWIRE_MODULE}.Evil", None]}, "tokenizer_class": "Evil"}))
    (remote / f"{TRIPWIRE_MODULE}.py").write_text((folder / f"{TRIPWIRE_MODULE}.py").read_text())
    regex = folder / "hf_regex_tokenizer"
    regex.mkdir(exist_ok=True)
    (regex / "tokenizer.json").write_text(json.dumps({
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": [], "normalizer": None,
        "pre_tokenizer": {"type": "Split", "pattern": {"Regex": "(a*)*" * 300 + "("}, "behavior": "Isolated",
                          "invert": False},
        "post_processor": None, "decoder": None,
        "model": {"type": "WordLevel", "vocab": {"a": 0, "[UNK]": 1}, "unk_token": "[UNK]"}}))
    for name, extra in (("hf_kernel_decoder", {"attn_implementation": "kernels-community/flash-attn"}),
                        ("hf_dtype_decoder", {"dtype": "_dynamo", "torch_dtype": "_dynamo"}),
                        ("hf_remote_decoder", {"auto_map": {"AutoModelForCausalLM": f"{TRIPWIRE_MODULE}.Evil",
                                                            "AutoConfig": f"{TRIPWIRE_MODULE}.Evil"}})):
        d = folder / name
        d.mkdir(exist_ok=True)
        (d / "config.json").write_text(json.dumps({"model_type": "gpt2", "vocab_size": 64, "n_positions": 32,
                                                   "n_embd": 16, "n_layer": 1, "n_head": 2, **extra}))
        (d / f"{TRIPWIRE_MODULE}.py").write_text((folder / f"{TRIPWIRE_MODULE}.py").read_text())
    fifo = folder / "fifo"
    if not fifo.exists():
        os.mkfifo(fifo)


# ============================================================================================ values
def nasty_value(rng: random.Random, json_safe: bool = False) -> Any:
    """A value a careless reader trips on: huge or negative numbers, non-finite floats, control characters, format
    specs, paths to special files, long strings, big, deep or self-similar containers, configs naming classes."""
    pick = rng.randrange(16)
    if pick == 0:
        return rng.choice([0, -1, 1, 2, 3, 7, 2**31, 2**53 + 1, 2**63, 2**64 + 1, -(2**63), 10**40, 65536, 65537,
                           4096, 4097, 100_000, 6000])
    if pick == 1:
        return rng.choice([float("nan"), float("inf"), -float("inf"), 1e308, -0.0, 5e-324, 0.5, 1e9])
    if pick == 2:
        return rng.choice([True, False, None])
    if pick == 3:
        return rng.choice(["", "\x00", "\x1b[2J\x1b[31mwrote evil", "a\nerror: forged line", "{}", "{:>300000000}",
                           "{0}{1}", "{}" * 50, "{", "}", "{!r}", "\u202egnp.exe", "../../../etc/passwd",
                           "/proc/self/pagemap", "/dev/zero", "/", "~", "sdpa", "_dynamo", "float16", "meta", "cuda"])
    if pick == 4:
        return "x" * rng.choice([1000, 65536, 65537, 300_000])
    if pick == 5:
        return [rng.choice([0, 1, "a", None])] * rng.choice([0, 1, 3, 65536, 65537, 200_000])
    if pick == 6:
        return {f"k{i}": i for i in range(rng.choice([0, 1, 65537]))}
    if pick == 7:  # nesting deeper than any bound
        value: Any = rng.choice([1, "x", None])
        for _ in range(rng.choice([33, 40, 200, 400])):
            value = [value] if rng.random() < 0.5 else {"a": value}
        return value
    if pick == 8 and not json_safe:  # shared references: a small pickle that a naive walk visits billions of times
        return shared_reference_bomb(rng)
    if pick == 9:
        return {"class_path": rng.choice(FOREIGN_CLASSES), "init_args": {}}
    if pick == 10:
        return {"class_path": rng.choice(list(_buildable())), "init_args": {}}
    if pick == 11:
        return rng.choice([{"options": {"cpp.cxx": ["sh -c 'touch /tmp/vlm-fuzz-pwned' x", "g++"]}},
                           {"mode": "max-autotune", "backend": "inductor"}, True, {"backend": "os.system"}])
    if pick == 12:
        return rng.choice([[1, 2, 3], [0.5, 0.5], [1, 2], [0, 0, 0], [float("nan")] * 3, ["a", "b", "c"], [],
                           [1, 2, 3, 4]])
    if pick == 13 and not json_safe:
        return rng.choice([{1: "int key"}, {(1, 2): "tuple key"}, {None: 1}, (1, 2), b"bytes", bytearray(b"x")])
    if pick == 14:
        return str(rng.choice([-1, 0, 10**50]))
    return rng.choice([str(TESTS), "/tmp", "/proc", "/dev", "/etc"])


FOREIGN_CLASSES = ["os.system", "builtins.eval", "subprocess.Popen", "torch.nn.Linear", "vlm.tasks.optim.AdamW",
                   "lightning.pytorch.cli.instantiate_module", f"{TRIPWIRE_MODULE}.Evil", "vlm.models.clip",
                   "vlm.models.clip.CLIP.__init__", "vlm.models.clip.CLIP.__class__", "vlm..models.clip.CLIP", "",
                   "vlm.models.clip.CLIP\x00", "torch.load", "vlm.formats.build.build", "collections.OrderedDict"]


def _buildable() -> dict[str, str]:
    from vlm.formats import BUILDABLE

    return BUILDABLE


def shared_reference_bomb(rng: random.Random) -> list | dict:
    """Nested lists (or mappings) where each level holds the level below many times: pickled once (a few KB),
    visited fan**depth times by a walk that does not count shared references."""
    value: Any = [0] * 16
    for _ in range(rng.choice([2, 3, 4])):
        fan = rng.choice([256, 4096, 65536])
        value = [value] * fan if rng.random() < 0.7 else {f"k{i}": value for i in range(fan)}
    return value


# ============================================================================================ config trees
SIZE_KEYS = ("width", "depth", "num_heads", "patch_size", "image_size", "context_length", "embed_dim", "num_latents",
             "resampler_depth", "resampler_heads", "cross_attn_heads", "max_new_tokens", "num_beams", "vocab_size",
             "images_per_sequence", "mlp_ratio", "cross_attn_every", "top_k")
EXTRA_KEYS = ("compile", "_instantiator", "dict_kwargs", "class_path", "init_args", "optimizer", "lr_scheduler",
              "vision_weights", "decoder_weights", "init_weights", "name_or_path", "__class__", "trust_remote_code",
              "attn_implementation", "dtype", "pretrained", "\x1b[31mkey\nline", "")


def positions(tree: Any, path: tuple = ()) -> list[tuple]:
    """Every (path) to a value inside nested dicts and lists (the root excluded)."""
    out = []
    if isinstance(tree, dict):
        items = tree.items()
    elif isinstance(tree, list):
        items = enumerate(tree)
    else:
        return out
    for key, value in items:
        out.append((*path, key))
        if len(out) < 5000:
            out.extend(positions(value, (*path, key)))
    return out


def get_at(tree: Any, path: tuple) -> Any:
    for key in path:
        tree = tree[key]
    return tree


def mutate_config(rng: random.Random, tree: dict, json_safe: bool = False) -> str:
    """One structure-aware change to a config tree (a task's hyper-parameters, an export's config.json, an inference
    block); returns what it did."""
    spots = positions(tree)
    named = [p for p in spots if isinstance(p[-1], str)]
    op = rng.randrange(12)
    if op == 11 and not json_safe and spots:  # a value that is small as a pickle and huge as a walk
        path = rng.choice(spots)
        get_at(tree, path[:-1])[path[-1]] = value = shared_reference_bomb(rng)
        return f"set {_show(path)} = shared-reference bomb {_short(value)}"
    if op == 0 and spots:  # any value becomes a nasty one
        path = rng.choice(spots)
        get_at(tree, path[:-1])[path[-1]] = value = nasty_value(rng, json_safe)
        return f"set {_show(path)} = {_short(value)}"
    if op == 1:  # a size or bound at and around its limits
        sized = [p for p in named if p[-1] in SIZE_KEYS] or named
        if sized:
            path = rng.choice(sized)
            value = rng.choice([0, -1, 1, 2, 3, 4095, 4096, 4097, 65536, 65537, 6000, 100_000, 2**31, 2**62, 1.5,
                                "16", True, None, 257, 1024])
            get_at(tree, path[:-1])[path[-1]] = value
            return f"set {_show(path)} = {value!r}"
    if op == 2:  # a key removed
        if named:
            path = rng.choice(named)
            del get_at(tree, path[:-1])[path[-1]]
            return f"deleted {_show(path)}"
    if op == 3:  # an extra key
        dicts = [()] + [p for p in spots if isinstance(get_at(tree, p), dict)]
        path = rng.choice(dicts)
        key = rng.choice(EXTRA_KEYS)
        get_at(tree, path)[key] = value = nasty_value(rng, json_safe)
        return f"added {_show((*path, key))} = {_short(value)}"
    if op == 4:  # a class path swapped for another class, a foreign one or garbage
        paths = [p for p in named if p[-1] in ("class_path", "_class_path")]
        if paths:
            path = rng.choice(paths)
            value = rng.choice(FOREIGN_CLASSES + list(_buildable()) + [None, 1, ["vlm.models.clip.CLIP"]])
            get_at(tree, path[:-1])[path[-1]] = value
            return f"set {_show(path)} = {value!r}"
    if op == 5:  # a subtree moved where another belongs (the text tower's config as the vision tower, ...)
        subtrees = [p for p in spots if isinstance(get_at(tree, p), dict | list)]
        if len(subtrees) >= 2:
            a, b = rng.sample(subtrees, 2)
            if a[: len(b)] != b and b[: len(a)] != a:
                get_at(tree, a[:-1])[a[-1]] = copy.deepcopy(get_at(tree, b))
                return f"copied {_show(b)} over {_show(a)}"
    if op == 6 and not json_safe:  # one subtree referenced from many places (kept shared by pickle's memo)
        subtrees = [p for p in spots if isinstance(get_at(tree, p), dict | list)]
        if subtrees:
            path = rng.choice(subtrees)
            shared = get_at(tree, path)
            get_at(tree, path[:-1])[path[-1]] = [shared] * rng.choice([1000, 65536])
            return f"{_show(path)} referenced many times"
    if op == 7:  # a container's type changed
        subtrees = [p for p in spots if isinstance(get_at(tree, p), dict | list)]
        if subtrees:
            path = rng.choice(subtrees)
            old = get_at(tree, path)
            new = list(old.items()) if isinstance(old, dict) else {str(i): v for i, v in enumerate(old)}
            get_at(tree, path[:-1])[path[-1]] = [list(x) for x in new] if isinstance(new, list) else new
            return f"{_show(path)} dict<->list"
    if op == 8:  # a key renamed
        if named:
            path = rng.choice(named)
            parent = get_at(tree, path[:-1])
            if isinstance(parent, dict):
                new_key = rng.choice([path[-1] + "\x00", path[-1].upper(), "\u202e" + path[-1], path[-1] * 2,
                                      "init_args", "class_path"])
                parent[new_key] = parent.pop(path[-1])
                return f"renamed {_show(path)} to {new_key!r}"
    if op == 9:  # a Hugging Face part from a planted folder, or a path to a special file as a file argument
        return "planted:"  # filled in by the caller, which knows where the planted files are
    if op == 10 and spots:  # a number set to its type's extremes
        numbers = [p for p in spots if isinstance(get_at(tree, p), int | float) and not isinstance(get_at(tree, p),
                                                                                                    bool)]
        if numbers:
            path = rng.choice(numbers)
            value = rng.choice([-get_at(tree, path), get_at(tree, path) * 1000, 2**53 + 1, 10**300, float("nan"),
                                1e-300])
            get_at(tree, path[:-1])[path[-1]] = value
            return f"set {_show(path)} = {_short(value)}"
    path = rng.choice(spots) if spots else None
    if path is None:
        return "unchanged"
    get_at(tree, path[:-1])[path[-1]] = value = nasty_value(rng, json_safe)
    return f"set {_show(path)} = {_short(value)}"


def plant(rng: random.Random, tree: dict, planted: Path) -> str:
    """Points a file argument of the config at a planted folder or a special file: a Hugging Face tokenizer or
    decoder with remote code, a Hub kernel or a torch attribute as dtype; weights paths at /proc or a FIFO."""
    init = tree.get("init_args") if isinstance(tree.get("init_args"), dict) else tree
    pick = rng.randrange(4)
    model = init.get("model")
    flamingo = isinstance(model, dict) and isinstance(model.get("init_args"), dict) and "decoder" in model["init_args"]
    if pick == 1 and not flamingo:
        pick = 0
    if pick == 0:
        folder = rng.choice(["hf_remote_tokenizer", "hf_regex_tokenizer"])
        tokenizer = init.get("tokenizer")
        if isinstance(tokenizer, dict) and "gpt2_tokenizer" in str(tokenizer.get("class_path")):
            tokenizer.setdefault("init_args", {})["name_or_path"] = str(planted / folder)  # the GPT-2 one's source
            return f"tokenizer name_or_path = {folder}"
        init["tokenizer"] = {"class_path": "vlm.data.hf_tokenizer.HFTokenizer",
                             "init_args": {"name_or_path": str(planted / folder), "context_length": 16}}
        return f"tokenizer = HFTokenizer({folder})"
    if pick == 1:
        if flamingo:
            folder = rng.choice(["hf_kernel_decoder", "hf_dtype_decoder", "hf_remote_decoder"])
            args = {"name_or_path": str(planted / folder)}
            if rng.random() < 0.5:
                args[rng.choice(["dtype", "attn_implementation"])] = rng.choice(
                    ["_dynamo", "kernels-community/flash-attn", "float16", "fx", "distributed"])
            model["init_args"]["decoder"] = {"class_path": "vlm.models.hf_decoder.HFCausalLM", "init_args": args}
            return f"decoder = HFCausalLM({args})"
    key = rng.choice(["vision_weights", "decoder_weights", "init_weights"])
    target = rng.choice(["/proc/self/pagemap", "/dev/zero", str(planted / "fifo"), "/proc/self/status", "/"])
    init[key] = target
    return f"{key} = {target}"


def _show(path: tuple) -> str:
    return ".".join(str(p) for p in path)


def _short(value: Any) -> str:
    text = repr(value) if not isinstance(value, list | dict) or len(value) < 8 else \
        f"<{type(value).__name__} of {len(value)}>"
    return text if len(text) <= 80 else text[:77] + "..."


# ============================================================================================ checkpoints
class Ref:
    """A global named in ``data.pkl`` (``torch._utils._rebuild_tensor_v2``, ``torch.FloatStorage``, ...); calling
    it records the call instead of making it."""

    def __init__(self, module: str, name: str) -> None:
        self.module, self.name = module, name

    def __call__(self, *args: Any) -> Call:
        return Call(self, args)

    def resolve(self) -> Any:
        import importlib

        obj: Any = importlib.import_module(self.module)
        for part in self.name.split("."):
            obj = getattr(obj, part)
        return obj

    def __repr__(self) -> str:
        return f"{self.module}.{self.name}"


class Call:
    """An object ``data.pkl`` builds by calling a global (a tensor, an OrderedDict), with what pickle then adds."""

    def __init__(self, fn: Ref, args: tuple) -> None:
        self.fn, self.args, self.state, self.items, self.appended = fn, args, None, [], []

    def __setitem__(self, key: Any, value: Any) -> None:
        self.items.append((key, value))

    def append(self, value: Any) -> None:
        self.appended.append(value)

    def extend(self, values: Any) -> None:
        self.appended.extend(values)

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def __reduce__(self) -> tuple:
        fn = self.fn.resolve() if isinstance(self.fn, Ref) else self.fn
        return (fn, self.args, self.state, iter(self.appended) if self.appended else None,
                iter(self.items) if self.items else None)


class Pid:
    """A persistent id in ``data.pkl``: ``("storage", storage type, key, location, numel)``."""

    def __init__(self, value: tuple) -> None:
        self.value = value


class _TreeUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Ref:
        return Ref(module, name)

    def persistent_load(self, pid: Any) -> Pid:
        return Pid(tuple(pid))


class _TreePickler(pickle.Pickler):
    def persistent_id(self, obj: Any) -> Any:
        if isinstance(obj, Pid):
            return tuple(x.resolve() if isinstance(x, Ref) else x for x in obj.value)
        return None


def read_tree(data: bytes) -> Any:
    return _TreeUnpickler(io.BytesIO(data)).load()


def write_tree(tree: Any) -> bytes:
    buf = io.BytesIO()
    _TreePickler(buf, protocol=2).dump(tree)
    return buf.getvalue()


@dataclass
class Checkpoint:
    """A checkpoint's zip members (name -> bytes, in order) and its ``data.pkl`` as a tree of :class:`Call`s."""

    prefix: str
    members: dict[str, bytes]
    tree: Any
    bombs: dict[str, bytes] = field(default_factory=dict)  # members written compressed, from their deflate stream

    @classmethod
    def read(cls, raw: bytes) -> Checkpoint:
        with zipfile.ZipFile(io.BytesIO(raw)) as z:
            members = {n: z.read(n) for n in z.namelist()}
        prefix = next(n for n in members if n.endswith("/data.pkl"))[: -len("data.pkl")]
        return cls(prefix, members, read_tree(members[prefix + "data.pkl"]))

    def tensors(self) -> list[tuple[str, Call]]:
        state = self.tree.get("state_dict") if isinstance(self.tree, dict) else None
        items = state.items if isinstance(state, Call) else list(state.items()) if isinstance(state, dict) else []
        return [(k, v) for k, v in items if isinstance(v, Call) and getattr(v.fn, "name", "").startswith(
            "_rebuild_tensor")]

    def to_bytes(self, pickled: bytes | None = None, duplicate: tuple[str, bytes] | None = None) -> bytes:
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w") as z:
            for name, data in self.members.items():
                if name == self.prefix + "data.pkl":
                    data = pickled if pickled is not None else write_tree(self.tree)
                if name in self.bombs:
                    continue
                z.writestr(_member(name), data)
            if duplicate is not None:
                import warnings

                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # zipfile warns about the duplicate name we write on purpose
                    z.writestr(_member(duplicate[0]), duplicate[1])
        raw = buf.getvalue()
        for name, stream in self.bombs.items():
            raw = _append_deflated(raw, name, *stream)
        return raw


def _member(name: str) -> zipfile.ZipInfo:
    """A zip member with a fixed time stamp (``writestr(name, ...)`` stamps the current time: the same case would
    make different bytes a second later)."""
    return zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))


def _append_deflated(body: bytes, name: str, stream: bytes, size: int, crc: int) -> bytes:
    """The zip ``body`` (no comment, no zip64) with one more member ``name`` whose pre-compressed deflate ``stream``
    inflates to ``size`` bytes (compressing a gigabyte for each case would take seconds)."""
    cd_start = struct.unpack("<I", body[-6:-2])[0]
    entries, count = body[cd_start:-22], struct.unpack("<H", body[-12:-10])[0]
    local_offset = cd_start
    encoded = name.encode()
    local = struct.pack("<IHHHHHIIIHH", 0x04034B50, 20, 0, 8, 0, 0, crc, len(stream), size & 0xFFFFFFFF,
                        len(encoded), 0) + encoded
    central = struct.pack("<IHHHHHHIIIHHHHHII", 0x02014B50, 20, 20, 0, 8, 0, 0, crc, len(stream),
                          size & 0xFFFFFFFF, len(encoded), 0, 0, 0, 0, 0, local_offset) + encoded
    new_cd = entries + central
    new_cd_start = local_offset + len(local) + len(stream)
    end = struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, count + 1, count + 1, len(new_cd), new_cd_start, 0)
    return body[:cd_start] + local + stream + new_cd + end


_BOMBS: dict[tuple, tuple[bytes, int, int]] = {}


def deflate_bomb(head: bytes, zeros: int) -> tuple[bytes, int, int]:
    """(raw deflate stream, size, crc) of ``head`` followed by ``zeros`` zero bytes; cached per (head, size)."""
    key = (zlib.crc32(head), len(head), zeros)
    if key not in _BOMBS:
        comp = zlib.compressobj(9, zlib.DEFLATED, -15)
        parts, crc, chunk = [comp.compress(head)], zlib.crc32(head), bytes(1 << 24)
        left = zeros
        while left:
            piece = chunk[: min(left, len(chunk))]
            parts.append(comp.compress(piece))
            crc = zlib.crc32(piece, crc)
            left -= len(piece)
        parts.append(comp.flush())
        _BOMBS[key] = (b"".join(parts), len(head) + zeros, crc)
    return _BOMBS[key]


STORAGE_TYPES = ["FloatStorage", "DoubleStorage", "HalfStorage", "BFloat16Storage", "LongStorage", "IntStorage",
                 "ShortStorage", "CharStorage", "ByteStorage", "BoolStorage", "ComplexFloatStorage",
                 "ComplexDoubleStorage", "QInt8Storage", "QUInt8Storage", "UntypedStorage"]
REBUILDERS = ["_rebuild_tensor_v2", "_rebuild_parameter", "_rebuild_meta_tensor_no_storage", "_rebuild_sparse_tensor",
              "_rebuild_qtensor", "_rebuild_tensor", "_rebuild_nested_tensor", "_rebuild_wrapper_subclass",
              "_rebuild_device_tensor_from_numpy", "_rebuild_parameter_with_state"]


def mutate_tensor(rng: random.Random, ckpt: Checkpoint) -> str:
    """One change to one tensor's record in ``data.pkl``: strides (0, negative, huge), storage offset, size, the
    storage's dtype, element count or key, the rebuild function, requires_grad, hooks."""
    tensors = ckpt.tensors()
    if not tensors:
        return "no tensors"
    name, call = rng.choice(tensors)
    args = list(call.args)
    if len(args) < 4:
        return "odd tensor"
    pid, offset, size, stride = args[:4]
    op = rng.randrange(12)
    if op == 0:  # stride 0 everywhere or in one dimension: any shape from one stored value
        stride = tuple(0 if rng.random() < 0.7 else s for s in stride) if stride else stride
        if rng.random() < 0.3 and size:
            size = tuple(s * rng.choice([1, 64, 4096]) for s in size)
        detail = f"stride {stride} size {size}"
    elif op == 1:
        stride = tuple(rng.choice([-1, -s or -1, 2**40, s * 2, 1]) for s in stride)
        detail = f"stride {stride}"
    elif op == 2:
        offset = rng.choice([-1, 1, 2**31, 2**62, pid.value[4] if len(pid.value) > 4 else 7])
        detail = f"storage offset {offset}"
    elif op == 3:
        size = rng.choice([(), (0,), (-1,), (2**31, 2**31), tuple(size) + (1,), tuple(size)[:-1],
                           tuple(s + 1 for s in size), (65536, 65536), (1.5,), ("3",), None])
        detail = f"size {size!r}"
    elif op == 4:  # the storage's dtype (the bytes stay)
        value = list(pid.value)
        value[1] = Ref("torch", rng.choice(STORAGE_TYPES))
        pid = Pid(tuple(value))
        detail = f"storage type {value[1]}"
    elif op == 5:  # the storage's element count
        value = list(pid.value)
        value[4] = rng.choice([0, 1, value[4] - 1, value[4] + 1, value[4] * 8, 2**40, -1])
        pid = Pid(tuple(value))
        detail = f"storage numel {value[4]}"
    elif op == 6:  # the storage key: another tensor's (aliasing), missing, a path, not a string
        value = list(pid.value)
        other = rng.choice(tensors)[1].args[0]
        value[2] = rng.choice([other.value[2], "9999", "../../../../etc/passwd", 0, "", "data.pkl", "/dev/zero"])
        pid = Pid(tuple(value))
        detail = f"storage key {value[2]!r}"
    elif op == 7:
        value = list(pid.value)
        value[3] = rng.choice(["cuda:0", "meta", "mps", "xla:0", "cpu\x00", "", "privateuseone"])
        pid = Pid(tuple(value))
        detail = f"location {value[3]!r}"
    elif op == 8:  # another rebuild function, allowed by weights_only or not
        call.fn = Ref("torch._utils", rng.choice(REBUILDERS))
        detail = f"rebuilt by {call.fn}"
    elif op == 9:
        args[4:] = [rng.choice([True, 1, "yes"]), *args[5:]]
        detail = "requires_grad"
    elif op == 10:  # the persistent id itself malformed
        pid = Pid(rng.choice([("storage",), ("storage", Ref("torch", "FloatStorage"), "0", "cpu"), ("module", 1),
                              ("storage", Ref("torch", "FloatStorage"), "0", "cpu", 4, "extra")]))
        detail = f"persistent id {pid.value!r}"
    else:  # every dimension made contiguous for a bigger shape over the same storage
        size = tuple(s * 2 for s in size)
        stride = tuple(1 for _ in size)
        detail = f"overlapping view size {size}"
    args[:4] = [pid, offset, size, stride]
    call.args = tuple(args)
    return f"tensor {name}: {detail}"


def grow_with_stride_zero(rng: random.Random, ckpt: Checkpoint) -> str:
    """The config and the weights agree on a vocabulary ``k`` times larger, but the token embedding is a stride-0
    view of its original storage: names, shapes and element counts all match, while the file stays small."""
    hparams = ckpt.tree.get("hyper_parameters")
    model = hparams.get("model") if isinstance(hparams, dict) else None
    args = model.get("init_args") if isinstance(model, dict) else None
    if not isinstance(args, dict):
        return "no model config"
    part = "text" if "text" in args else "decoder"
    tensor = dict(ckpt.tensors()).get(f"model.{part}.token_embedding.weight")
    part_args = args.get(part, {}).get("init_args") if isinstance(args.get(part), dict) else None
    if tensor is None or not isinstance(part_args, dict):
        return "no token embedding"
    k = rng.choice([8, 64])
    vocab, width = tensor.args[2]
    part_args["vocab_size"] = vocab * k
    tensor.args = (tensor.args[0], 0, (vocab * k, width), (rng.choice([0, width]), 1), *tensor.args[4:])
    settings = ckpt.tree.get("inference")
    tokenizer = settings.get("tokenizer") if isinstance(settings, dict) else None
    if part == "decoder" and isinstance(tokenizer, dict) and isinstance(tokenizer.get("init_args"), dict):
        tokenizer["init_args"]["vocab_offset"] = vocab * k  # the new tokens follow the (larger) vocabulary
    return f"vocabulary x{k} ({vocab * k:,} x {width}) over a stride {tensor.args[3]} view of {vocab} rows"


def mutate_state_dict(rng: random.Random, ckpt: Checkpoint) -> str:
    """Entries of the state dict: non-tensor values, non-string or odd names, missing, extra or duplicated ones."""
    state = ckpt.tree.get("state_dict") if isinstance(ckpt.tree, dict) else None
    if not isinstance(state, Call) or not state.items:
        return "no state_dict"
    i = rng.randrange(len(state.items))
    key, value = state.items[i]
    op = rng.randrange(6)
    if op == 0:
        state.items[i] = (key, nasty_value(rng))
        return f"state_dict[{key}] not a tensor"
    if op == 1:
        new = rng.choice([1, None, ("a", "b"), key + "\x00", "\x1b[31m" + key, key.replace(".", ".."), "", "x" * 70000])
        state.items[i] = (new, value)
        return f"state_dict key {_short(new)}"
    if op == 2:
        del state.items[i]
        return f"state_dict[{key}] removed"
    if op == 3:
        state.items.append((key, value))
        return f"state_dict[{key}] twice"
    if op == 4:
        state.items.append((f"model.extra{rng.randrange(9)}", value))
        return "state_dict extra entry"
    ckpt.tree["state_dict"] = rng.choice([{}, [], None, nasty_value(rng)])
    return "state_dict replaced"


def mutate_zip(rng: random.Random, ckpt: Checkpoint, raw: bytes) -> tuple[bytes, str]:
    """A change to the archive itself: truncated, bytes flipped in its headers, a member missing, renamed,
    duplicated, cut short, or compressed with a huge ratio (a bomb), its format records rewritten."""
    op = rng.randrange(9)
    pkl = ckpt.prefix + "data.pkl"
    if op == 0:
        cut = rng.choice([rng.randrange(len(raw)), len(raw) - 22, len(raw) // 2, 30, 4])
        return raw[:cut], f"truncated at {cut}"
    if op == 1:  # bytes flipped in a local header, the central directory or the end record
        data = bytearray(raw)
        cd = raw.rfind(b"PK\x01\x02")
        where = rng.choice([rng.randrange(len(raw)), rng.randrange(max(cd, 1), len(raw)), len(raw) - rng.randrange(22)
                            or 1, rng.randrange(30)])
        data[where] ^= 1 << rng.randrange(8)
        return bytes(data), f"bit flipped at {where}"
    if op == 2:
        name = rng.choice([n for n in ckpt.members if n != pkl] or [pkl])
        del ckpt.members[name]
        return ckpt.to_bytes(), f"member {name} removed"
    if op == 3:  # a storage cut short (or grown): the record is smaller than the tensor it backs
        names = [n for n in ckpt.members if "/data/" in n]
        name = rng.choice(names)
        data = ckpt.members[name]
        ckpt.members[name] = rng.choice([data[: len(data) // 2], data[:0], data + bytes(64), data[:-1]])
        return ckpt.to_bytes(), f"member {name} resized to {len(ckpt.members[name])}"
    if op == 4:  # the same name twice, the second different
        name = rng.choice([pkl] + [n for n in ckpt.members if "/data/" in n][:3])
        other = write_tree({"state_dict": {}, "hyper_parameters": {}}) if name == pkl else bytes(8)
        return ckpt.to_bytes(duplicate=(name, other)), f"member {name} twice"
    if op == 5:  # a deflated member that inflates to a gigabyte
        name = rng.choice([pkl, pkl, rng.choice([n for n in ckpt.members if "/data/" in n])])
        zeros = rng.choice([64 << 20, 512 << 20])
        head = write_tree(ckpt.tree) if name == pkl else ckpt.members[name]
        ckpt.bombs[name] = deflate_bomb(head, zeros)
        return ckpt.to_bytes(), f"member {name} deflated from {zeros + len(head):,} bytes"
    if op == 6:  # the format records
        name = rng.choice([n for n in ckpt.members if n.rsplit("/", 1)[-1] in ("version", ".format_version",
                                                                                   "byteorder", ".storage_alignment")])
        ckpt.members[name] = rng.choice([b"big", b"999", b"-1", b"", b"\x00" * 8, b"2" * 5000, b"little\n"])
        return ckpt.to_bytes(), f"member {name} = {ckpt.members[name][:20]!r}"
    if op == 7:  # two archives' prefixes in one file, or the prefix renamed
        renamed = {("other/" + n.split("/", 1)[1] if rng.random() < 0.5 else n): v for n, v in ckpt.members.items()}
        ckpt.members = renamed
        ckpt.prefix = next((n[: -len("data.pkl")] for n in renamed if n.endswith("/data.pkl")), ckpt.prefix)
        return ckpt.to_bytes(), "members under two prefixes"
    data = bytearray(raw)  # a member's size fields lie
    cd = raw.rfind(b"PK\x01\x02")
    if cd > 0:
        field_at = cd + rng.choice([20, 24])
        data[field_at : field_at + 4] = struct.pack("<I", rng.choice([0, 0xFFFFFFFF, 1 << 31, 1]))
    return bytes(data), "central directory size field changed"


def make_checkpoint_case(rng: random.Random, seeds: Path, out: Path) -> tuple[Path, str, list[str]]:
    seed_name = rng.choice(["clip", "flamingo"])
    ckpt = Checkpoint.read((seeds / f"{seed_name}.ckpt").read_bytes())
    done = []
    for _ in range(1 if rng.random() < 0.75 else 2):
        family = rng.choices(["hparams", "inference", "tensor", "state_dict", "zip", "exotic", "path", "planted",
                              "grow"], weights=[28, 12, 22, 8, 14, 6, 4, 6, 3])[0]
        if family in ("hparams", "inference", "planted"):
            target = ckpt.tree.get("hyper_parameters" if family != "inference" else "inference")
            if not isinstance(target, dict):
                continue
            if family == "planted":  # in the task's config (what load_task builds) or its inference block (vlm.load)
                place = rng.choice(["hyper_parameters", "inference"])
                if isinstance(ckpt.tree.get(place), dict):
                    done.append(f"planted in {place}: " + plant(rng, {"init_args": ckpt.tree[place]},
                                                                seeds / "planted"))
                continue
            what = mutate_config(rng, target)
            if what == "planted:":
                what = plant(rng, {"init_args": target}, seeds / "planted")
            done.append(f"{family} {what}")
        elif family == "tensor":
            done.append(mutate_tensor(rng, ckpt))
        elif family == "state_dict":
            done.append(mutate_state_dict(rng, ckpt))
        elif family == "exotic":
            done.append(exotic_tensor(rng, ckpt))
        elif family == "grow":
            done.append(grow_with_stride_zero(rng, ckpt))
        elif family == "path":
            path = out / "case.ckpt"
            return path, seed_name, [special_path(rng, path, seeds)]
        else:
            raw, what = mutate_zip(rng, ckpt, ckpt.to_bytes())
            path = out / "case.ckpt"
            path.write_bytes(raw)
            return path, seed_name, [*done, f"zip {what}"]
    path = out / "case.ckpt"
    path.write_bytes(ckpt.to_bytes())
    return path, seed_name, done


def exotic_tensor(rng: random.Random, ckpt: Checkpoint) -> str:
    """A tensor torch can pickle but a weights file should not hold (meta, sparse, quantized, complex, bool,
    zero-size, a non-contiguous view), grafted into ``data.pkl`` with its own storage member."""
    import torch

    tensors = ckpt.tensors()
    if not tensors:
        return "no tensors"
    name, call = rng.choice(tensors)
    shape = tuple(call.args[2]) if isinstance(call.args[2], tuple) and call.args[2] else (2, 2)
    kind = rng.randrange(8)
    if kind == 0:
        value = torch.empty(shape, device="meta")
    elif kind == 1:
        value = torch.zeros(shape).to_sparse() if len(shape) <= 2 else torch.zeros(shape).to_sparse(1)
    elif kind == 2:
        value = torch.quantize_per_tensor(torch.zeros(shape), 0.1, 0, torch.qint8)
    elif kind == 3:
        value = torch.zeros(shape, dtype=rng.choice([torch.complex64, torch.bool, torch.int64, torch.float16,
                                                     torch.uint8, torch.float64]))
    elif kind == 4:
        value = torch.zeros((0, *shape[1:]))
    elif kind == 5:
        value = torch.zeros(tuple(reversed(shape))).t() if len(shape) == 2 else torch.zeros(shape)[..., ::1]
    elif kind == 6:
        value = torch.nn.Parameter(torch.zeros(shape))
    else:  # stride 0: every element the same stored value
        value = torch.zeros(1).expand(*shape)
    buf = io.BytesIO()
    torch.save({"t": value}, buf)
    graft = Checkpoint.read(buf.getvalue())
    used = {n.rsplit("/", 1)[-1] for n in ckpt.members if "/data/" in n}
    renames = {}
    for member, data in graft.members.items():
        if "/data/" in member:
            key = member.rsplit("/", 1)[-1]
            new_key = f"9{len(used) + len(renames)}{key}"
            renames[key] = new_key
            ckpt.members[f"{ckpt.prefix}data/{new_key}"] = data
    _rename_storages(graft.tree, renames)
    grafted = graft.tree["t"] if isinstance(graft.tree, dict) else graft.tree
    state = ckpt.tree["state_dict"]
    state.items = [(k, grafted if k == name else v) for k, v in state.items]
    kinds = ["meta", "sparse", "quantized", f"dtype {value.dtype}", "zero-size", "transposed", "parameter", "expanded"]
    return f"tensor {name}: {kinds[kind]} {tuple(value.shape)}"


def _rename_storages(tree: Any, renames: dict[str, str], seen: set | None = None) -> None:
    seen = set() if seen is None else seen
    if id(tree) in seen:
        return
    seen.add(id(tree))
    if isinstance(tree, Pid) and len(tree.value) > 2 and tree.value[2] in renames:
        value = list(tree.value)
        value[2] = renames[value[2]]
        tree.value = tuple(value)
    elif isinstance(tree, Call):
        for part in (tree.args, tree.state, tree.items, tree.appended):
            _rename_storages(part, renames, seen)
    elif isinstance(tree, dict):
        for v in tree.values():
            _rename_storages(v, renames, seen)
    elif isinstance(tree, list | tuple):
        for v in tree:
            _rename_storages(v, renames, seen)


def special_path(rng: random.Random, path: Path, seeds: Path) -> str:
    """``path`` made into something that is not a plain file: a link to a pseudo-file or device, a FIFO, a folder,
    a dangling or looping link."""
    pick = rng.randrange(9)
    target = ["/proc/self/pagemap", "/proc/self/status", "/dev/zero", "/dev/null", "/dev/urandom",
              "/sys/kernel/mm/transparent_hugepage/enabled"]
    if pick < 4:
        dest = rng.choice(target)
        path.symlink_to(dest)
        return f"{path.name} -> {dest}"
    if pick == 4:
        os.mkfifo(path)
        return f"{path.name} is a FIFO"
    if pick == 5:
        path.mkdir()
        return f"{path.name} is a folder"
    if pick == 6:
        path.symlink_to(path.parent / "missing")
        return f"{path.name} is a dangling link"
    if pick == 7:
        path.symlink_to(path)
        return f"{path.name} links to itself"
    path.symlink_to(seeds / "planted" / "fifo")
    return f"{path.name} -> a FIFO"


# ============================================================================================ safetensors
def read_safetensors(raw: bytes) -> tuple[dict, bytes]:
    (length,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + length]), raw[8 + length :]


def write_safetensors(header: Any, data: bytes, header_text: bytes | None = None, length: int | None = None) -> bytes:
    text = header_text if header_text is not None else json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text) if length is None else length & 0xFFFFFFFFFFFFFFFF) + text + data


DTYPES = ["F32", "F16", "BF16", "F64", "I64", "I32", "I16", "I8", "U8", "BOOL", "F8_E4M3", "F8_E5M2", "C64", "U64",
          "F4", "XX", "", 7]


def mutate_safetensors(rng: random.Random, raw: bytes, record_key: str | None = None,
                       record_mutator: Callable[[random.Random, Any, dict], tuple[str, bytes | None]] | None = None
                       ) -> tuple[bytes, str]:
    """A safetensors file changed in its length prefix, its header's entries (dtype, shape, data offsets, names),
    its metadata (``record_key``'s JSON record by ``record_mutator``), its header text, or its data."""
    header, data = read_safetensors(raw)
    names = [k for k in header if k != "__metadata__"]
    op = rng.randrange(10 if record_mutator is None else 13)
    if op == 0:
        length = rng.choice([0, 1, 7, 2**63, 2**64 - 1, len(raw), len(raw) - 8, 100_000_001, 2**32])
        return write_safetensors(header, data, length=length), f"header length {length}"
    if op == 1 and names:
        name = rng.choice(names)
        header[name]["dtype"] = value = rng.choice(DTYPES)
        return write_safetensors(header, data), f"{name} dtype {value!r}"
    if op == 2 and names:
        name = rng.choice(names)
        shape = header[name]["shape"]
        header[name]["shape"] = value = rng.choice([[], [0], [-1], [2**62], [2**32, 2**32], shape + [1], shape[:-1],
                                                    [s + 1 for s in shape], [1.5], ["2"], None, list(reversed(shape))])
        return write_safetensors(header, data), f"{name} shape {value!r}"
    if op == 3 and names:
        name = rng.choice(names)
        begin, end = header[name]["data_offsets"]
        header[name]["data_offsets"] = value = rng.choice([[end, begin], [0, 0], [begin, end + 4], [0, len(data) + 64],
                                                           [-4, end], [begin, 2**63], [0, end - begin], [begin], None,
                                                           [begin + 1, end + 1]])
        return write_safetensors(header, data), f"{name} data_offsets {value!r}"
    if op == 4 and names:
        name = rng.choice(names)
        entry = header.pop(name)
        new = rng.choice([name + "\x00", "\x1b[2J" + name, "", "__metadata__", name.replace(".", "/"), "../" + name])
        if rng.random() < 0.5:
            header[name] = entry
        header[new] = entry
        return write_safetensors(header, data), f"entry {name} renamed {new!r}"
    if op == 5 and names:
        name = rng.choice(names)
        del header[name]
        return write_safetensors(header, data), f"entry {name} removed"
    if op == 6:
        meta = header.setdefault("__metadata__", {})
        meta[rng.choice(["format", "class_path", "x"])] = value = nasty_value(rng, json_safe=True)
        return write_safetensors(header, data), f"__metadata__ value {_short(value)}"
    if op == 7:  # header text: deep nesting, numbers with many digits, duplicate keys, junk, not UTF-8
        text = json.dumps(header).encode()
        edit = rng.randrange(6)
        if edit == 0:
            text = b"[" * 100_000 + b"]" * 100_000
        elif edit == 1:
            text = re.sub(rb"\d+", lambda m: b"9" * 5000 if rng.random() < 0.2 else m.group(), text, count=0)
        elif edit == 2:
            text = text[:-1] + b',"' + (names[0] if names else "x").encode() + b'":{"dtype":"F32","shape":[1],' \
                b'"data_offsets":[0,4]}}'
        elif edit == 3:
            text = text[: rng.randrange(len(text))]
        elif edit == 4:
            text = b"\xff\xfe" + text
        else:
            text = b"\x00" + text
        return write_safetensors(None, data, header_text=text), f"header text edit {edit}"
    if op == 8:
        cut = rng.choice([0, len(data) // 2, max(len(data) - 1, 0)])
        return write_safetensors(header, data[:cut]), f"data cut to {cut}"
    if op == 9:  # the floats themselves: NaN, inf, denormals
        buf = bytearray(data)
        for _ in range(rng.choice([1, 64, 4096])):
            at = rng.randrange(0, max(len(buf) - 4, 1)) & ~3
            buf[at : at + 4] = struct.pack("<f", rng.choice([float("nan"), float("inf"), -float("inf"), 1e38, 1e-45]))
        return write_safetensors(header, bytes(buf)), "non-finite weights"
    if record_mutator is None:
        cut = rng.randrange(len(raw))
        return raw[:cut], f"truncated at {cut}"
    meta = header.setdefault("__metadata__", {})
    record = json.loads(meta.get(record_key, "null"))
    what, new_data = record_mutator(rng, record, header)  # changes record and header in place
    data = data if new_data is None else new_data
    meta[record_key] = json.dumps(record, allow_nan=True)
    if rng.random() < 0.1:  # the record's own text: many digits, deep, not JSON
        meta[record_key] = rng.choice(["9" * 5000, "[" * 50_000, "{", "null", json.dumps(record)[:-1]])
        what += " + record text"
    return write_safetensors(header, data), f"record {what}"


# ============================================================================================ exports
def make_export_case(rng: random.Random, seeds: Path, out: Path) -> tuple[Path, str, list[str]]:
    seed_name = rng.choice(["clip", "flamingo"])
    src = seeds / f"{seed_name}_export"
    folder = out / "export"
    folder.mkdir()
    config_text = (src / "config.json").read_text()
    weights = (src / "model.safetensors").read_bytes()
    family = rng.choices(["config", "inference", "text", "weights", "path", "planted"],
                         weights=[35, 12, 15, 28, 5, 5])[0]
    what = family
    if family in ("config", "inference", "planted"):
        config = json.loads(config_text)
        target = config if family != "inference" else config.get("inference", config)
        if family == "planted" and rng.random() < 0.5 and isinstance(config.get("inference"), dict):
            family, what = "planted in inference", plant(rng, {"init_args": config["inference"]}, seeds / "planted")
        elif family == "planted":
            what = plant(rng, config, seeds / "planted")
        else:
            what = mutate_config(rng, target, True)
            if what == "planted:":
                what = plant(rng, config, seeds / "planted")
        config_text = json.dumps(config, allow_nan=True)
    elif family == "text":
        config_text, what = mutate_json_text(rng, config_text)
    elif family == "weights":
        weights, what = mutate_safetensors(rng, weights)
    if isinstance(config_text, str):
        config_text = config_text.encode("utf-8", "surrogatepass")
    (folder / "config.json").write_bytes(config_text)
    (folder / "model.safetensors").write_bytes(weights)
    if family == "path":
        name = rng.choice(["config.json", "model.safetensors"])
        (folder / name).unlink()
        what = special_path(rng, folder / name, seeds)
    return folder, seed_name, [f"{family} {what}"]


def mutate_json_text(rng: random.Random, text: str) -> tuple[bytes, str]:
    """JSON changed as text: a number with thousands of digits, nesting without end, duplicate keys, a byte-order
    mark or bytes that are not UTF-8, truncation, another encoding, a file past the size bound (sparse)."""
    op = rng.randrange(9)
    raw = text.encode()
    if op == 0:
        numbers = list(re.finditer(rb"(?<![\w.])\d+(?![\w.])", raw))
        if numbers:
            m = rng.choice(numbers)
            digits = rng.choice([b"9" * 5000, b"1" + b"0" * 4300, b"1e99999", b"-0", b"1" * 400, b"NaN", b"Infinity"])
            return raw[: m.start()] + digits + raw[m.end() :], f"number {m.group().decode()} -> {digits[:12]!r}..."
    if op == 1:
        at = raw.rfind(b"}")
        deep = rng.choice([1000, 100_000, 2_000_000])
        return raw[:at] + b',"deep":' + b"[" * deep + b"]" * deep + raw[at:], f"nested {deep} deep"
    if op == 2:
        return raw.replace(b"{", b'{"class_path": "os.system", ', 1), "duplicate class_path key"
    if op == 3:
        return b"\xef\xbb\xbf" + raw, "byte-order mark"
    if op == 4:
        at = rng.randrange(len(raw))
        return raw[:at] + b"\xff\xc0\x80" + raw[at:], "bytes that are not UTF-8"
    if op == 5:
        cut = rng.randrange(len(raw))
        return raw[:cut], f"truncated at {cut}"
    if op == 6:
        return text.encode("utf-16"), "UTF-16"
    if op == 7:
        return raw + b"\x00" * rng.choice([1, 17 << 20]), "NUL padding"
    return raw.replace(b'"', b"'", 3), "single quotes"


# ============================================================================================ indexes
def mutate_index_record(rng: random.Random, record: Any, header: dict) -> tuple[str, bytes | None]:
    """The index's JSON record: its files (names with ``..``, absolute, NUL, control characters; sizes and times of
    the wrong type or huge; many entries), root, checkpoint, fingerprint, embed_dim, format and version."""
    if not isinstance(record, dict):
        return "record not a dict", None
    files = record.get("files") if isinstance(record.get("files"), list) else []
    op = rng.randrange(7)
    if op == 0 and files:
        row = rng.choice(files)
        row[0] = value = rng.choice(["../../../etc/passwd", "/etc/passwd", "a\x00b.png", "", "\x1b[2Jx.png", ".",
                                     "sub/../../x.png", 7, None, "x" * 70000, "\udc80.png", "C:\\x.png", "//x.png"])
        return f"files name {_short(value)}", None
    if op == 1 and files:
        row = rng.choice(files)
        i = rng.choice([1, 2])
        row[i] = value = rng.choice([-1, 2**64, 10**30, 1.5, "7", None, True])
        return f"files stat {_short(value)}", None
    if op == 2 and files:  # many files, the embeddings grown to match
        n = rng.choice([2000, 50_000])
        dim = int(record.get("embed_dim", 16)) if isinstance(record.get("embed_dim"), int) else 16
        record["files"] = [[f"f{i}.png", 1, 1] for i in range(n)]
        header["embeddings"] = {"dtype": "F32", "shape": [n, dim], "data_offsets": [0, n * dim * 4]}
        return f"{n:,} files", bytes(n * dim * 4)
    if op == 3:
        key = rng.choice(["root", "checkpoint", "fingerprint"])
        record[key] = value = rng.choice(["relative/root", "/", "/proc", "", None, 5, "/dev/zero", "\x1b[31m/x",
                                          "/" + "x" * 5000, str(TESTS)])
        return f"{key} {_short(value)}", None
    if op == 4:
        dim = rng.choice([0, -1, 65536, 65537, 2**31, 1.0, "16", None, True])
        record["embed_dim"] = dim
        if isinstance(dim, int) and 0 < dim <= 65536 and not isinstance(dim, bool):
            rows = len(files)
            header["embeddings"] = {"dtype": "F32", "shape": [rows, dim], "data_offsets": [0, rows * dim * 4]}
            return f"embed_dim {dim} (data to match)", bytes(rows * dim * 4)
        return f"embed_dim {dim!r}", None
    if op == 5:
        key = rng.choice(["format", "version"])
        record[key] = value = rng.choice([True, 1.0, "1", 2, None, "vlm-image-index\x00"])
        return f"{key} {value!r}", None
    record[rng.choice(["files", "root", "extra"])] = value = nasty_value(rng, json_safe=True)
    return f"value {_short(value)}", None


def make_index_case(rng: random.Random, seeds: Path, out: Path) -> tuple[Path, str, list[str]]:
    from vlm.index import META_KEY

    path = out / "case.index"
    if rng.random() < 0.05:
        return path, "clip.index", [special_path(rng, path, seeds)]
    raw, what = mutate_safetensors(rng, (seeds / "clip.index").read_bytes(), META_KEY, mutate_index_record)
    path.write_bytes(raw)
    return path, "clip.index", [what]


# ============================================================================================ metadata.jsonl
def make_metadata_case(rng: random.Random, seeds: Path, out: Path) -> tuple[Path, str, list[str]]:
    """A copy of the imagefolder (images linked) whose ``metadata.jsonl`` lines are changed: huge lines, bad JSON,
    ``..`` and absolute paths, control characters, missing or odd-typed keys, line separators, encodings, size."""
    folder = out / "images"
    folder.mkdir()
    for image in (seeds / "images").iterdir():
        if image.name != "metadata.jsonl":
            (folder / image.name).symlink_to(image)
    lines = (seeds / "images" / "metadata.jsonl").read_text().splitlines()
    meta = folder / "metadata.jsonl"
    done = []
    for _ in range(rng.choice([1, 1, 2, 3])):
        op = rng.randrange(12)
        i = rng.randrange(len(lines))
        row = _json_object(lines[i])
        if op == 0:
            row["file_name"] = value = rng.choice(["../red.png", "/etc/passwd", str(seeds / "images" / "red.png"),
                                                   "a\x00b.png", "", ".", "sub/../red.png", "\x1b[2Jred.png",
                                                   "red.png\n", "\\..\\x", "x" * 70000, "red.png/", "~/red.png"])
            lines[i] = json.dumps(row)
            done.append(f"line {i} file_name {_short(value)}")
        elif op == 1:
            key = rng.choice(["file_name", "caption", "captions", "label"])
            row[key] = value = nasty_value(rng, json_safe=True)
            lines[i] = json.dumps(row, allow_nan=True)
            done.append(f"line {i} {key} {_short(value)}")
        elif op == 2:
            row.pop(rng.choice(list(row) or ["x"]), None)
            lines[i] = json.dumps(row)
            done.append(f"line {i} key removed")
        elif op == 3:
            lines[i] = rng.choice(["{", "[]", "null", "1", '"file_name"', "{'file_name': 'red.png'}", "\x00", "",
                                   '{"file_name": "red.png", "caption": "a"} trailing', lines[i][:-3]])
            done.append(f"line {i} not a JSON object")
        elif op == 4:
            size = rng.choice([1 << 20, 8 << 20])
            row["caption"] = "y" * size
            lines[i] = json.dumps(row)
            done.append(f"line {i} caption of {size:,} characters")
        elif op == 5:
            deep = rng.choice([1000, 200_000])
            lines[i] = '{"file_name": "red.png", "caption": ' + "[" * deep + "]" * deep + "}"
            done.append(f"line {i} nested {deep} deep")
        elif op == 6:
            lines[i] = '{"file_name": "red.png", "label": ' + "9" * rng.choice([5000, 100_000]) + "}"
            done.append(f"line {i} integer with many digits")
        elif op == 7:  # separators str.splitlines() honours inside a JSON string
            row["caption"] = "a\u2028b\x85c\x0bd\x1ce\r"
            lines[i] = json.dumps(row, ensure_ascii=False)
            done.append(f"line {i} caption with line separators")
        elif op == 8 and sum(map(len, lines)) < 4096:  # many genuine rows (not many huge ones)
            lines = lines * rng.choice([100, 2000])
            done.append(f"{len(lines):,} lines")
        elif op == 9:
            lines.insert(i, json.dumps({**row, "file_name": row.get("file_name", "red.png")}))
            done.append(f"line {i} duplicated")
        elif op == 10:
            done.append("special file")
            meta.unlink(missing_ok=True)
            return folder, "metadata.jsonl", [special_path(rng, meta, seeds)]
        else:
            done.append("blank and whitespace lines")
            lines[i:i] = ["", "   ", "\t", "\f"]
    text = "\n".join(lines).encode("utf-8", "surrogatepass")
    ending = rng.randrange(8)
    if ending == 0:
        text = text.replace(b"\n", b"\r")
        done.append("CR line ends")
    elif ending == 1:
        text = b"\xef\xbb\xbf" + text
        done.append("byte-order mark")
    elif ending == 2:
        at = rng.randrange(len(text) + 1)
        text = text[:at] + b"\xff\xfe" + text[at:]
        done.append("bytes that are not UTF-8")
    meta.write_bytes(text)
    if ending == 3 and rng.random() < 0.3:  # a sparse file of NULs: within the size bound, or past it
        size = rng.choice([64 << 20, 600 << 20])
        os.truncate(meta, size)
        done.append(f"grown to {size:,} bytes of NULs")
    return folder, "metadata.jsonl", done


def _json_object(line: str) -> dict:
    try:
        row = json.loads(line)
    except ValueError:  # a line an earlier mutator broke
        return {}
    return row if isinstance(row, dict) else {}


# ============================================================================================ images
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def png_chunks(raw: bytes) -> list[list]:
    chunks, at = [], 8
    while at + 8 <= len(raw):
        (length,) = struct.unpack(">I", raw[at : at + 4])
        kind = raw[at + 4 : at + 8]
        chunks.append([kind, raw[at + 8 : at + 8 + length]])
        at += 12 + length
    return chunks


def png_bytes(chunks: list[list], bad_crc: bool = False) -> bytes:
    out = [PNG_SIGNATURE]
    for kind, data in chunks:
        crc = zlib.crc32(kind + data) ^ (1 if bad_crc else 0)
        out.append(struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc))
    return b"".join(out)


_PNG_BOMBS: dict[tuple, bytes] = {}


def png_bomb_idat(width: int, height: int, bytes_per_pixel: float) -> bytes:
    """zlib data of ``height`` all-zero rows (filter byte + pixels): megabytes of pixels from a few hundred KB."""
    key = (width, height, bytes_per_pixel)
    if key not in _PNG_BOMBS:
        row = 1 + int(width * bytes_per_pixel + 0.999)
        comp = zlib.compressobj(9)
        chunk = bytes(row * max(1, (1 << 22) // row))
        parts, left = [], row * height
        while left:
            piece = chunk[: min(left, len(chunk))]
            parts.append(comp.compress(piece))
            left -= len(piece)
        parts.append(comp.flush())
        _PNG_BOMBS[key] = b"".join(parts)
    return _PNG_BOMBS[key]


@functools.cache
def _zeros_zlib(size: int) -> bytes:
    return zlib.compress(bytes(size), 9)


def mutate_png(rng: random.Random, raw: bytes) -> tuple[bytes, str]:
    """IHDR's fields (dimensions, bit depth, colour type) with the CRC recomputed, a decompression bomb just under
    PIL's pixel limit, chunk lengths and types, duplicated or missing critical chunks, text and profile chunks."""
    chunks = png_chunks(raw)
    ihdr = chunks[0][1]
    width, height, depth, colour, comp, filt, interlace = struct.unpack(">IIBBBBB", ihdr[:13])
    op = rng.randrange(10)
    if op == 0:
        width, height = rng.choice([(0, 16), (20, 0), (65535, 65535), (2**31 - 1, 1), (1, 2**31 - 1), (9458, 9458),
                                    (30000, 30000), (2**32 - 1, 2**32 - 1), (100_000, 1), (40000, 2000)])
        what = f"IHDR {width}x{height}"
    elif op == 1:
        depth, colour = rng.choice([(16, 2), (16, 6), (1, 0), (2, 3), (4, 3), (8, 4), (0, 2), (3, 2), (255, 255),
                                    (8, 1), (8, 5), (8, 7), (16, 3)])
        what = f"IHDR depth {depth} colour {colour}"
    elif op == 2:
        comp, filt, interlace = rng.choice([(1, 0, 0), (0, 1, 0), (0, 0, 1), (0, 0, 2), (255, 255, 255)])
        what = f"IHDR comp/filter/interlace {comp}/{filt}/{interlace}"
    elif op == 3:  # a bomb: all-zero pixels that decode to hundreds of megabytes (PIL's limit is 89,478,485 px)
        width, height, depth, colour, bpp = rng.choice([(9458, 9458, 16, 0, 2), (8000, 8000, 8, 2, 3),
                                                        (9000, 9000, 8, 6, 4), (20000, 4000, 1, 0, 0.125)])
        interlace = 0
        chunks = [c for c in chunks if c[0] != b"IDAT" and c[0] != b"PLTE" and c[0] != b"tRNS"]
        chunks.insert(1, [b"IDAT", png_bomb_idat(width, height, bpp)])
        what = f"bomb {width}x{height} depth {depth} colour {colour}"
    elif op == 4:
        i = rng.randrange(len(chunks))
        chunks.insert(i, [chunks[i][0], chunks[i][1]])
        return png_bytes(chunks), f"chunk {chunks[i][0].decode(errors='replace')} twice"
    elif op == 5:
        kinds = [c[0] for c in chunks]
        kind = rng.choice(kinds)
        chunks = [c for c in chunks if c[0] != kind]
        return png_bytes(chunks), f"chunks {kind.decode(errors='replace')} removed"
    elif op == 6:  # a chunk length that lies
        data = bytearray(png_bytes(chunks))
        at = 8 + 12 + 13 if len(chunks) > 1 else 8
        data[at : at + 4] = struct.pack(">I", rng.choice([0, 2**31 - 1, 2**32 - 1, 100_000_000]))
        return bytes(data), "chunk length field"
    elif op == 7:  # ancillary chunks: compressed text, a profile, EXIF, animation control
        kind, data = rng.choice([
            (b"zTXt", b"Comment\x00\x00" + _zeros_zlib(50 << 20)),
            (b"iCCP", b"icc\x00\x00" + _zeros_zlib(20 << 20)),
            (b"eXIf", b"MM\x00*\x00\x00\x00\x08\x00\x01\x01\x12\x00\x03\xff\xff\xff\xff\x00\x06\x00\x00"),
            (b"acTL", struct.pack(">II", 2**31 - 1, 0)),
            (b"tEXt", b"k" * 80 + b"\x00" + b"v" * (1 << 20)),
            (b"sPLT", b"x\x00\x08" + b"\x00" * 6 * 1000),
            (b"PLTE", b"\x00" * rng.choice([0, 3, 768 + 3, 2000]))])
        chunks.insert(1, [kind, data])
        return png_bytes(chunks), f"chunk {kind.decode()} added"
    elif op == 8:
        return png_bytes(chunks, bad_crc=True), "bad CRCs"
    else:
        cut = rng.randrange(8, len(raw))
        return raw[:cut], f"truncated at {cut}"
    chunks[0][1] = struct.pack(">IIBBBBB", width, height, depth, colour, comp, filt, interlace) + ihdr[13:]
    return png_bytes(chunks), what


def mutate_jpeg(rng: random.Random, raw: bytes) -> tuple[bytes, str]:
    """SOF's precision, height, width and component count; a marker's length; EXIF orientation and IFD entries;
    a missing end marker; truncation."""
    data = bytearray(raw)
    sof = next((m.start() for m in re.finditer(rb"\xff[\xc0\xc1\xc2]", raw)), None)
    op = rng.randrange(6)
    if op == 0 and sof is not None:
        height, width = rng.choice([(65535, 65535), (0, 16), (16, 0), (65500, 1), (9000, 9000), (20000, 4000)])
        data[sof + 5 : sof + 9] = struct.pack(">HH", height, width)
        return bytes(data), f"SOF {width}x{height}"
    if op == 1 and sof is not None:
        data[sof + 4] = precision = rng.choice([0, 12, 16, 255])
        data[sof + 9] = components = rng.choice([0, 1, 4, 255])
        return bytes(data), f"SOF precision {precision} components {components}"
    if op == 2:
        markers = [m.start() for m in re.finditer(rb"\xff[\xc0-\xfe]", raw) if raw[m.start() + 1] not in (0xD8, 0xD9)]
        if markers:
            at = rng.choice(markers)
            data[at + 2 : at + 4] = struct.pack(">H", rng.choice([0, 1, 2, 65535]))
            return bytes(data), f"marker at {at} length"
    if op == 3:
        exif = raw.find(b"Exif\x00\x00")
        if exif > 0:
            tiff = exif + 6
            for m in re.finditer(rb"\x01\x12|\x12\x01", raw[tiff:]):
                at = tiff + m.start()
                data[at + 2 : at + 8] = rng.choice([b"\x00\x03\x00\x00\x00\x01", b"\x00\x03\xff\xff\xff\xff",
                                                    b"\x00\x0c\x00\x00\x10\x00", b"\x03\x00\x01\x00\x00\x00"])
                data[at + 8 : at + 10] = struct.pack(">H", rng.choice([0, 9, 65535, 6]))
                return bytes(data), "EXIF orientation entry"
    if op == 4:
        return bytes(data).replace(b"\xff\xd9", b""), "no end marker"
    cut = rng.randrange(2, len(raw))
    return raw[:cut], f"truncated at {cut}"


def mutate_image_header(rng: random.Random, raw: bytes, suffix: str) -> tuple[bytes, str]:
    """BMP and GIF dimension fields, TIFF tag values (dimensions, bits, strip offsets and counts), or bit flips."""
    data = bytearray(raw)
    if suffix == ".bmp" and rng.random() < 0.7:
        width, height = rng.choice([(65535, 65535), (-20, 16), (20, -9000), (9000, 9000), (2**31 - 1, 1), (0, 0)])
        data[18:26] = struct.pack("<ii", width, height)
        if rng.random() < 0.5:
            data[28:30] = struct.pack("<H", rng.choice([0, 1, 4, 64, 32]))
        return bytes(data), f"BMP {width}x{height}"
    if suffix == ".gif" and rng.random() < 0.7:
        width, height = rng.choice([(65535, 65535), (0, 0), (1, 65535)])
        data[6:10] = struct.pack("<HH", width, height)
        if rng.random() < 0.5:
            at = raw.find(b"\x2c")
            if at > 0:
                data[at + 5 : at + 9] = struct.pack("<HH", width, height)
        return bytes(data), f"GIF {width}x{height}"
    if suffix == ".tiff" and rng.random() < 0.7:
        (ifd,) = struct.unpack("<I", raw[4:8])
        (count,) = struct.unpack("<H", raw[ifd : ifd + 2])
        entry = ifd + 2 + 12 * rng.randrange(max(count, 1))
        tag = struct.unpack("<H", raw[entry : entry + 2])[0]
        data[entry + 4 : entry + 12] = struct.pack("<II", rng.choice([1, 2**31, 0]),
                                                   rng.choice([0, 65535, 2**31 - 1, 2**32 - 1, 9000, 3]))
        return bytes(data), f"TIFF tag {tag}"
    for _ in range(rng.choice([1, 4, 32])):
        at = rng.randrange(len(data))
        data[at] ^= 1 << rng.randrange(8)
    return bytes(data), "bits flipped"


def make_image_case(rng: random.Random, seeds: Path, out: Path) -> tuple[Path, str, list[str]]:
    images = sorted(p for p in (seeds / "images").iterdir() if p.name != "metadata.jsonl")
    seed = rng.choice(images)
    raw = seed.read_bytes()
    path = out / f"case{seed.suffix}"
    if rng.random() < 0.05:
        return path, seed.name, [special_path(rng, path, seeds)]
    if seed.suffix == ".png":
        raw, what = mutate_png(rng, raw)
    elif seed.suffix == ".jpg":
        raw, what = mutate_jpeg(rng, raw)
    else:
        raw, what = mutate_image_header(rng, raw, seed.suffix)
    path.write_bytes(raw)
    return path, seed.name, [what]


MAKERS = {"checkpoint": make_checkpoint_case, "export": make_export_case, "index": make_index_case,
          "metadata": make_metadata_case, "image": make_image_case}


def case_rng(seed: int, kind: str, case: int) -> random.Random:
    return random.Random(f"{seed}:{kind}:{case}")


# ============================================================================================ running a case
class CaseTimeout(BaseException):
    """Raised by the case's alarm; a BaseException, so the loaders' ``except Exception`` cannot swallow it."""


class Tripwire(BaseException):
    """Raised where a file made vlm do what no file may (prompt, reach the network, start a process)."""


_TRIPPED: list[str] = []


@contextlib.contextmanager
def tripwires() -> Iterator[None]:
    """Replaces the doors a file must never open (the terminal, the network, a new process) with ones that record
    the attempt and refuse it; the originals are back afterwards."""

    def refuse(what: str) -> Callable:
        def door(*args: Any, **kwargs: Any) -> Any:
            _TRIPPED.append(what)
            raise Tripwire(what)
        return door

    doors = [(builtins, "input", "asked on the terminal (input)"),
             (socket.socket, "connect", "reached for the network (socket.connect)"),
             (socket, "getaddrinfo", "reached for the network (getaddrinfo)"),
             (subprocess.Popen, "__init__", "started a process (subprocess)"),
             (os, "system", "started a process (os.system)")]
    originals = [(owner, name, getattr(owner, name)) for owner, name, _ in doors]
    for owner, name, what in doors:
        setattr(owner, name, refuse(what))
    try:
        yield
    finally:
        for owner, name, original in originals:
            setattr(owner, name, original)


def _memory() -> tuple[int, int]:
    """(resident, peak resident) bytes of this process, from /proc/self/status."""
    values = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("VmRSS:", "VmHWM:")):
                values[line[:5]] = int(line.split()[1]) * 1024
    return values["VmRSS"], values["VmHWM"]


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets the peak resident size to the current one
        return True
    except OSError:
        return False


def _where(tb: Any) -> str:
    """``vlm/<file>:<function>:<line>`` of the innermost vlm frame (else the innermost frame) of a traceback."""
    import vlm

    package = str(Path(vlm.__file__).parent)  # the vlm being fuzzed (this checkout's, or one on PYTHONPATH)
    frames = traceback.extract_tb(tb)
    ours = [f for f in frames if f.filename.startswith(package)]
    frame = (ours or frames or [None])[-1]
    if frame is None:
        return "?"
    name = Path(frame.filename)
    shown = Path("vlm", name.relative_to(package)) if name.is_relative_to(package) else \
        name.relative_to(ROOT) if name.is_relative_to(ROOT) else Path(*name.parts[-2:])
    inner = frames[-1]
    deeper = "" if inner is frame else f" (raised in {Path(inner.filename).name}:{inner.name})"
    return f"{shown}:{frame.name}:{frame.lineno}{deeper}"


def execute(kind: str, path: Path, state: dict, targets: dict[str, tuple[Step, ...]] | None = None) -> dict:
    """Runs ``kind``'s steps on ``path``; the outcome: ``ok``, ``refused`` (an accepted error) or ``fail`` /
    ``timeout`` / ``tripwire`` with the step, the exception and where it was raised."""
    for step in (targets or TARGETS)[kind]:
        try:
            step.run(path, state)
        except (CaseTimeout, Tripwire) as e:
            status = "timeout" if isinstance(e, CaseTimeout) else "tripwire"
            return {"status": status, "step": step.name, "error": type(e).__name__,
                    "message": str(e), "where": _where(e.__traceback__)}
        except KeyboardInterrupt:
            raise
        except BaseException as e:  # noqa: BLE001 - anything not accepted is what this harness exists to find
            message = str(e)
            if step.accepted and isinstance(e, tuple(_cls(c) for c in step.accepted)):
                return {"status": "refused", "step": step.name, "error": type(e).__name__, "message": message[:300]}
            return {"status": "fail", "step": step.name, "error": f"{type(e).__module__}.{type(e).__name__}",
                    "message": (message.splitlines() or [""])[0][:300], "where": _where(e.__traceback__)}
    return {"status": "ok"}


def _on_alarm(signum: int, frame: Any) -> None:
    raise CaseTimeout("the case's time ran out")


def _image() -> Any:
    from PIL import Image

    return Image.new("RGB", (16, 16), (220, 30, 30))


def run_case(kind: str, seed: int, case: int, seeds: Path, work: Path, shared: dict, limits: dict,
             targets: dict[str, tuple[Step, ...]] | None = None, makers: dict[str, Callable] | None = None,
             timeout: float = CASE_TIMEOUT) -> dict:
    """Makes case ``case`` of ``kind`` and runs it under the time, memory and tripwire checks; the record says what
    happened and, for a failure, keeps the case's files in ``work/failed``. ``targets`` and ``makers`` replace
    :data:`TARGETS` and :data:`MAKERS` (the harness's own test)."""
    scratch = work / f"{kind}-{seed}-{case}"
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    record: dict[str, Any] = {"kind": kind, "seed": seed, "case": case}
    made = time.perf_counter()
    try:
        path, seed_file, mutators = (makers or MAKERS)[kind](case_rng(seed, kind, case), seeds, scratch)
    except Exception as e:  # noqa: BLE001 - a mutator's own bug is reported as such, never as vlm's
        record.update(status="harness", error=type(e).__name__, message=str(e)[:300], where=_where(e.__traceback__))
        return record
    record.update(seed_file=seed_file, mutators=mutators, make_seconds=round(time.perf_counter() - made, 3))
    state = {"case": case, "scratch": scratch, **shared}
    marker = seeds / "planted" / "RAN"
    _TRIPPED.clear()
    sys.modules.pop(TRIPWIRE_MODULE, None)
    rss, peak_before = _memory()
    reset = _reset_peak()
    start = time.perf_counter()
    previous = signal.signal(signal.SIGALRM, _on_alarm)
    signal.setitimer(signal.ITIMER_REAL, timeout)
    try:
        outcome = execute(kind, path, state, targets)
    except CaseTimeout:  # the alarm fired between steps
        outcome = {"status": "timeout", "step": "?", "error": "CaseTimeout", "message": f"over {timeout:g} s"}
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    record["seconds"] = round(time.perf_counter() - start, 3)
    _, peak = _memory()
    state.clear()
    record.update(outcome)
    # with the peak reset, the case's own peak over where it started; without, only a new all-time peak counts
    growth = (peak - rss if reset else max(0, peak - peak_before)) / 2**20
    record["growth_mib"] = round(growth, 1)
    allowed = limits.get(kind, 0.0) + MEMORY_SLACK_MIB
    if record["status"] in ("ok", "refused") and growth > allowed:
        record.update(status="memory", message=f"peak memory grew by {growth:,.0f} MiB (a genuine load: "
                                               f"{limits.get(kind, 0.0):,.0f} MiB; allowed {allowed:,.0f} MiB)")
    wires = list(_TRIPPED)
    if TRIPWIRE_MODULE in sys.modules:
        wires.append(f"imported {TRIPWIRE_MODULE}, a module the file named")
    if marker.exists():
        wires.append("ran code planted beside the file")
        marker.unlink()
    if wires and record["status"] != "tripwire":
        record.update(status="tripwire", message="; ".join(wires))
    if record["status"] in ("ok", "refused"):
        shutil.rmtree(scratch, ignore_errors=True)
    else:
        kept = work / "failed" / scratch.name
        shutil.rmtree(kept, ignore_errors=True)
        kept.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(scratch), kept)
        record["kept"] = str(kept)
    return record


def warm_up(seeds: Path, work: Path) -> tuple[dict, dict]:
    """Loads every genuine seed (so caches are filled before memory is measured); returns what the steps share (a
    loaded CLIP model) and each kind's peak memory growth for a genuine file, in MiB (and under ``"seconds"``, the
    slowest genuine case's time)."""
    import vlm

    shared = {"clip": vlm.load(seeds / "clip.ckpt")}
    genuine = {"checkpoint": [seeds / "clip.ckpt", seeds / "flamingo.ckpt"],
               "export": [seeds / "clip_export", seeds / "flamingo_export"], "index": [seeds / "clip.index"],
               "metadata": [seeds / "images"],
               "image": sorted(p for p in (seeds / "images").iterdir() if p.name != "metadata.jsonl")}
    limits: dict[str, float] = {"seconds": 0.0}
    for kind, paths in genuine.items():
        growth = 0.0
        for measured in (False, True):  # the second round measures: the first fills caches and imports
            for path in paths:
                scratch = work / f"warm-up-{os.getpid()}"
                scratch.mkdir(parents=True, exist_ok=True)
                state = {"case": 0, "scratch": scratch, **shared}
                rss, _ = _memory()
                _reset_peak()
                start = time.perf_counter()
                outcome = execute(kind, path, state)
                seconds = time.perf_counter() - start
                _, peak = _memory()
                if outcome["status"] != "ok":
                    raise RuntimeError(f"the genuine seed {path} does not load: {outcome}")
                if measured:
                    growth = max(growth, (peak - rss) / 2**20)
                    limits["seconds"] = max(limits["seconds"], seconds)
                shutil.rmtree(scratch, ignore_errors=True)
        limits[kind] = growth
    return shared, limits


def child_main(args: argparse.Namespace) -> int:
    """The fuzz loop (in its own process): one JSON line per started and per finished case on ``args.report``."""
    import faulthandler

    import torch

    faulthandler.enable()  # a case that crashes the interpreter still says where (on stderr, read by the parent)
    torch.set_num_threads(1)  # a shared 2-core machine; and the same numbers either way
    seeds, work = Path(args.seeds), Path(args.work)
    sys.path.insert(0, str(seeds / "planted"))  # the module a file may name is importable: importing it is caught
    _speed_up_tokenizer()
    shared, limits = warm_up(seeds, work)
    size = _address_space()
    limit = int(size + ADDRESS_SPACE_GIB * 2**30)
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    timeout = max(CASE_TIMEOUT, TIMEOUT_FACTOR * limits["seconds"])
    with tripwires(), open(args.report, "a") as report:
        report.write(json.dumps({"event": "limits", "limits": limits, "address_space": limit, "timeout": timeout})
                     + "\n")
        for kind, start, stop in (part.split(":") for part in args.plan.split(",")):
            for case in range(int(start), int(stop)):
                report.write(json.dumps({"event": "start", "kind": kind, "case": case}) + "\n")
                report.flush()
                print(f"{CASE_MARK}{kind} {case}", file=sys.stderr, flush=True)  # a crash report shows what follows
                record = run_case(kind, args.seed, case, seeds, work, shared, limits, timeout=timeout)
                report.write(json.dumps({"event": "done", **record}, default=str) + "\n")
                report.flush()
    return 0


def _address_space() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    return 4 << 30


def _speed_up_tokenizer() -> None:
    """Builds the CLIP BPE tables once per process instead of once per loaded model (0.15 s each): they come from
    the open_clip package, never from the fuzzed file, so sharing them changes nothing the cases test."""
    from functools import cached_property

    from vlm.data.tokenizer import CLIPTokenizer

    original = CLIPTokenizer.__dict__.get("_bpe")
    if not isinstance(original, cached_property):
        return
    tables: dict = {}

    def shared_bpe(self: CLIPTokenizer) -> Any:
        if "bpe" not in tables:
            tables["bpe"] = original.func(self)
        return tables["bpe"]

    shared = cached_property(shared_bpe)
    shared.__set_name__(CLIPTokenizer, "_bpe")
    CLIPTokenizer._bpe = shared


# ============================================================================================ the parent
def plan_cases(total: int) -> dict[str, int]:
    """Cases per kind for ``total`` cases, by :data:`SHARES` (at least one each)."""
    return {kind: max(1, round(total * share)) for kind, share in SHARES.items()}


def fuzz(seeds: Path, work: Path, total: int, seed: int = 0, deadline_s: float = 1800.0, jobs: int = JOBS,
         log: Callable[[str], None] | None = None) -> list[dict]:
    """Runs ``total`` cases in ``jobs`` child processes (each restarted after a case that kills or hangs it) and
    returns every finished case's record, plus one per case that killed or hung its child."""
    import threading

    work.mkdir(parents=True, exist_ok=True)
    parts: list[list[tuple[str, int, int]]] = [[] for _ in range(max(1, jobs))]
    for kind, n in plan_cases(total).items():  # each kind's cases split into contiguous runs, one per job
        for j, part in enumerate(parts):
            a, b = n * j // len(parts), n * (j + 1) // len(parts)
            if a < b:
                part.append((kind, a, b))
    results: list[list[dict]] = [[] for _ in parts]
    errors: list[BaseException] = []

    def worker(j: int) -> None:
        try:
            results[j] = _run_worker(seeds, work, parts[j], seed, work / f"report-{j}.jsonl", deadline_s, log)
        except BaseException as e:  # noqa: BLE001 - re-raised in the caller's thread
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(j,)) for j in range(len(parts)) if parts[j]]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return [r for part in results for r in part]


def _run_worker(seeds: Path, work: Path, todo: list[tuple[str, int, int]], seed: int, report: Path,
                deadline_s: float, log: Callable[[str], None] | None) -> list[dict]:
    """One child process running ``todo`` ((kind, first, stop) runs of cases), restarted after the case that
    killed or hung it."""
    records: list[dict] = []
    began, restarts = time.monotonic(), 0
    while todo and restarts <= MAX_RESTARTS:
        restarts += 1
        report.write_text("")
        plan = ",".join(f"{k}:{a}:{b}" for k, a, b in todo)
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]),
               "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
               "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
        child = subprocess.Popen([sys.executable, str(Path(__file__)), "--child", "--seeds", str(seeds), "--work",
                                  str(work), "--seed", str(seed), "--plan", plan, "--report", str(report)],
                                 stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                 env=env, start_new_session=True)
        stderr_tail, reader = _drain(child)
        last_seen, last_size, watchdog = time.monotonic(), 0, False
        while child.poll() is None:
            time.sleep(0.2)
            size = report.stat().st_size
            if size != last_size:
                last_seen, last_size = time.monotonic(), size
            # silent past a case's time plus making the next one (the warm-up: imports, first loads, much longer):
            # hung where the alarm cannot reach
            grace = CASE_TIMEOUT * 4 + 60 if size else 300
            if time.monotonic() - last_seen > grace or time.monotonic() - began > deadline_s:
                watchdog = True
                os.killpg(child.pid, signal.SIGKILL)
                child.wait()
        reader.join(timeout=10)
        events = [json.loads(line) for line in report.read_text().splitlines() if line.strip()]
        done = {(e["kind"], e["case"]) for e in events if e["event"] == "done"}
        records += [{k: v for k, v in e.items() if k != "event"} for e in events if e["event"] == "done"]
        starts = [e for e in events if e["event"] == "start"]
        started = starts[-1] if starts and (starts[-1]["kind"], starts[-1]["case"]) not in done else None
        if log:
            log(f"child exited {child.returncode} after {len(done)} cases")
        if started is None:
            if child.returncode != 0:
                raise RuntimeError(f"the fuzz child failed before its first case: {''.join(stderr_tail)[-3000:]}")
            break
        kind, case = started["kind"], started["case"]
        scratch = work / f"{kind}-{seed}-{case}"
        kept = work / "failed" / scratch.name
        if scratch.exists():
            kept.parent.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(kept, ignore_errors=True)
            shutil.move(str(scratch), kept)
        if watchdog:
            how = "hung (killed by the watchdog)"
        elif child.returncode < 0:
            how = f"killed the process ({signal.Signals(-child.returncode).name})"
        else:
            how = f"ended the process (exit {child.returncode})"
        marks = [i for i, line in enumerate(stderr_tail) if line.startswith(CASE_MARK)]
        output = stderr_tail[marks[-1] + 1 :] if marks else stderr_tail
        frames = [m.groups() for m in (re.search(r'File "(.*)", line (\d+) in (\S+)', line) for line in output) if m]
        where = next((f"vlm/{f.rsplit('/vlm/', 1)[1]}:{fn}" for f, _, fn in frames if "/vlm/" in f), "?")
        records.append({"kind": kind, "seed": seed, "case": case, "status": "crash", "step": "?",
                        "error": "process", "message": f"{how}; its stderr: {''.join(output)[:300]!r}",
                        "where": where, "kept": str(kept), **_remake(kind, seed, case, seeds)})
        todo = _remaining(todo, kind, case + 1)
        if time.monotonic() - began > deadline_s:
            break
    return records


def _drain(child: subprocess.Popen) -> tuple[list[str], Any]:
    """Collects the child's stderr in a thread (the last lines are kept for a crash report); returns the lines and
    the thread (joined once the child has exited, so its last words are in)."""
    import threading

    tail: list[str] = []

    def read() -> None:
        for line in child.stderr:
            tail.append(line.decode(errors="replace"))
            del tail[:-40]

    thread = threading.Thread(target=read, daemon=True)
    thread.start()
    return tail, thread


def _remaining(todo: list[tuple[str, int, int]], kind: str, next_case: int) -> list[tuple[str, int, int]]:
    out, reached = [], False
    for k, a, b in todo:
        if k == kind:
            reached = True
            if next_case < b:
                out.append((k, next_case, b))
        elif reached:
            out.append((k, a, b))
    return out


def _remake(kind: str, seed: int, case: int, seeds: Path) -> dict:
    """The seed file and mutators of a case whose child died before it could say."""
    with tempfile.TemporaryDirectory() as tmp:
        try:
            _, seed_file, mutators = MAKERS[kind](case_rng(seed, kind, case), seeds, Path(tmp))
        except Exception as e:  # noqa: BLE001 - the report says so instead
            return {"seed_file": "?", "mutators": [f"(cannot remake: {e})"]}
    return {"seed_file": seed_file, "mutators": mutators}


def failure_classes(records: list[dict]) -> dict[tuple, list[dict]]:
    """Failing records grouped by (status, step, exception, where it was raised); cases with no exception (memory,
    crashes, hangs) by (status, kind, their mutations with the numbers and names left out)."""
    classes: dict[tuple, list[dict]] = {}
    for r in records:
        if r.get("status") in ("ok", "refused"):
            continue
        if r.get("where", "?") in ("?", "-") or r["status"] == "memory":
            shape = re.sub(r"'[^']*'|\"[^\"]*\"|[\w.,/-]*\d[\w.,/-]*", "#", "; ".join(r.get("mutators", [])))
            key = (r["status"], r["kind"], r.get("error", "-"), shape[:100])
        else:
            where = re.sub(r":\d+(?= |$|\))", "", r["where"])  # line numbers move; functions do not
            key = (r["status"], r.get("step", "-"), r.get("error", "-"), where)
        classes.setdefault(key, []).append(r)
    return classes


def describe(records: list[dict], seed: int) -> str:
    """A failure report: each class with its count and first case (kind, seed, case, seed file, mutators, message,
    kept file) and how to reproduce it."""
    lines = []
    for (status, step, error, where), cases in sorted(failure_classes(records).items(), key=lambda kv: -len(kv[1])):
        first = cases[0]
        title = f"{status} in {step}: {error} at {where}" if where.startswith("vlm") or "/" in where.split(" ")[0] \
            else f"{status} ({step}) after mutations shaped like: {where}"
        lines.append(f"- {title} ({len(cases)} case(s))\n"
                     f"    first: {first['kind']} seed {first['seed']} case {first['case']} "
                     f"[{first.get('seed_file', '?')}: {'; '.join(first.get('mutators', []))}]\n"
                     f"    {first.get('message', '')[:240]}\n"
                     f"    kept: {first.get('kept', '-')}\n"
                     f"    reproduce: python tests/fuzz_cases.py --reproduce {first['kind']} {seed} {first['case']}")
    return "\n".join(lines)


def summary(records: list[dict], seconds: float) -> str:
    """Cases per second, outcomes and mean seconds (making + running a case) per kind, and the slowest cases."""
    counts: dict[str, dict[str, Any]] = {}
    for r in records:
        counts.setdefault(r["kind"], {"s/case": 0.0}).setdefault(r["status"], 0)
        counts[r["kind"]][r["status"]] += 1
        counts[r["kind"]]["s/case"] += r.get("seconds", 0) + r.get("make_seconds", 0)
    for c in counts.values():
        c["s/case"] = round(c["s/case"] / sum(v for k, v in c.items() if k != "s/case"), 3)
    slow = sorted((r for r in records if "seconds" in r), key=lambda r: -r["seconds"])[:3]
    return (f"{len(records)} cases in {seconds:.0f} s ({len(records) / max(seconds, 1e-9):.1f}/s): "
            + "; ".join(f"{k} {v}" for k, v in counts.items())
            + "; slowest: " + ", ".join(f"{r['kind']} {r['case']} {r['seconds']} s" for r in slow))


# ============================================================================================ command line
def reproduce(kind: str, seed: int, case: int, seeds: Path) -> int:
    """Remakes one case in ``./fuzz-<kind>-<seed>-<case>/``, prints its mutators and runs its steps with full
    tracebacks (no time or memory limits: run it under ``ulimit -v`` if it is a memory case)."""
    out = Path.cwd() / f"fuzz-{kind}-{seed}-{case}"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir()
    sys.path.insert(0, str(seeds / "planted"))
    path, seed_file, mutators = MAKERS[kind](case_rng(seed, kind, case), seeds, out)
    print(f"{kind} case {case} (seed {seed}) from {seed_file}: {'; '.join(mutators)}\nfile: {path}")
    import vlm

    state = {"case": case, "scratch": out, "clip": vlm.load(seeds / "clip.ckpt")}
    for step in TARGETS[kind]:
        print(f"-- {step.name} (may raise {', '.join(step.accepted) or 'nothing'})", flush=True)
        start = time.perf_counter()
        try:
            step.run(path, state)
        except BaseException as e:  # noqa: BLE001
            accepted = step.accepted and isinstance(e, tuple(_cls(c) for c in step.accepted))
            print(f"   {'refused (accepted)' if accepted else 'FAILED'} after {time.perf_counter() - start:.2f} s: "
                  f"{type(e).__name__}: {e}"[:2000])
            if not accepted:
                traceback.print_exc()
                return 1
            return 0
        print(f"   ok in {time.perf_counter() - start:.2f} s")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--reproduce", nargs=3, metavar=("KIND", "SEED", "CASE"))
    p.add_argument("--cases", type=int, default=int(os.environ.get("VLM_FUZZ_CASES", "1500")))
    p.add_argument("--seed", type=int, default=int(os.environ.get("VLM_FUZZ_SEED", "0")))
    p.add_argument("--seeds", default=os.path.join(tempfile.gettempdir(), "vlm-fuzz-seeds"))
    p.add_argument("--work")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--plan", help=argparse.SUPPRESS)
    p.add_argument("--report", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        return child_main(args)
    seeds = make_seeds(args.seeds)
    if args.reproduce:
        kind, seed, case = args.reproduce
        return reproduce(kind, int(seed), int(case), seeds)
    work = Path(args.work or tempfile.mkdtemp(prefix="vlm-fuzz-"))
    start = time.monotonic()
    records = fuzz(seeds, work, args.cases, args.seed, log=print)
    print(summary(records, time.monotonic() - start))
    print(describe(records, args.seed) or "no failures")
    return 1 if failure_classes(records) else 0


if __name__ == "__main__":
    sys.exit(main())
