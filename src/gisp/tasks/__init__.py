"""Task-aligned pruning and evaluation: lm-eval-style tasks, margin and answer objectives.

Importing this package registers the ``margin`` and ``answer`` objectives and
their calibration builders (``gisp`` imports it at the end of its ``__init__``).
"""

from gisp.tasks.evaluate import GENERATIVE, TASKS, evaluate_tasks, resolve_task
from gisp.tasks.loaders import DEFAULT_SPLIT_SEED, TASK_CALIB_FRACTION, load_task_data, load_user_task, split_task
from gisp.tasks.objectives import Answer, Margin
from gisp.tasks.scoring import loglikelihoods

__all__ = [
    "TASK_CALIB_FRACTION", "DEFAULT_SPLIT_SEED", "GENERATIVE", "TASKS", "Answer", "Margin", "evaluate_tasks",
    "load_task_data", "load_user_task", "loglikelihoods", "resolve_task", "split_task",
]
