"""A dataset's samples fingerprint: the same samples stored as hub, imagefolder or arrow files are
one dataset to the evaluation's training-data check (their file fingerprints differ); both
fingerprints travel in model.json, the model card and the Lightning checkpoints."""

import io
import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

import test_pipeline_standins as S
from shapesynth import ShapeSynth, SynthConfig, dataset_fingerprint, samples_fingerprint
from shapesynth.config import PAPER_SIZE_BANDS, SPLITS
from shapesynth.generate import generate
from shapesynth.readers import open_split
from shapesynth.schema import decode_image, encode_png
from validation.pipeline.checks import check_training_data

FORMATS = ("hub", "imagefolder", "arrow")
CFG = SynthConfig(image_size=32, size_bands=PAPER_SIZE_BANDS[:2], split_sizes={"train": 12, "val": 4, "test": 6},
                  bg_pool_sizes={"train": 2, "val": 1, "test": 1})


def _generate(out, cfg=CFG, fmt="hub"):
    summary = generate(cfg, out, fmt=fmt, samples_per_shard=4, progress=False)
    assert summary.complete
    return out


@pytest.fixture(scope="module")
def copies(tmp_path_factory):
    """One recipe written in each format."""
    root = tmp_path_factory.mktemp("copies")
    return {fmt: _generate(root / fmt, fmt=fmt) for fmt in FORMATS}


def _edited(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


# --------------------------------------------------------------------------- the fingerprint itself
def test_every_format_stores_the_generators_samples_and_has_one_samples_fingerprint(copies):
    """The generator is a pure function of (config, split, index) over the recipe's background
    pools: each format decodes to the same images, masks, regions, labels and metadata, which are
    the generator's own. Only the file fingerprints tell the formats apart."""
    synth = ShapeSynth(CFG)
    for split in SPLITS:
        splits = {fmt: open_split(path, split) for fmt, path in copies.items()}
        assert {len(s) for s in splits.values()} == {CFG.split_size(split)}
        for i in range(CFG.split_size(split)):
            want = synth.sample(split, i)
            for fmt, records in splits.items():
                image, mask, region, label, index = records[i]
                assert index == i and label == want.label, (fmt, split, i)
                assert np.array_equal(image, want.image), (fmt, split, i)
                assert np.array_equal(mask, np.rint(want.mask * 255) / np.float32(255)), (fmt, split, i)
                assert np.array_equal(region, np.rint(want.region * 255) / np.float32(255)), (fmt, split, i)
                assert records.metadata(i) == splits["hub"].metadata(i), (fmt, split, i)
    file_fps = {fmt: dataset_fingerprint(path) for fmt, path in copies.items()}
    assert len(set(file_fps.values())) == 3
    sample_fps = {fmt: samples_fingerprint(path) for fmt, path in copies.items()}
    assert len(set(sample_fps.values())) == 1, sample_fps
    assert len(sample_fps["hub"]) == 16 and int(sample_fps["hub"], 16) >= 0


def test_a_changed_pixel_label_metadata_value_or_sample_count_changes_the_samples_fingerprint(copies, tmp_path):
    before = samples_fingerprint(copies["imagefolder"])

    pixel = _edited(copies["imagefolder"], tmp_path / "pixel")
    png = pixel / "test" / "00001" / "images" / "000005.png"
    image = decode_image(png.read_bytes())
    image[0, 0, 0] ^= 1
    png.write_bytes(encode_png(image))
    assert samples_fingerprint(pixel) != before

    def edit_first_row(name, change):
        folder = _edited(copies["imagefolder"], tmp_path / name)
        meta = folder / "val" / "00000" / "metadata.jsonl"
        rows = [json.loads(line) for line in meta.read_text().splitlines()]
        change(rows[0])
        meta.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))
        return folder

    relabelled = edit_first_row("label", lambda row: row.update(label=(row["label"] + 1) % 6))
    renamed = edit_first_row("meta", lambda row: row.update(bg_name=row["bg_name"] + "x"))
    dropped = edit_first_row("dropped", lambda row: row.update(index=99))  # sample 0 gone, 99 added
    fps = {samples_fingerprint(f) for f in (relabelled, renamed, dropped)}
    assert len(fps) == 3 and before not in fps

    reseeded = _generate(tmp_path / "reseeded", CFG.replace(seed=CFG.seed + 1), fmt="imagefolder")
    assert samples_fingerprint(reseeded) != before


def test_the_same_rows_in_rewritten_files_keep_the_samples_fingerprint(copies, tmp_path):
    """A parquet file rewritten by another tool (other compression, row groups) holds other bytes
    but the same samples."""
    hub = _edited(copies["hub"], tmp_path / "rewritten")
    for f in sorted((hub / "data").glob("train-*.parquet")):
        buf = io.BytesIO()
        pq.write_table(pq.read_table(f), buf, compression="zstd", row_group_size=1)
        f.write_bytes(buf.getvalue())
    assert dataset_fingerprint(hub) != dataset_fingerprint(copies["hub"])
    assert samples_fingerprint(hub) == samples_fingerprint(copies["hub"])


# --------------------------------------------------------------------------- the training-data check
def _check(data_fp, model_meta, data_samples):
    notes, calls = [], []

    def thunk():
        calls.append(1)
        return data_samples

    check_training_data("/data/copy", ["m.ckpt"], [model_meta], data_fp, notes.append, thunk)
    return notes, len(calls)


def test_the_training_data_check_compares_samples_when_the_files_differ():
    meta = {"data": {"data": "/data/hub", "synth": None}, "dataset_fingerprint": "files-a",
            "dataset_samples_fingerprint": "samples-1"}
    # another format of the same samples: nothing to say
    assert _check("files-b", meta, "samples-1") == ([], 1)
    # other samples (edited files, in this format or another): the warning
    notes, calls = _check("files-b", meta, "samples-2")
    assert calls == 1 and len(notes) == 1
    assert ("it was trained on another dataset (/data/hub, fingerprint files-a) than /data/copy "
            "(fingerprint files-b)") in notes[0]
    # the dataset's samples cannot be fingerprinted: the files decide, as before
    assert _check("files-b", meta, None)[0] == notes
    # the same files: the samples are not even looked at
    assert _check("files-a", meta, "samples-2") == ([], 0)


def test_a_model_without_a_samples_fingerprint_is_checked_as_before():
    old = {"data": {"data": "/data/hub", "synth": None}, "dataset_fingerprint": "files-a"}
    notes, calls = _check("files-b", old, "samples-1")
    assert calls == 0 and len(notes) == 1 and "fingerprint files-a" in notes[0]
    assert _check("files-b", {**old, "dataset_samples_fingerprint": None}, "samples-1")[0] == notes
    notes = []
    check_training_data("/data/copy", ["m.ckpt"], [old], "files-b", notes.append)  # no samples_fingerprint given
    assert len(notes) == 1


def test_the_pipeline_asks_the_datasets_samples_fingerprint_once(tmp_path, capsys):
    """run_eval's own wiring: the Components' samples fingerprint, asked once for all the models."""
    from validation.pipeline.run import run_eval

    torch.set_num_threads(1)
    data = tmp_path / "data"
    data.mkdir()
    recorded = {"copy": "samples-1", "edited": "samples-2", "old": None}
    paths = S.make_models(tmp_path, recorded)

    def load_model(path):
        model, meta = S.load_model(path)
        meta = {**meta, "data": {"data": "/elsewhere/hub", "synth": None}, "dataset_fingerprint": "abc"}
        if recorded[Path(path).stem] is not None:
            meta["dataset_samples_fingerprint"] = recorded[Path(path).stem]
        return model, meta

    asked = []
    comps = S.components()
    comps.load_model = load_model
    comps.samples_fingerprint = lambda path: asked.append(path) or "samples-1"
    config = S.config(paths, methods=["halfcam"], metrics=["gt_cosine"], mixes=["identity"], data=str(data),
                      image_range=(0, 4))
    summary = run_eval(config, tmp_path / "run", components=comps, progress=False)
    err = capsys.readouterr().err
    for path, warned in zip(paths, (False, True, True)):
        line = (f"warning: --model {path}: it was trained on another dataset (/elsewhere/hub, fingerprint abc) "
                f"than {data} (fingerprint tiny-fingerprint)")
        assert (line in err) == warned, path
    assert sum("another dataset" in w for w in summary["warnings"]) == 2
    assert asked == [str(data)]


# --------------------------------------------------------------------------- recorded by training
@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from trainers.api import TrainConfig, fit

    root = tmp_path_factory.mktemp("trained")
    cfg = CFG.replace(size_bands=((0.3, 0.4), (0.2, 0.25)), split_sizes={"train": 16, "val": 6, "test": 6})
    data = _generate(root / "hub", cfg)
    out = root / "run"
    meta = fit(TrainConfig(arch="resnet18", image_size=32, out=str(out), data=str(data), train_source="disk",
                           batch_size=16, max_epochs=1, precision="32-true", num_workers=0, progress_bar=False,
                           curriculum_epochs=0, log_every_n_steps=1))
    return {"cfg": cfg, "data": data, "out": out, "meta": meta, "root": root}


def test_training_records_both_fingerprints_in_model_json_card_and_checkpoints(trained):
    from trainers import load_model

    data, out = trained["data"], trained["out"]
    files, samples = dataset_fingerprint(data), samples_fingerprint(data)
    assert trained["meta"]["dataset_fingerprint"] == files
    assert trained["meta"]["dataset_samples_fingerprint"] == samples
    recorded = json.loads((out / "model.json").read_text())
    assert recorded["dataset_fingerprint"] == files and recorded["dataset_samples_fingerprint"] == samples
    card = (out / "MODEL_CARD.md").read_text()
    assert f"| dataset fingerprint | `{files}` |" in card
    assert f"| samples fingerprint | `{samples}` (the dataset's samples, the same in any storage format) |" in card
    for name in ("best.ckpt", "last.ckpt"):
        _, meta = load_model(out / "checkpoints" / name)
        assert meta["dataset_fingerprint"] == files, name
        assert meta["dataset_samples_fingerprint"] == samples, name
        assert meta["data"]["data"] == str(data) and meta["data"]["train_source"] == "disk", name


def _ckpt_notes(ckpt, data):
    from trainers import load_model

    _, meta = load_model(ckpt)
    notes = []
    check_training_data(str(data), [str(ckpt)], [meta], dataset_fingerprint(data), notes.append,
                        lambda: samples_fingerprint(data))
    return notes


def test_a_checkpoint_is_checked_against_the_evaluated_dataset(trained):
    """A .ckpt evaluated on other data used to pass silently (its metadata had no fingerprint);
    the same samples in another format say nothing."""
    ckpt = trained["out"] / "checkpoints" / "best.ckpt"
    arrow = _generate(trained["root"] / "arrow", trained["cfg"], fmt="arrow")
    assert _ckpt_notes(ckpt, trained["data"]) == []
    assert _ckpt_notes(ckpt, arrow) == []
    other = _generate(trained["root"] / "other", trained["cfg"].replace(seed=5))
    notes = _ckpt_notes(ckpt, other)
    assert len(notes) == 1 and f"it was trained on another dataset ({trained['data']}, fingerprint " in notes[0]
    # the training data's own format, one label edited by hand: the same recipe, other samples
    edited = _edited(trained["data"], trained["root"] / "edited")
    shard = sorted((edited / "data").glob("test-*.parquet"))[0]
    table = pq.read_table(shard)
    labels = table.column("label").to_pylist()
    labels[0] = (labels[0] + 1) % 6
    pq.write_table(table.set_column(table.schema.get_field_index("label"), table.schema.field("label"),
                                    pa.array(labels, table.schema.field("label").type)), shard)
    notes = _ckpt_notes(ckpt, edited)
    assert len(notes) == 1 and f"than {edited} (fingerprint {dataset_fingerprint(edited)})" in notes[0]


def test_checkpoints_written_before_the_fingerprints_read_as_before(trained, tmp_path):
    from trainers import load_model

    ckpt = torch.load(trained["out"] / "checkpoints" / "best.ckpt", map_location="cpu", weights_only=True)
    for key in ("data", "dataset_fingerprint", "dataset_samples_fingerprint"):
        ckpt["hyper_parameters"].pop(key, None)
    torch.save(ckpt, tmp_path / "old.ckpt")
    _, meta = load_model(tmp_path / "old.ckpt")
    assert meta["dataset_fingerprint"] is None and meta["dataset_samples_fingerprint"] is None
    assert "data" not in meta
