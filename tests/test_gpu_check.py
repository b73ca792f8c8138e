"""bench/gpu_check.sh --smoke: the GPU check's whole path (bf16 where there is a GPU, checkpointing, packing,
on-policy sampling, then the activation-memory sweep) on a tiny pair on the CPU, ending in its tables."""

from __future__ import annotations

import os
import subprocess

from tests.conftest import REPO_ROOT


def test_gpu_check_smoke_runs_and_prints_its_tables():
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        ["bash", "bench/gpu_check.sh", "--smoke"], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    assert "random weights of the real shapes (timings and memory are the same" in out
    assert "gradient checkpointing, packing, on-policy 0.25" in out
    table = out.splitlines()[
        out.splitlines().index(next(line for line in out.splitlines() if line.startswith("| step s"))) + 1
    ]
    step, tokens_per_s = (float(cell.replace(",", "")) for cell in table.strip("| ").split(" | ")[:2])
    assert step > 0 and tokens_per_s > 0
    assert "activation memory (cpu)" in out and "\n     64 " in out
