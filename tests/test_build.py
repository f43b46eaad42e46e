"""The build: what was compiled and how it was linked; the torch it was built for, and
what adamx does beside another torch (the user upgraded torch after building) or without
its compiled module at all.

Beside another torch the compiled module is not loaded (it could fail with undefined
symbols, or crash): `import adamx` works, build_info() shows both versions and using a
kernel says to rebuild, with the command. No second torch is needed to test it: each such
test copies the adamx package that this interpreter imports (installed, or an in-place
build) into a temporary directory, edits the build record there (_C_build.json, written
beside adamx._C by setup.py), and imports that copy in a subprocess. Those tests, and the
missing-module ones, run whether or not adamx._C is built.
"""

import importlib.util
import json
import re
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import adamx
from adamx import _ops
from conftest import needs_build


# --------------------------------------------------------------------------------------
# What was built
# --------------------------------------------------------------------------------------
@needs_build
def test_module_links_the_shared_libstdcxx():
    """A compiled module carrying its own static libstdc++ crashes the process on the
    first error message that formats a number (two libstdc++ copies, one locale state
    each; seen on a GPU machine whose g++ linked it statically). setup.py refuses to
    finish such a build; this checks the module under test with setup.py's own scan."""
    spec = importlib.util.spec_from_file_location(
        "adamx_setup", Path(__file__).resolve().parents[1] / "setup.py")
    setup_py = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(setup_py)
    import adamx._C as ext
    own = setup_py.static_libstdcxx_symbols(ext.__file__)
    if own is None:
        pytest.skip("no nm (binutils) to read the module's symbol table")
    assert not own, f"{ext.__file__} defines libstdc++'s own symbols, e.g. {own[0]}"


@needs_build
def test_build_info_reports_cuda_kernels():
    info = adamx.build_info()
    assert isinstance(info["cuda"], bool)
    if os.environ.get("ADAMX_EXPECT_CUDA_BUILD") == "1":
        assert info["cuda"], "adamx was expected to be built with its CUDA kernels"
    if info["cuda"]:
        import torch
        dump = torch._C._dispatch_dump("adamx::adam_")
        assert "CUDA: registered at" in dump and "adam_cuda.cpp" in dump, dump


# --------------------------------------------------------------------------------------
# Beside another torch
# --------------------------------------------------------------------------------------
FAKE_TORCH = "0.0.1+built.elsewhere"

# Part of the subprocess scripts below: one step of an adamx.Adam on a fresh param; leaves
# `step_error` (its RuntimeError's message, or None) and `untouched` (param and state as
# before the step).
TRY_A_STEP = """
p = torch.zeros(3)
p.grad = torch.ones(3)
opt = adamx.Adam([p], lr=0.1)
try:
    opt.step()
    step_error = None
except RuntimeError as e:
    step_error = str(e)
untouched = bool(torch.equal(p, torch.zeros(3))) and not opt.state
"""


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
    got = run_copy(root, textwrap.dedent("""
        import json, sys
        import torch
        import adamx
        out = {"file": adamx.__file__, "C_loaded": "adamx._C" in sys.modules,
               "compiled": adamx.is_compiled(), "info": adamx.build_info()}
        """) + TRY_A_STEP + textwrap.dedent("""
        out.update(step_error=step_error, untouched=untouched)
        try:
            adamx.cpu_capability()
        except RuntimeError as e:
            out["other_error"] = str(e)
        print(json.dumps(out))
    """))
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


# --------------------------------------------------------------------------------------
# Without the compiled module
# --------------------------------------------------------------------------------------
BUILD_WORDS = r"(?s)(build_ext|pip install).*"


def test_missing_module_in_a_fresh_interpreter():
    """Block adamx._C from importing (as if it had never been built) in a subprocess."""
    code = textwrap.dedent("""
        import sys
        sys.modules["adamx._C"] = None  # makes `from . import _C` raise ImportError
        import torch
        import adamx
        assert adamx.is_compiled() is False
        """) + TRY_A_STEP + textwrap.dedent("""
        assert step_error is not None, "step did not raise"
        print("STEP-ERROR:", step_error.replace("\\n", " "))
        assert untouched
        for call in (lambda: adamx.functional.adam([p], [p.grad], [p.clone()], [p.clone()],
                                                   [], [torch.tensor(0.)], lr=0.1, beta1=0.9,
                                                   beta2=0.999, weight_decay=0, eps=1e-8),
                     adamx.cpu_capability):
            try:
                call()
            except RuntimeError as e:
                print("OTHER-ERROR:", str(e).replace("\\n", " "))
        print("INFO:", adamx.build_info()["compiled"])
    """)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([root, env.get("PYTHONPATH", "")])
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=env, timeout=180, cwd=root)
    assert out.returncode == 0, out.stdout + out.stderr
    lines = out.stdout.splitlines()
    step_err = [l for l in lines if l.startswith("STEP-ERROR:")]
    other = [l for l in lines if l.startswith("OTHER-ERROR:")]
    assert len(step_err) == 1 and len(other) == 2, out.stdout

    for line in step_err + other:
        assert re.search(BUILD_WORDS, line), line
    assert "INFO: False" in lines


def test_missing_module_monkeypatched(monkeypatch):
    """The same in-process, by swapping out the loaded module."""
    monkeypatch.setattr(adamx._ops, "_C", None)
    monkeypatch.setattr(adamx._ops, "_IMPORT_ERROR", ImportError("simulated"), raising=False)
    assert adamx.is_compiled() is False
    p = torch.zeros(3)
    p.grad = torch.ones(3)
    opt = adamx.AdamW([p])
    with pytest.raises(RuntimeError, match=BUILD_WORDS):
        opt.step()
    assert torch.equal(p, torch.zeros(3))
    with pytest.raises(RuntimeError, match=BUILD_WORDS):
        adamx.supported_cpu_capabilities()
