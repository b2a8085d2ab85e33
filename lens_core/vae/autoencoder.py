"""`LensVAE`: decode / encode between images and the Lens latent space, tiled when memory is short.

Tiles overlap and are blended with linear ramps over the overlap, so there are no seams. The mid
attention of the VAE sees one tile instead of the whole image, so a tiled result is close to, not
identical with, the untiled one (measured differences are in tests/test_vae.py).
"""

from __future__ import annotations

import logging

import torch

from .. import placement
from ..errors import LensInputError
from .latent import fold, unfold
from .model import FluxVAEModel

log = logging.getLogger("lens_core")

DEFAULT_TILE = 32      # Lens latent positions per tile side (512 pixels for the real VAE)
DEFAULT_OVERLAP = 8    # Lens latent positions shared by neighbouring tiles (128 pixels)


def _available_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 8 << 30


def _tile_starts(size: int, tile: int, overlap: int) -> list[int]:
    if size <= tile:
        return [0]
    step = tile - overlap
    starts = list(range(0, size - tile, step))
    return starts + [size - tile]


def _ramp(length: int, ramp: int, fade_in: bool, fade_out: bool) -> torch.Tensor:
    weight = torch.ones(length)
    if ramp > 0:
        edge = (torch.arange(ramp, dtype=torch.float32) + 0.5) / ramp
        if fade_in:
            weight[:ramp] = torch.minimum(weight[:ramp], edge)
        if fade_out:
            weight[-ramp:] = torch.minimum(weight[-ramp:], edge.flip(0))
    return weight


def tiled_apply(fn, x: torch.Tensor, tile: int, overlap: int, scale_num: int, scale_den: int, out_channels: int) -> torch.Tensor:
    """Apply `fn` to overlapping tiles of x [B, C, H, W] and blend the results.

    Output positions = input positions * scale_num / scale_den (16/1 for decode, 1/16 for encode).
    """
    b, _, height, width = x.shape
    out_h, out_w = height * scale_num // scale_den, width * scale_num // scale_den
    out = torch.zeros(b, out_channels, out_h, out_w, dtype=torch.float32)
    weights = torch.zeros(1, 1, out_h, out_w)
    ramp = overlap * scale_num // scale_den
    rows, cols = _tile_starts(height, tile, overlap), _tile_starts(width, tile, overlap)
    for top in rows:
        for left in cols:
            piece = fn(x[:, :, top:top + tile, left:left + tile]).float().cpu()
            ph, pw = piece.shape[-2:]
            oy, ox = top * scale_num // scale_den, left * scale_num // scale_den
            wy = _ramp(ph, ramp, top > 0, top + tile < height)
            wx = _ramp(pw, ramp, left > 0, left + tile < width)
            mask = (wy[:, None] * wx[None, :])[None, None]
            out[:, :, oy:oy + ph, ox:ox + pw] += piece * mask
            weights[:, :, oy:oy + ph, ox:ox + pw] += mask
    return out / weights


class LensVAE:
    """The FLUX.2 VAE plus the Lens latent conventions: latents are [B, 128, H/16, W/16], BN-normalised.

    `decode` / `encode` compute on `device` (default: the model's; ComfyUI names its compute device, since under its
    partial loading some layers stay in CPU memory)."""

    def __init__(self, model: FluxVAEModel, source: str = "<memory>"):
        self.model = model.eval()
        self.source = source

    @property
    def device(self) -> torch.device:
        return self.model.decoder.conv_in.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.decoder.conv_in.weight.dtype

    @property
    def latent_channels(self) -> int:
        return 4 * self.model.config.z_channels

    @property
    def pixels_per_latent(self) -> int:
        """Image pixels per Lens latent position (16 for the real VAE: x8 in the VAE, x2 in the fold)."""
        return 2 * self.model.config.downscale

    def place(self, device) -> "LensVAE":
        """Outside ComfyUI: the weights on `device` (see placement.place)."""
        placement.place(self.model, device)
        return self

    # -- decode -----------------------------------------------------------------------------------
    def _decode_untiled(self, latent: torch.Tensor, device: torch.device) -> torch.Tensor:
        z = unfold(self.model.bn.denormalize(latent.to(device)))
        z = self.model.post_quant_conv(z.to(self.dtype))
        return self.model.decoder(z)

    def decode_bytes(self, height: int, width: int) -> int:
        """A rough peak-activation estimate for decoding an image of height x width pixels untiled."""
        widest_full_res = self.model.config.channels
        return 8 * widest_full_res * height * width * self.dtype.itemsize

    def largest_tile(self, height: int, width: int, available: int) -> int:
        """The largest square tile (Lens latent positions, a multiple of 8, at least DEFAULT_TILE) whose decode fits in
        `available` bytes: fewer, larger tiles mean less overlap recomputed and fewer seams."""
        scale, tile = self.pixels_per_latent, DEFAULT_TILE
        while tile + 8 < max(height, width) and self.decode_bytes((tile + 8) * scale, (tile + 8) * scale) <= 0.8 * available:
            tile += 8
        return tile

    @torch.no_grad()
    def decode(self, latent: torch.Tensor, tile: bool | None = None, tile_size: int | None = None,
               overlap: int = DEFAULT_OVERLAP, clamp: bool = True, device=None) -> torch.Tensor:
        """latent [B, 128, h, w] -> image [B, 3, 16h, 16w] in [-1, 1] (float32, on the CPU).

        tile: None = decide from free memory; True / False force it. tile_size (Lens latent positions): None = the
        largest that fits when tiling was decided from memory, DEFAULT_TILE (512 pixels) when forced.
        """
        if latent.ndim != 4 or latent.shape[1] != self.latent_channels:
            raise LensInputError(
                f"cannot decode a latent of shape {tuple(latent.shape)}: the Lens VAE needs "
                f"[B, {self.latent_channels}, h, w] (a Lens latent). SD/SDXL/FLUX latents have 4 or 16 channels."
            )
        h, w = latent.shape[-2:]
        device = torch.device(device) if device is not None else self.device
        available, auto = _available_bytes(device), tile is None
        if auto:
            scale = self.pixels_per_latent
            tile = self.decode_bytes(h * scale, w * scale) > 0.8 * available
            if tile:
                log.info("Lens VAE: decoding %dx%d in tiles (not enough free memory for one pass)", w * scale, h * scale)
        tile_size = tile_size or (self.largest_tile(h, w, available) if auto else DEFAULT_TILE)
        if tile and (h > tile_size or w > tile_size):
            image = tiled_apply(lambda piece: self._decode_untiled(piece, device), latent, tile_size, overlap, self.pixels_per_latent, 1, 3)
        else:
            image = self._decode_untiled(latent, device).float().cpu()
        return image.clamp(-1.0, 1.0) if clamp else image

    # -- encode -----------------------------------------------------------------------------------
    def _encode_untiled(self, image: torch.Tensor, device: torch.device) -> torch.Tensor:
        moments = self.model.quant_conv(self.model.encoder(image.to(device, self.dtype)))
        mean = moments[:, : self.model.config.z_channels]
        return self.model.bn.normalize(fold(mean))

    def crop_to_multiple(self, image: torch.Tensor) -> torch.Tensor:
        """Centre-crop an image whose sides are not multiples of 16 (as ComfyUI's VAE Encode does)."""
        multiple = self.pixels_per_latent
        height, width = image.shape[-2:]
        new_h, new_w = height // multiple * multiple, width // multiple * multiple
        if new_h == 0 or new_w == 0:
            raise LensInputError(f"image of {width}x{height} pixels is too small to encode; the Lens VAE needs at least {multiple}x{multiple}.")
        if (new_h, new_w) != (height, width):
            log.warning("Lens VAE: %dx%d is not a multiple of %d; centre-cropped to %dx%d", width, height, multiple, new_w, new_h)
            top, left = (height - new_h) // 2, (width - new_w) // 2
            image = image[..., top:top + new_h, left:left + new_w]
        return image

    @torch.no_grad()
    def encode(self, image: torch.Tensor, tile: bool | None = None, tile_size: int = DEFAULT_TILE,
               overlap: int = DEFAULT_OVERLAP, device=None) -> torch.Tensor:
        """image [B, 3, H, W] in [-1, 1] -> latent [B, 128, H/16, W/16] (float32, on the CPU).

        Sides that are not multiples of 16 are centre-cropped (with a warning).
        """
        if image.ndim != 4 or image.shape[1] != 3:
            raise LensInputError(f"cannot encode an image of shape {tuple(image.shape)}; expected [B, 3, H, W] RGB in [-1, 1].")
        image = self.crop_to_multiple(image)
        device = torch.device(device) if device is not None else self.device
        scale = self.pixels_per_latent
        height, width = image.shape[-2:]
        if tile is None:
            tile = self.decode_bytes(height, width) > 0.8 * _available_bytes(device)
        pixel_tile = tile_size * scale
        if tile and (height > pixel_tile or width > pixel_tile):
            return tiled_apply(lambda piece: self._encode_untiled(piece, device), image, pixel_tile, overlap * scale, 1, scale,
                               self.latent_channels)
        return self._encode_untiled(image, device).float().cpu()
