"""vlm's fp32 CPU linear layers (vlm/models/linear_kernels.py): oneDNN and BLAS give the same values and gradients,
the default backend follows the rule (oneDNN where MKL runs its non-Intel path), small products stay on BLAS, and the
CLIP projections and LM head take the chosen backend."""

import pytest
import torch


@pytest.fixture
def onednn_at_any_size(monkeypatch):
    """These layers are far below the size from which oneDNN is used: lower it, so that the oneDNN path runs."""
    from vlm.models import linear_kernels

    monkeypatch.setattr(linear_kernels, "_ONEDNN_MIN_MACS", 0)


@pytest.mark.parametrize("shape", [(6, 16), (2, 5, 16), (2, 3, 4, 16)])
@pytest.mark.parametrize("bias", [True, False])
def test_onednn_linear_matches_blas_values_and_gradients(shape, bias, onednn_at_any_size):
    from vlm.models.linear_kernels import Linear, cpu_linear

    torch.manual_seed(0)
    layer = Linear(16, 24, bias=bias)
    x = torch.randn(*shape, requires_grad=True)
    runs = {}
    for backend in ("onednn", "blas"):
        with cpu_linear(backend):
            out = layer(x)
            grads = torch.autograd.grad((out * torch.linspace(-1, 1, 24)).sum(), [x, *layer.parameters()])
        runs[backend] = out, grads
    (out, grads), (ref, ref_grads) = runs["onednn"], runs["blas"]
    assert out.shape == (*shape[:-1], 24)
    torch.testing.assert_close(out, ref)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r)


def test_onednn_linear_frozen_weights_and_in_place_residual(onednn_at_any_size):
    """A frozen layer still passes gradients to its input, and its output may take an in-place residual add."""
    from vlm.models.linear_kernels import Linear, cpu_linear

    layer = Linear(8, 8).requires_grad_(False)
    x = torch.randn(3, 4, 8, requires_grad=True)
    with cpu_linear("onednn"):
        out = layer(x).add_(x)
        (grad,) = torch.autograd.grad(out.sum(), x)
    torch.testing.assert_close(grad, layer.weight.sum(0).expand(3, 4, 8) + 1)
    assert layer.weight.grad is None


def test_onednn_mlp_fused_gelu_matches_the_blas_path(onednn_at_any_size):
    from vlm.models.layers import MLP
    from vlm.models.linear_kernels import cpu_linear

    mlp = MLP(16, 64, act="gelu")
    x = torch.randn(2, 5, 16)
    with torch.no_grad():
        with cpu_linear("onednn"):
            fused = mlp(x)
        with cpu_linear("blas"):
            ref = mlp(x)
    torch.testing.assert_close(fused, ref)


def test_cpu_linear_names_a_bad_backend_and_autocast_falls_back_to_blas(onednn_at_any_size):
    from vlm.models.linear_kernels import Linear, cpu_linear

    with pytest.raises(ValueError, match="'onednn' or 'blas'"):
        with cpu_linear("mkl"):
            pass
    layer = Linear(8, 4)
    with cpu_linear("onednn"), torch.autocast("cpu", dtype=torch.bfloat16):
        assert layer(torch.randn(2, 8)).dtype == torch.bfloat16  # autocast still casts: F.linear ran


def test_default_cpu_linear_is_onednn_exactly_where_mkl_runs_its_generic_path(monkeypatch):
    from vlm.models import linear_kernels

    for generic, expected in ((True, "onednn"), (False, "blas")):
        monkeypatch.setattr(linear_kernels, "_mkl_runs_its_generic_path", lambda generic=generic: generic)
        assert linear_kernels._default_cpu_linear(None) == expected
        assert linear_kernels._default_cpu_linear("auto") == expected
        assert linear_kernels._default_cpu_linear("BLAS") == "blas"  # an explicit choice wins either way
        assert linear_kernels._default_cpu_linear("onednn") == "onednn"
    with pytest.warns(UserWarning, match=r"VLM_CPU_LINEAR must be .*got 'mkl'"):
        assert linear_kernels._default_cpu_linear("mkl") == "blas"  # named, then the automatic choice


def test_mkl_generic_path_is_read_off_the_cpu_vendor(monkeypatch, tmp_path):
    from vlm.models import linear_kernels

    real_open = open

    def cpuinfo(vendor):
        path = tmp_path / vendor
        path.write_text(f"processor\t: 0\nvendor_id\t: {vendor}\n\nprocessor\t: 1\nvendor_id\t: {vendor}\n")
        return lambda name, *a, **k: real_open(path if name == "/proc/cpuinfo" else name, *a, **k)

    monkeypatch.setattr(linear_kernels.platform, "machine", lambda: "x86_64")
    monkeypatch.setattr(torch.backends.mkl, "is_available", lambda: True)
    monkeypatch.setattr("builtins.open", cpuinfo("AuthenticAMD"))
    assert linear_kernels._mkl_runs_its_generic_path()
    monkeypatch.setattr("builtins.open", cpuinfo("GenuineIntel"))
    assert not linear_kernels._mkl_runs_its_generic_path()
    monkeypatch.setattr(torch.backends.mkl, "is_available", lambda: False)  # another BLAS: PyTorch's choice stands
    monkeypatch.setattr("builtins.open", cpuinfo("AuthenticAMD"))
    assert not linear_kernels._mkl_runs_its_generic_path()


def test_clip_projections_and_the_tied_lm_head_take_the_chosen_backend(monkeypatch, onednn_at_any_size):
    """The CLIP projections and the decoder's unembedding are vlm linears too: on oneDNN when it is chosen, with the
    same values as on BLAS."""
    from vlm.models import linear_kernels
    from vlm.models.decoder import DecoderLM

    calls = []
    real_mm = linear_kernels._onednn_mm

    def counting_mm(x, w, *args):
        calls.append(tuple(w.shape))
        return real_mm(x, w, *args)

    monkeypatch.setattr(linear_kernels, "_onednn_mm", counting_mm)
    torch.manual_seed(0)
    lm = DecoderLM(vocab_size=50, context_length=8, width=16, depth=1, num_heads=2).eval()
    ids = torch.randint(0, 50, (2, 8))
    with torch.no_grad():
        with linear_kernels.cpu_linear("onednn"):
            fast = lm(ids)
        assert (50, 16) in calls  # the tied unembedding
        assert len(calls) == 5  # and qkv, proj, fc1 (GELU fused), fc2
        with linear_kernels.cpu_linear("blas"):
            ref = lm(ids)
    torch.testing.assert_close(fast, ref)
    assert len(calls) == 5  # nothing on oneDNN under BLAS

    from vlm.models.clip import CLIP
    from vlm.models.text import TextTransformer
    from vlm.models.vit import VisionTransformer

    clip = CLIP(VisionTransformer(16, 8, width=16, depth=1, num_heads=2),
                TextTransformer(context_length=8, width=16, depth=1, num_heads=2), embed_dim=12)  # fmt: skip
    assert isinstance(clip.visual_proj, linear_kernels.Linear) and isinstance(clip.text_proj, linear_kernels.Linear)


def test_small_products_stay_on_blas():
    """oneDNN's per-call cost only pays off from about a million multiply-adds: smaller products keep BLAS."""
    from vlm.models import linear_kernels

    with linear_kernels.cpu_linear("onednn"):
        assert not linear_kernels._use_onednn(torch.zeros(2, 17, 64), torch.zeros(192, 64))  # 0.4M: a tiny ViT's qkv
        assert linear_kernels._use_onednn(torch.zeros(128, 128), torch.zeros(384, 128))  # 6.3M
        assert linear_kernels._use_onednn(torch.zeros(4, 768), torch.zeros(768, 768))  # 2.4M: batched decoding steps
        assert not linear_kernels._use_onednn(torch.zeros(0, 768), torch.zeros(768, 768))
    with linear_kernels.cpu_linear("blas"):
        assert not linear_kernels._use_onednn(torch.zeros(128, 128), torch.zeros(384, 128))
