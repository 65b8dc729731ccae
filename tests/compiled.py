"""Which Numba specialisations a piece of code needs that were not there before it.

``new_specialisations(setup, probe, *argv)`` runs ``setup`` and then ``probe`` (Python
source) in a fresh interpreter and returns ``{kernel: [signatures]}`` that ``probe`` added
to any `lhtstream` kernel (a module-level ``@njit`` function). A fresh process is the
point: in the test session other tests have already compiled whatever they ran, which
would hide a warm-up that misses one.
Signatures loaded from Numba's on-disk cache count as added too, so the answer does not
depend on what the cache holds.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

from tests.processes import _child_env

_HARNESS = """
import json, sys
from numba.core.dispatcher import Dispatcher

def _signatures():
    out = {}
    for name, module in list(sys.modules.items()):
        if name == "lhtstream" or name.startswith("lhtstream."):
            for value in list(vars(module).values()):
                if isinstance(value, Dispatcher):
                    key = value.py_func.__module__ + "." + value.py_func.__qualname__
                    out.setdefault(key, set()).update(str(s) for s in value.signatures)
    return out

#SETUP
_before = _signatures()
#PROBE
_after = _signatures()
_new = {k: sorted(v - _before.get(k, set())) for k, v in _after.items()
        if v - _before.get(k, set())}
_warm = sorted(k for k, v in _before.items() if v)
print("NEW-SPECIALISATIONS " + json.dumps({"new": _new, "warm": _warm}))
"""


def new_specialisations(setup: str, probe: str, *argv: str, timeout: float = 120.0
                        ) -> dict[str, list[str]]:
    code = (_HARNESS.replace("#SETUP", textwrap.dedent(setup))
            .replace("#PROBE", textwrap.dedent(probe)))
    proc = subprocess.run([sys.executable, "-c", code, *argv], env=_child_env(),
                          stdin=subprocess.DEVNULL, capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (line,) = [ln for ln in proc.stdout.splitlines() if ln.startswith("NEW-SPECIALISATIONS ")]
    found = json.loads(line.split(" ", 1)[1])
    # an empty answer means something only if kernels were found and warm to begin with
    assert found["warm"], "no compiled lhtstream kernel found after the setup"
    return found["new"]
