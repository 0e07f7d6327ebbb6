"""scripts/benchmark.py: every suite runs at tiny sizes and prints well-formed rows (nothing about speed)."""

from __future__ import annotations

import copy
import importlib.util
import json
import math
import os
from pathlib import Path

import pytest
import torch
from conftest import assert_fp32_close

from benchmarks import DEVICE_SUITES, SUITES, run_suite
from benchmarks.core import (
    Row,
    Settings,
    count_flops,
    fit_exponent,
    interleaved_medians,
    make_row,
    nominal_peak_tflops,
    peak_memory_bytes,
)

ROOT = Path(__file__).resolve().parents[1]
KEYS = {"suite", "name", "ours", "peer", "unit", "ratio"}


def _load_script():
    spec = importlib.util.spec_from_file_location("benchmark_script", ROOT / "scripts" / "benchmark.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def script():
    return _load_script()


def test_ratio_favours_ours_when_faster_or_smaller():
    assert make_row("s", "rate", 20.0, "img/s", 10.0).ratio == 2.0  # twice the throughput
    assert make_row("s", "time", 1.0, "s", 2.0).ratio == 2.0  # half the time
    assert make_row("s", "memory", 300.0, "MiB", 100.0).ratio == pytest.approx(1 / 3, rel=1e-3)  # 3x the memory
    row = make_row("s", "alone", 5.0, "s")
    assert row.peer is None and row.ratio is None


def test_fit_exponent_recovers_a_power_law():
    xs = [32, 64, 128, 256, 512]
    assert fit_exponent(xs, [3e-3 * x**1.5 for x in xs]) == pytest.approx(1.5)
    assert fit_exponent(xs, [7.0 * x for x in xs]) == pytest.approx(1.0)


def test_interleaving_alternates_the_order_after_warmup():
    calls: list[str] = []
    medians = interleaved_medians({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, repeats=3, warmup=1)
    assert calls == ["a", "b", "a", "b", "b", "a", "a", "b"]  # warm-up, then A B, B A, A B
    assert set(medians) == {"a", "b"} and all(t >= 0 for t in medians.values())


@pytest.mark.parametrize("train", [False, True], ids=["forward", "forward+backward"])
def test_cpu_attention_kernel_flops_equal_its_products(train):
    """The fused CPU attention kernel is counted as the products it computes: the same count as attention written
    out as matmuls (which PyTorch's counter sees), forward and backward; a mask does not change it."""
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, n, 4, generator=gen).requires_grad_(train) for n in (5, 7, 7))
    mask = torch.rand(5, 7, generator=gen) > 0.3
    mask[:, 0] = True

    def run(fused: bool) -> None:
        if fused:
            out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        else:
            scores = (q @ k.transpose(-1, -2)).masked_fill(~mask, float("-inf"))
            out = scores.softmax(-1) @ v
        if train:
            out.square().sum().backward()

    with torch.profiler.profile() as prof:
        run(fused=True)
    assert "aten::_scaled_dot_product_flash_attention_for_cpu" in {e.name for e in prof.events()}
    expected = 2 * 2 * 3 * 5 * 7 * (4 + 4) * (3 if train else 1)  # backward: two products per forward product
    assert count_flops(lambda: run(fused=False)) == expected
    assert count_flops(lambda: run(fused=True)) == expected


def test_peak_memory_sees_a_freed_temporary():
    def fn() -> None:
        a = torch.ones(4 * 2**20 // 4)  # 4 MiB
        b = torch.ones(8 * 2**20 // 4)  # 8 MiB live together with a: peak >= 12 MiB
        del a, b

    peak = peak_memory_bytes(fn)
    assert 12 * 2**20 <= peak < 20 * 2**20


def test_a_missing_module_becomes_a_skip_row(monkeypatch):
    monkeypatch.setitem(SUITES, "future", "benchmarks._not_written_yet")
    rows = list(run_suite("future", Settings(quick=True)))
    assert len(rows) == 1 and rows[0].name.startswith("not available yet:") and rows[0].ours is None


def test_unknown_suite_is_a_usage_error(script, capsys):
    with pytest.raises(SystemExit) as exc:
        script.main(["--suite", "nope"])
    assert exc.value.code == 2
    assert "invalid choice" in capsys.readouterr().err


def _check_rows(lines: list[str], suite: str) -> list[Row]:
    rows = []
    for line in lines:
        obj = json.loads(line)
        assert set(obj) == KEYS, line
        assert obj["suite"] == suite
        assert not obj["name"].startswith("error:"), obj["name"]
        for key in ("ours", "peer", "ratio"):
            assert obj[key] is None or (isinstance(obj[key], int | float) and math.isfinite(obj[key])), line
        if obj["peer"] is None:
            assert obj["ratio"] is None, line
        elif obj["ours"] and obj["peer"]:
            expected = make_row(suite, "", obj["ours"], obj["unit"], obj["peer"]).ratio  # from the rounded figures
            assert obj["ratio"] == pytest.approx(expected, rel=0.02), line
        rows.append(Row(**obj))
    return rows


# The compile suite runs torch.compile with the eager backend under --quick (inductor takes minutes here).
@pytest.mark.parametrize("suite", list(SUITES))
def test_quick_suite_prints_well_formed_json_rows(script, capsys, suite):
    code = script.main(["--suite", suite, "--json", "--quick", "--repeats", "1", "--threads", "1"])
    lines = [line for line in capsys.readouterr().out.splitlines() if line.strip()]
    rows = _check_rows(lines, suite)
    assert code == 0
    measured = [r for r in rows if not r.name.startswith("not available yet")]
    assert measured, f"{suite} measured nothing: {[r.name for r in rows]}"
    # Ours and the peer hold identical weights: their outputs agree (the contract the ratios rely on).
    for row in rows:
        if row.unit == "abs diff":
            assert row.ours <= 1e-4, row


# bf16 autocast on the CPU exercises what a GPU run does (autocast around ours and the peer, backward outside it,
# bf16 outputs compared in fp32) at tiny sizes; the GPU's own lines (synchronisation, CUDA memory, its GEMM) are
# in the cuda-marked test below.
@pytest.mark.parametrize("suite", DEVICE_SUITES)
def test_device_suites_run_in_bf16_mixed(script, capsys, suite):
    code = script.main(["--suite", suite, "--json", "--quick", "--repeats", "1", "--threads", "1",
                        "--precision", "bf16-mixed"])  # fmt: skip
    rows = _check_rows([line for line in capsys.readouterr().out.splitlines() if line.strip()], suite)
    assert code == 0 and rows
    if suite != "roofline":  # on the CPU the roofline is fp32 whatever the models run in, and says so
        assert all("[cpu bf16-mixed]" in r.name or r.name.startswith("Flamingo step:") for r in rows), rows
    for row in rows:
        if row.unit == "abs diff":  # bf16 keeps ~3 significant digits of the O(1) outputs and losses
            assert row.ours <= (0.0 if suite == "ddp" else 0.05), row
    if suite == "clip":  # the training step's model FLOPs utilisation: a share, for ours and open_clip
        util = [r for r in rows if "FLOPs utilisation" in r.name]
        assert len(util) == 1 and 0 < util[0].ours <= 100 and 0 < util[0].peer <= 100


def test_ddp_suite_leaves_the_process_environment_as_it_was(monkeypatch):
    # Lightning's DDP launcher writes LOCAL_RANK, MASTER_PORT... into os.environ: a DDP run started afterwards in
    # a subprocess (tests/ddp_contrastive.py) would inherit them, take itself for a worker and wait forever.
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    before, threads = dict(os.environ), torch.get_num_threads()
    rows = list(run_suite("ddp", Settings(quick=True, repeats=1)))
    assert rows and not any(r.name.startswith("error") for r in rows)
    assert dict(os.environ) == before and torch.get_num_threads() == threads
    assert not (torch.distributed.is_available() and torch.distributed.is_initialized())


def test_cpu_only_suites_say_they_were_skipped_off_cpu_fp32(script, capsys):
    rows = list(run_suite("scaling", Settings(quick=True, precision="bf16-mixed")))
    assert len(rows) == 1 and rows[0].name.startswith("skipped: scaling measures the CPU in fp32 only")
    # Without --suite, a bf16 run runs the suites that support it and only those.
    assert script.main(["--json", "--quick", "--repeats", "1", "--threads", "1", "--precision", "bf16-mixed",
                        "--suite", "roofline"]) == 0  # fmt: skip
    capsys.readouterr()


@pytest.mark.parametrize("args, message", [
    (["--device", "tpu"], "--device must be cpu or cuda"),
    (["--device", "cuda:99"], "cuda"),
    (["--precision", "fp8"], "invalid choice"),
    (["--peak-tflops", "0"], "--peak-tflops must be positive"),
])  # fmt: skip
def test_device_options_are_checked(script, capsys, args, message):
    with pytest.raises(SystemExit) as exc:
        script.main([*args, "--quick"])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("name, peak", [("NVIDIA H200", 989.4), ("NVIDIA H100 80GB HBM3", 989.4),
                                        ("NVIDIA H100 PCIe", 756.5), ("NVIDIA A100-SXM4-80GB", 312.0),
                                        ("NVIDIA GeForce RTX 4090", None)])  # fmt: skip
def test_nominal_bf16_peak_is_read_off_the_device_name(monkeypatch, name, peak):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    assert nominal_peak_tflops(Settings(device="cuda")) == peak
    assert nominal_peak_tflops(Settings(device="cuda", peak_tflops=123.0)) == 123.0  # the user's figure wins
    assert nominal_peak_tflops(Settings()) is None  # a CPU has no nominal bf16 peak here


def test_settings_refuse_an_unknown_precision():
    with pytest.raises(ValueError, match="precision must be one of"):
        Settings(precision="16-mixed")


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("suite", DEVICE_SUITES)
def test_device_suites_run_on_the_gpu(script, capsys, suite):
    code = script.main(["--suite", suite, "--json", "--quick", "--repeats", "1", "--device", "cuda",
                        "--precision", "bf16-mixed"])  # fmt: skip
    rows = _check_rows([line for line in capsys.readouterr().out.splitlines() if line.strip()], suite)
    assert code == 0 and rows


def test_table_has_a_header_and_one_line_per_row(script, capsys):
    assert script.main(["--suite", "roofline", "--quick", "--repeats", "1", "--threads", "1", "--clock", "cpu"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["suite", "name", "ours", "peer", "unit", "ratio"]
    assert len(lines) > 1 and all(line.startswith("roofline") for line in lines[1:])


# ------------------------------------------------------------------ the speed changes keep every output identical
@pytest.mark.parametrize("pool", ["eot", "mean"])
def test_text_tower_skips_padding_without_changing_values_or_gradients(pool):
    from vlm.models.text import TextTransformer

    torch.manual_seed(0)
    tower = TextTransformer(vocab_size=100, context_length=16, width=32, depth=2, num_heads=2, eot_token_id=99,
                            pool=pool)  # fmt: skip
    text = torch.randint(1, 99, (3, 16))
    text[0, 4:], text[1, 9:], text[2, 6:] = 0, 0, 0  # padded captions
    text[0, 3], text[1, 8], text[2, 5] = 99, 99, 99
    exact_tower = copy.deepcopy(tower).double()
    eot = tower.eot_positions(text)
    keep = (torch.arange(16)[None, :] <= eot[:, None]).unsqueeze(-1)

    def by_hand(model):  # all 16 positions, pooled by hand
        full = model.forward_tokens(text)
        return full[torch.arange(3), eot] if pool == "eot" else (full * keep).sum(1) / keep.sum(1)

    fast = tower(text)  # runs 9 positions
    # Only float rounding may differ (sums over a different number of zero padding terms, in another order): the
    # shortcut's values are as close to the float64 ones as the full float32 pass's.
    assert_fp32_close(fast, by_hand(tower), by_hand(exact_tower), msg="pooled")
    # The float32 gradients miss the float64 ones by up to ~200 ulps of their scale, the 9-position pass by 1-7x
    # the 16-position one depending on the CPU's vector kernels, so they are compared in float64 on the same code
    # path: there the two differ by ~5e-15 of the scale (~20 float64 ulps), 2e5 times below the bound,
    # while a padding position that leaked in changes them by O(1).
    params = list(exact_tower.parameters())
    grads = torch.autograd.grad(exact_tower(text).square().sum(), params)
    ref_grads = torch.autograd.grad(by_hand(exact_tower).square().sum(), params)
    scale = max(r.abs().max().item() for r in ref_grads)
    for (name, _), g, r in zip(exact_tower.named_parameters(), grads, ref_grads):
        assert (g - r).abs().max().item() <= 1e-9 * scale, name
