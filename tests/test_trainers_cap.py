"""The max_time cap: parsed and checked up front, forecast from the pace, and named in the model card."""

import warnings
from datetime import timedelta
from types import SimpleNamespace

import pytest
import torch
from pytorch_lightning.callbacks import EarlyStopping, Timer

from trainers.api import TrainConfig, model_card, stop_reason
from trainers.clock import CapForecast, TrainClock, cap_forecast, max_time_seconds


def test_max_time_is_parsed_and_a_bad_value_is_refused_up_front(tmp_path):
    assert max_time_seconds("00:01:00:00") == 3600.0
    assert max_time_seconds("01:02:03:04") == ((24 + 2) * 60 + 3) * 60 + 4
    for bad in ("1h", "01:00:00", "00:-1:00:00"):
        with pytest.raises(ValueError, match="max_time"):
            max_time_seconds(bad)
    with pytest.raises(ValueError, match="'1h'"):
        TrainConfig(arch="resnet18", out=str(tmp_path), max_time="1h")


def test_forecast_by_hand():
    # 2 epochs in 200 s, the last took 81 s: 58 more need 4698 s, 4898 s in all (82 min) > 3600 s;
    # the 3400 s left hold 41 whole epochs, so the cap stops the run after ~43, inside the crops
    text = cap_forecast(200.0, 2, 81.0, 60, 3600.0, full_from_epoch=46)
    assert "~82 min" in text and "after ~43 epochs" in text and "full-image epochs (from epoch 46)" in text
    assert "full-image" not in cap_forecast(200.0, 2, 81.0, 60, 3600.0, full_from_epoch=40)
    # fits: 100 + 58 * 50 = 3000 s <= 3600 s
    assert cap_forecast(100.0, 2, 50.0, 60, 3600.0) is None
    assert cap_forecast(100.0, 60, 50.0, 60, 10.0) is None  # nothing left to cut


def test_forecast_warns_once_from_the_second_epoch():
    now = [0.0]
    clock = TrainClock(clock=lambda: now[0])
    forecast = CapForecast(clock, max_epochs=60, budget_seconds=3600.0, full_from_epoch=46)

    def epoch(index, seconds):
        trainer = SimpleNamespace(current_epoch=index, is_global_zero=True)
        forecast.on_train_epoch_start(trainer, None)
        now[0] += seconds
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            forecast.on_train_epoch_end(trainer, None)
        return [str(w.message) for w in caught]

    assert epoch(0, 500.0) == []  # start-up epoch: never judged, however slow
    (message,) = epoch(1, 81.0)  # 581 s + 58 x 81 s = 5279 s > 3600 s; 3019 s left hold 37 epochs
    assert "~88 min" in message and "after ~39 epochs" in message and message == forecast.message
    assert epoch(2, 81.0) == []  # once


def _trainer(current_epoch, *callbacks):
    return SimpleNamespace(current_epoch=current_epoch, callbacks=list(callbacks))


def test_stop_reason_names_what_ended_training(tmp_path):
    cfg = TrainConfig(arch="resnet18", out=str(tmp_path), max_epochs=60, max_time="00:01:00:00")
    assert stop_reason(_trainer(60, EarlyStopping(monitor="val_acc")), cfg) == "the schedule's end"
    spent = Timer(duration=timedelta(seconds=0))  # nothing left of the budget
    assert stop_reason(_trainer(58, spent), cfg) == "the max_time cap (00:01:00:00), before the schedule's end"
    assert "limit" in stop_reason(_trainer(58, Timer(duration=timedelta(days=1))), cfg)
    stop = EarlyStopping(monitor="val_acc", mode="max", stopping_threshold=0.999)
    should_stop, stop.stopping_reason_message = stop._evaluate_stopping_criteria(torch.tensor(1.0))  # as Lightning does
    assert should_stop
    assert stop_reason(_trainer(12, stop, spent), cfg).startswith("early stopping (Stopping threshold reached")


def test_card_says_how_far_the_schedule_got():
    meta = {"arch": "resnet18", "image_size": 128, "class_names": ["a", "b"], "mean": [0.5] * 3, "std": [0.2] * 3,
            "dataset_fingerprint": "synth-x", "test_accuracy": 0.99, "best_val_accuracy": 0.994,
            "per_class_accuracy": {"a": 1.0, "b": 0.98}, "confusion_matrix": [[50, 0], [1, 49]],
            "epochs": 58, "max_epochs": 60, "stopped_by": "the max_time cap (00:01:00:00), before the schedule's end",
            "global_step": 7392, "train_seconds": 3603.5, "precision": "bf16-mixed", "hardware": "cpu",
            "torch": "2", "pretrained": False,
            "data": {"data": None, "train_source": "stream", "synth": {}, "train_synth": None, "train_crop": None}}
    card = model_card(meta)
    assert "| epochs / steps | 58 of 60 / 7392 (stopped by the max_time cap (00:01:00:00), before the schedule's end) |" in card
    del meta["max_epochs"], meta["stopped_by"]  # a model.json written before these were recorded
    assert "| epochs / steps | 58 / 7392 |" in model_card(meta)
    # the test step undoes only mixed precision's autocast: a "-true" run tests in its own precision
    assert "| precision | bf16-mixed in training; the test in fp32 |" in card
    for precision, says in (("bf16-true", "bf16-true (training and test)"), ("32-true", "32-true")):
        assert f"| precision | {says} |" in model_card({**meta, "precision": precision})


def test_a_capped_fit_plan_carries_the_forecast(tmp_path):
    from trainers.api import plan_fit

    base = dict(arch="resnet18", image_size=32, out=str(tmp_path / "run"), batch_size=32, train_length=64,
                val_length=32, test_length=36, precision="32-true", num_workers=0, progress_bar=False,
                curriculum_epochs=0, synth={"size_bands": [[0.3, 0.4], [0.2, 0.25]]})
    plan = plan_fit(TrainConfig(**base, max_epochs=7, max_time="00:00:30:00", train_crop=28, train_crop_epochs=5))
    (forecast,) = [c for c in plan.trainer.callbacks if isinstance(c, CapForecast)]
    assert (forecast.max_epochs, forecast.budget_seconds, forecast.full_from_epoch) == (7, 1800.0, 5)
    assert forecast.clock is plan.clock
    uncapped = plan_fit(TrainConfig(**base, max_epochs=7))
    assert not any(isinstance(c, CapForecast) for c in uncapped.trainer.callbacks)
