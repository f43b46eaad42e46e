"""Without the compiled module, `import adamx` still works and using a kernel says how to
build it. These tests run whether or not adamx._C is built."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch

import adamx

BUILD_WORDS = r"(?s)(build_ext|pip install).*"


def test_missing_module_in_a_fresh_interpreter():
    """Block adamx._C from importing (as if it had never been built) in a subprocess."""
    code = textwrap.dedent("""
        import sys
        sys.modules["adamx._C"] = None  # makes `from . import _C` raise ImportError
        import torch
        import adamx
        assert adamx.is_compiled() is False
        p = torch.zeros(3)
        p.grad = torch.ones(3)
        opt = adamx.Adam([p], lr=0.1)
        try:
            opt.step()
        except RuntimeError as e:
            print("STEP-ERROR:", str(e).replace("\\n", " "))
        else:
            raise SystemExit("step did not raise")
        assert torch.equal(p, torch.zeros(3)) and not opt.state
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
    import re
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
