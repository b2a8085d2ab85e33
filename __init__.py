"""ComfyUI entry point of the Lens node pack: registers the nodes, nothing else.

ComfyUI imports this file as a package named after the pack's folder. Tools such as pytest may import it as a
plain module instead (they do in a clone named `comfyui-lens`, which is not a valid package name); without a
parent package there is nothing to register, and the relative import below would fail.
"""

if __package__:
    from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

    __all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
