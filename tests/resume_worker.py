"""train_caption.py, but with KILL_AT_STEP set it SIGKILLs itself right after logging that training step.

The kill lands between two checkpoints and in the middle of an epoch, like a preemption; tests/training/test_resume.py
then resumes the run and compares it with one that was never interrupted.
"""
import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import train_caption  # noqa: E402
import utils  # noqa: E402

kill_at = int(os.environ.get("KILL_AT_STEP", 0))
if kill_at:
    original_log = utils.JsonlLogger.log

    def log_then_maybe_die(self, **record):
        original_log(self, **record)
        if record.get("kind") == "train" and record.get("step") == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)

    utils.JsonlLogger.log = log_then_maybe_die

if __name__ == "__main__":
    train_caption.main()
