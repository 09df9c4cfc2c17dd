"""Root pytest configuration: test the installed package unless the source tree is built.

``python -m pytest`` (the README's test command) puts the working directory first on
``sys.path``. In a fresh clone, after ``pip install .``, the source package ``mars_native/`` has no
compiled ``_core`` and would shadow the installed one, so nothing could be imported. When the
source tree holds no compiled extension, its root is taken off ``sys.path`` and the installed
package is tested (what CI does); after a developer build (``tools/dev_build.sh`` puts
``_core*.so`` into ``mars_native/``), the source tree is tested.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent


def _is_root(entry: str) -> bool:
    try:
        return Path(entry or ".").resolve() == ROOT
    except OSError:
        return False


if not any((ROOT / "mars_native").glob("_core*")):
    sys.path[:] = [p for p in sys.path if not _is_root(p)]
    for name in [m for m in sys.modules if m == "mars_native" or m.startswith("mars_native.")]:
        del sys.modules[name]
