"""Training wall time: a clock that survives interruptions, and a forecast against ``max_time``.

A run killed after epoch 9 and resumed in a later session must report the time of both
sessions. The elapsed seconds travel in the checkpoint (Lightning saves a callback's
``state_dict`` with it and restores it on resume), so the total counts the work up to each
checkpoint; time spent after the last checkpoint of an interrupted session is redone, and
counted once, in the session that redoes it.

``CapForecast`` warns when the pace says the ``max_time`` cap will stop the run before the
schedule's end (the schedule does not shrink to fit the cap).
"""

from __future__ import annotations

import time
import warnings

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


def max_time_seconds(text: str) -> float:
    """Seconds of a ``max_time`` string "DD:HH:MM:SS", parsed by Lightning's own `Timer` (so what
    passes here is what the Trainer accepts); ValueError naming the value otherwise."""
    from pytorch_lightning.utilities.exceptions import MisconfigurationException
    from pytorch_lightning.callbacks import Timer

    try:
        return float(Timer(duration=str(text), verbose=False).time_remaining())
    except MisconfigurationException:
        raise ValueError(f"max_time must be 'DD:HH:MM:SS' (e.g. 00:01:00:00 for one hour), got {text!r}") from None


def positive_max_time(text: str, name: str = "max_time") -> float:
    """`max_time_seconds`, refusing a zero cap (``name`` says where it was given): Lightning
    accepts 00:00:00:00, then stops before the first step, and the fit ends without a checkpoint."""
    seconds = max_time_seconds(text)
    if seconds <= 0:
        raise ValueError(f"{name} {text}: a zero wall-clock cap stops training before its first step; give a "
                         f"positive DD:HH:MM:SS (e.g. 00:01:00:00), or none for no cap")
    return seconds


def cap_forecast(seconds_done: float, epochs_done: int, last_epoch_seconds: float, max_epochs: int,
                 budget_seconds: float, full_from_epoch: int | None = None) -> str | None:
    """Why the time cap will cut the schedule, at the pace of the last epoch; None if it fits.

    The schedule does not shrink to fit ``max_time``: a cap reached early cuts the one-cycle
    anneal and, with crops, may stop the run before its first full-image epoch.
    """
    remaining = max_epochs - epochs_done
    if remaining <= 0 or last_epoch_seconds <= 0:
        return None
    needed = seconds_done + remaining * last_epoch_seconds
    if needed <= budget_seconds:
        return None
    stop_at = epochs_done + int(max(budget_seconds - seconds_done, 0.0) // last_epoch_seconds)
    text = (f"at {last_epoch_seconds:.0f} s per epoch the {max_epochs}-epoch schedule needs ~{needed / 60:.0f} min, "
            f"more than the max_time cap of {budget_seconds / 60:.0f} min: the run will stop after ~{stop_at} "
            f"epochs, before the learning rate has annealed")
    if full_from_epoch is not None and stop_at < full_from_epoch:
        text += f" and before the full-image epochs (from epoch {full_from_epoch})"
    return text + ("; a shorter schedule (--max-epochs, --train-crop-epochs) fits the cap, "
                   "or raise --max-time")


class CapForecast(Callback):
    """Warns once, from the end of the second epoch on, when the pace says the cap will cut the schedule.

    The first epoch is skipped: it carries the start-up costs. ``clock`` is the run's `TrainClock`,
    so a resumed run counts its earlier sessions (as Lightning's own timer does).
    """

    def __init__(self, clock: TrainClock, max_epochs: int, budget_seconds: float,
                 full_from_epoch: int | None = None):
        self.clock, self.max_epochs, self.budget_seconds = clock, int(max_epochs), float(budget_seconds)
        self.full_from_epoch = full_from_epoch
        self.message: str | None = None
        self._epoch_start: float | None = None

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._epoch_start = self.clock.seconds

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if self.message is not None or self._epoch_start is None or trainer.current_epoch < 1:
            return
        now = self.clock.seconds
        message = cap_forecast(now, trainer.current_epoch + 1, now - self._epoch_start, self.max_epochs,
                               self.budget_seconds, self.full_from_epoch)
        if message is not None:
            self.message = message
            if trainer.is_global_zero:
                warnings.warn(message, UserWarning, stacklevel=2)
