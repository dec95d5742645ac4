"""ComfyUI entry point of TalkFormer nodes.

ComfyUI imports this package from custom_nodes/ (by file path, under a module name made of that
path) and reads NODE_CLASS_MAPPINGS and NODE_DISPLAY_NAME_MAPPINGS. It does not put the pack's
folder on sys.path, so we append it here: the node modules can then ``import talkformer_core``.
Appended, not prepended, so ComfyUI's own top-level ``nodes`` module is never shadowed by our
``nodes/`` folder. Importing this anywhere (pytest, a script) does no heavy work: nodes/ imports
torch and the core lazily, inside the node functions.
"""
import os as _os
import sys as _sys

_PACK_DIR = _os.path.dirname(_os.path.abspath(__file__))
if _PACK_DIR not in _sys.path and _os.path.realpath(_PACK_DIR) not in map(_os.path.realpath, _sys.path):
    _sys.path.append(_PACK_DIR)

try:  # imported as a package (ComfyUI, or `import <pack>` from the parent folder)
    from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS
except ImportError as _e:  # imported as a plain module (e.g. pytest collecting the root folder)
    if __package__:  # a real package whose nodes failed to import: let ComfyUI show the error
        raise
    NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS = {}, {}

WEB_DIRECTORY = None
__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
