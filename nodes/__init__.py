"""The Lens node classes, registered under ids that never change (saved workflows store them)."""

from .encode import LensTextEncode
from .latent import LensEmptyLatent
from .loader import LensModelLoader
from .lora import LensLoraLoader
from .sampler import LensCFGGuider, LensSampler, LensScheduler, LensTurboSampler
from .vae import LensVAEDecode, LensVAEEncode

NODE_CLASS_MAPPINGS = {
    "LensPackModelLoader": LensModelLoader,
    "LensPackTextEncode": LensTextEncode,
    "LensPackEmptyLatent": LensEmptyLatent,
    "LensPackSampler": LensSampler,
    "LensPackTurboSampler": LensTurboSampler,
    "LensPackVAEDecode": LensVAEDecode,
    "LensPackVAEEncode": LensVAEEncode,
    "LensPackLoraLoader": LensLoraLoader,
    "LensPackScheduler": LensScheduler,
    "LensPackCFGGuider": LensCFGGuider,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "LensPackModelLoader": "Lens Model Loader",
    "LensPackTextEncode": "Lens Text Encode",
    "LensPackEmptyLatent": "Lens Empty Latent (Aspect Ratio)",
    "LensPackSampler": "Lens Sampler",
    "LensPackTurboSampler": "Lens Turbo Sampler",
    "LensPackVAEDecode": "Lens VAE Decode",
    "LensPackVAEEncode": "Lens VAE Encode",
    "LensPackLoraLoader": "Lens LoRA Loader",
    "LensPackScheduler": "Lens Scheduler",
    "LensPackCFGGuider": "Lens CFG Guider",
}
