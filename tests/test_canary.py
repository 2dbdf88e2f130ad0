"""The accuracy canary with the shipped trained weights: the gaps that catch selection bugs (seconds on CPU)."""
import json

import numpy as np
import pytest

from vtr.bench import canary
from vtr.bench import canary_task as task
from vtr.methods import REGISTRY


def test_task_marks_exactly_the_patches_the_square_covers():
    images, answers, informative = task.samples(32, seed=3)
    patches = images.reshape(32, task.GRID, task.PATCH, task.GRID, task.PATCH, 3).transpose(0, 1, 3, 2, 4, 5)
    saturated = (patches.max(-1).astype(int) - patches.min(-1)) > 100  # grey texture has equal channels
    assert (saturated.reshape(32, task.GRID ** 2, -1).any(-1) == informative).all()
    assert informative.sum(1).min() >= 1 and informative.sum(1).max() <= 4
    assert set(np.unique(answers)) == set(range(len(task.COLOURS)))


def test_training_inputs_equal_the_processors():
    _, processor = task.build()
    images, _, _ = task.samples(4, seed=0)
    np.testing.assert_allclose(task.pixels(images, processor).numpy(),
                               task.inputs(images, processor)["pixel_values"].numpy(), atol=1e-5)


def test_shipped_weights_are_small():
    assert task.WEIGHTS.stat().st_size < 2 * 2**20


def test_canary_gaps():
    """With the shipped weights (measured over 256 samples: dense 1.000; at 25% kept oracle-informative 1.000,
    random 0.785, oracle-background 0.480; at 12.5% random 0.648): keeping the informative patches stays at dense,
    random falls well below, keeping only background falls lower still, halfway to chance (the CLIP layer before
    the projector copies some of the square's colour into other patches). A selection bug (wrong slots,
    positions, rows) moves a method toward the background oracle."""
    report = canary.run(["random"], kept=(0.25, 0.125), n=256)
    curves = {label: c["accuracy"] for label, c in report["curves"].items()}
    dense, chance = report["dense"], report["chance"]
    assert dense >= 0.95
    assert min(curves["oracle-informative"]) >= dense - 0.05
    quarter, eighth = curves["random (compact)"]
    assert quarter <= dense - 0.15 and eighth <= dense - 0.25
    assert max(curves["oracle-background"]) <= min(quarter - 0.2, chance + 0.3)
    assert report["curves"]["random (compact)"]["mean_kept_tokens"] == [16, 8]


def test_every_registered_method_is_on_the_curve(tmp_path):
    out = tmp_path / "canary"
    canary.main(["--samples", "16", "--kept", "0.5", "--out", str(out), "--quiet"])
    report = json.loads(out.with_suffix(".json").read_text())
    methods = {label.split(" ")[0] for label in report["curves"]}
    assert set(REGISTRY) | {"oracle-informative", "oracle-background"} == methods | set(report["refused"])
    # flowcut, mustdrop: their 2-layer tower has no layer below the feature layer; vflowopt: LLaVA-OneVision only;
    # evs and vidcom2: videos only (LLaVA-1.5 takes none)
    assert set(report["refused"]) == {"flowcut", "mustdrop", "vflowopt", "evs", "vidcom2"}
    for name, cls in REGISTRY.items():  # pre-LLM methods under both position policies
        if cls.stage.value == "pre_llm" and name not in report["refused"]:
            assert {f"{name} (compact)", f"{name} (original)"} <= set(report["curves"])
    assert out.with_suffix(".png").stat().st_size > 0


def test_budgets_out_of_a_methods_reach_leave_a_gap(tmp_path):
    """PyramidDrop's layer-averaged budget cannot go below 1/2 on the canary's 2-layer model (layer 0 runs on every
    token): that point of its curve is empty, the others are measured, and the table and plot show the gap."""
    report = canary.run(["pdrop"], kept=(0.5, 0.25), n=8)
    assert report["curves"]["pdrop"]["accuracy"][1] is None and report["curves"]["pdrop"]["accuracy"][0] >= 0
    assert report["curves"]["pdrop"]["mean_kept_tokens"][1] is None
    assert canary.table(report).splitlines()[-3].split()[-1] == "-"
    canary.plot(report, str(tmp_path / "gap.png"))


def test_unknown_method_is_refused():
    with pytest.raises(ValueError, match="unknown method"):
        canary.run(["dartt"], kept=(0.5,), n=4)
