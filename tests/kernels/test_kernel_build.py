"""The native kernels' sources: every file the compiler reads keys the build cache and ships in the wheel."""

import fnmatch
import re
import shutil
import tomllib
from pathlib import Path

import pytest

from promptdelta.kernels import native as native_mod

ROOT = Path(__file__).resolve().parents[2]


def test_every_included_header_is_a_listed_source():
    names = {p.name for p in native_mod.source_files()}
    assert native_mod.SOURCE.name in names and any(n.endswith(".h") for n in names)
    for path in native_mod.source_files():
        for inc in re.findall(r'^#include "([^"]+)"', path.read_text(), flags=re.M):
            assert inc in names, f"{path.name} includes {inc}, which source_files() does not list"


def test_build_name_changes_with_any_source_file(tmp_path, monkeypatch):
    """A cached build from older sources must never load: editing a header alone gives a new name; another
    extension's source in csrc/ (dropout_cpu.cpp) is not read, so editing it keeps the name (no rebuild)."""
    csrc = tmp_path / "csrc"
    shutil.copytree(native_mod.CSRC, csrc)
    monkeypatch.setattr(native_mod, "CSRC", csrc)
    sources = native_mod.source_files()
    assert all(p.name.startswith("lora_") for p in sources)
    names = {native_mod._build_name()}
    for path in sources:
        path.write_text(path.read_text() + "\n// edited\n")
        names.add(native_mod._build_name())
    assert len(names) == 1 + len(sources)
    (csrc / "lora_extra.h").write_text("// a new header\n")
    assert native_mod._build_name() not in names
    before = native_mod._build_name()
    (csrc / "dropout_cpu.cpp").write_text("// another extension, edited\n")
    assert native_mod._build_name() == before


def test_package_data_ships_every_source_file():
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["promptdelta"]
    for path in native_mod.source_files():
        rel = path.relative_to(ROOT / "promptdelta").as_posix()
        assert any(fnmatch.fnmatch(rel, pattern) for pattern in data), f"{rel} is not in package-data"


@pytest.mark.slow
def test_sources_build_and_run_without_avx512(tmp_path):
    """A user's AVX2-only CPU: the sources compile for Haswell, the native GEMM (lora_gemm.h, AVX-512 only) is
    left out and the layer runs on MKL's GEMM, matching the reference."""
    import torch
    from torch.utils.cpp_extension import load

    if shutil.which("g++") is None and shutil.which("c++") is None:
        pytest.skip("no C++ compiler on this machine")
    ext = load(name="promptdelta_lora_cpu_avx2_check", sources=[str(native_mod.SOURCE)],
               extra_cflags=["-O1", "-march=haswell", "-fopenmp"], extra_ldflags=["-fopenmp"],
               build_directory=str(tmp_path), verbose=False)
    assert not ext.own_gemm() and not ext.use_own_gemm(300)
    gen = torch.Generator().manual_seed(0)
    x, w, b = torch.randn(300, 70, generator=gen), torch.randn(50, 70, generator=gen), torch.randn(50, generator=gen)
    a, bb = torch.randn(16, 70, generator=gen), torch.randn(50, 16, generator=gen)
    want = torch.nn.functional.linear(x, w, b) + 0.5 * (x @ a.t()) @ bb.t()
    torch.testing.assert_close(ext.lora_linear(x, None, w, b, a, bb, 0.5, 0), want, rtol=0, atol=1e-4)
