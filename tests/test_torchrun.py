"""torchrun with 2 CPU processes (gloo) gives the same losses and metrics as one process on the same
global batches: the DDP path splits each global batch, scales the loss, and shards evaluation.
Plain SGD, so that a wrong gradient scale changes the later losses (Adam would hide it)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch.distributed as dist

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = """
import json, sys
sys.path.insert(0, {examples!r}); sys.path.insert(0, {tests!r})
import torch
torch.set_num_threads(1)
import torch.distributed as dist
from example_helpers import synthetic
from train import TrainConfig, run
ds = synthetic()
out = {{}}
for name in ("DIFSASRec", "BERT4Rec"):
    cfg = TrainConfig(batch_size=32, epochs=3, lr=0.5, optimizer="sgd", lamb=1.0, save=False, progress=False,
                      log=False)
    model = dict(dim=16, heads=2, layers=1, attr_dim=8, max_len=12, hidden_dropout=0.0, attn_dropout=0.0)
    r = run(ds, name, cfg, model)
    out[name] = {{"loss": [h["loss"] for h in r["history"]], "test": r["test"], "world": r["world_size"]}}
if not dist.is_initialized() or dist.get_rank() == 0:
    open(sys.argv[1], "w").write(json.dumps(out))
if dist.is_initialized():
    dist.destroy_process_group()
"""


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed not available")
def test_two_processes_match_one(tmp_path):
    script = tmp_path / "ddp_run.py"
    script.write_text(SCRIPT.format(examples=str(ROOT / "examples"), tests=str(ROOT / "tests")))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("WORLD_SIZE", None)
    subprocess.run([sys.executable, str(script), str(tmp_path / "one.json")], check=True, env=env, timeout=300)
    # The launch itself (rendezvous on a free local port) failed once in ~15 full-suite runs without a visible
    # cause; relaunch once on a crash, and show both attempts' output if it fails twice. A wrong result is
    # never retried: the comparisons below run on the outputs.
    errors = []
    for _ in range(2):
        proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                               str(script), str(tmp_path / "two.json")], env=env, timeout=300, capture_output=True,
                              text=True)
        if proc.returncode == 0:
            break
        errors.append(f"exit {proc.returncode}:\n{proc.stdout[-2000:]}\n{proc.stderr[-5000:]}")
    assert proc.returncode == 0, "torchrun failed twice:\n" + "\n----\n".join(errors)
    one = json.loads((tmp_path / "one.json").read_text())
    two = json.loads((tmp_path / "two.json").read_text())
    for name in one:
        assert one[name]["world"] == 1 and two[name]["world"] == 2
        assert one[name]["loss"] == pytest.approx(two[name]["loss"], rel=1e-4), name
        for k, v in one[name]["test"].items():
            assert two[name]["test"][k] == pytest.approx(v, abs=1e-6), (name, k)
