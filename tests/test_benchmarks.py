"""The benchmark scripts run end to end on CPU (memory part only; speed needs a GPU)."""
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_attention_benchmark_cpu_memory(tmp_path):
    out = tmp_path / "bench.json"
    subprocess.run([sys.executable, "benchmarks/attention.py", "--seqs=1024,2048", f"--out={out}"],
                   cwd=ROOT, check=True, capture_output=True, timeout=600)
    rows = json.loads(out.read_text())["rows"]
    assert {r["impl"] for r in rows} == {"naive", "chunked", "lightning_xla"}
    assert not [r for r in rows if "error" in r]
    temp = {(r["impl"], r["T"]): r["temp_bytes"]["fwd"] for r in rows}
    # naive attention's scores grow 4x when T doubles; the chunked path's temp does not
    assert temp["naive", 2048] >= 3.5 * temp["naive", 1024]
    assert temp["chunked", 2048] < 1.5 * temp["chunked", 1024]
