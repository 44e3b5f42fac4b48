"""The jobs layer: what every command and the grid's tasks share.

* :mod:`ibau.jobs.inputs` -- the one input pipeline (data -> model built after seeding
  -> weights -> checks), devices, model definitions;
* :mod:`ibau.jobs.outputs` -- output planning (never over an input, writable, new or
  ``force``), written in a safe order;
* :mod:`ibau.jobs.runner` -- one defense runner with held-out measurements and one
  report skeleton;
* :mod:`ibau.jobs.commands` -- one job per command (``unlearn``, ``defend``, ``poison``,
  ``evaluate``, ``demo``): options in, files out, a summary back. The command line
  (:mod:`ibau.cli`) only parses arguments, calls one of them and prints.
"""

from .inputs import DataSource, Inputs, ModelSource, load_inputs, resolve_device
from .outputs import Outputs
from .runner import JobResult, make_defense, run_measured

__all__ = ["DataSource", "Inputs", "ModelSource", "load_inputs", "resolve_device", "Outputs", "JobResult",
           "make_defense", "run_measured"]
