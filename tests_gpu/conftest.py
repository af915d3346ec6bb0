import pytest

from moe_core.checkpoint import random_weights, write_checkpoint
from moe_core.config import preset


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """The `tiny` preset's checkpoint (seed 0)."""
    d = tmp_path_factory.mktemp("tiny")
    cfg = preset("tiny")
    write_checkpoint(d, cfg, random_weights(cfg, seed=0))
    return d
