"""adamx's build backend: setuptools' own, run against the torch of the environment that
adamx is being installed into, also when pip builds in an isolated environment.

Why it exists: adamx is a C++ extension and must be compiled against the torch it will
run beside (torch promises no C++ ABI across versions). pip's default isolated build
runs this backend with the environment's own interpreter but hides that environment's
site-packages (where the user's torch is) from `sys.path`, so setup.py could not import
torch and plain `pip install .` failed. Listing torch in `build-system.requires` is
worse: pip would download a second torch (5.5 GB for the CUDA build) into the isolated
environment and the module built against it need not load beside the user's. So, when
the isolated environment has no torch, this backend asks the same interpreter, with
pip's isolation undone (no PYTHONPATH, user site allowed), where it would import torch
from, and appends that interpreter's `sys.path` entries to its own: the isolated
environment's packages (setuptools, wheel, ninja) still come first, and the build sees
exactly the torch that `--no-build-isolation` would. Front ends that build in a venv of
their own (`python -m build`, uv) get nothing from this (their interpreter has no torch)
and setup.py's message says what to do instead.

Why a file of its own, outside the package: pyproject.toml's `backend-path` puts this
directory (and nothing else of the source tree) on the backend's `sys.path`; it holds no
build logic (that stays in setup.py), so setup.py still works on its own
(`python setup.py build_ext --inplace`), and `adamx/` ships nothing of the build.
"""

import importlib.util
import json
import os
import subprocess
import sys

# The interpreter's import path as it is outside pip's build environment, and where it
# finds torch there. `python -c` puts '' (the working directory) first: not wanted.
_PROBE = r"""
import importlib.util, json, sys
spec = importlib.util.find_spec("torch")
print(json.dumps({"torch": spec.origin if spec else None, "path": sys.path[1:]}))
"""


def _log(msg):
    print(f"adamx build: {msg}", file=sys.stderr, flush=True)


def _environment_torch_path():
    """(where torch's __init__.py is, the sys.path entries) of this interpreter outside
    pip's isolation; (None, []) when it has no torch either or the probe fails."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONNOUSERSITE")}
    try:
        out = subprocess.run([sys.executable, "-c", _PROBE], env=env, capture_output=True,
                             text=True, timeout=120, check=True).stdout
        found = json.loads(out.strip().splitlines()[-1])
    except (OSError, subprocess.SubprocessError, ValueError, IndexError) as exc:
        _log(f"could not ask {sys.executable} where its torch is: {exc}")
        return None, []
    return found["torch"], found["path"]


def _use_environment_torch():
    if importlib.util.find_spec("torch") is not None:
        return  # --no-build-isolation, or a build environment that has torch: use it
    origin, path = _environment_torch_path()
    if origin is None:
        return  # setup.py says what to do
    added = [p for p in path if p not in sys.path]
    sys.path.extend(added)
    importlib.invalidate_caches()
    _log(f"the isolated build environment has no torch; building against this "
         f"environment's torch ({os.path.dirname(origin)}), as --no-build-isolation would")


_use_environment_torch()

from setuptools.build_meta import *  # noqa: E402,F401,F403  (the hooks pip calls)
