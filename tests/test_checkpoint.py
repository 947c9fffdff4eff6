"""Checkpoints: state round trips through ``torch.load(weights_only=True)``, and a training run that is
interrupted at any step (or killed with SIGKILL) and resumed ends with the same weights, bit for bit.

Run as a script, this file is the training worker that the SIGKILL test starts and kills.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from dif_attention import (AttributeEmbedding, AttributePredictor, ConcatFusion, DecoupledEncoder, GateFusion,
                           aap_loss, padding_mask, total_loss)

NUM_ITEMS, NUM_CATS, N, DIM = 24, 7, 6, 16
STEPS = 6


class TinyDIF(nn.Module):
    """Item/position tables, attribute tables, a 2-layer decoupled encoder with dropout, AAP head."""

    def __init__(self, fusion="gate"):
        super().__init__()
        table = torch.arange(NUM_ITEMS)[:, None] % (NUM_CATS - 1) + 1  # item -> one category token
        self.items = nn.Embedding(NUM_ITEMS, DIM, padding_idx=0)
        self.pos = nn.Embedding(N, DIM)
        self.attrs = AttributeEmbedding({"cat": NUM_CATS}, 8, item_tables={"cat": table})
        self.encoder = DecoupledEncoder(2, DIM, 2, attr_dims={"cat": 8}, fusion=fusion, hidden_dropout=0.2,
                                        attn_dropout=0.2)
        self.predictor = AttributePredictor(DIM, {"cat": NUM_CATS})

    def forward(self, ids):
        h = self.encoder(self.items(ids), attrs=self.attrs(items=ids), pos=self.pos.weight[: ids.shape[1]],
                         mask=padding_mask(ids), is_causal=True)
        return h  # (b, n, dim)


def batch(step: int):
    """The data of a step depends on the step only (a resumed run sees the same batches)."""
    g = torch.Generator().manual_seed(10_000 + step)
    ids = torch.randint(1, NUM_ITEMS, (4, N + 1), generator=g)
    ids[0, :2] = 0  # left padding
    return ids[:, :-1], ids[:, 1:]


def train_step(model, opt, step):
    inputs, targets = batch(step)
    h = model(inputs)
    item_loss = nn.functional.cross_entropy((h @ model.items.weight.T).flatten(0, 1), targets.flatten())
    cats = model.attrs.lookup(targets)
    aux = aap_loss(model.predictor(h), cats, valid=targets != 0)
    loss = total_loss(item_loss, aux, lamb=0.5)
    opt.zero_grad()
    loss.backward()
    opt.step()


def fresh(seed=0, fusion="gate"):
    torch.manual_seed(seed)
    model = TinyDIF(fusion).train()
    return model, torch.optim.AdamW(model.parameters(), lr=1e-2)


def save(path: Path, model, opt, step):
    state = {"model": model.state_dict(), "optim": opt.state_dict(), "rng": torch.get_rng_state(), "step": step}
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)  # atomic: a kill during the save leaves the previous checkpoint intact


def train(path: Path, steps=STEPS, stop_at=None, kill_at=None):
    """Train to ``steps``, checkpointing after every step; resume from ``path`` if it exists."""
    model, opt = fresh()
    start = 0
    if path.exists():
        ck = torch.load(path, weights_only=True)
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optim"])
        torch.set_rng_state(ck["rng"])
        start = ck["step"]
    for step in range(start, steps):
        if step == stop_at:
            return None
        if step == kill_at:  # die mid-step: forward and backward done, update and checkpoint not
            inputs, _ = batch(step)
            model(inputs).sum().backward()
            os.kill(os.getpid(), signal.SIGKILL)
        train_step(model, opt, step)
        save(path, model, opt, step + 1)
    return model


def weights(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_identical(a, b):
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=0, rtol=0, msg=lambda s: f"{k}: {s}")


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the worker subprocess uses one thread too: same reduction order
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("fusion", ["add", "concat", "gate", "concat-L", "gate-L"])
def test_state_round_trip_weights_only(tmp_path, fusion):
    def make(seed):
        f = {"concat-L": ConcatFusion(max_len=N), "gate-L": GateFusion(max_len=N)}.get(fusion, fusion)
        return fresh(seed, f)

    model, opt = make(0)
    train_step(model, opt, 0)  # optimizer state exists
    torch.save({"model": model.state_dict(), "optim": opt.state_dict()}, tmp_path / "ck.pt")
    ck = torch.load(tmp_path / "ck.pt", weights_only=True)
    clone, clone_opt = make(1)  # different init: the load must overwrite every parameter
    clone.load_state_dict(ck["model"])  # strict: no missing or unexpected key
    clone_opt.load_state_dict(ck["optim"])
    assert_identical(weights(clone), weights(model))
    model.eval(), clone.eval()
    ids, _ = batch(1)
    torch.testing.assert_close(clone(ids), model(ids), atol=0, rtol=0)
    assert any(k.startswith("encoder.layers.0.attn.fusion") for k in ck["model"]) == (fusion != "add")


@pytest.mark.parametrize("stop_at", range(STEPS))
def test_interrupted_training_resumes_to_the_same_weights(tmp_path, one_thread, stop_at):
    reference = weights(train(tmp_path / "straight.pt"))
    path = tmp_path / "resumed.pt"
    assert train(path, stop_at=stop_at) is None
    assert_identical(weights(train(path)), reference)


def test_killed_training_resumes_to_the_same_weights(tmp_path, one_thread):
    path = tmp_path / "killed.pt"
    proc = subprocess.run([sys.executable, __file__, str(path), "3"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert torch.load(path, weights_only=True)["step"] == 3  # the last completed step
    resumed = weights(train(path))
    assert_identical(resumed, weights(train(tmp_path / "straight.pt")))


if __name__ == "__main__":  # worker for the SIGKILL test: python test_checkpoint.py CKPT KILL_AT
    torch.set_num_threads(1)
    train(Path(sys.argv[1]), kill_at=int(sys.argv[2]))
