import pytest
import torch
from support import triton_interpreter  # noqa: F401  (sets TRITON_INTERPRET without a GPU before triton is imported)
from support.models import SMALL

from blackmamba import BlackMambaConfig

torch.set_num_threads(2)


@pytest.fixture
def small_cfg() -> BlackMambaConfig:
    return BlackMambaConfig(**SMALL)
