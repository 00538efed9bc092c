"""`app.evaluate_lib.evaluate` on a labelled folder with no train split evaluates all of it."""

from __future__ import annotations

import json
import pathlib

import pytest

from app import evaluate_lib
from app.data import DataConfig
from models import preprocessing
from tests.helpers import save_bundle, tiny_model, write_folder


@pytest.mark.parametrize("layout", ["test_only", "classes_at_split_0"])
def test_every_image_of_an_evaluation_folder_is_evaluated(tmp_path, layout):
    data_dir = tmp_path / "photos"
    write_folder(data_dir / "test" if layout == "test_only" else data_dir, per_class=4)
    model = save_bundle(tmp_path / "run", tiny_model(2, 8), preprocessing.cifar(8), ["cat", "dog"])
    split = 0.1 if layout == "test_only" else 0.0
    result, paths = evaluate_lib.evaluate(
        evaluate_lib.EvalConfig(
            model=model,
            data=DataConfig(data_dir=str(data_dir), validation_split=split),
            output_dir=str(tmp_path / "out"),
            verbose=0,
        )
    )
    assert (result.split, result.num_examples) == ("test", 8)
    written = json.loads(pathlib.Path(paths["json"]).read_text())
    assert written["num_examples"] == 8 and paths["predictions"].endswith("predictions_test.png")
