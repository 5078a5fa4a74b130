"""The ``torchderiv bench`` command: torchderiv side by side with torch.func, autograd loops and the
seeds' own code, on the seeds' networks and the PDE operators of the issues.

Run ``python -m torchderiv bench --help``. The scenario registry :data:`SCENARIOS` is a plain dict.
"""

from ._cli import main
from ._scenarios import SCENARIOS, Method, Scenario, Target

__all__ = ["main", "SCENARIOS", "Scenario", "Method", "Target"]
