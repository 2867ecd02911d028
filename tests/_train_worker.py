"""Subprocess worker for test_train: trains a tiny config and dumps losses and parameters.

Usage: python _train_worker.py WORKDIR OUT.npz [--kill-after-epoch E] [--epochs N]
                                 [--signal TYPE:STEP:SIG ...]
       python _train_worker.py WORKDIR OUT.npz --distributed PROCESS PROCESSES PORT
       python _train_worker.py WORKDIR OUT.npz --dump-only
(XLA_FLAGS may force several CPU devices; set by the parent.) With ``--distributed`` the worker
is one of PROCESSES processes of a jax.distributed run (coordinator on 127.0.0.1:PORT, CPU
collectives by gloo) and only trains; ``--dump-only`` then dumps the run in one process.
``--signal eval:4:KILL`` sends the worker SIGKILL just before it logs the evaluation of step 4
(on the epoch-end thread, after that step's checkpoints: the moment a kill can lose a line);
``train:3:INT`` SIGINT before the train line of step 3; repeatable.
"""

import json
import os
import signal
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from _synth import blob_train_val, tiny_config  # noqa: E402
from unet_jax.checkpoint import load_model  # noqa: E402
from unet_jax.model import model_to_pure  # noqa: E402
from unet_jax.train import train_and_evaluate  # noqa: E402

CONFIG = tiny_config("worker", epochs=2, log_every_steps=1, seed=3)


def _signal_before_records(argv):
    """Wrap RunLog.write to signal this process before writing the chosen records."""
    from unet_jax import rundir

    targets = {}
    for i, arg in enumerate(argv):
        if arg == "--signal":
            kind, step, sig = argv[i + 1].split(":")
            targets[(kind, int(step))] = getattr(signal, f"SIG{sig}")
    if not targets:
        return
    write = rundir.RunLog.write

    def signalling_write(self, record):
        sig = targets.pop((record.get("type"), record.get("step")), None)
        if sig is not None:
            os.kill(os.getpid(), sig)
            if sig != signal.SIGKILL:
                time.sleep(0.5)  # let the main thread take the signal while this one writes
        write(self, record)

    rundir.RunLog.write = signalling_write


def main(argv):
    global CONFIG
    workdir, out = argv[0], argv[1]
    if "--epochs" in argv:
        CONFIG = CONFIG.replace(epochs=int(argv[argv.index("--epochs") + 1]))
    _signal_before_records(argv)
    kill_after = (
        int(argv[argv.index("--kill-after-epoch") + 1]) if "--kill-after-epoch" in argv else None
    )
    if "--distributed" in argv:
        i = argv.index("--distributed")
        process, processes, port = (int(x) for x in argv[i + 1 : i + 4])
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(f"127.0.0.1:{port}", processes, process)

    def on_epoch_end(epoch, _):
        if kill_after is not None and epoch == kill_after:
            os.kill(os.getpid(), signal.SIGKILL)

    if "--dump-only" not in argv:
        data = blob_train_val()
        train_and_evaluate(CONFIG, workdir, data=data, on_epoch_end=on_epoch_end, progress=False)
        if "--distributed" in argv:
            return
    dump(workdir, out)


def dump(workdir, out):
    model, _, _ = load_model(workdir, step=CONFIG.epochs * 4)
    flat = jax.tree_util.tree_flatten_with_path(model_to_pure(model))[0]
    arrays = {jax.tree_util.keystr(k): np.asarray(v) for k, v in flat}
    losses = [
        json.loads(ln)["loss"]
        for ln in Path(workdir, "metrics.jsonl").read_text().splitlines()
        if json.loads(ln)["type"] == "train"
    ]
    np.savez(out, losses=np.array(losses), devices=jax.device_count(), **arrays)


if __name__ == "__main__":
    main(sys.argv[1:])
