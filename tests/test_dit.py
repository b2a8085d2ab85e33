"""The denoiser: goldens, an independent reference on other shapes, and numerics."""

import json

import pytest
import torch
from model_files import TINY_DIT, random_dit_state, write_single
from reference_dit import reference_forward
from safetensors import safe_open
from safetensors.torch import load_file

from lens_core import latent_to_tokens, load_dit, tokens_to_latent
from lens_core.errors import LensInputError


def golden_cases(golden, file="dit_tiny_cases.safetensors"):
    path = golden / file
    tensors = load_file(str(path))
    with safe_open(str(path), "pt") as f:
        grids = json.loads(f.metadata()["cases"])
    for name, g in grids.items():
        yield name, {k.split(".", 1)[1]: v for k, v in tensors.items() if k.startswith(name + ".")}, (g["h"], g["w"])


@pytest.fixture(scope="module")
def golden_dit(golden):
    """The diffusers port's masking (first block only), which dit_tiny_cases was computed with."""
    return load_dit(golden / "dit_tiny.safetensors", device="cpu", dtype=torch.float32, text_mask="first_block")


def test_golden_cases_token_layout(golden, golden_dit):
    for name, case, grid in golden_cases(golden):
        out = golden_dit(case["x"], case["sigma"], case["text"], case["mask"].bool(), grid)
        assert (out - case["out"]).abs().max() <= 1e-4, name


def test_default_masks_every_block_like_native(golden, golden_dit):
    """The default reproduces the port run with the mask handed to every block (ComfyUI native, musubi-tuner);
    the two modes differ where text is padded (case0, case1) and agree where it is not (case2)."""
    every = load_dit(golden / "dit_tiny.safetensors", device="cpu", dtype=torch.float32)
    assert every.text_mask == "every_block"
    for name, case, grid in golden_cases(golden, "dit_tiny_everyblock_cases.safetensors"):
        mask = case["mask"].bool()
        out = every(case["x"], case["sigma"], case["text"], mask, grid)
        assert (out - case["out"]).abs().max() <= 1e-4, name
        first = golden_dit(case["x"], case["sigma"], case["text"], mask, grid)
        if mask.all():
            assert (out - first).abs().max() <= 1e-5, name
        else:
            assert (out - first).abs().max() > 0.1, name


def test_unknown_mask_mode_is_refused(golden):
    with pytest.raises(LensInputError, match="every_block, first_block"):
        load_dit(golden / "dit_tiny.safetensors", device="cpu", text_mask="last_block")


def test_golden_cases_through_latent_layout(golden, golden_dit):
    for name, case, grid in golden_cases(golden):
        latent = tokens_to_latent(case["x"], grid)
        assert latent.shape == (case["x"].shape[0], 128, *grid)
        assert torch.equal(latent[:, :, 1, 2], case["x"][:, 1 * grid[1] + 2])
        out = tokens_to_latent(golden_dit(latent_to_tokens(latent), case["sigma"], case["text"], case["mask"].bool(), grid), grid)
        assert (latent_to_tokens(out) - case["out"]).abs().max() <= 1e-4, name


def test_bf16_stays_close_to_fp32(golden, golden_dit):
    """bf16 quantises sigma itself (as the reference does), so compare against fp32 fed that sigma.

    Measured on the golden cases: max abs error 0.045-0.083 (outputs up to ~5.6), relative L2 1.0-1.4%.
    """
    dit16 = load_dit(golden / "dit_tiny.safetensors", device="cpu", dtype=torch.bfloat16, text_mask="first_block")
    for name, case, grid in golden_cases(golden):
        out16 = dit16(case["x"], case["sigma"], case["text"], case["mask"].bool(), grid).float()
        out32 = golden_dit(case["x"], case["sigma"].bfloat16().float(), case["text"], case["mask"].bool(), grid)
        assert (out16 - out32).abs().max() <= 0.15, name
        assert (out16 - out32).norm() / out32.norm() <= 0.025, name


@pytest.mark.parametrize("text_mask", ["every_block", "first_block"])
@pytest.mark.parametrize("blocks,heads,grid,lengths", [
    (3, 3, (5, 4), [7, 3]),      # deeper and wider than the golden model, even/odd grid, padding
    (2, 2, (1, 9), [4]),          # a one-row grid
    (4, 1, (6, 6), [1, 5, 0]),    # three samples, one fully padded
])
def test_matches_independent_reference(tmp_path, blocks, heads, grid, lengths, text_mask):
    cfg = TINY_DIT.__class__(hidden=64 * heads, heads=heads, blocks=blocks, mlp_hidden=int(64 * heads / 3 * 8), text_width=40, text_layers=4)
    state = random_dit_state(cfg, seed=blocks)
    dit = load_dit(write_single(state, tmp_path / "dit.safetensors", dtype=torch.float32), device="cpu", text_mask=text_mask)
    h, w = grid
    b, s = len(lengths), max(lengths)
    torch.manual_seed(1)
    x = torch.randn(b, h * w, 128)
    sigma = torch.rand(b)
    mask = torch.arange(s)[None] < torch.tensor(lengths)[:, None]
    text = torch.randn(b, s, 4, 40) * 3 * mask[..., None, None]
    out = dit(x, sigma, text, mask, grid)
    for i in range(b):
        ref = reference_forward(state, x[i], sigma[i], text[i], mask[i], h, w, heads, every_block=text_mask == "every_block")
        assert (out[i] - ref).abs().max() <= 1e-4 * max(1.0, ref.abs().max().item())


def test_wrong_inputs_are_refused_before_compute(golden_dit):
    x = torch.zeros(1, 12, 128)
    with pytest.raises(LensInputError, match="expected \\[B, 3\\*5=15, 128\\]"):
        golden_dit(x, torch.ones(1), torch.zeros(1, 2, 4, 48), torch.ones(1, 2, dtype=torch.bool), (3, 5))
    with pytest.raises(LensInputError, match="Lens text encoder"):
        golden_dit(x, torch.ones(1), torch.zeros(1, 2, 4, 4096), torch.ones(1, 2, dtype=torch.bool), (3, 4))


def test_fp16_is_refused(golden):
    with pytest.raises(LensInputError, match="overflows in fp16"):
        load_dit(golden / "dit_tiny.safetensors", device="cpu", dtype=torch.float16)


def test_parameter_count_of_real_config():
    """Microsoft's "3.8B" is 4,104,225,152 parameters divided by 2^30; the real config builds exactly that many."""
    from lens_core import DiTConfig, LensDiT

    with torch.device("meta"):
        model = LensDiT(DiTConfig())
    assert sum(p.numel() for p in model.parameters()) == 4_104_225_152


def test_fused_norm_and_rope_equal_the_spelled_out_float32_math():
    from lens_core.dit.rope import apply_rope, rope_frequencies

    torch.manual_seed(0)
    norm = torch.nn.RMSNorm(64, eps=1e-6)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(64) + 0.5)
    for dtype in (torch.float32, torch.bfloat16):
        x = (torch.randn(2, 3, 7, 64) * 3).to(dtype)
        x32, w32 = x.float(), norm.weight.to(dtype).float()
        expected = (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + 1e-6) * w32).to(dtype)
        assert torch.equal(norm.to(dtype)(x), expected)
    rope = rope_frequencies(2, 3, 1, (8, 28, 28))
    assert torch.equal(rope[..., 0, 0], rope[..., 1, 1]) and torch.equal(rope[..., 0, 1], -rope[..., 1, 0])  # rotations
    x = torch.randn(1, 2, 7, 64)
    angle = torch.atan2(rope[..., 1, 0], rope[..., 0, 0])
    even, odd = x[..., 0::2], x[..., 1::2]
    expected = torch.stack([even * angle.cos() - odd * angle.sin(), even * angle.sin() + odd * angle.cos()], dim=-1).flatten(-2)
    assert torch.allclose(apply_rope(x, rope, torch.float32), expected, atol=1e-6)


def _diffusers_lens_port():
    try:
        from diffusers import LensTransformer2DModel
    except ImportError:
        pytest.skip("this diffusers has no LensTransformer2DModel (the Lens port is in diffusers' pull request, not a release); "
                    "the goldens cover the same code")
    return LensTransformer2DModel


@pytest.mark.parametrize("lengths", [[9], [9, 4]])
def test_matches_diffusers_port_at_real_width(tmp_path, lengths):
    """The reference model itself at the real width (1536, 24 heads, RoPE axes 8/28/28, text 4 x 2880), two blocks,
    its state dict saved as a file and loaded by load_dit: the goldens are tiny; this covers the real head layout."""
    torch.manual_seed(0)
    reference = _diffusers_lens_port()(num_layers=2).eval()
    for name, tensor in reference.state_dict().items():
        if "norm" in name:
            tensor.normal_(1.0, 0.1)
        elif name.endswith("bias"):
            tensor.normal_(0.0, 0.02)
    state = {k: v.contiguous() for k, v in reference.state_dict().items()}
    dit = load_dit(write_single(state, tmp_path / "dit.safetensors", dtype=torch.float32), device="cpu", text_mask="first_block")
    h, w = 3, 5
    b, s = len(lengths), max(lengths)
    x = torch.randn(b, h * w, 128)
    sigma = torch.rand(b)
    mask = torch.arange(s)[None] < torch.tensor(lengths)[:, None]
    text = torch.randn(b, s, 4, 2880) * mask[..., None, None]
    with torch.no_grad():
        expected = reference(x, list(text.unbind(2)), mask, sigma, [(1, h, w)] * b, return_dict=False)[0]
        out = dit(x, sigma, text, mask, (h, w))
    assert (out - expected).abs().max() <= 1e-4 * max(1.0, expected.abs().max().item())
