"""Microsoft Lens text-to-image in plain PyTorch: the denoiser, text encoder, VAE, samplers and pipeline.

No ComfyUI imports here: the node pack around this package is a thin layer over this API.
"""

from ._version import __version__ as __version__
from .dit.layout import latent_to_tokens, tokens_to_latent
from .dit.loader import load_dit
from .dit.lora import LoRA, apply_loras, load_lora
from .dit.model import DiTConfig, LensDiT
from .errors import LensError, LensFileError, LensInputError
from .pipeline import LensPipeline
from .sampling import Cancelled, make_noise, sample, schedule_sigmas
from .text.cache import PromptCache
from .text.loader import load_text_encoder
from .text.prompt import EncodedPrompts, encode_prompts, render_and_tokenize
from .text.tokenizer import load_tokenizer
from .vae.autoencoder import LensVAE
from .vae.loader import load_vae

__all__ = [
    "Cancelled", "DiTConfig", "LoRA", "apply_loras", "load_lora", "EncodedPrompts", "LensDiT", "LensError", "LensFileError", "LensInputError",
    "LensPipeline", "LensVAE", "PromptCache", "encode_prompts", "latent_to_tokens", "load_dit", "load_text_encoder",
    "load_tokenizer", "load_vae", "make_noise", "render_and_tokenize", "sample", "schedule_sigmas", "tokens_to_latent",
]
