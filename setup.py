"""Build the C core into the extension module llmasos._core.

The C sources under csrc/ are the same ones the C SDK's Makefile builds into
libllmasos.a; here they are compiled together with the CPython binding.
"""

from glob import glob

from setuptools import Extension, setup

core = Extension(
    "llmasos._core",
    sources=sorted(glob("csrc/*.c")) + ["src/llmasos/_core.c"],
    include_dirs=["csrc/include"],
    depends=sorted(glob("csrc/*.h") + glob("csrc/include/llmasos/*.h")),
    extra_compile_args=["-std=c11", "-O2", "-Wall", "-Wextra", "-Werror"],
    libraries=["rt", "pthread"],
)

setup(ext_modules=[core])
