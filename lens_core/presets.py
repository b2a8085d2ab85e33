"""Variant defaults, resolution buckets and size checks (docs/architecture.md, The model and Sampling)."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from .errors import LensInputError
from .sampling import check_size, snap_to_16  # noqa: F401 (snap_to_16: part of this module's API)

log = logging.getLogger("lens_core")


@dataclass(frozen=True)
class Variant:
    name: str
    steps: int
    cfg: float


VARIANTS = {
    "base": Variant("Lens-Base", 50, 5.0),
    "lens": Variant("Lens", 20, 5.0),
    "turbo": Variant("Lens-Turbo", 4, 1.0),
}

ASPECTS = ("1:2", "9:16", "2:3", "3:4", "1:1", "4:3", "3:2", "16:9", "2:1")
# (height, width) per aspect (width:height), as trained.
BUCKETS = {
    1024: dict(zip(ASPECTS, [(1472, 736), (1376, 768), (1248, 832), (1152, 864), (1024, 1024),
                             (864, 1152), (832, 1248), (768, 1376), (736, 1472)])),
    1440: dict(zip(ASPECTS, [(2080, 1040), (1936, 1088), (1760, 1168), (1616, 1216), (1440, 1440),
                             (1216, 1616), (1168, 1760), (1088, 1936), (1040, 2080)])),
}
MAX_TRAINED_PIXELS = 1440 * 1440

# The ranges the nodes' widgets offer and the command line accepts (one table, one message for both).
LIMITS = {
    "steps": (1, 200),
    "cfg": (0.0, 20.0),
    "seed": (0, 2**64 - 1),
    "width": (16, 4096),
    "height": (16, 4096),
    "batch": (1, 64),
    "denoise": (0.0, 1.0),
}


def check_in_range(name: str, value) -> None:
    """Refuse a setting outside LIMITS with a message naming the setting, the range and the value."""
    low, high = LIMITS[name]
    if not low <= value <= high:
        raise LensInputError(f"{name} must be between {low} and {high}, got {value}.")


def guess_variant(file_name: str, metadata: dict | None = None) -> str:
    """"turbo" / "base" / "lens" from a DiT's file name or safetensors metadata (the weights can't tell)."""
    text = (file_name + " " + " ".join(f"{k}={v}" for k, v in (metadata or {}).items())).lower()
    if "turbo" in text:
        return "turbo"
    if "lens-base" in text or "lens_base" in text or "base" in file_name.lower().rsplit("/", 1)[-1]:
        return "base"
    return "lens"


def check_variant_settings(variant: str, steps: int, cfg: float) -> list[str]:
    """Warn about settings that do not fit the model variant (a distilled Turbo with CFG, and so on)."""
    warnings = []
    if variant == "turbo" and (cfg != 1.0 or steps > 8):
        warnings.append(f"Lens-Turbo is distilled for 4 steps at CFG 1; steps={steps}, cfg={cfg} will over-cook the image.")
    if variant in ("lens", "base") and steps <= 8 and cfg == 1.0:
        warnings.append(f"{VARIANTS[variant].name} is not distilled: {steps} steps at CFG 1 gives a blurry image; "
                        f"use {VARIANTS[variant].steps} steps at CFG {VARIANTS[variant].cfg} or load a Turbo model.")
    for text in warnings:
        log.warning("Lens: %s", text)
    return warnings


def bucket_size(aspect: str, base: int = 1024) -> tuple[int, int]:
    """(height, width) of a trained bucket."""
    try:
        return BUCKETS[base][aspect]
    except KeyError:
        raise LensInputError(f"unknown bucket {aspect!r} at base {base}; aspects: {', '.join(ASPECTS)}; bases: 1024, 1440.") from None


def size_warnings(height: int, width: int) -> list[str]:
    """Validate a custom size (multiples of 16) and list what lies outside the trained range."""
    check_size(height, width)
    warnings = []
    if not 0.5 <= width / height <= 2.0:
        warnings.append(f"{width}x{height} has aspect {width / height:.2f}, outside the trained 1:2..2:1; expect distorted images.")
    if height * width > MAX_TRAINED_PIXELS * 1.02:
        warnings.append(f"{width}x{height} is {height * width / 1e6:.1f} MP, above the trained ~2.1 MP (1440x1440); expect repeated content.")
    for text in warnings:
        log.warning("Lens: %s", text)
    return warnings
