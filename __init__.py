"""ComfyUI entry point of the Lens node pack: registers the nodes and the page script (web/), and says so in the log.

ComfyUI imports this file as a package named after the pack's folder. Tools such as pytest may import it as a
plain module instead (they do in a clone named `comfyui-lens`, which is not a valid package name); without a
parent package there is nothing to register, and the relative import below would fail.
"""

if __package__:
    import logging

    from .lens_core import __version__
    from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

    WEB_DIRECTORY = "./web"
    logging.getLogger("lens_core").info("Lens node pack %s: %d nodes", __version__, len(NODE_CLASS_MAPPINGS))
    __all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]
