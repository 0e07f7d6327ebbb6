"""Hugging Face parts and record files from strangers: no remote code, prompt, Hub kernel or torch lookup from a
directory's config files, a Rust tokenizer panic as one error line, and metadata files and image indexes read
within bounds (peak memory measured in a subprocess)."""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from vlm.models.hf_local import HFFileError

ROOT = Path(__file__).parent.parent
PANIC_REGEX = "(a+)+b"  # backtracks past Oniguruma's retry limit on "aaa...c": the Rust library panics
PANIC_TEXT = "a" * 40 + "c"


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory):
    """A tiny random GPT-2 saved with save_pretrained, with the GPT-2 BPE tokenizer beside it."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from vlm.data.gpt2_tokenizer import load_hf_tokenizer

    path = tmp_path_factory.mktemp("hf") / "gpt2"
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(vocab_size=50257, n_positions=64, n_embd=32, n_layer=2, n_head=2)).save_pretrained(path)
    load_hf_tokenizer(None).save_pretrained(path)
    return path


def _copy(src: Path, dst: Path, file: str, **changes) -> Path:
    shutil.copytree(src, dst)
    config = json.loads((dst / file).read_text())
    config.update(changes)
    (dst / file).write_text(json.dumps(config))
    return dst


def _run(code: str) -> subprocess.CompletedProcess:
    """``code`` in a fresh interpreter, offline, with no terminal to read from."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "RUST_BACKTRACE": "0"}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, env=env, stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, timeout=300)


# ------------------------------------------------------------------------------------------------ Hugging Face parts
def test_auto_map_is_refused_without_a_prompt(gpt2_dir, tmp_path):
    tok_dir = _copy(gpt2_dir, tmp_path / "tok", "tokenizer_config.json",
                    auto_map={"AutoTokenizer": ["tokenization_evil.EvilTokenizer", None]})
    (tok_dir / "tokenization_evil.py").write_text("import pathlib; pathlib.Path('RAN').write_text('yes')\n")
    model_dir = _copy(gpt2_dir, tmp_path / "model", "config.json", auto_map={"AutoConfig": "configuration_evil.C"})
    result = _run(f"""
        from vlm.data.gpt2_tokenizer import CausalLMTokenizer
        from vlm.data.hf_tokenizer import HFTokenizer
        from vlm.models.hf_decoder import HFCausalLM
        for build in (lambda: CausalLMTokenizer({str(tok_dir)!r}).encode("hi"),
                      lambda: HFTokenizer({str(tok_dir)!r})(["hi"]),
                      lambda: HFCausalLM({str(model_dir)!r}, pretrained=False)):
            try:
                build()
                print("BUILT")
            except ValueError as e:
                print("REFUSED", e)
    """)
    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stdout.splitlines()
    assert len(lines) == 3 and all(line.startswith("REFUSED") and "auto_map" in line for line in lines), lines
    assert "custom code" not in result.stdout + result.stderr  # transformers' question never came
    assert not (ROOT / "RAN").exists() and not (tok_dir / "RAN").exists()


def test_unknown_model_type_and_tokenizer_class_are_refused(gpt2_dir, tmp_path):
    from vlm.data.gpt2_tokenizer import CausalLMTokenizer
    from vlm.models.hf_decoder import HFCausalLM

    with pytest.raises(HFFileError, match="model_type: 'evil_model'"):
        HFCausalLM(str(_copy(gpt2_dir, tmp_path / "m", "config.json", model_type="evil_model")), pretrained=False)
    with pytest.raises(HFFileError, match="tokenizer_class 'Trainer'"):
        CausalLMTokenizer(str(_copy(gpt2_dir, tmp_path / "t", "tokenizer_config.json", tokenizer_class="Trainer")))
    CausalLMTokenizer(str(gpt2_dir))  # the genuine directory passes


def test_attn_implementation_is_an_allow_list(gpt2_dir, tmp_path):
    from vlm.models.hf_decoder import HFCausalLM

    kernel = "kernels-community/flash-attn"
    with pytest.raises(HFFileError, match="attn_implementation 'kernels-community/flash-attn' is not one of"):
        HFCausalLM(str(gpt2_dir), pretrained=False, attn_implementation=kernel)
    bad = _copy(gpt2_dir, tmp_path / "k", "config.json", attn_implementation=kernel)
    for attn in (None, "eager"):  # None leaves the config's choice; a named one overrides it: both refused
        with pytest.raises(HFFileError, match=r"config.json: refused attn_implementation"):
            HFCausalLM(str(bad), pretrained=False, attn_implementation=attn)
    for attn in (None, "eager", "sdpa"):
        assert HFCausalLM(str(gpt2_dir), pretrained=False, attn_implementation=attn).width == 32


def test_dtype_is_an_allow_list_checked_before_torch_is_asked(gpt2_dir, tmp_path):
    bad = _copy(gpt2_dir, tmp_path / "d", "config.json", dtype="_dynamo")
    result = _run(f"""
        import sys
        from vlm.models.hf_decoder import HFCausalLM
        for path, dtype in (({str(gpt2_dir)!r}, "_dynamo"), ({str(gpt2_dir)!r}, "int8"), ({str(bad)!r}, None)):
            try:
                HFCausalLM(path, pretrained=False, dtype=dtype)
                print("BUILT")
            except ValueError as e:
                print("REFUSED", e)
        print("torch._dynamo" in sys.modules)
    """)
    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stdout.splitlines()
    assert lines[0].startswith("REFUSED HFCausalLM dtype: '_dynamo' is not one of float32")
    assert lines[1].startswith("REFUSED HFCausalLM dtype: 'int8'")
    assert lines[2].startswith("REFUSED") and "refused dtype: '_dynamo'" in lines[2]
    assert lines[3] == "False"
    from vlm.models.hf_decoder import HFCausalLM

    assert HFCausalLM(str(gpt2_dir), pretrained=False, dtype="bf16").model.dtype == torch.bfloat16


def test_a_tokenizer_panic_is_one_value_error(gpt2_dir, tmp_path):
    from vlm.data.gpt2_tokenizer import CausalLMTokenizer, FlamingoTokenizer
    from vlm.data.hf_tokenizer import HFTokenizer

    path = _copy(gpt2_dir, tmp_path / "p", "tokenizer_config.json", tokenizer_class="PreTrainedTokenizerFast",
                 pad_token="<|endoftext|>")
    spec = json.loads((path / "tokenizer.json").read_text())
    spec["pre_tokenizer"] = {"type": "Split", "pattern": {"Regex": PANIC_REGEX}, "behavior": "Isolated",
                             "invert": False}
    (path / "tokenizer.json").write_text(json.dumps(spec))
    for tokenizer in (CausalLMTokenizer(str(path)), FlamingoTokenizer(str(path))):
        assert tokenizer.encode("a b") != []  # an ordinary text is fine
        with pytest.raises(HFFileError) as info:
            tokenizer.encode(PANIC_TEXT)
        assert "\n" not in str(info.value) and "retry-limit-in-match" in str(info.value)
    with pytest.raises(ValueError, match="the tokenizers library failed"):
        HFTokenizer(str(path), context_length=8)([PANIC_TEXT])
    # the exception really is a Rust panic, a BaseException that `except Exception` would not catch
    with pytest.raises(BaseException) as raw:
        CausalLMTokenizer(str(path)).hf.encode(PANIC_TEXT)
    assert type(raw.value).__name__ == "PanicException" and not isinstance(raw.value, Exception)


# ------------------------------------------------------------------------------------------------ metadata files
def _peak_extra_mib(code: str) -> float:
    """Peak RSS growth (MiB) of ``code`` in a subprocess, after the imports in its first line."""
    first, rest = code.strip().split("\n", 1)
    result = _run(f"""
        import resource
        {first}
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        {rest.strip()}
        print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024)
    """)
    assert result.returncode == 0, result.stderr[-2000:]
    return float(result.stdout.splitlines()[-1])


def _write_metadata(path: Path, mib: int) -> None:
    """Rows of many tiny lists (about 30x their size as Python objects) and one row per distinct file name."""
    junk = ",".join(["[]"] * 2000)
    with path.open("w") as f:
        size = i = 0
        while size < mib << 20:
            line = f'{{"file_name": "{i}.png", "caption": "c", "x": [{junk}]}}\n'
            f.write(line)
            size += len(line)
            i += 1


def test_metadata_memory_stays_near_the_file_size(tmp_path):
    from vlm.index import read_captions

    folder = tmp_path / "images"
    folder.mkdir()
    _write_metadata(folder / "metadata.jsonl", 16)
    (folder / "1.png").write_bytes(b"")  # the one named image that exists
    extra = _peak_extra_mib(f"""
        from pathlib import Path; from vlm.index import read_captions; from vlm.data.records import read_json_rows
        captions = read_captions(Path({str(folder)!r}), lambda m: None)
        kept = list(read_json_rows(Path({str(folder)!r}) / "metadata.jsonl", lambda r: r.get("caption"), print))
        assert len(captions) == 1 and len(kept) > 1000
    """)
    assert extra < 32, f"reading a 16 MiB metadata.jsonl took {extra:.0f} MiB"  # read whole: about 450 MiB
    warnings = []
    captions = read_captions(folder, warnings.append)
    assert dict(captions) == {"1.png": ["c"]}
    assert len(warnings) == 1 and "no image file '0.png'" in warnings[0]


def test_json_rows_skip_long_and_bad_lines_in_one_warning(tmp_path):
    from vlm.data.records import Captions, iter_json_rows, read_json_rows

    path = tmp_path / "m.jsonl"
    path.write_bytes(b'{"a": 1}\n\n' + b'{"a": "' + b"x" * 3000 + b'"}\n[1]\n{bad\n\xff\n{"a": 2}')
    warnings = []
    rows = list(read_json_rows(path, lambda r: r["a"], warnings.append, limit=1 << 20))
    assert rows == [1, "x" * 3000, 2]

    reasons = [r for _, r in iter_json_rows(path, max_line=100) if isinstance(r, str)]
    assert reasons == ["longer than 100 bytes", "not a JSON object", "not JSON (JSONDecodeError)", "not UTF-8"]
    assert len(warnings) == 1 and "skipped 3 malformed lines (first: line 4: not a JSON object)" in warnings[0]
    captions = Captions()
    assert captions.add("a.png", [str(i) for i in range(150)]) == 50  # kept up to 100 per image
    assert captions["a.png"] == [str(i) for i in range(100)]


def test_training_tables_stream_and_keep_types(tmp_path):
    from vlm.data.sources import load_table

    rows = [{"file_name": "a.png", "caption": "one", "label": 1}, {"file_name": "b.png", "caption": "two"},
            {"file_name": "c.png", "caption": "three", "label": "x", "extra": [1, 2]}]
    (tmp_path / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    table = load_table(str(tmp_path), "train")
    data = table.data
    assert data["image"] == ["a.png", "b.png", "c.png"] and data["caption"] == ["one", "two", "three"]
    assert data["label"] == ["1", None, "x"]  # numbers and strings in one column: text, as before
    assert data["extra"] == [None, None, [1, 2]]
    (tmp_path / "metadata.jsonl").write_text('{"file_name": "a.png"}\n{oops\n')
    with pytest.raises(ValueError, match=r"metadata.jsonl:2: not JSON"):
        load_table(str(tmp_path), "train")


# ------------------------------------------------------------------------------------------------ image indexes
def _index_bytes(header: dict | bytes, data: bytes = b"") -> bytes:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data


def _record(n: int, dim: int = 4, **changes) -> str:
    record = {"format": "vlm-image-index", "version": 1, "root": "/tmp", "checkpoint": "/tmp/x.ckpt",
              "fingerprint": "sha256:0", "embed_dim": dim, "files": [[f"{i}.png", 1, 2] for i in range(n)]}
    return json.dumps({**record, **changes})


def test_index_header_and_shapes_are_checked_before_reading(tmp_path, monkeypatch):
    import vlm.index as index_module
    from vlm.index import IndexFileError, load_index

    path = tmp_path / "x.index"
    good = {"__metadata__": {"vlm_index": _record(2)},
            "embeddings": {"dtype": "F32", "shape": [2, 4], "data_offsets": [0, 32]}}
    path.write_bytes(_index_bytes(good, bytes(32)))
    index = load_index(path)
    assert index.files == ["0.png", "1.png"] and list(index.stats) == [(1, 2), (1, 2)]
    assert index.embeddings.shape == (2, 4)
    cases = [
        (_index_bytes({**good, "embeddings": {"dtype": "F32", "shape": [2, 4], "data_offsets": [0, 32]}}, bytes(8)),
         "should be the 32 bytes"),  # the header promises more than the file holds: refused before allocating
        (_index_bytes({**good, "embeddings": {"dtype": "F32", "shape": [2, 1 << 40], "data_offsets": [0, 32]}}),
         "expected F32 \\[2, 4\\]"),
        (_index_bytes({**good, "__metadata__": {"vlm_index": _record(2, root=[[[]] * 3000])}}, bytes(32)),
         "longer than 4,096 characters"),  # nested junk is never expanded
        (struct.pack("<Q", 1 << 40) + b"{}", "a header of 1,099,511,627,776 bytes"),
    ]
    for data, message in cases:
        path.write_bytes(data)
        with pytest.raises(IndexFileError, match=message):
            load_index(path)
    monkeypatch.setattr(index_module, "MAX_INDEX_FILES", 3)
    many = {"__metadata__": {"vlm_index": _record(4)},
            "embeddings": {"dtype": "F32", "shape": [4, 4], "data_offsets": [0, 64]}}
    path.write_bytes(_index_bytes(many, bytes(64)))
    with pytest.raises(IndexFileError, match="more than 3 files"):
        load_index(path)


def test_index_memory_stays_near_the_file_size(tmp_path):
    n = 400_000
    path = tmp_path / "big.index"
    header = {"__metadata__": {"vlm_index": _record(n, dim=1)},
              "embeddings": {"dtype": "F32", "shape": [n, 1], "data_offsets": [0, 4 * n]}}
    path.write_bytes(_index_bytes(header, bytes(4 * n)))
    size = path.stat().st_size / (1 << 20)
    extra = _peak_extra_mib(f"""
        from vlm.index import load_index
        index = load_index({str(path)!r})
        assert len(index.files) == {n}
    """)
    # names (about 60 bytes each as strings) and 16 bytes of stats per entry, plus the header's text a few times;
    # json.loads of the record and a tuple per entry took about 10x the file.
    assert extra < 6 * size + 16, f"a {size:.0f} MiB index took {extra:.0f} MiB"


def test_index_builds_batches_of_small_tensors(tmp_path, monkeypatch):
    from conftest import tiny_clip_config
    from PIL import Image

    from vlm.formats import build_task
    from vlm.index import build_index, load_clip, load_index
    from vlm.inference import CLIPPredictor

    task = build_task(tiny_clip_config())
    ckpt = tmp_path / "clip.ckpt"
    torch.save({"state_dict": task.state_dict(), "hyper_parameters": dict(task.hparams),
                "inference": task.inference_settings()}, ckpt)  # fmt: skip
    folder = tmp_path / "images"
    folder.mkdir()
    for i, colour in enumerate(((200, 30, 30), (30, 200, 30), (30, 30, 200))):
        Image.new("RGB", (300 + 50 * i, 200), colour).save(folder / f"{i}.png")
    seen = []
    real = CLIPPredictor.embed_images
    monkeypatch.setattr(CLIPPredictor, "embed_images", lambda self, images: seen.append(images) or real(self, images))
    build_index(ckpt, folder, tmp_path / "x.index", batch_size=2)
    size = load_clip(ckpt).image_size
    assert [len(batch) for batch in seen] == [2, 1]
    assert all(t.dtype == torch.uint8 and tuple(t.shape) == (3, size, size) for batch in seen for t in batch)
    monkeypatch.setattr(CLIPPredictor, "embed_images", real)
    expected = load_clip(ckpt).embed_images(sorted(folder.glob("*.png")))
    torch.testing.assert_close(load_index(tmp_path / "x.index").embeddings, expected, atol=1e-5, rtol=0)
