"""The FLUX.2 VAE: goldens from every key layout, latent conventions, tiling, previews, bad input."""

import pytest
import torch
from safetensors.torch import load_file, save_file

from lens_core import LensFileError, LensInputError, load_vae
from lens_core.vae.latent import fold, latent_preview, unfold


def golden_latent(cases):
    return cases["tokens"].transpose(1, 2).reshape(1, 32, 3, 5)


@pytest.fixture(scope="module")
def cases(golden):
    return load_file(str(golden / "vae_tiny_cases.safetensors"))


def write_bfl_layout(golden, path):
    """BFL's ae.safetensors keeps ldm names but nests the quant convs in encoder/decoder."""
    state = load_file(str(golden / "vae_tiny_ldm.safetensors"))
    renamed = {k.replace("post_quant_conv.", "decoder.post_quant_conv.") if k.startswith("post_quant_conv.")
               else k.replace("quant_conv.", "encoder.quant_conv.") if k.startswith("quant_conv.") else k: v
               for k, v in state.items()}
    assert "encoder.quant_conv.weight" in renamed and "decoder.post_quant_conv.weight" in renamed
    save_file(renamed, str(path))
    return path


@pytest.mark.parametrize("layout", ["ldm", "diffusers", "bfl"])
def test_golden_decode_and_encode(golden, cases, tmp_path, layout):
    path = {"ldm": golden / "vae_tiny_ldm.safetensors", "diffusers": golden / "vae_tiny_diffusers.safetensors"}.get(layout)
    vae = load_vae(path or write_bfl_layout(golden, tmp_path / "ae.safetensors"), device="cpu")
    decoded = vae.decode(golden_latent(cases), clamp=False)
    assert decoded.shape == (1, 3, 12, 20)
    assert (decoded - cases["decoded"]).abs().max() <= 1e-4
    assert torch.equal(vae.decode(golden_latent(cases)), decoded.clamp(-1, 1))
    assert (vae.encode(cases["image"]) - cases["encoded"]).abs().max() <= 1e-4


def test_fold_is_channel_c4_py2_px():
    z = torch.randn(2, 32, 6, 10)
    folded = fold(z)
    assert folded.shape == (2, 128, 3, 5)
    assert folded[0, 7 * 4 + 1 * 2 + 0, 2, 3] == z[0, 7, 2 * 2 + 1, 3 * 2 + 0]
    assert torch.equal(unfold(folded), z)


def test_batchnorm_round_trip(golden):
    vae = load_vae(golden / "vae_tiny_ldm.safetensors", device="cpu")
    x = torch.randn(1, 32, 3, 5)
    assert torch.allclose(vae.model.bn.normalize(vae.model.bn.denormalize(x)), x, atol=1e-5)
    stats = load_file(str(golden / "vae_tiny_ldm.safetensors"))
    assert torch.equal(vae.model.bn.running_var, stats["bn.running_var"])


def test_odd_sizes_are_centre_cropped(golden, cases):
    vae = load_vae(golden / "vae_tiny_ldm.safetensors", device="cpu")
    padded = torch.nn.functional.pad(cases["image"], (1, 2, 2, 1), value=0.5)  # 15 x 23 pixels
    assert vae.pixels_per_latent == 4
    cropped = vae.crop_to_multiple(padded)
    assert cropped.shape[-2:] == (12, 20)
    with pytest.raises(LensInputError, match="too small to encode"):
        vae.encode(torch.zeros(1, 3, 3, 40))
    with pytest.raises(LensInputError, match="expected \\[B, 3, H, W\\]"):
        vae.encode(torch.zeros(1, 4, 16, 16))


def test_tiled_decode_and_encode_match_untiled_without_seams(golden):
    """Tiles see less context than the whole image: the VAE's GroupNorm statistics and its mid attention
    are global. With random weights that context matters far more than with the trained VAE.

    Measured here (seed 0, 24x40 latent, tiles of 16 with overlap 8, random tiny VAE): decode mean |diff|
    0.083 on outputs of mean |x| 1.02, column-error peak / mean 1.38; encode mean |diff| 0.047 on 0.73.
    """
    vae = load_vae(golden / "vae_tiny_ldm.safetensors", device="cpu")
    torch.manual_seed(0)
    latent = torch.randn(1, 32, 24, 40)
    full = vae.decode(latent, tile=False, clamp=False)
    tiled = vae.decode(latent, tile=True, tile_size=16, overlap=8, clamp=False)
    assert tiled.shape == full.shape
    diff = (tiled - full).abs()
    assert diff.mean() < 0.12 * full.abs().mean()
    # No seams: the error in the columns where tiles meet is not much larger than elsewhere.
    cols = diff.mean(dim=(0, 1, 2))
    assert cols.max() < 2.5 * cols.mean()
    image = full.clamp(-1, 1)
    enc_full, enc_tiled = vae.encode(image, tile=False), vae.encode(image, tile=True, tile_size=16, overlap=8)
    assert enc_tiled.shape == enc_full.shape == (1, 32, 24, 40)
    assert (enc_tiled - enc_full).abs().mean() < 0.1 * enc_full.abs().mean()


def test_tiling_is_exact_for_a_single_tile(golden):
    vae = load_vae(golden / "vae_tiny_ldm.safetensors", device="cpu")
    latent = torch.randn(1, 32, 8, 8)
    assert torch.equal(vae.decode(latent, tile=True, tile_size=8), vae.decode(latent, tile=False))


def test_preview_uses_spec_factors():
    latent = torch.zeros(1, 128, 2, 3)
    latent[:, 3 * 4:3 * 4 + 4] = 1.0  # unfolded channel 3 everywhere
    rgb = latent_preview(latent)
    assert rgb.shape == (1, 4, 6, 3)
    expected = (torch.tensor([0.2144, 0.3009, 0.3652]) + torch.tensor([-0.0329, -0.0718, -0.0851]) + 1) / 2
    assert torch.allclose(rgb[0, 1, 2], expected)


def test_wrong_latent_is_refused(golden):
    vae = load_vae(golden / "vae_tiny_ldm.safetensors", device="cpu")
    with pytest.raises(LensInputError, match="4 or 16 channels"):
        vae.decode(torch.zeros(1, 4, 8, 8))


def flux1_vae_state():
    return {"decoder.conv_in.weight": torch.zeros(512, 16, 3, 3), "encoder.conv_in.weight": torch.zeros(128, 3, 3, 3)}


def test_wrong_files_are_named(golden, tmp_path):
    save_file(flux1_vae_state(), str(tmp_path / "ae.safetensors"))
    with pytest.raises(LensFileError, match="FLUX.1 VAE.*common mix-up.*FLUX.2"):
        load_vae(tmp_path / "ae.safetensors", device="cpu")
    save_file({"decoder.conv_in.weight": torch.zeros(512, 4, 3, 3)}, str(tmp_path / "sdxl_vae.safetensors"))
    with pytest.raises(LensFileError, match="SD1.x/SDXL VAE"):
        load_vae(tmp_path / "sdxl_vae.safetensors", device="cpu")
    with pytest.raises(LensFileError, match="Lens denoiser"):
        load_vae(golden / "dit_tiny.safetensors", device="cpu")
    (tmp_path / "broken.safetensors").write_bytes(b"12345678{not json")
    with pytest.raises(LensFileError, match="not a valid safetensors|corrupt"):
        load_vae(tmp_path / "broken.safetensors", device="cpu")


@pytest.mark.parametrize("widths,layers,latent,grid", [((32, 64, 64), 2, 8, (3, 5)), ((32, 32), 1, 4, (4, 2))])
def test_matches_diffusers_flux2_vae_on_other_sizes(tmp_path, widths, layers, latent, grid):
    """diffusers' AutoencoderKLFlux2 (the reference's VAE) on configs and grids the goldens do not cover."""
    from diffusers import AutoencoderKLFlux2

    torch.manual_seed(len(widths))
    ref = AutoencoderKLFlux2(block_out_channels=widths, layers_per_block=layers, latent_channels=latent,
                             down_block_types=("DownEncoderBlock2D",) * len(widths), up_block_types=("UpDecoderBlock2D",) * len(widths)).eval()
    ref.bn.running_mean.normal_()
    ref.bn.running_var.uniform_(0.5, 2.0)
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(tmp_path / "diffusion_pytorch_model.safetensors"))
    vae = load_vae(tmp_path, device="cpu")
    h, w = grid
    lens_latent = torch.randn(2, 4 * latent, h, w)
    std = torch.sqrt(ref.bn.running_var + ref.bn.eps)
    z = unfold(lens_latent * std.view(1, -1, 1, 1) + ref.bn.running_mean.view(1, -1, 1, 1))
    with torch.no_grad():
        expected = ref.decode(z).sample
        ours = vae.decode(lens_latent, clamp=False)
        assert (ours - expected).abs().max() <= 1e-4
        image = torch.rand(2, 3, h * vae.pixels_per_latent, w * vae.pixels_per_latent) * 2 - 1
        mean = ref.encode(image).latent_dist.mean
        expected_latent = (fold(mean) - ref.bn.running_mean.view(1, -1, 1, 1)) / std.view(1, -1, 1, 1)
        assert (vae.encode(image) - expected_latent).abs().max() <= 1e-4


def test_automatic_tiles_are_as_large_as_memory_allows(monkeypatch):
    from lens_core.demo import demo_vae
    from lens_core.vae import autoencoder

    vae = demo_vae()
    per_tile = {tile: vae.decode_bytes(tile * 16, tile * 16) for tile in (32, 40, 48, 56)}
    assert vae.largest_tile(90, 90, available=int(per_tile[48] / 0.8)) == 48
    assert vae.largest_tile(90, 90, available=0) == autoencoder.DEFAULT_TILE
    assert vae.largest_tile(40, 20, available=1 << 60) == 32  # never a tile as large as the latent itself
    latent = torch.randn(1, 128, 40, 20)
    monkeypatch.setattr(autoencoder, "_available_bytes", lambda device: vae.decode_bytes(640, 320) // 2)  # too little for one pass
    calls = []
    original = vae._decode_untiled
    monkeypatch.setattr(vae, "_decode_untiled", lambda x, device: calls.append(tuple(x.shape[-2:])) or original(x, device))
    vae.decode(latent)
    assert len(calls) > 1 and all(shape[0] <= 32 and shape[1] <= 32 for shape in calls)


def test_group_norm_keeps_float32_math_on_bf16_activations():
    """bf16 in, statistics and scaling in float32, one rounding out: the float32 path's numbers without its copies
    (PyTorch's GroupNorm, as the VAE builds it from torch.nn or ComfyUI's operations)."""
    torch.manual_seed(0)
    norm = torch.nn.GroupNorm(32, 128, eps=1e-6)
    with torch.no_grad():
        norm.weight.normal_()
        norm.bias.normal_()
    norm = norm.bfloat16()
    x = (torch.randn(2, 128, 40, 24) * 3 + 1).bfloat16()
    out = norm(x)
    expected = torch.nn.functional.group_norm(x.float(), 32, norm.weight.float(), norm.bias.float(), 1e-6).bfloat16()
    assert out.dtype == torch.bfloat16
    differ = out != expected
    assert differ.float().mean() < 1e-4  # a rare last-bit difference from the summation order
    ulp = expected.float().abs().clamp_min(1e-30) * 2 ** -7
    assert ((out.float() - expected.float()).abs()[differ] <= ulp[differ]).all()
