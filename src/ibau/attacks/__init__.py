"""Backdoor triggers and attacks. Images are float tensors in [0, 1], (C, H, W) or (N, C, H, W)."""

from .trigger import Trigger, badnets_square

__all__ = ["Trigger", "badnets_square"]
