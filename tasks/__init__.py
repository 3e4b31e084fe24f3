"""The paper's evaluations, one module each; `TASKS` maps a command name to its task."""

from .diagnose import Diagnose
from .generate import Generation
from .passkey import Passkey
from .ppl import Perplexity
from .timing import Timing

TASKS = {task.name: task for task in (Perplexity(), Passkey(), Generation(), Timing(), Diagnose())}
