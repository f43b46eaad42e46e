"""The build: what was compiled, and how it was linked. (Without the compiled module,
see test_errors_missing_build.py.)"""

import importlib.util
import os
from pathlib import Path

import pytest

import adamx
from conftest import needs_build

pytestmark = needs_build


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


def test_build_info_reports_cuda_kernels():
    info = adamx.build_info()
    assert isinstance(info["cuda"], bool)
    if os.environ.get("ADAMX_EXPECT_CUDA_BUILD") == "1":
        assert info["cuda"], "adamx was expected to be built with its CUDA kernels"
    if info["cuda"]:
        import torch
        dump = torch._C._dispatch_dump("adamx::adam_")
        assert "CUDA: registered at" in dump and "adam_cuda.cpp" in dump, dump
