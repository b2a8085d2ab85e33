"""Microsoft Lens text-to-image in plain PyTorch: the denoiser, text encoder, VAE, samplers and pipeline.

No ComfyUI imports here: the node pack around this package is a thin layer over this API.
"""

from .dit.layout import latent_to_tokens, tokens_to_latent
from .dit.loader import load_dit
from .dit.model import DiTConfig, LensDiT
from .errors import LensError, LensFileError, LensInputError
from .sampling import sample, schedule_sigmas
from .vae.autoencoder import LensVAE
from .vae.loader import load_vae

__all__ = [
    "DiTConfig", "LensDiT", "LensError", "LensFileError", "LensInputError",
    "LensVAE", "latent_to_tokens", "load_dit", "load_vae", "sample", "schedule_sigmas", "tokens_to_latent",
]
