"""Ending a process that can no longer serve: loudly, at once, non-zero.

Used when the gRPC front end ended without being asked to (service/server.py) and when a
worker's supervisor is gone (service/supervisor.py): the process must end so that compose's
`restart:` policy, Kubernetes or the supervisor starts a fresh one (docs/serving.md).
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from typing import NoReturn

log = logging.getLogger(__name__)

# Exit status of a process that can no longer serve (EX_SOFTWARE): not 0, so compose's and
# Kubernetes' restart policies and the --workers supervisor restart it.
FATAL_EXIT_CODE = 70


def die(reason: str) -> NoReturn:
    """Log why and end the process now, whatever other threads are doing.

    os._exit, not sys.exit: a non-daemon thread (an executor's, the exporter's) or a stuck
    drain must not keep a process that cannot serve alive; nothing is left to drain anyway.
    """
    log.critical("event=fatal reason=%s action=exit exit_code=%d pid=%d", reason,
                 FATAL_EXIT_CODE, os.getpid())
    for handler in logging.getLogger().handlers:
        with contextlib.suppress(Exception):
            handler.flush()
    with contextlib.suppress(Exception):
        sys.stdout.flush()
        sys.stderr.flush()
    os._exit(FATAL_EXIT_CODE)
