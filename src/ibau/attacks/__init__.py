"""Backdoor triggers and attacks. Images are float tensors in [0, 1], (C, H, W) or (N, C, H, W).

Every attack class registers itself under its ``name``; ``create_attack(name, **kw)``
builds one, ``ATTACKS`` lists them. ``ImageTrigger`` (not in the registry) is a trigger
the user knows, read from files, to measure the success rate of one's own backdoor.
"""

from .trigger import Trigger, badnets_square
from .base import ATTACKS, Attack, create_attack, register_attack
from .badnets import BadNets
from .blend import Blend, procedural_pattern
from .invisible import L0Inv, L2Inv
from .smooth import Smooth, gaussian_blur
from .trojan import TrojanSquare, TrojanWatermark, square_mask, watermark_mask
from .all_to_all import AllToAll
from .multi import MultiTrigger
from .semantic import SemanticReplacement, cartoon_picture
from .wanet import WaNet, WaNetSet
from .input_aware import InputAware, InputAwareSet
from .hidden_trigger import HiddenTrigger, HiddenTriggerSet
from .user_trigger import ImageTrigger

__all__ = [
    "Trigger", "badnets_square",
    "Attack", "ATTACKS", "register_attack", "create_attack",
    "BadNets", "Blend", "L0Inv", "L2Inv", "Smooth", "TrojanSquare", "TrojanWatermark", "AllToAll", "MultiTrigger",
    "SemanticReplacement", "WaNet", "WaNetSet", "cartoon_picture", "InputAware", "InputAwareSet",
    "HiddenTrigger", "HiddenTriggerSet", "ImageTrigger",
    "procedural_pattern", "gaussian_blur", "square_mask", "watermark_mask",
]
