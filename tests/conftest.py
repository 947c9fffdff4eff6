import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

# Triton's CPU interpreter must be chosen before anything imports triton (collecting the torch.compile
# tests already does): without a GPU the fused-kernel tests (tests/test_triton_*.py) run in it.
if "TRITON_INTERPRET" not in os.environ:
    import torch

    if not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"
