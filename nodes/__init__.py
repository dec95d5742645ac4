"""ComfyUI nodes: thin adapters over talkformer_core (classic node API: it loads in every
recent ComfyUI and runs without ComfyUI).

Each node module defines its classes and a NODE_CLASS_MAPPINGS / NODE_DISPLAY_NAME_MAPPINGS pair;
this package merges them. Node modules import only light things at import time (torch, numpy and
talkformer_core inside the node functions), and each other relatively.
"""
from . import audio_nodes, face_nodes, generate_nodes, model_nodes
from . import video_node  # TalkFormer Lip Sync (Video)
from . import train_node  # Train TalkFormer on Video
from . import provenance_node  # TalkFormer Mark Video
from ._common import register_model_folder

register_model_folder()  # models/talkformer/ (inside ComfyUI only; a no-op elsewhere)

NODE_CLASS_MAPPINGS: dict = {}
NODE_DISPLAY_NAME_MAPPINGS: dict = {}
for _m in (model_nodes, audio_nodes, face_nodes, generate_nodes, video_node, train_node, provenance_node):
    NODE_CLASS_MAPPINGS.update(_m.NODE_CLASS_MAPPINGS)
    NODE_DISPLAY_NAME_MAPPINGS.update(_m.NODE_DISPLAY_NAME_MAPPINGS)

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
