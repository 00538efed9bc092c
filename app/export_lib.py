"""Exporting a trained model with real images: what `python -m app.export` runs.

The export library (`export/`) takes image arrays; this module reads them from a dataset
(`app.data`): a stratified sample of the train split calibrates the full-int8 model, another
of the test split (or else the validation split, held out of train with the training run's
seed and fraction, so the model has not seen it) measures every format's agreement with Keras.

Example:

    from app import data, export_lib
    job = export_lib.ExportJob(
        model="runs/cpu_quick/best.keras",
        data=data.DataConfig(data_dir="~/data/cifar10"),
    )
    report = export_lib.export_model(job)   # writes runs/cpu_quick/export/
"""

from __future__ import annotations

import dataclasses
import logging
import sys

from app import data
from app.data import DataConfig
from app.training.config import FLAGS_FILE
from common import files
from common.errors import UsageError
from common.pixel_limits import MAX_PIXELS
from export import FORMATS
from export.model_input import Sample, to_model_input

log = logging.getLogger(__name__)

EXPORT_DIR = "export"


@dataclasses.dataclass(frozen=True)
class ExportJob:
    """One export of a trained model.

    Attributes:
        model: the `.keras` file (labels.txt and preprocessing.json beside it).
        export_dir: output folder; None: `export/` beside the model.
        formats: some of `export.FORMATS`, in that order.
        data: where the real images come from (any dataset `app.data.load` reads; its seed
            and validation fraction pick the held-out images), or None: then no int8 model
            and no agreement figures.
        num_calibration: training images that calibrate the full-int8 model.
        num_evaluation: held-out images on which every format is compared with Keras.
        author: the author field of the `.tflite` metadata.
        version: the version field of the `.tflite` metadata; empty: the export's UTC time.
    """

    model: str
    export_dir: str | None = None
    formats: tuple[str, ...] = FORMATS
    data: DataConfig | None = None
    num_calibration: int = 200
    num_evaluation: int = 500
    author: str = ""
    version: str = ""
    max_pixels: int = MAX_PIXELS  # the SavedModel refuses larger images


def calibration_and_evaluation(
    config: DataConfig,
    class_names: list[str],
    image_size: int,
    num_calibration: int,
    num_evaluation: int,
) -> tuple[Sample, Sample | None]:
    """(calibration sample from train, evaluation sample from test/validation or None).

    Both are stratified, seeded by `config.seed`, and resized like app input
    (`export.model_input.to_model_input`). The evaluation labels are None when the data's classes
    are not the model's.

    Raises:
        app.data.DataError: the data cannot be read.
    """
    splits = data.load(
        dataclasses.replace(config, train_limit=num_calibration, eval_limit=max(num_evaluation, 1))
    )
    same_classes = list(splits.class_names) == list(class_names)
    if not same_classes:
        log.warning(
            "the data's classes (%s) are not the model's (%s): accuracy is not reported",
            ", ".join(splits.class_names),
            ", ".join(class_names),
        )
    train_images, _ = data.sample_images(splits.train, num_calibration, config.seed)
    calibration = Sample(
        to_model_input(train_images, image_size), None, splits.train.origin or "train"
    )
    if num_evaluation == 0:
        return calibration, None
    held_out = splits.test if splits.test is not None else splits.validation
    images, labels = data.sample_images(held_out, num_evaluation, config.seed)
    if splits.test is not None:
        split = "test split"
    else:
        split = "validation split" + (" held out of train" if splits.validation_held_out else "")
    source = f"{held_out.origin or config.data_dir} ({split})"
    evaluation = Sample(
        to_model_input(images, image_size), labels if same_classes else None, source
    )
    return calibration, evaluation


def export_model(job: ExportJob) -> dict:
    """Loads the model, samples the real images, writes every format and the report.

    Prints what `python -m app.export` prints: a note when there are no real images, the
    report as a table, and what was written where.

    Returns:
        The report (what report.json holds).

    Raises:
        UsageError: bad counts or formats, an unusable model, or int8 without real images
            (all before anything is written).
        app.data.DataError: the real images cannot be read.
    """
    from export import all_formats, report
    from models.bundle import load_model_bundle

    if job.num_calibration < 1 or job.num_evaluation < 0:
        raise UsageError("--num_calibration must be >= 1 and --num_evaluation >= 0")
    bundle = load_model_bundle(job.model)
    export_dir = job.export_dir or files.join(files.dirname(job.model), EXPORT_DIR)
    calibration = evaluation = None
    if job.data is not None:
        calibration, evaluation = calibration_and_evaluation(
            job.data,
            bundle.class_names,
            bundle.preprocessing.image_size,
            job.num_calibration,
            job.num_evaluation,
        )
    elif "int8" not in job.formats:  # with int8, export_all refuses and says how to fix it
        print(
            "note: no --representative_data nor flags.txt: no agreement figures in the report",
            file=sys.stderr,
        )
    flags_path = files.join(files.dirname(job.model), FLAGS_FILE)
    training_flags = None
    if files.isfile(flags_path):  # the model card's training recipe
        training_flags = files.read_text(flags_path)
    config = all_formats.ExportConfig(
        export_dir,
        job.formats,
        calibration,
        evaluation,
        author=job.author,
        version=job.version,
        training_flags=training_flags,
        max_pixels=job.max_pixels,
    )
    result = all_formats.export_all(bundle, config)
    print(report.to_markdown(result))
    print(f"exported {', '.join(job.formats)} to {export_dir}")
    return result
