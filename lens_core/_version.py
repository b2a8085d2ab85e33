"""The pack's version: the one place it is written. pyproject.toml reads it (setuptools for the wheel, comfy-cli for
the Registry), `lens --version` and the pack's load line in ComfyUI show it, and CHANGELOG.md names it."""

__version__ = "0.4.0"
