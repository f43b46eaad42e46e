"""Builds adamx's compiled module, adamx._C.

What it compiles:
- always, the CPU kernel, once per instruction set (x86-64: default, AVX2, AVX-512; the
  best one the running CPU supports is picked at import time), plus the op bindings;
- the CUDA kernels too, when the installed torch is a CUDA build and a CUDA toolkit
  (nvcc) is found. ADAMX_CUDA=1 insists on them (the build fails rather than skip them),
  ADAMX_CUDA=0 leaves them out. TORCH_CUDA_ARCH_LIST picks the GPU architectures
  (default below).

Install with `pip install .` into an environment that already has torch: the module
must be compiled against that torch, which build_backend/adamx_build_backend.py finds
when pip builds in an isolated environment (see README.md, "Install"). The build records
that torch's version beside the module (BUILD_RECORD), so that adamx can refuse to load
the module beside another torch without loading it.
"""

import glob
import json
import os
import platform
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))
# Turing..Blackwell (CUDA 13 has no 7.0), with PTX for later GPUs. Used when no GPU is
# visible; with one, torch builds for the visible GPUs' architectures.
DEFAULT_CUDA_ARCHS = "7.5;8.0;8.6;8.9;9.0;10.0;12.0+PTX"


def log(msg):
    print(f"adamx build: {msg}", file=sys.stderr, flush=True)


def find_cuda_home():
    """A toolkit directory with nvcc and the runtime headers, or None.

    torch guesses CUDA_HOME from `which nvcc`, which is wrong where nvcc is a wrapper
    script outside the toolkit (e.g. /usr/local/bin/nvcc), so look for a real one first.
    """
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            return os.environ[var]
    candidates = ["/usr/local/cuda"] + sorted(glob.glob("/usr/local/cuda-*"), reverse=True)
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    for d in candidates:
        if os.path.isfile(os.path.join(d, "bin", "nvcc")) and os.path.isfile(
            os.path.join(d, "include", "cuda_runtime_api.h")
        ):
            return d
    return None


def want_cuda(torch):
    """(build CUDA?, reason), honouring ADAMX_CUDA."""
    switch = os.environ.get("ADAMX_CUDA", "").strip().lower()
    if switch in ("0", "off", "false", "no"):
        return False, "ADAMX_CUDA=0"
    cuda_home = find_cuda_home()
    problem = None
    if torch.version.cuda is None:
        problem = f"torch {torch.__version__} is a CPU-only build"
    elif cuda_home is None:
        problem = "no CUDA toolkit (nvcc) found; set CUDA_HOME"
    if problem:
        if switch in ("1", "on", "true", "yes"):
            raise SystemExit(f"adamx build: ADAMX_CUDA=1 but {problem}")
        return False, problem
    os.environ.setdefault("CUDA_HOME", cuda_home)
    return True, f"torch CUDA {torch.version.cuda}, toolkit {cuda_home}"


def prepare_cuda_env(torch):
    """Environment fixes a CUDA build needs on machines without a GPU or full toolkit."""
    # Without a visible GPU torch cannot infer the architectures.
    if not os.environ.get("TORCH_CUDA_ARCH_LIST") and torch.cuda.device_count() == 0:
        os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_CUDA_ARCHS
    # ATen's CUDA headers include cuBLAS/cuSPARSE headers that a minimal toolkit lacks;
    # torch's CUDA wheels ship them in nvidia/cu*/include.
    toolkit_inc = os.path.join(os.environ["CUDA_HOME"], "include")
    if not os.path.isfile(os.path.join(toolkit_inc, "cusparse.h")) and "CUDA_INC_PATH" not in os.environ:
        site = os.path.dirname(os.path.dirname(torch.__file__))
        for inc in sorted(glob.glob(os.path.join(site, "nvidia", "cu*", "include"))):
            if os.path.isfile(os.path.join(inc, "cusparse.h")):
                os.environ["CUDA_INC_PATH"] = inc
                break


# Per instruction set: the macros ATen's Vectorized<T> keys on, and the compiler flags.
ISA_BUILDS = {
    "default": ([("CPU_CAPABILITY", "DEFAULT"), ("CPU_CAPABILITY_DEFAULT", None)], []),
    "avx2": (
        [("CPU_CAPABILITY", "AVX2"), ("CPU_CAPABILITY_AVX2", None)],
        ["-mavx2", "-mfma", "-mf16c"],
    ),
    "avx512": (
        [("CPU_CAPABILITY", "AVX512"), ("CPU_CAPABILITY_AVX512", None)],
        ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mf16c"],
    ),
}
# The files compiled once per instruction set.
ISA_KERNELS = ["csrc/backends/cpu/kernel.cpp", "csrc/backends/cpu/norm_kernel.cpp"]


def static_libstdcxx_symbols(path):
    """The symbols of libstdc++'s own that the module at `path` defines: none when it
    links the shared libstdc++, some when the compiler put a static copy in it; None when
    there is no nm (binutils) to read its symbol table. tests/test_errors.py calls this."""
    nm = shutil.which("nm")
    if nm is None:
        return None
    out = subprocess.run([nm, "-D", "--defined-only", path], capture_output=True, text=True,
                         check=True).stdout
    return [line.split()[-1] for line in out.splitlines()
            if "_ZNSt6locale" in line or "_ZNSo9_M_insert" in line]


def check_shared_libstdcxx(path):
    """Fail the build if the compiler linked its own copy of libstdc++ into the module.

    torch has already loaded the system's libstdc++.so when the module is imported; a
    second, static copy in the module shares no locale state with it, and the first
    error message that formats a number is cut short there (reproduced here with
    LDFLAGS=-static-libstdc++) or crashes the process (seen on a GPU machine
    whose g++ in /opt/gcc linked libstdc++ statically: a segmentation fault inside
    std::ostream::operator<<(unsigned long)).
    """
    try:
        own = static_libstdcxx_symbols(path)
    except subprocess.CalledProcessError as e:
        log(f"cannot check how libstdc++ was linked: nm failed on {path}: {e.stderr.strip()}")
        return
    if own is None:
        log("cannot check how libstdc++ was linked: no nm (binutils) found")
    elif own:
        raise SystemExit(
            f"adamx build: the compiler linked a static copy of libstdc++ into {path} "
            f"(it defines {own[0]}, ...). Beside the libstdc++.so that torch loads, the "
            "first error message that formats a number is cut short or crashes the "
            "process. Build with a compiler that links libstdc++ as a shared library, "
            "e.g. CXX=/usr/bin/g++, and without -static-libstdc++ in LDFLAGS.")


# Written beside the compiled module by every build (in-place ones too); read by
# adamx/_ops.py, which must know the torch it was built for without loading the module.
BUILD_RECORD = "_C_build.json"
TORCH_MISSING = (
    "adamx build: torch is not importable here. adamx compiles against the torch already "
    "installed in the environment it goes into: install torch there first (e.g. "
    "`pip install torch`), then `pip install .` in this directory. Front ends that build "
    "in an environment of their own (`python -m build`, uv) cannot see that torch: use "
    "`pip install --no-build-isolation .`, `python -m build --no-isolation` or "
    "`uv pip install --no-build-isolation .` there.")


def write_build_record(ext_dir, torch, build_cuda):
    """Records, in `ext_dir` beside adamx._C, the torch the module is compiled against."""
    record = {"torch": torch.__version__, "torch_cuda": torch.version.cuda,
              "torch_git": getattr(torch.version, "git_version", None),
              "cuda_kernels": bool(build_cuda)}
    path = os.path.join(ext_dir, BUILD_RECORD)
    os.makedirs(ext_dir, exist_ok=True)
    with open(path, "w") as f:
        json.dump(record, f, indent=1)
        f.write("\n")
    log(f"built against torch {torch.__version__} (recorded in {path})")
    return path


def main():
    try:
        import torch
    except ImportError:
        raise SystemExit(TORCH_MISSING)

    build_cuda, reason = want_cuda(torch)
    if build_cuda:
        prepare_cuda_env(torch)
    # Import only now: cpp_extension reads CUDA_HOME when it is imported.
    from torch.utils import cpp_extension
    from torch.utils.cpp_extension import BuildExtension

    x86 = platform.machine().lower() in ("x86_64", "amd64", "i686", "i386")
    isas = list(ISA_BUILDS) if x86 else ["default"]
    abi = f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}"
    # No FMA contraction: a fused multiply-add only where the source says so, so every
    # instruction set (and the scalar emulation of the CUDA kernel) rounds alike.
    cxx_flags = ["-O3", "-std=c++20", "-ffp-contract=off", "-fno-math-errno", abi]

    class BuildExt(BuildExtension):
        """Compiles the CPU kernel once per instruction set, each with its own flags."""

        def build_extensions(self):
            for ext in self.extensions:
                ext.extra_objects = self.isa_objects(ext) + list(ext.extra_objects or [])
            super().build_extensions()
            for ext in self.extensions:
                check_shared_libstdcxx(self.get_ext_fullpath(ext.name))
            write_build_record(os.path.dirname(self.record_paths()[0]), torch, build_cuda)

        # The record goes wherever the module goes. setuptools builds into build_lib even
        # for --inplace and editable installs, then copies the module into the source tree
        # (copy_extensions_to_source); wheels take build_lib as it is.
        def record_paths(self):
            """(where the build writes the record, its place in the source tree)."""
            package_dir = self.get_finalized_command("build_py").get_package_dir("adamx")
            return (os.path.join(self.build_lib, "adamx", BUILD_RECORD),
                    os.path.join(package_dir, BUILD_RECORD))

        def copy_extensions_to_source(self):
            super().copy_extensions_to_source()
            self.copy_file(*self.record_paths(), level=self.verbose)

        def get_outputs(self):
            # (inplace: the keys of get_output_mapping, below, which hold the record)
            extra = [] if self.inplace else [self.record_paths()[0]]
            return super().get_outputs() + extra

        def get_output_mapping(self):
            mapping = super().get_output_mapping()
            if self.inplace:
                mapping.setdefault(*self.record_paths())
            return mapping

        def isa_objects(self, ext):
            # One compiler process per instruction set, side by side (each is one large
            # translation unit, compiled before ninja starts on the rest).
            def compile_isa(isa):
                macros, flags = ISA_BUILDS[isa]
                return self.compiler.compile(
                    ISA_KERNELS,
                    output_dir=os.path.join(self.build_temp, "isa", torch.__version__, isa),
                    macros=macros,
                    include_dirs=cpp_extension.include_paths(),
                    # GCC 12 warns about its own intrinsics headers there.
                    extra_postargs=cxx_flags + ["-fPIC", "-Wno-maybe-uninitialized"] + flags,
                    depends=glob.glob("csrc/**/*.h", recursive=True),
                )
            jobs = int(os.environ.get("MAX_JOBS") or os.cpu_count() or 1)
            with ThreadPoolExecutor(max_workers=max(1, min(jobs, len(isas)))) as pool:
                return [obj for objs in pool.map(compile_isa, isas) for obj in objs]

    sources = sorted(glob.glob("csrc/**/*.cpp", recursive=True))
    for kernel in ISA_KERNELS:
        sources.remove(kernel)
    macros = [("ADAMX_WITH_CUDA", None)] if build_cuda else []
    # at::parallel_for is inline code that opens an OpenMP region in *our* object files:
    # without -fopenmp it silently runs on one thread. The OpenMP runtime linked is the
    # one torch already loaded (same soname, libgomp.so.1), so there is one thread pool.
    kwargs = dict(
        name="adamx._C",
        sources=sources,
        define_macros=macros,
        extra_compile_args={"cxx": cxx_flags + ["-fopenmp"]},
        extra_link_args=["-fopenmp"],
    )
    if build_cuda:
        kwargs["sources"] += sorted(glob.glob("csrc/**/*.cu", recursive=True))
        # -fmad=false: no FMA contraction on the device either (as -ffp-contract=off on the
        # host), so the GPU rounds exactly as the CPU emulation of its kernel body does.
        kwargs["extra_compile_args"]["nvcc"] = ["-O3", "-std=c++20", "--expt-relaxed-constexpr",
                                                "-fmad=false"]
        ext = cpp_extension.CUDAExtension(**kwargs)
        archs = os.environ.get("TORCH_CUDA_ARCH_LIST") or "the visible GPUs"
        log(f"building CPU kernels ({', '.join(isas)}) and CUDA kernels "
            f"for {archs} ({reason})")
    else:
        ext = cpp_extension.CppExtension(**kwargs)
        log(f"building CPU kernels ({', '.join(isas)}); CUDA kernels skipped: {reason}")

    setup(ext_modules=[ext], cmdclass={"build_ext": BuildExt})


if __name__ == "__main__":
    os.chdir(HERE)
    main()
