"""CLI flag handling: a bad --dtype is a flag error that lists the choices (for every
command: the flag is shared), and generate checks its flags before it prints the prompt."""
import os
import subprocess
import sys

import pytest
from absl import flags

import memlab.__main__ as cli
from memlab.__main__ import DTYPES, main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FLAGS = flags.FLAGS


@pytest.fixture
def parse():
    def _parse(*args):
        FLAGS.unparse_flags()
        FLAGS(["memlab", *args])
    yield _parse
    FLAGS.unparse_flags()


@pytest.fixture
def real(monkeypatch, smollm2):
    """generate on the real SmolLM2 (it has a tokenizer), loaded once per session."""
    monkeypatch.setattr(cli, "_load", lambda name, dtype: smollm2)


@pytest.mark.parametrize("bad", ["float13", "int8", "fp32"])
def test_bad_dtype_is_a_flag_error_listing_the_choices(parse, bad):
    with pytest.raises(flags.IllegalFlagValueError) as e:
        parse(f"--dtype={bad}")
    assert all(d in str(e.value) for d in DTYPES), str(e.value)


def test_bad_dtype_on_the_command_line_is_one_line_not_a_traceback():
    r = subprocess.run([sys.executable, "-m", "memlab", "profile", "--dtype=float13"], cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode != 0
    assert "Traceback" not in r.stderr and "--dtype" in r.stderr, r.stderr[-2000:]
    assert all(d in r.stderr for d in DTYPES), r.stderr[-2000:]


@pytest.mark.parametrize("dtype", DTYPES)
def test_every_listed_dtype_runs(parse, capsys, dtype):
    parse("--model=tiny", "--task=prefill", "--seq=8", f"--dtype={dtype}")
    assert main(["memlab", "profile"]) == 0, capsys.readouterr().err
    assert "params" in capsys.readouterr().out


@pytest.mark.parametrize("args, message", [
    (["--max_new_tokens=0"], "max_new_tokens must be >= 1"),
    (["--top_p=0"], "top_p must be in (0, 1]"),
    (["--kv=kivi:group_size=48,residual=48"], "does not divide head_dim=64"),   # at the cache
    (["--kv=nope"], "unknown kv policy"),
])
@pytest.mark.slow
def test_generate_checks_its_flags_before_printing_the_prompt(parse, real, capsys, args, message):
    parse("--model=smollm2-135m", "--prompt=Zanzibar", *args)
    assert main(["memlab", "generate"]) == 2
    out, err = capsys.readouterr()
    assert "Zanzibar" not in out, out
    assert err.startswith("memlab generate: error: ") and message in err, err


@pytest.mark.slow
def test_generate_with_kivi_on_a_cache_shorter_than_its_residual(parse, real, capsys):
    # the prompt + 3 tokens is far below KIVI's 128 float slots and one group of 32: every
    # token stays float, so the text is the dense cache's
    outs = []
    for kv in ("--kv=kivi2", "--kv=dense"):
        parse("--model=smollm2-135m", "--prompt=The capital of France is", kv,
              "--max_new_tokens=3")
        assert main(["memlab", "generate"]) == 0, capsys.readouterr().err
        outs.append(capsys.readouterr().out)
    assert outs[0] == outs[1], outs
    assert outs[0].startswith("The capital of France is") and len(outs[0]) > 30, outs
