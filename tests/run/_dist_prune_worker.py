"""One rank of a data-parallel GISP run, for tests/run/test_distributed.py (launched by torchrun).

usage: torchrun --standalone --nproc_per_node 2 tests/run/_dist_prune_worker.py OUT CONFIG_JSON SAMPLES

Every rank prunes the same tiny model on the same calibration set and passes
``OUT/rank{r}`` as its run directory (only rank 0 may write there), then dumps
its returned trajectory and a digest of its masked weights to ``OUT/result{r}.json``.
A second, one-sample run checks that a rank without samples still takes part.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from tests.conftest import random_calib, tiny_model  # noqa: E402

import gisp  # noqa: E402
from gisp.run import distributed  # noqa: E402


def weight_digest(model: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for name, p in sorted(model.named_parameters()):
        h.update(name.encode())
        h.update(p.detach().float().numpy().tobytes())
    return h.hexdigest()


def main() -> None:
    out, config, samples = Path(sys.argv[1]), json.loads(sys.argv[2]), int(sys.argv[3])
    torch.set_num_threads(1)  # two ranks share the CI machine's cores
    assert distributed.init_from_env(), "expected WORLD_SIZE > 1"
    r = distributed.rank()
    model = tiny_model()
    traj = gisp.prune(model, gisp.PruneConfig(**config), random_calib(n=samples), run_dir=out / f"rank{r}",
                      progress=False)
    lone = gisp.prune(tiny_model(), gisp.PruneConfig(**{**config, "steps": 1}), random_calib(n=1), progress=False)
    result = {"traj": traj.to_dict(), "weights": weight_digest(model), "world": distributed.world_size(),
              "backend": distributed.backend(), "lone": lone.to_dict()}
    (out / f"result{r}.json").write_text(json.dumps(result))
    distributed.shutdown()


if __name__ == "__main__":
    main()
