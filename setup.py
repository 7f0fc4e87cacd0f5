"""Build h1r_ops._C.

* CPU kernels always. The SIMD kernel files (csrc/cpu/*_kernels.cpp) are compiled once per ISA level
  (avx512, avx2, scalar) into separate namespaces, and csrc/cpu/isa.h picks one at run time from
  cpuid, as ATen's DispatchStub does: a wheel built here runs on any x86-64.
* CUDA kernels (csrc/cuda/*.cu and their *_api.cpp glue) whenever nvcc and a CUDA build of torch are
  present, for sm_80 and sm_90. CUDA_HOME is found without the user setting it; H1R_NO_CUDA=1 skips them.
"""

import glob
import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _find_cuda_home():
    """CUDA_HOME / CUDA_PATH, else the usual install folders, else the folder of nvcc on PATH."""
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    candidates += sorted(glob.glob("/usr/local/cuda-*"), reverse=True)
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    for c in candidates:
        if c and os.path.isfile(os.path.join(c, "bin", "nvcc")) and os.path.isfile(
            os.path.join(c, "include", "cuda_runtime.h")
        ):
            return c
    return None


_cuda_home = None if os.environ.get("H1R_NO_CUDA") == "1" else _find_cuda_home()
if _cuda_home:
    os.environ["CUDA_HOME"] = _cuda_home  # torch.utils.cpp_extension reads it at import time

import torch  # noqa: E402
from torch.utils.cpp_extension import (  # noqa: E402
    BuildExtension,
    CppExtension,
    CUDAExtension,
    include_paths,
)

WITH_CUDA = bool(_cuda_home) and torch.version.cuda is not None
CXX_STD = "-std=c++20"
COMMON_FLAGS = [
    "-O3",
    CXX_STD,
    "-fopenmp",
    "-fPIC",
    "-fvisibility=hidden",
    "-fvisibility-inlines-hidden",
    "-Wall",
    "-Wno-unused-function",
    "-Wno-unknown-pragmas",  # ATen's vec headers carry #pragma unroll
    f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
]

# The ISA levels the SIMD kernels are compiled for. CPU_CAPABILITY selects ATen's at::vec::Vectorized
# implementation (and names its inline namespace); H1R_ISA names ours.
ISA_LEVELS = {
    "avx512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mavx2", "-mf16c", "-mbmi2",
               "-DCPU_CAPABILITY=AVX512", "-DCPU_CAPABILITY_AVX512"],
    "avx2": ["-mavx2", "-mfma", "-mf16c", "-mbmi2", "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"],
    "scalar": ["-DCPU_CAPABILITY=DEFAULT"],
}


def _compile_isa_objects(build_temp):
    """Compile every csrc/cpu/*_kernels.cpp once per ISA level; returns the object files.

    Objects newer than their source and every header in csrc/ are reused (incremental builds)."""
    sources = sorted(glob.glob(os.path.join(ROOT, "csrc", "cpu", "*_kernels.cpp")))
    headers = glob.glob(os.path.join(ROOT, "csrc", "**", "*.h"), recursive=True)
    newest_header = max([os.path.getmtime(h) for h in headers] + [0])
    cxx = os.environ.get("CXX", "c++")
    incs = [f"-I{p}" for p in include_paths()] + [f"-I{os.path.join(ROOT, 'csrc')}"]
    jobs = []
    for src in sources:
        name = os.path.splitext(os.path.basename(src))[0]
        for isa, flags in ISA_LEVELS.items():
            obj = os.path.join(build_temp, "isa", f"{name}.{isa}.o")
            fresh = os.path.exists(obj) and os.path.getmtime(obj) >= max(os.path.getmtime(src), newest_header)
            cmd = [cxx, "-c", src, "-o", obj, *COMMON_FLAGS, *flags, f"-DH1R_ISA={isa}", *incs]
            jobs.append((obj, None if fresh else cmd))
    os.makedirs(os.path.join(build_temp, "isa"), exist_ok=True)

    def run(job):
        obj, cmd = job
        if cmd is not None:
            print(" ".join(cmd), flush=True)
            subprocess.check_call(cmd)
        return obj

    workers = int(os.environ.get("MAX_JOBS", os.cpu_count() or 1))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(run, jobs))


class BuildExt(BuildExtension):
    def build_extensions(self):
        objects = _compile_isa_objects(os.path.abspath(self.build_temp))
        for ext in self.extensions:
            ext.extra_objects = list(ext.extra_objects or []) + objects
        super().build_extensions()


def _extension():
    # The torch-facing glue: everything in csrc/ that is not an ISA kernel file or a CUDA file.
    cpp = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    cpp += sorted(f for f in glob.glob(os.path.join("csrc", "cpu", "*.cpp")) if not f.endswith("_kernels.cpp"))
    include_dirs = [os.path.join(ROOT, "csrc")]
    cxx_flags = COMMON_FLAGS + ["-DH1R_WITH_CUDA" if WITH_CUDA else "-UH1R_WITH_CUDA"]
    link = ["-fopenmp"]
    if WITH_CUDA:
        cu = sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
        cu_api = sorted(glob.glob(os.path.join("csrc", "cuda", "*.cpp")))
        nvcc_flags = [
            "-O3",
            CXX_STD,
            "--use_fast_math",
            "-lineinfo",
            "--expt-relaxed-constexpr",
            "-Werror=all-warnings",
            "-Xcompiler=-fPIC",
            "-gencode=arch=compute_80,code=sm_80",
            "-gencode=arch=compute_90,code=sm_90",
        ]
        return CUDAExtension(
            "h1r_ops._C",
            cpp + cu_api + cu,
            include_dirs=include_dirs,
            extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags},
            extra_link_args=link,
        )
    return CppExtension(
        "h1r_ops._C", cpp, include_dirs=include_dirs, extra_compile_args={"cxx": cxx_flags}, extra_link_args=link
    )


if __name__ == "__main__":
    print(f"h1r_ops: building CPU kernels; CUDA kernels: {'yes (' + _cuda_home + ')' if WITH_CUDA else 'no'}",
          file=sys.stderr)
    setup(
        packages=find_packages(include=["h1r_ops", "h1r_ops.*"]),
        ext_modules=[_extension()],
        cmdclass={"build_ext": BuildExt},
    )
