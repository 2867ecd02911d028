"""Subprocess worker for the full-disk test: trains a tiny config and, once epoch LIMIT_AFTER has
ended (its evaluation and checkpoints written), limits the size of any file this process
writes to LIMIT bytes (RLIMIT_FSIZE: writes beyond it fail with EFBIG, as writes to a full disk
fail with ENOSPC), then reports a failure the way ``experiments.run`` does.

Usage: python _full_disk_worker.py WORKDIR [LIMIT_AFTER LIMIT]
"""

import resource
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _synth import blob_train_val, tiny_config  # noqa: E402
from experiments.run import report_failure  # noqa: E402
from unet_jax.train import train_and_evaluate  # noqa: E402

CONFIG = tiny_config("full", epochs=3, seed=9)


def main(argv):
    workdir = Path(argv[0])
    limit_after, limit = (int(argv[1]), int(argv[2])) if len(argv) > 2 else (None, None)
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a failed write, not a killed process

    def on_epoch_end(epoch, _):
        if epoch == limit_after:
            resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    try:
        train_and_evaluate(
            CONFIG, workdir, data=blob_train_val(), progress=False, on_epoch_end=on_epoch_end
        )
    except Exception as e:
        return report_failure(e, [workdir])
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
