"""Train CWM: `python train.py --config configs/<stage>.py --workdir DIR [--config.key=value ...]`.

One process per host. On a multi-host TPU slice every host runs this same command and `jax.distributed` is set up
from the TPU environment; elsewhere pass --coordinator_address, --num_processes and --process_id (several local CPU
processes work too, with gloo collectives). A run resumes from the latest complete checkpoint in the workdir.
"""

import os
import sys

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Run config file (configs/*.py).", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Folder for checkpoints, metrics and TensorBoard events.")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (multi-process runs).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes (multi-process runs).")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index (multi-process runs).")
_MAX_STEPS = flags.DEFINE_integer("max_steps", None, "Stop after this many steps of this invocation.")


def _distributed_init():
    import jax

    if _COORDINATOR.value:
        # Collectives between CPU devices of different processes (local multi-process runs); TPUs ignore it.
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
    elif "TPU_WORKER_HOSTNAMES" in os.environ and "," in os.environ["TPU_WORKER_HOSTNAMES"]:
        jax.distributed.initialize()  # a multi-host TPU slice: everything comes from the TPU environment


def main(argv):
    del argv
    from cwm_jax.config import ConfigError
    from cwm_jax.data import DataError
    from cwm_jax.train.loop import TrainingError, setup_logging, skip_absent_accelerators, train

    setup_logging()

    skip_absent_accelerators()
    _distributed_init()

    try:
        train(_CONFIG.value, _WORKDIR.value, max_steps=_MAX_STEPS.value)
    except (ConfigError, DataError, TrainingError) as e:
        print(f"train.py: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    flags.mark_flags_as_required(["config", "workdir"])
    app.run(main)
