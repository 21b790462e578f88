"""benchmarks/gpu_suite.sh, the GPU readiness run, in its CPU smoke mode: the same scripts and code paths
on the shapes-sized model, so the suite is known to run before a GPU is lent."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_gpu_suite_runs_end_to_end_in_cpu_smoke_mode(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable, "GPU_SUITE_MODEL": "shapes", "GPU_SUITE_DEVICE": "cpu",
           "GPU_SUITE_DTYPE": "float32", "GPU_SUITE_BATCH": "2", "GPU_SUITE_TRAIN_BATCH": "2", "GPU_SUITE_STEPS": "1",
           "GPU_SUITE_REPEATS": "1", "OUT": str(tmp_path)}
    run = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_suite.sh")], env=env, cwd=REPO,
                         capture_output=True, text=True, timeout=580)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    text = (tmp_path / "gpu_suite.txt").read_text()
    assert text == run.stdout and text.rstrip().endswith("# gpu_suite done")
    lines = text.splitlines()
    gen = next(line for line in lines if line.startswith("shapes") and " generate " in line)
    assert "images/s, roofline" in gen and "x" in gen.split()[5]  # a speed-up ratio and the roofline share
    assert any(line.startswith("shapes") and " judge " in line for line in lines)
    for variant in ("sft", "sft_guided", "dpo_precomp", "dpo_resident"):
        row = next(line.split() for line in lines if line.split()[:1] == [variant])
        assert float(row[1]) > 0  # tokens/s measured
