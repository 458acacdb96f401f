"""No server outlives the process that started it, even one killed with SIGKILL.

Without `PREFECT_API_URL`, Prefect starts an ephemeral API server (`uvicorn … prefect.server.api.server:create_app`)
as a child process and stops it at exit. A `kill -9` of the parent skips that cleanup, and the server used
to keep running (found after `make test`). On Linux the child now asks the kernel to send it SIGTERM when
its parent dies (`prctl(PR_SET_PDEATHSIG)`, set between fork and exec), so nothing is left behind however
the parent ends. Elsewhere this is a no-op and Prefect's own cleanup is what remains.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import types

_PR_SET_PDEATHSIG = 1
_installed = False
_prctl = None  # libc's prctl, looked up in the parent: the child only calls it


def _die_with_parent() -> None:  # runs in the child between fork and exec: no imports, no allocation of note
    _prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM))


def tie_ephemeral_server_to_this_process() -> bool:
    """Make Prefect's ephemeral server a child that dies with this process; True when installed (Linux)."""
    global _installed
    if _installed or not sys.platform.startswith("linux"):
        return _installed
    import ctypes

    from prefect.server.api import server as server_module

    global _prctl
    _prctl = ctypes.CDLL(None, use_errno=True).prctl

    real_popen = subprocess.Popen

    def popen(*args, **kwargs):
        kwargs.setdefault("preexec_fn", _die_with_parent)
        return real_popen(*args, **kwargs)

    # only the server module sees this Popen; the rest of the process keeps subprocess as it is
    shim = types.ModuleType("subprocess")
    shim.__dict__.update(vars(subprocess))
    shim.Popen = popen
    server_module.subprocess = shim
    _installed = True
    return True
