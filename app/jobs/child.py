"""What every process that a worker starts calls first: the job's child (app/jobs/worker.py) and each extra DDP rank
(app/jobs/ranks.py). A child never outlives its parent, so a killed worker never leaves a job half-run by an orphan.
"""

import os
import threading
import time


def die_with_parent(parent_pid: int) -> None:
    """A training child must not outlive its worker (kill -9 included): the job goes back to the queue and a second
    copy writing the same directory would corrupt the retry."""
    try:
        import ctypes
        import signal

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG, Linux
    except (OSError, AttributeError):
        pass

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(0.5)
        os._exit(1)

    threading.Thread(target=watch, daemon=True).start()
