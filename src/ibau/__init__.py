"""ibau: Implicit Backdoor Adversarial Unlearning (Zeng et al., ICLR 2022) for PyTorch classifiers."""

from . import attacks, defenses, metrics, models
from .errors import InputError
from .defenses import IBAU, Defense, DefenseResult
from .hypergrad import implicit_grad
from .io import load_state_dict, load_weights, save_weights
from .scanning import ScanResult, scan

__version__ = "0.1.0"

__all__ = ["IBAU", "InputError", "Defense", "DefenseResult", "implicit_grad", "load_state_dict", "load_weights",
           "save_weights", "scan", "ScanResult", "attacks", "defenses", "metrics", "models", "__version__"]
