"""Run a Python snippet in a fresh interpreter (for tests that hide physkern._C)."""
import os
import subprocess
import sys


def assert_snippet_prints_ok(code: str, timeout: int = 300) -> None:
    """Run `code` with `python -c` (TRITON_INTERPRET=1); it must exit 0 and print 'ok' last."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         timeout=timeout)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-3000:]
