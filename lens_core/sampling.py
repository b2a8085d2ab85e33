"""Flow-matching schedule, norm-rescaled guidance and the Euler sampler (docs/architecture.md, Sampling).

Plain functions, FLUX-style: `schedule_sigmas` -> N+1 sigmas; `euler` runs N Euler steps
x <- x + (sigma_next - sigma) * v with the update in float32; `sample` ties them to a denoiser. Inside ComfyUI the
same `euler`, schedule and guidance run under ComfyUI's sampling (nodes/sampler.py).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from .dit.layout import latent_to_tokens, tokens_to_latent
from .dit.model import DiTConfig, check_text_features
from .errors import LensInputError, require_finite

# The FLUX.2 empirical shift rule: mu as a function of image tokens L and steps N.
_A1, _B1 = 8.73809524e-05, 1.89833333
_A2, _B2 = 0.00016927, 0.45666666


def empirical_mu(image_tokens: int, steps: int) -> float:
    if image_tokens > 4300:
        return _A2 * image_tokens + _B2
    m200 = _A2 * image_tokens + _B2
    m10 = _A1 * image_tokens + _B1
    a = (m200 - m10) / 190.0
    b = m200 - 200.0 * a
    return a * steps + b


def snap_to_16(value: int) -> int:
    return max(16, int(value / 16 + 0.5) * 16)


def check_size(height: int, width: int) -> None:
    if height <= 0 or width <= 0 or height % 16 or width % 16:
        raise LensInputError(
            f"image size {width}x{height} (width x height) is not usable: both sides must be positive multiples of 16 "
            f"(e.g. {snap_to_16(width)}x{snap_to_16(height)})."
        )


def _check_steps(steps) -> None:
    if not isinstance(steps, int) or steps < 1:
        raise LensInputError(f"steps must be a whole number >= 1, got {steps!r}.")


def check_settings(steps: int, cfg: float, denoise: float = 1.0) -> None:
    """Refuse sampler settings that cannot work, before any heavy work."""
    _check_steps(steps)
    if cfg < 0 or not math.isfinite(cfg):
        raise LensInputError(f"cfg must be >= 0, got {cfg}.")
    if not 0.0 <= denoise <= 1.0:
        raise LensInputError(f"denoise must be between 0 and 1, got {denoise}.")


def schedule_sigmas(steps: int, height: int, width: int, shift: float | None = None) -> torch.Tensor:
    """The N+1 float32 sigmas for N steps at height x width pixels (last one 0).

    shift: use this mu instead of the empirical rule (for experiments).
    """
    _check_steps(steps)
    check_size(height, width)
    mu = empirical_mu((height // 16) * (width // 16), steps) if shift is None else float(shift)
    base = torch.linspace(1.0, 1.0 / steps, steps, dtype=torch.float64)
    shifted = math.exp(mu) / (math.exp(mu) + (1.0 / base - 1.0))
    return torch.cat([shifted, torch.zeros(1, dtype=torch.float64)]).float()


def norm_rescaled_cfg(v_cond: torch.Tensor, v_uncond: torch.Tensor, scale: float, channel_dim: int = -1) -> torch.Tensor:
    """comb = v_u + g (v_c - v_u), rescaled per token to the norm of v_c over the channel axis (the last one in the
    token layout, 1 in the latent layout). Any common positive multiple of the velocities gives the same direction and
    ratio, so sigma * v (what ComfyUI's guidance sees) works as well as v."""
    comb = v_uncond + scale * (v_cond - v_uncond)
    comb_norm = comb.norm(dim=channel_dim, keepdim=True)
    cond_norm = v_cond.norm(dim=channel_dim, keepdim=True)
    factor = torch.where(comb_norm > 0, cond_norm / comb_norm.clamp_min(1e-12), torch.ones_like(comb_norm))
    return comb * factor


def make_noise(seed: int, shape: tuple[int, int, int, int]) -> torch.Tensor:
    """The reference's starting noise [B, 128, h, w] in float32, drawn on the CPU so a seed gives the same image on any
    device: image i is drawn from seed + i in the reference's token order [h*w, 128], so any image of a batch can be
    re-made alone. (The ComfyUI nodes draw ComfyUI's own noise instead, so a seed matches native graphs.)"""
    batch, channels, h, w = shape
    if batch < 1:
        raise LensInputError(f"the latent's batch size is {batch}; it must be at least 1.")
    seed = int(seed) & 0xFFFF_FFFF_FFFF_FFFF
    images = []
    for i in range(batch):
        generator = torch.Generator("cpu").manual_seed((seed + i) & 0xFFFF_FFFF_FFFF_FFFF)
        images.append(tokens_to_latent(torch.randn(1, h * w, channels, generator=generator), (h, w)))
    return torch.cat(images)


def _pad_text(features: torch.Tensor, mask: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    extra = length - features.shape[1]
    if extra == 0:
        return features, mask
    features = torch.cat([features, features.new_zeros(features.shape[0], extra, *features.shape[2:])], dim=1)
    return features, torch.cat([mask, mask.new_zeros(mask.shape[0], extra)], dim=1)


def _trim_padding(features: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Drop the trailing positions that are padding in every row.

    Only for a denoiser that masks padded keys in every block: there padding changes nothing, so a pass run
    without it computes the same velocity on fewer tokens, and with no padding left it needs no mask (SDPA keeps
    its flash kernel). The diffusers port's first-block masking lets padding act in later blocks: kept there.
    """
    real = mask.bool().any(dim=0).nonzero()
    length = int(real.max()) + 1 if real.numel() else 0
    return features[:, :length], mask[:, :length]


def _expand_batch(features: torch.Tensor, mask: torch.Tensor, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    if features.shape[0] == batch:
        return features, mask
    if features.shape[0] != 1:
        raise LensInputError(f"conditioning has batch {features.shape[0]} but the latent has {batch}; use 1 or {batch} prompts.")
    return features.expand(batch, *features.shape[1:]), mask.expand(batch, -1)


def _text_on_device(features: torch.Tensor, mask: torch.Tensor, device, dtype) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Text features moved once to the denoiser's device and dtype; the mask only where a key is padded.

    None for an all-real mask lets attention skip the mask (and keep its fastest kernel); deciding it
    here, once per run, avoids a device-to-host sync in every forward.
    """
    mask = mask.bool()
    return features.to(device, dtype), None if bool(mask.all()) else mask.to(device)


def _join_masks(first: torch.Tensor | None, second: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor | None:
    """The mask of two text batches run as one (None when neither has padding)."""
    if first is None and second is None:
        return None
    full = torch.ones(like.shape[:2], dtype=torch.bool, device=like.device)
    return torch.cat([full if first is None else first, full if second is None else second])


def _prepare_text(dit, cond, uncond, batch: int, batch_cfg: bool):
    """The text as the loop feeds it to the denoiser, prepared once per run: (cond, uncond or None, both joined
    into one batch or None), each (features on the denoiser's device and dtype, mask or None).

    Both sides are expanded to the latent's batch; where padding is inert (see `_trim_padding`) trailing padding
    is dropped; for one CFG batch, or where padding acts, both are padded to one length as the reference does."""
    padding_is_inert = getattr(dit, "text_mask", None) == "every_block"
    cond = _expand_batch(*cond, batch)
    if padding_is_inert:
        cond = _trim_padding(*cond)
    if uncond is not None:
        uncond = _expand_batch(*uncond, batch)
        if cond[0].shape[2:] != uncond[0].shape[2:]:
            raise LensInputError("positive and negative conditioning come from different text encoders (feature shapes differ).")
        if padding_is_inert:
            uncond = _trim_padding(*uncond)
        if batch_cfg or not padding_is_inert:
            length = max(cond[0].shape[1], uncond[0].shape[1])
            cond, uncond = _pad_text(*cond, length), _pad_text(*uncond, length)
    device, dtype = dit.device, dit.dtype
    cond = _text_on_device(*cond, device, dtype)
    if uncond is None:
        return cond, None, None
    uncond = _text_on_device(*uncond, device, dtype)
    joined = (torch.cat([cond[0], uncond[0]]), _join_masks(cond[1], uncond[1], cond[0])) if batch_cfg else None
    return cond, uncond, joined


class Cancelled(Exception):
    """Raised inside `sample` when the caller's cancellation check says stop."""


def check_sample_inputs(config: DiTConfig, noise: torch.Tensor, cond, uncond, steps: int, cfg: float, denoise: float = 1.0,
                        init_latent: torch.Tensor | None = None) -> None:
    """Everything `sample` refuses, checked before any work: the nodes call it before the denoiser goes to the GPU."""
    if noise.ndim != 4 or noise.shape[1] != config.in_channels:
        raise LensInputError(f"noise/latent has shape {tuple(noise.shape)}; this denoiser's latent is "
                             f"[B, {config.in_channels}, H/16, W/16].")
    check_settings(steps, cfg, denoise)
    use_cfg = cfg != 1.0
    if use_cfg and uncond is None:
        raise LensInputError("cfg != 1 needs a negative (unconditional) conditioning; pass an empty negative prompt for none.")
    for which, text in (("positive", cond), ("negative", uncond if use_cfg else None)):
        if text is not None:
            check_text_features(config, text[0], which)
            require_finite(text[0], f"the {which} conditioning", "Encode the prompt again; if it still happens, the "
                                                                 "text encoder's weights or a node between it and the "
                                                                 "sampler are at fault.")
    if init_latent is not None and denoise < 1.0:
        require_finite(init_latent, "the input latent", "Re-encode the image (its pixels may hold NaN) or check the "
                                                        "node that made the latent.")


def sample(
    dit,
    noise: torch.Tensor,
    cond: tuple[torch.Tensor, torch.Tensor],
    uncond: tuple[torch.Tensor, torch.Tensor] | None,
    steps: int,
    cfg: float,
    *,
    denoise: float = 1.0,
    init_latent: torch.Tensor | None = None,
    shift: float | None = None,
    batch_cfg: bool = True,
    callback: Callable[[int, int, torch.Tensor], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> torch.Tensor:
    """Sample a latent [B, 128, h, w] from `noise` [B, 128, h, w].

    cond / uncond: (features [B or 1, S, layers, C], mask [B or 1, S]); uncond may be None when cfg == 1.
    denoise < 1 with `init_latent` is img2img: the run starts at the schedule's sigma for that strength.
    callback(step, total, x0_estimate [B,128,h,w]) is called after every step; should_stop() is polled
    before every step and raises `Cancelled` when it returns True.
    batch_cfg: run the positive and negative passes as one batch (padded to a common length, masked), or, when
    False, one after the other, each on its own text without padding where the denoiser allows (see
    `_trim_padding`): fewer tokens and no mask; which is faster depends on the GPU (bench_sampling.py --separate-cfg).

    Devices: the inputs may live anywhere; they are moved once to `dit.device`, where the whole loop
    runs (state x and sigmas in float32, text in the denoiser's dtype). The x0 estimates handed to
    `callback` and the returned latent (float32) live on `dit.device` too.
    """
    check_sample_inputs(dit.config, noise, cond, uncond, steps, cfg, denoise, init_latent)
    batch, _, h, w = noise.shape
    use_cfg = cfg != 1.0
    device = dit.device
    sigmas = img2img_sigmas(steps, denoise, h * 16, w * 16, shift).to(device, torch.float32)
    cond, uncond, batched_text = _prepare_text(dit, cond, uncond if use_cfg else None, batch, batch_cfg)
    x = latent_to_tokens(noise.to(device, torch.float32))
    if init_latent is not None and denoise < 1.0:
        x = (1.0 - sigmas[0]) * latent_to_tokens(init_latent.to(device, torch.float32)) + sigmas[0] * x

    def velocity(x, sigma):
        return _velocity(dit, x, sigma.expand(batch), cond, uncond, cfg, (h, w), batched_text)

    def on_step(step, total, x0):
        if callback is not None:
            callback(step, total, tokens_to_latent(x0, (h, w)))

    x = euler(velocity, x, sigmas, on_step, should_stop)
    require_finite(x, "the sampled latent", "The weights were checked when loaded, so the compute went wrong: try "
                                            "weight_dtype fp32 or bf16, or remove nodes that patch the model.")
    return tokens_to_latent(x, (h, w))


def euler(velocity: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], x: torch.Tensor, sigmas: torch.Tensor,
          callback: Callable[[int, int, torch.Tensor], None] | None = None,
          should_stop: Callable[[], bool] | None = None) -> torch.Tensor:
    """The flow-matching Euler loop, in float32: for each step, v = velocity(x, sigma_i), x0 = x - sigma_i v,
    x <- x + (sigma_{i+1} - sigma_i) v; callback(step, total, x0) after each step; should_stop() is polled before each
    step and raises `Cancelled` when it returns True. Any layout: the update is elementwise."""
    x = x.float()
    total = len(sigmas) - 1
    for i in range(total):
        if should_stop is not None and should_stop():
            raise Cancelled()
        v = velocity(x, sigmas[i]).float()
        x0 = x - sigmas[i] * v
        x = x + (sigmas[i + 1] - sigmas[i]) * v
        if callback is not None:
            callback(i + 1, total, x0)
    return x


MAX_SCHEDULE_STEPS = 100_000


def img2img_sigmas(steps: int, denoise: float, height: int, width: int, shift: float | None = None) -> torch.Tensor:
    """The last `steps` + 1 sigmas of the schedule a full run of steps / denoise steps would take at height x width
    pixels (all of them at denoise 1; none to take at denoise 0)."""
    if denoise <= 0:
        return torch.zeros(1)
    full_steps = steps if denoise >= 1.0 else max(1, round(steps / denoise))
    if full_steps > MAX_SCHEDULE_STEPS:
        raise LensInputError(f"denoise {denoise:g} with {steps} steps means a {full_steps:,}-step schedule, more than the "
                             f"{MAX_SCHEDULE_STEPS:,} this pack computes; raise denoise or lower steps so that steps / denoise "
                             f"stays at or below {MAX_SCHEDULE_STEPS:,}.")
    return schedule_sigmas(full_steps, height, width, shift)[-(steps + 1):]


def _velocity(dit, x, sigma, cond, uncond, cfg, grid, batched_text) -> torch.Tensor:
    """The (guided) velocity in float32; both passes in one batch when `batched_text` (cond and uncond joined) is given."""
    if uncond is None:
        return dit(x, sigma, cond[0], cond[1], grid).float()
    if batched_text is not None:
        v = dit(torch.cat([x, x]), torch.cat([sigma, sigma]), *batched_text, grid).float()
        v_cond, v_uncond = v.chunk(2)
    else:
        v_cond = dit(x, sigma, cond[0], cond[1], grid).float()
        v_uncond = dit(x, sigma, uncond[0], uncond[1], grid).float()
    return norm_rescaled_cfg(v_cond, v_uncond, cfg)
