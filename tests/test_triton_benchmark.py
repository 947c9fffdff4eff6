"""benchmarks/kernels.py runs on CPU from a fresh checkout (tiny shapes) and writes its outputs."""
import json
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before dif_attention.ops decorates its kernels

import kernels  # noqa: E402


def test_kernel_benchmark_runs_on_cpu(tmp_path):
    """Without --interpret the Triton rows are skipped on CPU, with a reason."""
    result = kernels.main(["--device", "cpu", "--shapes", "4,2,8", "--batch-div", "1", "--fusions", "add", "gate",
                           "--modes", "fwd", "fwd+bwd", "--providers", "eager", "sdpa", "triton", "--repeats", "1",
                           "--warmup", "0", "--threads", "1", "--out", str(tmp_path)])
    rows = result["rows"]
    assert len(rows) == 2 * 2 * 3
    timed = [r for r in rows if "ms" in r]
    assert {r["provider"] for r in timed} == {"eager", "sdpa"}
    assert all(r["ms"] > 0 and r["gbs"] > 0 and r["tflops"] > 0 for r in timed)
    assert all("skipped" in r for r in rows if r["provider"] == "triton")  # CPU: tests-only interpreter
    assert all(r["maxdiff"] < 1e-5 for r in timed if r["mode"] == "fwd")
    saved = json.loads((tmp_path / "kernels.json").read_text())
    assert saved["rows"] == json.loads(json.dumps(rows))
    assert (tmp_path / "kernels.csv").read_text().count("\n") == len(rows) + 1
    assert (tmp_path / "kernels.png").stat().st_size > 1000


@pytest.mark.skipif(torch.cuda.is_available(), reason="the interpreter run is the CPU stand-in for the GPU run")
def test_kernel_benchmark_triton_provider_in_the_interpreter(tmp_path):
    """--interpret runs the Triton provider on CPU: it must agree with eager on every valid row."""
    pytest.importorskip("triton")
    result = kernels.main(["--device", "cpu", "--shapes", "2,2,6", "--batch-div", "1", "--fusions", "add", "gate",
                           "--modes", "fwd", "--providers", "eager", "triton", "--repeats", "1", "--warmup", "0",
                           "--threads", "1", "--interpret", "--out", str(tmp_path)])
    tri = [r for r in result["rows"] if r["provider"] == "triton"]
    assert len(tri) == 2 and all("ms" in r and r["maxdiff"] < 1e-5 for r in tri), tri


def test_traffic_model_counts_bytes_of_the_fused_op():
    nbytes, flops = kernels.model_bytes_flops(2, 2, 10, kernels.torch.float32, "fwd")
    ws, ev = kernels.widths(2)  # item/position 128, attribute 32, value 128 per head
    e = ws[0] + ws[2]
    want = 2 * 2 * 10 * (2 * e + 2 * ev) * 4 + 2 * 2 * 10 * 4 + 2 * 10 * 10 * 4
    assert nbytes == want
    assert flops == 2 * 2 * 2 * 10 * 10 * (sum(ws) + ev)
    nb2, fl2 = kernels.model_bytes_flops(2, 2, 10, kernels.torch.float32, "fwd+bwd")
    assert nb2 > 2 * nbytes and fl2 > 3 * flops
