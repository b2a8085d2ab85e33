"""Schedules, guidance and the sampling loop against the reference."""

import json

import pytest
import torch
from safetensors.torch import load_file

from lens_core import load_dit, tokens_to_latent
from lens_core.errors import LensInputError
from lens_core.sampling import Cancelled, empirical_mu, make_noise, norm_rescaled_cfg, sample, schedule_sigmas


def test_schedule_matches_reference_for_every_listed_size(golden):
    table = json.loads((golden / "schedule_tiny.json").read_text())
    assert len(table) >= 5
    for key, expected in table.items():
        size, steps = key.split("@")
        height, width = map(int, size.split("x"))
        steps = int(steps)
        assert empirical_mu((height // 16) * (width // 16), steps) == pytest.approx(expected["mu"], abs=1e-9), key
        sigmas = schedule_sigmas(steps, height, width)
        assert sigmas.shape == (steps + 1,) and sigmas[-1] == 0
        assert torch.allclose(sigmas, torch.tensor(expected["sigmas"]), atol=1e-6), key


def test_spec_examples():
    assert empirical_mu(64 * 64, 20) == pytest.approx(2.1980, abs=1e-4)
    assert empirical_mu(90 * 90, 7) == pytest.approx(1.8278, abs=1e-4)
    assert torch.allclose(schedule_sigmas(4, 1024, 1024), torch.tensor([1, .9674, .9081, .7672, 0]), atol=1e-4)


def test_shift_override():
    sigmas = schedule_sigmas(4, 1024, 1024, shift=0.0)
    assert torch.allclose(sigmas, torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0]))


@pytest.mark.parametrize("steps,h,w", [(0, 1024, 1024), (-3, 1024, 1024), (4, 1000, 1024), (4, 1024, 0)])
def test_bad_schedule_inputs(steps, h, w):
    with pytest.raises(LensInputError):
        schedule_sigmas(steps, h, w)


def test_norm_rescaled_cfg():
    v_c, v_u = torch.randn(2, 5, 128), torch.randn(2, 5, 128)
    out = norm_rescaled_cfg(v_c, v_u, 5.0)
    assert torch.allclose(out.norm(dim=-1), v_c.norm(dim=-1), atol=1e-5)
    comb = v_u + 5 * (v_c - v_u)
    assert torch.allclose(out / out.norm(dim=-1, keepdim=True), comb / comb.norm(dim=-1, keepdim=True), atol=1e-5)
    assert torch.allclose(norm_rescaled_cfg(v_c, v_u, 1.0), v_c, atol=1e-6)
    zero = norm_rescaled_cfg(torch.zeros(1, 1, 128), torch.zeros(1, 1, 128), 3.0)
    assert torch.equal(zero, torch.zeros(1, 1, 128))


@pytest.fixture(scope="module")
def sampling_case(golden):
    return load_file(str(golden / "sampling_tiny_cases.safetensors")), load_dit(golden / "dit_tiny.safetensors", device="cpu", dtype=torch.float32,
                                                                                   text_mask="first_block")


@pytest.mark.parametrize("batch_cfg", [True, False])
def test_sampling_golden_cfg5(sampling_case, batch_cfg):
    """Measured max error 1.7e-4: the DiT matches its goldens to 6e-5 per pass, and CFG 5 combines the
    two passes as 5*cond - 4*uncond, which scales per-pass differences by up to 9. Same in float64."""
    case, dit = sampling_case
    noise = tokens_to_latent(case["noise"], (4, 6))
    pos = (case["pos"], case["pos_mask"].bool())
    neg = (torch.zeros_like(case["pos"]), torch.zeros_like(pos[1]))
    out = sample(dit, noise, pos, neg, steps=3, cfg=5.0, batch_cfg=batch_cfg)
    assert (out - tokens_to_latent(case["final_cfg5_steps3"], (4, 6))).abs().max() <= 2.5e-4


def test_sampling_golden_cfg1_skips_uncond(sampling_case):
    case, dit = sampling_case
    calls = []
    original = dit.forward
    dit.forward = lambda *a: calls.append(a[0].shape[0]) or original(*a)
    try:
        out = sample(dit, tokens_to_latent(case["noise"], (4, 6)), (case["pos"], case["pos_mask"].bool()), None, steps=2, cfg=1.0)
    finally:
        del dit.forward
    assert calls == [1, 1]
    assert (out - tokens_to_latent(case["final_cfg1_steps2"], (4, 6))).abs().max() <= 1e-4


def test_callback_and_cancel(sampling_case):
    case, dit = sampling_case
    noise = tokens_to_latent(case["noise"], (4, 6))
    seen = []
    sample(dit, noise, (case["pos"], case["pos_mask"].bool()), None, steps=3, cfg=1.0, callback=lambda i, n, x0: seen.append((i, n, x0.shape)))
    assert seen == [(1, 3, (1, 128, 4, 6)), (2, 3, (1, 128, 4, 6)), (3, 3, (1, 128, 4, 6))]
    polls = []
    with pytest.raises(Cancelled):
        sample(dit, noise, (case["pos"], case["pos_mask"].bool()), None, steps=3, cfg=1.0, should_stop=lambda: polls.append(1) or len(polls) > 1)
    assert len(polls) == 2


def test_img2img_denoise(sampling_case):
    case, dit = sampling_case
    noise = tokens_to_latent(case["noise"], (4, 6))
    init = torch.randn_like(noise)
    cond = (case["pos"], case["pos_mask"].bool())
    assert torch.equal(sample(dit, noise, cond, None, steps=4, cfg=1.0, denoise=0.0, init_latent=init), init)
    light = sample(dit, noise, cond, None, steps=4, cfg=1.0, denoise=0.3, init_latent=init)
    full = sample(dit, noise, cond, None, steps=4, cfg=1.0, denoise=1.0, init_latent=init)
    assert (light - init).norm() < (full - init).norm()


def test_feature_width_mismatch_is_refused_before_any_step(sampling_case):
    case, dit = sampling_case
    calls = []
    original = dit.forward
    dit.forward = lambda *a: calls.append(1) or original(*a)
    try:
        with pytest.raises(LensInputError, match=r"positive text features have shape \[1, 7, 4, 64\].*\[B, S, 4, 48\]"):
            sample(dit, tokens_to_latent(case["noise"], (4, 6)), (torch.zeros(1, 7, 4, 64), torch.ones(1, 7, dtype=torch.bool)), None, 2, 1.0)
    finally:
        del dit.forward
    assert calls == []


@pytest.mark.parametrize("kwargs,match", [
    ({"cfg": -1.0}, "cfg must be >= 0"),
    ({"denoise": 1.5}, "denoise must be between 0 and 1"),
    ({"steps": 0}, "steps must be"),
])
def test_bad_sampling_inputs(sampling_case, kwargs, match):
    case, dit = sampling_case
    args = dict(steps=2, cfg=1.0) | kwargs
    with pytest.raises(LensInputError, match=match):
        sample(dit, tokens_to_latent(case["noise"], (4, 6)), (case["pos"], case["pos_mask"].bool()), None, **args)


def test_reference_noise_is_drawn_per_image_in_token_order():
    """LensPipeline / the command line: image i from seed + i, drawn as [h*w, 128] tokens (the reference's order)."""
    batch = make_noise(7, (3, 128, 4, 6))
    assert batch.shape == (3, 128, 4, 6) and batch.dtype == torch.float32
    # token 0 holds the first 128 draws: channels 0..3 of position (0, 0)
    assert batch[0, :4, 0, 0].tolist() == pytest.approx([-0.82013452, 0.39563116, 0.89890850, -1.38840389], abs=1e-7)
    assert torch.equal(batch[1:2], make_noise(8, (1, 128, 4, 6)))
    generator = torch.Generator().manual_seed(9)
    assert torch.equal(batch[2:3], tokens_to_latent(torch.randn(1, 24, 128, generator=generator), (4, 6)))


def test_seeds_run_up_to_two_to_the_64():
    top = make_noise(2**64 - 1, (2, 128, 2, 2))
    assert torch.isfinite(top).all() and not torch.equal(top, make_noise(2**64 - 2, (2, 128, 2, 2)))


@pytest.mark.parametrize("text_mask", ["every_block", "first_block"])
def test_separate_cfg_passes_drop_padding_only_where_it_changes_nothing(golden, text_mask):
    """With every-block masking each pass runs on its own unpadded text (no mask, fewer tokens) and gives the
    batched result; with the diffusers port's first-block masking padding acts, so both keep the reference's
    common padded length."""
    dit = load_dit(golden / "dit_tiny.safetensors", device="cpu", dtype=torch.float32, text_mask=text_mask)
    torch.manual_seed(0)
    noise = torch.randn(1, 128, 3, 4)
    pos = (torch.randn(1, 9, 4, 48), torch.tensor([[True] * 6 + [False] * 3]))
    pos[0][:, 6:] = 0
    neg = (torch.zeros(1, 0, 4, 48), torch.zeros(1, 0, dtype=torch.bool))
    calls = []
    original = dit.forward
    dit.forward = lambda x, sigma, text, mask, grid: calls.append((text.shape[1], mask)) or original(x, sigma, text, mask, grid)
    try:
        separate = sample(dit, noise, pos, neg, steps=2, cfg=5.0, batch_cfg=False)
    finally:
        del dit.forward
    batched = sample(dit, noise, pos, neg, steps=2, cfg=5.0)
    if text_mask == "every_block":
        assert [(length, mask) for length, mask in calls] == [(6, None), (0, None)] * 2
    else:
        assert [length for length, _ in calls] == [9, 9] * 2 and all(mask is not None for _, mask in calls)
    assert (separate - batched).abs().max() <= 1e-4 * batched.abs().max()  # float rounding only (CFG 5 scales it by 9)


def test_non_finite_inputs_and_outputs_are_named(sampling_case, tmp_path):
    case, dit = sampling_case
    noise = tokens_to_latent(case["noise"], (4, 6))
    cond = (case["pos"], case["pos_mask"].bool())
    bad_text = (case["pos"].clone().index_fill_(1, torch.tensor([0]), float("nan")), cond[1])
    with pytest.raises(LensInputError, match="the positive conditioning holds NaN"):
        sample(dit, noise, bad_text, None, steps=2, cfg=1.0)
    with pytest.raises(LensInputError, match="the negative conditioning holds NaN"):
        sample(dit, noise, cond, bad_text, steps=2, cfg=5.0)
    with pytest.raises(LensInputError, match="the input latent holds NaN"):
        sample(dit, noise, cond, None, steps=2, cfg=1.0, denoise=0.5, init_latent=torch.full_like(noise, float("inf")))
    weight = dit.proj_out.weight
    dit.proj_out._parameters["weight"] = torch.nn.Parameter(weight.clone().fill_(float("nan")), requires_grad=False)
    try:
        with pytest.raises(LensInputError, match="the sampled latent holds NaN.*try weight_dtype"):
            sample(dit, noise, cond, None, steps=2, cfg=1.0)
    finally:
        dit.proj_out._parameters["weight"] = weight


def test_a_nan_weight_in_the_file_is_named_at_load(golden, tmp_path):
    from safetensors.torch import save_file

    from lens_core import LensFileError

    state = load_file(str(golden / "dit_tiny.safetensors"))
    state["proj_out.weight"] = state["proj_out.weight"].clone().index_fill_(0, torch.tensor([1]), float("nan"))
    save_file(state, str(tmp_path / "nan.safetensors"))
    with pytest.raises(LensFileError, match=r"nan.safetensors: tensor 'proj_out.weight' holds NaN"):
        load_dit(tmp_path / "nan.safetensors", device="cpu")


def test_a_tiny_denoise_does_not_build_a_huge_schedule(sampling_case):
    case, dit = sampling_case
    noise = tokens_to_latent(case["noise"], (4, 6))
    cond = (case["pos"], case["pos_mask"].bool())
    with pytest.raises(LensInputError, match=r"denoise 1e-06 with 200 steps means a 200,000,000-step schedule"):
        sample(dit, noise, cond, None, steps=200, cfg=1.0, denoise=1e-6, init_latent=noise)
    tiny = sample(dit, noise, cond, None, steps=2, cfg=1.0, denoise=1e-4, init_latent=noise)  # 20,000 steps: allowed
    assert (tiny - noise).abs().max() < 1e-2


@pytest.mark.parametrize("batch", [0, -1])
def test_an_empty_batch_is_refused(batch):
    with pytest.raises(LensInputError, match=f"batch size is {batch}; it must be at least 1"):
        make_noise(7, (batch, 128, 4, 6))
