"""vlm's CPU kernels, applied from outside the models (vlm/kernels.py, vlm.callbacks.CPUKernels): the swap keeps the
very same parameters and state-dict keys, oneDNN and the inference-time buffer reuse give the plain model's values
and gradients, ``off`` undoes it, ``auto`` follows the rule (oneDNN where MKL runs its non-Intel path), and the
callback applies it on a CPU trainer only."""

from __future__ import annotations

import copy
import types

import pytest
import torch
from conftest import FP32_EPS, assert_fp32_close
from torch import nn

from vlm import kernels
from vlm.kernels import CPUMLP, CPUBlock, OneDNNDecoderLM, OneDNNLinear, use_cpu_kernels
from vlm.models.decoder import DecoderLM
from vlm.models.layers import MLP, Block


@pytest.fixture
def onednn_calls(monkeypatch):
    """oneDNN at any size (these layers are far below the size from which it pays), every call recorded as
    ``(weight shape, fused activation)``."""
    monkeypatch.setattr(kernels, "_ONEDNN_MIN_MACS", 0)
    calls: list[tuple[tuple[int, ...], str]] = []
    real_mm = kernels._onednn_mm

    def counting_mm(x, w, bias, act="none", approx=""):
        calls.append((tuple(w.shape), act))
        return real_mm(x, w, bias, act, approx)

    monkeypatch.setattr(kernels, "_onednn_mm", counting_mm)
    return calls


def tiny_flamingo():
    from vlm.models.flamingo import Flamingo
    from vlm.models.vit import VisionTransformer

    torch.manual_seed(0)
    vision = VisionTransformer(image_size=16, patch_size=8, width=16, depth=1, num_heads=2)
    decoder = DecoderLM(vocab_size=40, context_length=16, width=32, depth=2, num_heads=2)
    return Flamingo(vision, decoder, cross_attn_heads=2, num_latents=4, resampler_depth=1, resampler_heads=2)


def _classes(model: nn.Module) -> list[type]:
    return [type(m) for m in model.modules()]


# ------------------------------------------------------------------------------------------------- the swap
@pytest.mark.parametrize("backend", ["onednn", "blas"])
def test_the_swap_keeps_the_parameters_state_dict_and_optimizer(backend):
    model = tiny_flamingo()
    params = dict(model.named_parameters())
    state = model.state_dict()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    assert use_cpu_kernels(model, backend) is model
    assert {n: id(p) for n, p in model.named_parameters()} == {n: id(p) for n, p in params.items()}
    after = model.state_dict()
    assert list(after) == list(state)
    assert all(after[k].data_ptr() == state[k].data_ptr() for k in state)
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if backend == "onednn":  # every projection, the MLPs (Perceiver, gated blocks, decoder) and the LM head
        assert linears and all(type(m) is OneDNNLinear for m in linears)
        assert type(model.decoder) is OneDNNDecoderLM
    else:
        assert linears and all(type(m) is nn.Linear for m in linears)
        assert type(model.decoder) is DecoderLM
    assert all(type(m) is CPUMLP for m in model.modules() if isinstance(m, MLP))
    assert all(type(m) is CPUBlock for m in model.modules() if isinstance(m, Block))
    assert _classes(copy.deepcopy(model)) == _classes(model)  # a copy is the same kind of model
    # The optimizer built before the swap still trains the model's own parameters.
    weight = params["decoder.blocks.0.attn.qkv.weight"]
    before = weight.detach().clone()
    model.train()
    ids = torch.tensor([[40, 3, 4, 5]])
    model(torch.randn(1, 3, 16, 16), ids).square().mean().backward()
    optimizer.step()
    assert not torch.equal(model.decoder.blocks[0].attn.qkv.weight, before)


def test_off_restores_the_plain_model_and_blas_the_plain_linears():
    model = tiny_flamingo()
    plain = _classes(model)
    use_cpu_kernels(model, "onednn")
    assert _classes(model) != plain
    use_cpu_kernels(model, "blas")  # back to nn.Linear and DecoderLM, the inference buffer reuse stays
    assert not any(t in (OneDNNLinear, OneDNNDecoderLM) for t in _classes(model))
    assert CPUBlock in _classes(model)
    use_cpu_kernels(model, "off")
    assert _classes(model) == plain
    use_cpu_kernels(model, "off")  # idempotent
    assert _classes(model) == plain


def test_only_exact_classes_are_swapped():
    """Subclasses (another library's linear, a wrapper's own block class) are someone else's: left alone."""

    class OwnLinear(nn.Linear):
        pass

    model = nn.Sequential(OwnLinear(4, 4), nn.MultiheadAttention(4, 2), nn.Linear(4, 4))
    use_cpu_kernels(model, "onednn")
    assert type(model[0]) is OwnLinear
    assert type(model[1].out_proj) is nn.modules.linear.NonDynamicallyQuantizableLinear
    assert type(model[2]) is OneDNNLinear


# -------------------------------------------------------------------------------------- values and gradients
@pytest.mark.parametrize("shape", [(6, 16), (2, 5, 16), (2, 3, 4, 16)])
@pytest.mark.parametrize("bias", [True, False])
def test_onednn_linear_matches_plain_values_and_gradients(shape, bias, onednn_calls):
    torch.manual_seed(0)
    layer = nn.Linear(16, 24, bias=bias)
    x = torch.randn(*shape, requires_grad=True)

    def run(layer, x):
        out = layer(x)
        weights = torch.linspace(-1, 1, 24, dtype=x.dtype)
        return out, torch.autograd.grad((out * weights).sum(), [x, *layer.parameters()])

    exact, exact_grads = run(copy.deepcopy(layer).double(), x.detach().double().requires_grad_())
    ref, ref_grads = run(layer, x)
    out, grads = run(use_cpu_kernels(layer, "onednn"), x)
    assert len(onednn_calls) == 3  # forward, input gradient, weight gradient: all on oneDNN
    assert out.shape == (*shape[:-1], 24)
    assert_fp32_close(out, ref, exact, msg="output")
    for g, r, e in zip(grads, ref_grads, exact_grads):
        assert_fp32_close(g, r, e, msg="gradient")


def test_onednn_linear_frozen_weights_and_in_place_residual(onednn_calls):
    """A frozen layer still passes gradients to its input, and its output may take an in-place residual add."""
    layer = use_cpu_kernels(nn.Linear(8, 8).requires_grad_(False), "onednn")
    x = torch.randn(3, 4, 8, requires_grad=True)
    out = layer(x).add_(x)
    (grad,) = torch.autograd.grad(out.sum(), x)
    # A sum of 9 terms (8 weights and the residual's 1), in any order: within 9 ulps of the sum of their magnitudes.
    bound = 9 * FP32_EPS * (layer.weight.abs().sum(0).max().item() + 1)
    torch.testing.assert_close(grad, layer.weight.sum(0).expand(3, 4, 8) + 1, rtol=0, atol=bound)
    assert layer.weight.grad is None and len(onednn_calls) == 2  # forward and input gradient


@pytest.mark.parametrize("backend", ["onednn", "blas"])
def test_models_on_either_backend_give_the_plain_values_and_gradients(backend, onednn_calls):
    """A ViT and a decoder LM, inference and training: the plain model's outputs and gradients within fp32 rounding."""
    from vlm.models.vit import VisionTransformer

    torch.manual_seed(0)
    vit = VisionTransformer(16, 8, width=32, depth=2, num_heads=2, layer_scale=0.5)
    lm = DecoderLM(vocab_size=50, context_length=8, width=32, depth=2, num_heads=2)
    for model, x in ((vit, torch.randn(2, 3, 16, 16)), (lm, torch.randint(0, 50, (2, 8)))):
        model.eval()
        exact_model = copy.deepcopy(model).double()  # the float64 values both float32 runs approximate
        x64 = x.double() if x.is_floating_point() else x
        with torch.no_grad():
            ref, exact = model(x), exact_model(x64)
        ref_grads = torch.autograd.grad(model(x).square().sum(), list(model.parameters()))
        exact_grads = torch.autograd.grad(exact_model(x64).square().sum(), list(exact_model.parameters()))
        use_cpu_kernels(model, backend)
        with torch.no_grad():
            assert_fp32_close(model(x), ref, exact, msg="output")
        grads = torch.autograd.grad(model(x).square().sum(), list(model.parameters()))
        for (name, _), g, r, e in zip(model.named_parameters(), grads, ref_grads, exact_grads):
            assert_fp32_close(g, r, e, msg=f"gradient of {name}")
    assert (len(onednn_calls) > 0) == (backend == "onednn")


def test_inference_mlp_fuses_gelu_into_fc1_on_onednn(onednn_calls):
    mlp = MLP(16, 64, act="gelu").eval()
    x = torch.randn(2, 5, 16)
    with torch.no_grad():
        ref, exact = mlp(x), copy.deepcopy(mlp).double()(x.double())
        use_cpu_kernels(mlp, "onednn")
        fused = mlp(x)
    assert onednn_calls == [((64, 16), "gelu"), ((16, 64), "none")]  # GELU applied as fc1 writes its output
    assert_fp32_close(fused, ref, exact)  # oneDNN's GELU is its own approximation of erf: compared to float64
    mlp(x).sum().backward()  # with autograd: fc1, the activation and fc2 separately
    assert ((64, 16), "none") in onednn_calls


@pytest.mark.parametrize("act", ["gelu", "gelu_tanh", "quick_gelu", "relu"])
def test_inference_mlp_in_place_activation_gives_the_plain_values(act):
    mlp = MLP(16, 64, act=act)
    x = torch.randn(2, 5, 16)
    reference = mlp(x)  # plain, under autograd
    with torch.no_grad():
        activated = mlp.act(mlp.fc1(x))
    use_cpu_kernels(mlp, "blas")
    fc1_outputs = []
    mlp.fc1.register_forward_hook(lambda m, i, o: fc1_outputs.append(o))
    with torch.no_grad():
        fast = mlp(x)
    assert torch.equal(fc1_outputs[0], activated)  # the activation was written into fc1's output
    assert torch.equal(fast, reference.detach())


@pytest.mark.parametrize("layer_scale", [None, 0.5])
def test_block_residuals_keep_values_and_gradients(layer_scale):
    torch.manual_seed(0)
    blk = Block(32, 4, layer_scale=layer_scale)
    x = torch.randn(2, 7, 32, requires_grad=True)
    reference = blk(x, is_causal=True)  # the plain block
    ref_grads = torch.autograd.grad(reference.square().sum(), [x, *blk.parameters()])
    x64, blk64 = x.detach().double().requires_grad_(), copy.deepcopy(blk).double()
    exact_grads = torch.autograd.grad(blk64(x64, is_causal=True).square().sum(), [x64, *blk64.parameters()])
    use_cpu_kernels(blk, "blas")
    out = blk(x, is_causal=True)
    assert torch.equal(out, reference)
    grads = torch.autograd.grad(out.square().sum(), [x, *blk.parameters()])
    for g, r, e in zip(grads, ref_grads, exact_grads):  # the backward may group the residual sums differently
        assert_fp32_close(g, r, e)
    # Under autograd the residuals are out of place: no in-place write to a view that the backward must undo.
    seen, stack = set(), [out.grad_fn]
    while stack:
        node = stack.pop()
        if node is not None and node not in seen:
            seen.add(node)
            stack.extend(fn for fn, _ in node.next_functions)
    assert "CopySlices" not in {type(node).__name__ for node in seen}
    with torch.no_grad():
        branch_outputs = []
        blk.ls2.register_forward_hook(lambda m, i, o: branch_outputs.append(o))
        out = blk(x, is_causal=True)
        assert torch.equal(out, reference)  # in place without autograd: the same values
        assert out.data_ptr() == branch_outputs[0].data_ptr()  # the sum went into the MLP branch's output
    with torch.autocast("cpu", dtype=torch.bfloat16):  # bf16 branches, float32 stream: float32 out, grad or not
        assert blk(x).dtype == torch.float32
        with torch.no_grad():
            assert blk(x).dtype == torch.float32


def test_the_tied_lm_head_runs_on_onednn(onednn_calls):
    torch.manual_seed(0)
    lm = DecoderLM(vocab_size=50, context_length=8, width=16, depth=1, num_heads=2).eval()
    ids = torch.randint(0, 50, (2, 8))
    with torch.no_grad():
        ref, exact = lm(ids), copy.deepcopy(lm).double()(ids)
        use_cpu_kernels(lm, "onednn")
        fast = lm(ids)
        assert ((50, 16), "none") in onednn_calls  # the tied unembedding
        assert len(onednn_calls) == 5 and ((64, 16), "gelu") in onednn_calls  # and qkv, proj, fc1 + GELU, fc2
        assert_fp32_close(fast, ref, exact)
        assert lm.unembed(torch.randn(3, 16), torch.tensor([1, 7])).shape == (3, 2)


# ------------------------------------------------------------------------------------- when oneDNN is used
def test_small_products_autocast_and_other_devices_stay_on_plain_kernels():
    """oneDNN's per-call cost only pays off from about a million multiply-adds: smaller products keep BLAS; so do
    autocast (it casts for F.linear) and anything but fp32 CPU tensors."""
    pays = kernels._onednn_pays
    assert not pays(torch.zeros(2, 17, 64), torch.zeros(192, 64))  # 0.4M: a tiny ViT's qkv
    assert pays(torch.zeros(128, 128), torch.zeros(384, 128))  # 6.3M
    assert pays(torch.zeros(4, 768), torch.zeros(768, 768))  # 2.4M: batched decoding steps
    assert not pays(torch.zeros(0, 768), torch.zeros(768, 768))
    assert not pays(torch.zeros(768), torch.zeros(768, 768))  # a vector: F.linear
    assert not pays(torch.zeros(128, 128, dtype=torch.float64), torch.zeros(384, 128, dtype=torch.float64))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not pays(torch.zeros(128, 128), torch.zeros(384, 128))
        layer = use_cpu_kernels(nn.Linear(8, 4), "onednn")
        assert layer(torch.randn(2, 8)).dtype == torch.bfloat16  # autocast still casts: F.linear ran


def test_backend_names_and_the_auto_rule(monkeypatch):
    for generic, expected in ((True, "onednn"), (False, "blas")):
        monkeypatch.setattr(kernels, "_mkl_runs_its_generic_path", lambda generic=generic: generic)
        assert kernels.resolve_backend() == kernels.resolve_backend("AUTO") == expected
        assert kernels.resolve_backend("blas") == "blas"  # an explicit choice wins either way
        assert kernels.resolve_backend("onednn") == "onednn"
        assert kernels.resolve_backend("off") == "off"
    with pytest.raises(ValueError, match=r"auto, onednn, blas, off, got 'mkl'"):
        use_cpu_kernels(nn.Linear(2, 2), "mkl")
    monkeypatch.setattr(kernels, "onednn_available", lambda: False)
    assert kernels.resolve_backend("auto") == "blas"  # generic MKL, but no oneDNN in this build
    with pytest.raises(RuntimeError, match="no oneDNN"):
        kernels.resolve_backend("onednn")


def test_mkl_generic_path_is_read_off_the_cpu_vendor(monkeypatch, tmp_path):
    real_open = open

    def cpuinfo(vendor):
        path = tmp_path / vendor
        path.write_text(f"processor\t: 0\nvendor_id\t: {vendor}\n\nprocessor\t: 1\nvendor_id\t: {vendor}\n")
        return lambda name, *a, **k: real_open(path if name == "/proc/cpuinfo" else name, *a, **k)

    monkeypatch.setattr(kernels.platform, "machine", lambda: "x86_64")
    monkeypatch.setattr(torch.backends.mkl, "is_available", lambda: True)
    monkeypatch.setattr("builtins.open", cpuinfo("AuthenticAMD"))
    assert kernels._mkl_runs_its_generic_path()
    monkeypatch.setattr("builtins.open", cpuinfo("GenuineIntel"))
    assert not kernels._mkl_runs_its_generic_path()
    monkeypatch.setattr(torch.backends.mkl, "is_available", lambda: False)  # another BLAS: PyTorch's choice stands
    monkeypatch.setattr("builtins.open", cpuinfo("AuthenticAMD"))
    assert not kernels._mkl_runs_its_generic_path()


# ------------------------------------------------------------------------------------------------ the callback
def test_callback_applies_on_a_cpu_trainer_and_leaves_a_gpu_trainer_alone(monkeypatch):
    import lightning as L
    from lightning.pytorch.accelerators import CUDAAccelerator

    from vlm.callbacks import CPUKernels

    model = tiny_flamingo()
    plain = _classes(model)
    gpu_trainer = types.SimpleNamespace(accelerator=CUDAAccelerator())  # the one attribute the callback reads
    CPUKernels("onednn").setup(gpu_trainer, model, "fit")
    assert _classes(model) == plain
    cpu_trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                            enable_progress_bar=False, enable_model_summary=False)  # fmt: skip
    CPUKernels("onednn").setup(cpu_trainer, model, "fit")
    assert type(model.decoder.blocks[0].attn.qkv) is OneDNNLinear
    CPUKernels("off").setup(cpu_trainer, model, "validate")
    assert _classes(model) == plain
    monkeypatch.setattr(kernels, "_mkl_runs_its_generic_path", lambda: False)
    CPUKernels().setup(cpu_trainer, model, "fit")  # auto on an Intel CPU: BLAS, buffers reused at inference
    assert CPUBlock in _classes(model) and OneDNNLinear not in _classes(model)


def test_callback_default_is_the_environment_variable_and_names_a_bad_backend(monkeypatch):
    from vlm.callbacks import CPUKernels

    monkeypatch.delenv("VLM_CPU_LINEAR", raising=False)
    assert CPUKernels().backend == "auto"
    monkeypatch.setenv("VLM_CPU_LINEAR", "BLAS")
    assert CPUKernels().backend == "blas"
    assert CPUKernels("onednn").backend == "onednn"  # an argument wins over the environment
    with pytest.raises(ValueError, match="got 'mkl'"):
        CPUKernels("mkl")
