"""ComfyUI entry point of TalkFormer nodes.

ComfyUI imports this package from custom_nodes/ and reads NODE_CLASS_MAPPINGS and
NODE_DISPLAY_NAME_MAPPINGS. Importing it anywhere else (pytest, a script) must neither fail nor do
heavy work: nodes/ imports torch and the core lazily, inside the node functions.
"""
try:  # imported as a package (ComfyUI, or `import <pack>` from the parent folder)
    from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS
except ImportError:  # imported as a plain module (e.g. pytest collecting the root folder)
    NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS = {}, {}

WEB_DIRECTORY = None
__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
