"""The CPU kernels' library where its cache directory cannot be used: it is built in this
user's own temporary directory instead. Runs in a fresh interpreter."""

import os
import subprocess
import sys
import textwrap

import pytest

from seqkv.engine import cpu_kernels

pytestmark = pytest.mark.skipif(not cpu_kernels.available(), reason="no CPU kernels here")


def _run(code: str, **env: str) -> str:
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                          text=True, timeout=120, env={**os.environ, **env})
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_an_unusable_cache_directory_falls_back_to_a_private_one(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    out = _run("""
        from seqkv.engine import cpu_kernels as ck
        print(ck.available())
    """, SEQKV_CACHE=str(blocker))
    assert out.strip() == "True"
