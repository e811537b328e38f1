"""Cold versus cached load time of the offline default model, measured as a ratio in one run.

The cold load parses and dequantises the GGUF and converts it (what a first `make demo` does); the
cached load reads the converted state dict from an atomic cache entry. Each is timed in a fresh
Python process (imports included), against a temporary cache folder so the user's cache is untouched.

    .venv/bin/python benchmarks/load.py
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time

LOAD = "from lens_squash.edge.models import load_model; load_model()"


def timed_load(cache: str) -> float:
    env = {**os.environ, "LENS_SQUASH_CACHE": cache}
    started = time.perf_counter()
    subprocess.run([sys.executable, "-W", "ignore", "-c", LOAD], env=env, check=True, capture_output=True)
    return time.perf_counter() - started


def main() -> None:
    with tempfile.TemporaryDirectory() as cache:
        cold = timed_load(cache)
        cached = min(timed_load(cache) for _ in range(2))
    print("| load | seconds |\n|---|---|")
    print(f"| cold (GGUF → HookedTransformer, cache written) | {cold:.1f} |")
    print(f"| cached (best of 2) | {cached:.1f} |")
    print(f"| ratio cold / cached | {cold / cached:.1f}× |")


if __name__ == "__main__":
    main()
