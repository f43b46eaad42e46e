"""adamx beside a torch other than the one it was built for (the user upgraded torch after
building): the compiled module is not loaded at all (it could fail with undefined symbols,
or crash), `import adamx` works, build_info() shows both versions and using a kernel says
to rebuild, with the command.

No second torch is needed: each test copies the adamx package that this interpreter
imports (installed, or an in-place build) into a temporary directory, edits the build
record there (_C_build.json, written beside adamx._C by setup.py), and imports that copy
in a subprocess. These tests run whether or not adamx._C is built.
"""

import json
import os
import shutil
import subprocess
import sys
import textwrap

import torch

import adamx
from adamx import _ops

FAKE_TORCH = "0.0.1+built.elsewhere"


def copy_package(tmp_path, record):
    """A copy of the imported adamx package under tmp_path, with `record` as its build
    record (None: no record, as a build from before the record existed)."""
    src = os.path.dirname(os.path.abspath(adamx.__file__))
    dst = tmp_path / "adamx"
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__"))
    path = dst / _ops.BUILD_RECORD
    if record is None:
        if path.exists():
            path.unlink()
    else:
        path.write_text(json.dumps(record))
    return tmp_path


def run_copy(root, code):
    env = dict(os.environ)
    env["PYTHONPATH"] = str(root)
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                         text=True, env=env, timeout=180, cwd=str(root))
    assert out.returncode == 0, out.stdout + out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_build_records_the_torch_it_was_built_for():
    """A build (this one) records its torch, and it is the torch here, or nothing loads."""
    info = adamx.build_info()
    if adamx.is_compiled():
        assert info["built_for_torch"] == torch.__version__, info
    assert info["torch"] == torch.__version__


def test_other_torch_is_refused_without_loading_the_module(tmp_path):
    root = copy_package(tmp_path, {"torch": FAKE_TORCH, "torch_cuda": None})
    got = run_copy(root, """
        import json, sys
        import torch
        import adamx
        out = {"file": adamx.__file__, "C_loaded": "adamx._C" in sys.modules,
               "compiled": adamx.is_compiled(), "info": adamx.build_info()}
        p = torch.zeros(3)
        p.grad = torch.ones(3)
        opt = adamx.Adam([p], lr=0.1)
        try:
            opt.step()
        except RuntimeError as e:
            out["step_error"] = str(e)
        out["untouched"] = bool(torch.equal(p, torch.zeros(3))) and not opt.state
        try:
            adamx.cpu_capability()
        except RuntimeError as e:
            out["other_error"] = str(e)
        print(json.dumps(out))
    """)
    assert got["file"].startswith(str(root)), got["file"]
    assert got["C_loaded"] is False and got["compiled"] is False
    info = got["info"]
    assert info["torch"] == torch.__version__ and info["built_for_torch"] == FAKE_TORCH
    assert info["compiled"] is False
    for msg in (got.get("step_error"), got.get("other_error"), info.get("not_loaded")):
        assert msg, got
        assert f"built for torch {FAKE_TORCH}" in msg, msg
        assert f"torch {torch.__version__} is installed" in msg, msg
        assert "`pip install .` in the adamx source tree" in msg, msg
    assert got["untouched"]


def test_no_record_behaves_as_before(tmp_path):
    """A build without a record (older adamx): the module loads as it always did."""
    root = copy_package(tmp_path, None)
    got = run_copy(root, """
        import json
        import adamx
        print(json.dumps({"file": adamx.__file__, "info": adamx.build_info()}))
    """)
    assert got["file"].startswith(str(root)), got["file"]
    assert got["info"]["built_for_torch"] is None
    assert got["info"]["compiled"] == adamx.is_compiled()


def test_matching_record_loads(tmp_path):
    root = copy_package(tmp_path, {"torch": torch.__version__})
    got = run_copy(root, """
        import json
        import adamx
        print(json.dumps({"file": adamx.__file__, "info": adamx.build_info()}))
    """)
    assert got["file"].startswith(str(root)), got["file"]
    assert got["info"]["built_for_torch"] == torch.__version__
    assert got["info"]["compiled"] == adamx.is_compiled()
