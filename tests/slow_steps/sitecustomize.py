"""Test aid, loaded by Python at start-up when this folder is on PYTHONPATH: sleeps $SLOW_STEP_SECONDS after every
optimizer step of distill's trainer.

Tests that signal or kill a training run "between two checkpoints" need the run to last long enough for the test to
notice the first checkpoint, on any machine however fast (a CI machine once finished six tiny steps in 0.1 s, before
the test's SIGTERM arrived). The delay changes timing only: losses and weights are those of an undelayed run.
"""

import os
import time

_delay = float(os.environ.get("SLOW_STEP_SECONDS", "0") or 0)
if _delay > 0:
    import distill.training.train

    _original_step = distill.training.train.Distiller.training_step

    def _slowed_step(self):
        values = _original_step(self)
        time.sleep(_delay)
        return values

    distill.training.train.Distiller.training_step = _slowed_step
