"""Training wall time that survives interruptions: carried inside every checkpoint.

A run killed after epoch 9 and resumed in a later session must report the time of both
sessions. The elapsed seconds travel in the checkpoint (Lightning saves a callback's
``state_dict`` with it and restores it on resume), so the total counts the work up to each
checkpoint; time spent after the last checkpoint of an interrupted session is redone, and
counted once, in the session that redoes it.
"""

from __future__ import annotations

import time

from pytorch_lightning.callbacks import Callback


class TrainClock(Callback):
    def __init__(self, clock=time.perf_counter):
        self._clock = clock
        self._prior = 0.0  # seconds of earlier sessions, from the resumed checkpoint
        self.restored = False  # a resumed run whose checkpoint lacks the clock counts this session only
        self._start = clock()

    def on_fit_start(self, trainer, pl_module) -> None:
        self._start = self._clock()

    @property
    def seconds(self) -> float:
        return self._prior + self._clock() - self._start

    def state_dict(self) -> dict:
        return {"seconds": self.seconds}

    def load_state_dict(self, state_dict: dict) -> None:
        self._prior = float(state_dict["seconds"])
        self.restored = True
