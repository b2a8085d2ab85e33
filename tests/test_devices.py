"""The device rule, checked without a GPU.

A model on the `meta` device behaves like one on CUDA for device mistakes: any CPU tensor that meets
one of its tensors in an op fails ("Tensor on device cpu is not on the expected device meta"), just as
"Expected all tensors to be on the same device ... cuda:0 and cpu" fails on a GPU.
"""

import pytest
import torch
from te_files import expert_banks

from lens_core import LensDiT, LensInputError, sample
from lens_core.demo import DEMO_DIT, DEMO_VAE
from lens_core.device import default_device, resolve_compute
from lens_core.vae.autoencoder import LensVAE
from lens_core.vae.model import FluxVAEModel

META = torch.device("meta")


class MetaDenoiser:
    """A stand-in denoiser that only exposes config, device, dtype and forward, as on an accelerator: it
    checks that everything it is handed already lives on its device and answers with meta tensors."""

    def __init__(self, config=DEMO_DIT):
        self.config, self.device, self.dtype = config, META, torch.bfloat16
        self.calls = []

    def forward(self, x, sigma, text, text_mask, grid):
        for name, t in (("x", x), ("sigma", sigma), ("text", text), ("text_mask", text_mask)):
            assert t is None or t.device == META, f"{name} reached the denoiser on {t.device}"
        assert text.dtype == self.dtype, "text features should be moved once, in the denoiser's dtype"
        self.calls.append((x.shape[0], None if text_mask is None else tuple(text_mask.shape)))
        return (x * 0.5).to(self.dtype)

    __call__ = forward


def cpu_conditioning(length=5, padded_to=None):
    features = torch.randn(1, padded_to or length, DEMO_DIT.text_layers, DEMO_DIT.text_width)
    mask = torch.arange(padded_to or length)[None] < length
    return features, mask


@pytest.mark.parametrize("steps,cfg,img2img", [(4, 1.0, False), (3, 5.0, False), (4, 5.0, True)], ids=["turbo", "cfg5", "img2img"])
def test_sampler_state_lives_on_the_model_device(steps, cfg, img2img):
    dit = MetaDenoiser()
    noise = torch.randn(2, 128, 3, 4)
    uncond = cpu_conditioning(0) if cfg != 1.0 else None
    seen = []
    out = sample(dit, noise, cpu_conditioning(5, padded_to=7), uncond, steps=steps, cfg=cfg,
                 denoise=0.5 if img2img else 1.0, init_latent=torch.randn(2, 128, 3, 4) if img2img else None,
                 callback=lambda step, total, x0: seen.append(x0.device))
    assert out.device == META and out.shape == (2, 128, 3, 4) and out.dtype == torch.float32
    assert seen == [META] * steps
    expected_batch = 4 if cfg != 1.0 else 2
    assert [call[0] for call in dit.calls] == [expected_batch] * steps


def test_unpadded_text_reaches_the_model_without_a_mask():
    """No padding, no mask: attention keeps its fastest kernel and no forward syncs on the mask."""
    dit = MetaDenoiser()
    sample(dit, torch.randn(1, 128, 2, 2), cpu_conditioning(6), None, steps=2, cfg=1.0)
    assert [mask for _, mask in dit.calls] == [None, None]
    sample(dit, torch.randn(1, 128, 2, 2), cpu_conditioning(6), cpu_conditioning(0), steps=1, cfg=5.0)
    assert dit.calls[-1][1] == (2, 6)


def test_real_denoiser_runs_on_its_device_from_cpu_inputs():
    with META:
        dit = LensDiT(DEMO_DIT)
    features, mask = cpu_conditioning(3, padded_to=5)
    for text_mask in (mask.expand(2, -1), None):
        out = dit(torch.randn(2, 12, 128), torch.rand(2), features.expand(2, -1, -1, -1), text_mask, (3, 4))
        assert out.device == META and out.shape == (2, 12, 128)


class NoFloat64OffTheCPU(torch.utils._python_dispatch.TorchDispatchMode):
    """Fails as Apple GPUs (MPS) do: they have no float64."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in torch.utils._pytree.tree_leaves((args, kwargs, out)):
            if isinstance(t, torch.Tensor) and t.dtype == torch.float64 and t.device.type != "cpu":
                raise TypeError(f"{func}: float64 on {t.device}")
        return out


def test_rope_tables_are_built_on_the_cpu_and_reach_the_device_as_float32():
    from lens_core.dit.rope import rope_frequencies

    with META:
        dit = LensDiT(DEMO_DIT)
    features, mask = cpu_conditioning(3, padded_to=5)
    with NoFloat64OffTheCPU():
        assert dit(torch.randn(1, 12, 128), torch.rand(1), features, mask, (3, 4)).device == META
        table = rope_frequencies(3, 5, 2, (8, 28, 28), META)
    assert table.device == META and table.dtype == torch.float32
    assert rope_frequencies(3, 5, 2, (8, 28, 28), META) is table  # once per size and device


def test_sampling_a_real_denoiser_on_its_device():
    with META:
        dit = LensDiT(DEMO_DIT)
    out = sample(dit, torch.randn(1, 128, 2, 3), cpu_conditioning(4), cpu_conditioning(0), steps=2, cfg=4.0)
    assert out.device == META


def test_vae_work_happens_on_the_vae_device():
    with META:
        vae = LensVAE(FluxVAEModel(DEMO_VAE))
    assert vae._decode_untiled(torch.randn(1, 128, 2, 3), META).device == META
    assert vae._encode_untiled(torch.rand(1, 3, 32, 48) * 2 - 1, META).device == META


def test_default_device_order(monkeypatch):
    import lens_core.device as device_module

    available = {"cuda": False, "xpu": False, "mps": False}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: available["cuda"])
    monkeypatch.setattr(device_module, "_xpu_available", lambda: available["xpu"])
    monkeypatch.setattr(device_module, "_mps_available", lambda: available["mps"])
    assert default_device() == torch.device("cpu")
    for kind in ("mps", "xpu", "cuda"):
        available[kind] = True
        assert default_device() == torch.device(kind)


def test_dtype_defaults_follow_the_device(monkeypatch, caplog):
    with caplog.at_level("INFO", logger="lens_core"):
        assert resolve_compute("cpu", None, "the test model") == (torch.device("cpu"), torch.float32)
    assert "the test model on cpu in float32 (auto: CPUs compute fp32" in caplog.text
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla T4")
    monkeypatch.setattr(torch.version, "hip", None)
    assert resolve_compute("cuda", None, "the test model") == (torch.device("cuda"), torch.float32)
    with pytest.raises(LensInputError, match="cannot run in bf16 on cuda: Tesla T4 .* Use fp32"):
        resolve_compute("cuda", "bf16", "the test model")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100")
    assert resolve_compute("cuda", None, "the test model") == (torch.device("cuda"), torch.bfloat16)
    with pytest.raises(LensInputError, match="overflows in fp16"):
        resolve_compute("cuda", "fp16", "the test model")


@pytest.mark.parametrize("name,message", [("gpu", "'gpu' is not a device name"), ("cuda", "not available in this PyTorch"),
                                          ("cuda:1", "not available in this PyTorch")])
def test_an_unusable_device_is_named(monkeypatch, name, message):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(LensInputError, match=message):
        resolve_compute(name, None, "the test model")


def test_streamed_experts_stay_in_cpu_memory_and_decode_where_asked():
    from lens_core.demo import demo_text_encoder
    from lens_core.placement import weight_bytes

    encoder = demo_text_encoder()
    ids = torch.randint(0, 1000, (1, 9))
    before = encoder.features(ids, layers=(1, 3))
    encoder.set_expert_streaming(True)
    assert all(torch.equal(a, b) for a, b in zip(encoder.features(ids, layers=(1, 3)), before))
    banks = sum(weight_bytes(bank) for bank in expert_banks(encoder))
    table = encoder.embed_tokens.weight.numel() * encoder.embed_tokens.weight.element_size()
    assert banks > 0 and weight_bytes(encoder, skip=encoder.keeps_on_cpu()) == weight_bytes(encoder) - banks - table
    encoder.place(META)
    bank = encoder.layers[0].mlp.gate_up
    assert encoder.device == META and bank.weight.device.type == "cpu"
    assert bank.expert_weight(1, torch.bfloat16, META).device == META


def test_token_embedding_stays_in_cpu_memory_and_sends_only_the_looked_up_rows(golden, tmp_path):
    """The 1.16 GB table stays in CPU memory; a forward on another device gets the prompt's rows."""
    from te_files import golden_te_folder

    from lens_core import load_text_encoder
    from lens_core.placement import weight_bytes

    folder = golden_te_folder(golden, tmp_path)
    encoder = load_text_encoder(folder, device="cpu", dtype=torch.float32)
    table = encoder.embed_tokens.weight
    ids = torch.randint(0, 1000, (1, 7), generator=torch.Generator().manual_seed(0))
    expected = load_text_encoder(folder, device="cpu", dtype=torch.bfloat16).features(ids, layers=(1,))[0]
    encoder.to(torch.bfloat16)
    assert encoder.dtype == torch.bfloat16
    assert torch.equal(encoder.features(ids, layers=(1,))[0], expected)  # cast after loading = loaded in bf16
    encoder.place(META)
    assert encoder.embed_tokens.weight is table and table.device.type == "cpu" and encoder.device == META
    assert weight_bytes(encoder, skip=encoder.keeps_on_cpu()) == weight_bytes(encoder) - table.numel() * table.element_size()
    rows = encoder.embed(ids, META)
    assert rows.device == META and rows.dtype == torch.bfloat16 and rows.shape == expected.shape
