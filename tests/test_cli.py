"""The absl CLI: tables, JSON, and one clear line for user mistakes."""
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(*args):
    return subprocess.run([sys.executable, "-m", "memlab", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=600)


def test_profile_cli_prints_table_and_writes_json(tmp_path):
    out = tmp_path / "p.json"
    r = _run("profile", "--model=tiny", "--task=train", "--batch=2", "--seq=16", f"--json={out}")
    assert r.returncode == 0, r.stderr
    assert "optimizer_state" in r.stdout and "temp" in r.stdout
    res = json.loads(out.read_text())
    prof = res["profile"]
    # profile --task=train compiles the step train runs: adamw under the trainer's
    # learning-rate schedule, whose optax scale_by_schedule keeps one more int32 step count
    assert prof["by_category"]["optimizer_state"] == prof["analytic"]["optimizer_state"] + 4
    assert prof["peak_bytes"] == (prof["argument_bytes"] + prof["output_bytes"]
                                  - prof["alias_bytes"] + prof["temp_bytes"])
    assert res["environment"]["device"]


def test_cli_user_errors_are_one_clear_line():
    r = _run("profile", "--model=gpt-5")
    assert r.returncode == 2
    assert "unknown model 'gpt-5'" in r.stderr and "Traceback" not in r.stderr
    r = _run("profile", "--model=tiny", "--batch=0")
    assert r.returncode == 2 and "batch must be a positive int" in r.stderr
    r = _run("frobnicate")
    assert r.returncode != 0 and "usage: python -m memlab" in r.stderr
