"""Every .cu file compiles for sm_80 and sm_90 with -Xptxas -v, with no register spills and no warnings.
Runs wherever nvcc exists (CI has it), GPU or not."""
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCES = sorted((ROOT / "csrc" / "cuda").glob("*.cu"))
NVCC = shutil.which("nvcc")


@pytest.mark.skipif(NVCC is None, reason="nvcc not found")
@pytest.mark.parametrize("source", SOURCES, ids=[s.name for s in SOURCES])
def test_cuda_source_compiles_without_spills(source, tmp_path):
    cmd = [NVCC, "-std=c++17", "-O3", "-fmad=false", "-Xptxas", "-v", "-I", str(ROOT / "csrc" / "include"),
           "-I", str(ROOT / "csrc"), "-gencode", "arch=compute_80,code=sm_80",
           "-gencode", "arch=compute_90,code=sm_90", "-c", str(source), "-o", str(tmp_path / "out.o")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log
    spills = [int(n) for n in re.findall(r"(\d+) bytes spill (?:stores|loads)", log)]
    assert spills, f"ptxas printed no resource usage:\n{log}"
    assert max(spills) == 0, f"register spills in {source.name}:\n{log}"
    warnings = [line for line in log.splitlines() if "warning" in line.lower()]
    assert not warnings, "\n".join(warnings)
