"""The built wheel holds every package and data file, and imports without the checkout."""
import os
import subprocess
import sys
import zipfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_built_wheel_imports_every_package_outside_the_checkout(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps",
                    "-q", "-w", str(tmp_path), ROOT], check=True, capture_output=True,
                   timeout=600)
    wheel = next(p for p in os.listdir(tmp_path) if p.endswith(".whl"))
    site = tmp_path / "site"
    with zipfile.ZipFile(tmp_path / wheel) as z:
        names = set(z.namelist())
        z.extractall(site)
    # every package directory of the source tree is in the wheel
    packages = sorted(os.path.relpath(d, ROOT).replace(os.sep, ".")
                      for d, _, files in os.walk(os.path.join(ROOT, "memlab"))
                      if "__init__.py" in files)
    assert {"memlab", "memlab.kv", "memlab.quant.methods"} <= set(packages), packages
    for pkg in packages:
        assert pkg.replace(".", "/") + "/__init__.py" in names, pkg
    # every source file, under its installed name: a module in a directory that
    # lacks __init__.py (so package discovery skips it) is caught here
    for src, dst in (("memlab", "memlab"), ("kernels", "memlab_kernels")):
        for d, _, files in os.walk(os.path.join(ROOT, src)):
            rel = os.path.relpath(d, os.path.join(ROOT, src))
            for f in files:
                if f.endswith(".py"):
                    want = os.path.normpath(os.path.join(dst, rel, f)).replace(os.sep, "/")
                    assert want in names, f"{want} is missing from the wheel"
    assert "memlab_kernels/flash_attention.py" in names
    assert {"memlab/targets/specs/h100.txtpb", "memlab/targets/specs/a100.txtpb",
            "memlab/targets/specs/h200.txtpb"} <= names
    # imported from the unpacked wheel, in a fresh process started away from the checkout
    code = ("import sys, importlib; sys.path.insert(0, sys.argv[1]); import memlab as ml; "
            "assert ml.__file__.startswith(sys.argv[1]), ml.__file__; "
            "[importlib.import_module(p) for p in sys.argv[2:]]; "
            "t = ml.targets.get('h100'); assert t.sm_count == 132, t; "
            "import memlab_kernels.flash_attention; print('ok')")
    out = subprocess.run([sys.executable, "-c", code, str(site), *packages], cwd=str(tmp_path),
                         capture_output=True, text=True, timeout=300,
                         env=dict(os.environ, PYTHONPATH=""))
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-2000:]
