"""ComfyUI nodes: thin adapters over talkformer_core (classic node API, DESIGN.md §3).

Each node module defines its classes and a NODE_CLASS_MAPPINGS / NODE_DISPLAY_NAME_MAPPINGS pair;
this package merges them. Node modules import only light things at import time.
"""
NODE_CLASS_MAPPINGS: dict = {}
NODE_DISPLAY_NAME_MAPPINGS: dict = {}
