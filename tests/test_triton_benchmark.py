"""benchmarks/kernels.py runs on CPU from a fresh checkout (tiny shapes) and writes its outputs."""
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import kernels  # noqa: E402


def test_kernel_benchmark_runs_on_cpu(tmp_path):
    result = kernels.main(["--device", "cpu", "--shapes", "4,2,8", "--batch-div", "1", "--fusions", "add", "gate",
                           "--modes", "fwd", "fwd+bwd", "--providers", "eager", "sdpa", "triton", "--repeats", "1",
                           "--warmup", "0", "--threads", "1", "--out", str(tmp_path)])
    rows = result["rows"]
    assert len(rows) == 2 * 2 * 3
    timed = [r for r in rows if "ms" in r]
    assert {r["provider"] for r in timed} == {"eager", "sdpa"}
    assert all(r["ms"] > 0 and r["gbs"] > 0 and r["tflops"] > 0 for r in timed)
    assert all("skipped" in r for r in rows if r["provider"] == "triton")  # CPU: tests-only interpreter
    saved = json.loads((tmp_path / "kernels.json").read_text())
    assert saved["rows"] == json.loads(json.dumps(rows))
    assert (tmp_path / "kernels.csv").read_text().count("\n") == len(rows) + 1
    assert (tmp_path / "kernels.png").stat().st_size > 1000


def test_traffic_model_counts_bytes_of_the_fused_op():
    nbytes, flops = kernels.model_bytes_flops(2, 2, 10, kernels.torch.float32, "fwd")
    ws, ev = kernels.widths(2)  # item/position 128, attribute 32, value 128 per head
    e = ws[0] + ws[2]
    want = 2 * 2 * 10 * (2 * e + 2 * ev) * 4 + 2 * 2 * 10 * 4 + 2 * 10 * 10 * 4
    assert nbytes == want
    assert flops == 2 * 2 * 2 * 10 * 10 * (sum(ws) + ev)
    nb2, fl2 = kernels.model_bytes_flops(2, 2, 10, kernels.torch.float32, "fwd+bwd")
    assert nb2 > 2 * nbytes and fl2 > 3 * flops
