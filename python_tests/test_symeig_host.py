"""The shared eigen header csrc/mars/symeig.hpp on the host.

The CUDA spectral kernel solves its Gram matrices with ``symeig::max_eigenvalue_tridiagonal``
(Householder + Laguerre) and, for Grams too large for shared memory, ``symeig::max_eigenvalue``
(cyclic Jacobi); both are ``__host__ __device__``. The GPU tests cover them on a device; this
test compiles a small driver against the header with the host C++ compiler (the one that builds
the package) and checks both solvers against ``numpy.linalg.eigvalsh`` and against each other,
so that the device's math is exercised on every machine. Skips without a C++ compiler or without
the source tree.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

CSRC = Path(__file__).resolve().parent.parent / "csrc"
CXX = shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")

DRIVER = r"""
#include <cstdio>
#include <vector>
#include "mars/symeig.hpp"
// stdin: count, then per matrix n and n*n row-major values; stdout per matrix: tridiagonal and
// Jacobi top eigenvalues.
int main() {
  int count = 0;
  if (std::scanf("%d", &count) != 1) return 1;
  for (int c = 0; c < count; ++c) {
    int n = 0;
    if (std::scanf("%d", &n) != 1) return 1;
    std::vector<double> a(n * n), b, work(mars::symeig::tridiagonal_workspace(n) + 1);
    for (double& v : a) {
      if (std::scanf("%lf", &v) != 1) return 1;
    }
    b = a;
    const double t = mars::symeig::max_eigenvalue_tridiagonal(a.data(), n, work.data());
    const double j = mars::symeig::max_eigenvalue(b.data(), n);
    std::printf("%.17g %.17g\n", t, j);
  }
  return 0;
}
"""


@pytest.fixture(scope="module")
def solver(tmp_path_factory):
    if CXX is None:
        pytest.skip("no C++ compiler on PATH")
    if not (CSRC / "mars" / "symeig.hpp").exists():
        pytest.skip("the C++ sources are not next to the tests")
    tmp = tmp_path_factory.mktemp("symeig")
    src, exe = tmp / "driver.cpp", tmp / "driver"
    src.write_text(DRIVER)
    subprocess.run([CXX, "-O2", "-std=c++17", f"-I{CSRC}", str(src), "-o", str(exe)], check=True,
                   capture_output=True)

    def run(matrices: list[np.ndarray]) -> np.ndarray:
        lines = [str(len(matrices))]
        for m in matrices:
            lines.append(str(m.shape[0]))
            lines.append(" ".join(repr(float(v)) for v in m.ravel()))
        out = subprocess.run([str(exe)], input="\n".join(lines), text=True, capture_output=True,
                             check=True).stdout
        return np.array([[float(x) for x in line.split()] for line in out.splitlines()])

    return run


def _gram(rng: np.random.Generator, n: int, rows: int, scale: float) -> np.ndarray:
    m = rng.standard_normal((rows, n)) * scale
    return m.T @ m


def test_both_solvers_match_eigvalsh_on_psd_grams(solver):
    rng = np.random.default_rng(0)
    mats = []
    for n in range(1, 41):
        for rows in (max(1, n // 2), n, n + 7, 3 * n):  # rank-deficient, square, tall
            for scale in (1e-3, 1.0, 1e3):
                mats.append(_gram(rng, n, rows, scale))
    got = solver(mats)
    want = np.array([np.linalg.eigvalsh(m)[-1] for m in mats])
    norm = np.array([np.linalg.norm(m, 2) for m in mats])
    assert np.all(np.abs(got[:, 0] - want) <= 1e-13 * norm)
    assert np.all(np.abs(got[:, 1] - want) <= 1e-13 * norm)
    assert np.all(np.abs(got[:, 0] - got[:, 1]) <= 1e-14 * norm)


def test_special_matrices(solver):
    nan = np.eye(3)
    nan[1, 2] = nan[2, 1] = np.nan
    inf = np.eye(4)
    inf[0, 0] = np.inf
    equal_diag = np.full((5, 5), 2.0)  # rank one, all entries equal: eigenvalue 10
    got = solver([np.zeros((9, 9)), nan, inf, np.array([[4.0]]), np.array([[2.0, 1.0], [1.0, 2.0]]),
                  equal_diag, np.diag([1.0, 5.0, 3.0])])
    assert got[0].tolist() == [0.0, 0.0]
    assert np.isnan(got[1]).all() and np.isnan(got[2]).all()
    assert got[3].tolist() == [4.0, 4.0]
    np.testing.assert_allclose(got[4], [3.0, 3.0], rtol=1e-15)
    np.testing.assert_allclose(got[5], [10.0, 10.0], rtol=1e-14)
    np.testing.assert_allclose(got[6], [5.0, 5.0], rtol=1e-15)
