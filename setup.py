"""Build script: drives CMake (Ninja) to build the extension flextron_kernels._C.

Metadata lives in pyproject.toml; this file only adds the compiled module.

Environment variables:
  FLEXTRON_SKIP_EXT=1          skip the extension: a pure-Python package
  FLEXTRON_WITH_CUDA=0         build the CPU code only, even when nvcc is found
  FLEXTRON_CUDA_ARCHS="80;90"  CUDA architectures (CMAKE_CUDA_ARCHITECTURES syntax)
  CMAKE_BUILD_PARALLEL_LEVEL / MAX_JOBS   parallel compile jobs (default: CPU count)
  CMAKE_ARGS                   extra arguments for the CMake configure step
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent
MIN_CMAKE = (3, 24)


def _env_flag(name: str) -> bool | None:
    """True/False for a set boolean-ish variable, None when unset or empty."""
    value = os.environ.get(name, "").strip().lower()
    if not value:
        return None
    return value not in {"0", "false", "off", "no"}


def _version() -> str:
    text = (ROOT / "flextron_kernels" / "__init__.py").read_text(encoding="utf-8")
    match = re.search(r"""^__version__\s*=\s*["']([^"']+)["']""", text, re.MULTILINE)
    if not match:
        raise RuntimeError("flextron_kernels/__init__.py defines no __version__")
    return match.group(1)


def _cmake_version(cmake: str) -> tuple[int, ...] | None:
    try:
        out = subprocess.run([cmake, "--version"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    match = re.search(r"version (\d+)\.(\d+)", out)
    return tuple(int(x) for x in match.groups()) if match else None


def _package_binary(module: str, attr: str, name: str) -> str | None:
    """The binary shipped by the PyPI package `module` (cmake, ninja), if importable."""
    try:
        bin_dir = getattr(__import__(module), attr)
    except (ImportError, AttributeError):
        return None
    path = Path(bin_dir) / name
    return str(path) if path.exists() else None


def _find_cmake() -> str:
    """The build environment's cmake (the `cmake` package this interpreter imports:
    pip's isolated build installs it from pyproject.toml), else cmake on PATH; either
    must be new enough."""
    for candidate in (_package_binary("cmake", "CMAKE_BIN_DIR", "cmake"), shutil.which("cmake")):
        if candidate is None:
            continue
        version = _cmake_version(candidate)
        if version is not None and version >= MIN_CMAKE:
            return candidate
    raise RuntimeError(
        f"CMake >= {'.'.join(map(str, MIN_CMAKE))} is needed to build flextron_kernels._C "
        "(pip install cmake), or set FLEXTRON_SKIP_EXT=1 for a pure-Python install"
    )


def _find_ninja() -> str | None:
    return _package_binary("ninja", "BIN_DIR", "ninja") or shutil.which("ninja")


def _parallel_jobs(requested: int | None) -> int:
    for name in ("CMAKE_BUILD_PARALLEL_LEVEL", "MAX_JOBS"):
        value = os.environ.get(name, "").strip()
        if value.isdigit() and int(value) > 0:
            return int(value)
    if requested:
        return requested
    return os.cpu_count() or 1


def _drop_stale_cache(build_dir: Path, generator: str | None) -> None:
    """Remove a CMake cache made for another source tree or generator (e.g. a
    build folder reused after moving the checkout), which CMake refuses."""
    cache = build_dir / "CMakeCache.txt"
    if not cache.exists():
        return
    entries = {}  # lines look like NAME:TYPE=VALUE
    for line in cache.read_text(encoding="utf-8", errors="replace").splitlines():
        match = re.match(r"^([A-Za-z_][\w.+-]*):[A-Z]+=(.*)$", line)
        if match:
            entries[match.group(1)] = match.group(2)
    home = entries.get("CMAKE_HOME_DIRECTORY")
    same_home = home is not None and Path(home).resolve() == ROOT
    same_generator = generator is None or entries.get("CMAKE_GENERATOR") == generator
    if not (same_home and same_generator):
        cache.unlink()
        shutil.rmtree(build_dir / "CMakeFiles", ignore_errors=True)


class CMakeExtension(Extension):
    def __init__(self, name: str, depends: list[str]):
        # No sources for setuptools to compile; `depends` puts the CMake inputs
        # into source distributions.
        super().__init__(name, sources=[], depends=depends)


class CMakeBuild(build_ext):
    def build_extension(self, ext: Extension) -> None:
        if not isinstance(ext, CMakeExtension):
            super().build_extension(ext)
            return
        import pybind11

        # The module goes where setuptools expects it (build_lib/flextron_kernels);
        # for --inplace and editable installs setuptools copies it into the source tree.
        ext_path = Path(self.get_ext_fullpath(ext.name)).resolve()
        ext_dir = ext_path.parent
        if getattr(self, "editable_mode", False):
            # Editable installs get a new temporary build_temp each time; a fixed
            # folder keeps rebuilds incremental.
            tag = f"{sysconfig.get_platform()}-{sys.implementation.cache_tag}"
            build_dir = ROOT / "build" / f"cmake-editable.{tag}"
        else:
            build_dir = Path(self.build_temp).resolve() / "cmake"
        build_dir.mkdir(parents=True, exist_ok=True)

        cmake = _find_cmake()
        ninja = _find_ninja()
        generator = "Ninja" if ninja else None
        archs = os.environ.get("FLEXTRON_CUDA_ARCHS", "").strip() or "80;90"

        configure = [
            cmake,
            "-S",
            str(ROOT),
            "-B",
            str(build_dir),
            "-DCMAKE_BUILD_TYPE=Release",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={ext_dir}",
            f"-DFLEXTRON_CUDA_ARCHS={archs}",
            f"-DFLEXTRON_VERSION={_version()}",
        ]
        if ninja:
            configure += ["-G", "Ninja", f"-DCMAKE_MAKE_PROGRAM={ninja}"]
        else:
            print("flextron_kernels: ninja not found, using CMake's default generator", flush=True)
        with_cuda = _env_flag("FLEXTRON_WITH_CUDA")
        if with_cuda is not None:
            configure.append(f"-DFLEXTRON_WITH_CUDA={'ON' if with_cuda else 'OFF'}")
        configure += shlex.split(os.environ.get("CMAKE_ARGS", ""))

        _drop_stale_cache(build_dir, generator)
        # build_ext's own -j/--parallel (an int, or True for "all CPUs").
        requested = self.parallel if type(self.parallel) is int else None
        jobs = _parallel_jobs(requested)
        build = [cmake, "--build", str(build_dir), "--config", "Release", "--parallel", str(jobs)]

        # CMake's and the compilers' output go straight to the console (pip shows
        # it on failure); a failed step fails the install.
        for step in (configure, build):
            print("flextron_kernels:", shlex.join(step), flush=True)
            result = subprocess.run(step, cwd=ROOT)
            if result.returncode != 0:
                raise RuntimeError(
                    f"building flextron_kernels._C failed ({Path(step[0]).name} exited with "
                    f"{result.returncode}; its output is above). Set FLEXTRON_SKIP_EXT=1 to "
                    "install without the compiled extension."
                )
        if not ext_path.exists():
            raise RuntimeError(f"CMake finished but {ext_path} was not produced")


def _ext_modules() -> list[Extension]:
    if _env_flag("FLEXTRON_SKIP_EXT"):
        return []
    depends = sorted(
        str(p.relative_to(ROOT)) for p in (ROOT / "csrc").glob("*") if p.is_file()
    )
    return [CMakeExtension("flextron_kernels._C", depends=["CMakeLists.txt", *depends])]


setup(ext_modules=_ext_modules(), cmdclass={"build_ext": CMakeBuild})
