"""gisp: Global Iterative Structured Pruning for Llama-family language models."""

__version__ = "0.1.0"

import gisp.tasks  # noqa: E402,F401,I001  (registers the margin/answer objectives and their calibration)
from gisp.adapters import ArchAdapter, get_adapter, register_adapter  # noqa: E402
from gisp.calibration import CalibrationSet, build_calibration  # noqa: E402
from gisp.elastic import ElasticModel  # noqa: E402
from gisp.errors import GispError  # noqa: E402
from gisp.evaluate import evaluate  # noqa: E402
from gisp.export import export, load_pretrained  # noqa: E402
from gisp.loading import fingerprint, load_model  # noqa: E402
from gisp.perplexity import perplexity  # noqa: E402
from gisp.prune import PruneConfig, prune  # noqa: E402
from gisp.structures import Layout, Mask  # noqa: E402
from gisp.trajectory import Trajectory  # noqa: E402
import gisp.vllm_export  # noqa: E402,F401  (registers the gisp_decilm config of --format vllm with AutoConfig)

__all__ = [
    "ArchAdapter", "CalibrationSet", "ElasticModel", "GispError", "Layout", "Mask", "PruneConfig", "Trajectory",
    "build_calibration", "evaluate", "export", "fingerprint", "get_adapter", "load_model", "load_pretrained",
    "perplexity", "prune", "register_adapter",
]
