"""No server outlives the process that started it, even one killed with SIGKILL.

Without `PREFECT_API_URL`, Prefect starts an ephemeral API server (`uvicorn … prefect.server.api.server:create_app`)
as a child process and stops it at exit. A `kill -9` of the parent skips that cleanup, which would leave the
server running; so on Linux the child asks the kernel to send it SIGTERM when its parent dies
(`prctl(PR_SET_PDEATHSIG)`, set between fork and exec, `redistill.core.processes`), and nothing is left behind
however the parent ends. Elsewhere this is a no-op and Prefect's own cleanup is what remains.
"""

from __future__ import annotations

import subprocess
import sys
import types

from redistill.core.processes import die_with_parent_hook

_installed = False


def tie_ephemeral_server_to_this_process() -> bool:
    """Make Prefect's ephemeral server a child that dies with this process; True when installed (Linux)."""
    global _installed
    if _installed or not sys.platform.startswith("linux"):
        return _installed
    from prefect.server.api import server as server_module

    hook = die_with_parent_hook()
    real_popen = subprocess.Popen

    def popen(*args, **kwargs):
        kwargs.setdefault("preexec_fn", hook)
        return real_popen(*args, **kwargs)

    # only the server module sees this Popen; the rest of the process keeps subprocess as it is
    shim = types.ModuleType("subprocess")
    shim.__dict__.update(vars(subprocess))
    shim.Popen = popen
    server_module.subprocess = shim
    _installed = True
    return True
