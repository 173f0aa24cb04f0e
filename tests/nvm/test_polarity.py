"""Polarity: a unipolar layer never holds a weight of the wrong sign after training; the evolutionary search returns
an assignment that compile's placement honours (bipolar layers on column pairs, unipolar ones on one array)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from cimlab.chip_sim.profiles import load_profile
from cimlab.deploy.schedule import plan
from cimlab.firmware_bridge.errors import ConfigError
from cimlab.polarity import column_cost, paired_layers, search_polarity, train_projected, weighted_layers
from cimlab.training.models import build_model
from cimlab.training.tasks import load_task


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_unipolar_layers_hold_no_weight_of_the_wrong_sign_after_training() -> None:
    data = load_task("digits", limit=400)
    torch.manual_seed(0)
    model = build_model("digits_mlp")
    assignment = {"1": "unipolar-pos", "4": "unipolar-neg"}
    train_projected(model, data.x_train, data.y_train, assignment, steps=40, lr=1e-2)
    pos, neg = dict(weighted_layers(model))["1"].weight, dict(weighted_layers(model))["4"].weight
    assert int((pos < 0).sum()) == 0 and int((pos > 0).sum()) > 0
    assert int((neg > 0).sum()) == 0 and int((neg < 0).sum()) > 0
    with pytest.raises(ConfigError, match="not one of"):
        train_projected(model, data.x_train, data.y_train, {"1": "positive"}, steps=1)


def test_column_cost_by_hand() -> None:
    model = build_model("digits_mlp")  # 64x64 and 10x64 weights
    assert column_cost(model, {}) == 1.0
    assert column_cost(model, {"1": "unipolar-pos", "4": "unipolar-neg"}) == 0.5
    assert column_cost(model, {"1": "unipolar-pos"}) == pytest.approx((4096 + 2 * 640) / (2 * 4096 + 2 * 640))


def test_search_result_is_honoured_by_the_placement() -> None:
    data = load_task("digits", limit=300)
    torch.manual_seed(0)
    model = build_model("digits_mlp")
    train_projected(model, data.x_train, data.y_train, {}, steps=30, lr=1e-2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    res = search_polarity(model, data.x_train, data.y_train, generations=2, offspring=2, steps=10, cost_weight=0.5)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # the model is left as it was
    assert 2 <= res.evaluations <= 6 and set(res.assignment) == {"1", "4"}
    assert res.fitness == pytest.approx(res.accuracy - 0.5 * res.cost)
    assert res.fitness == max(h["fitness"] for h in res.history)
    spec = load_profile("nvm-2bit").spec
    sched = plan(spec, [("1", 64, 64), ("4", 64, 10)], paired=paired_layers(res.assignment))
    for name, lm in sched.layers:
        assert all(t.paired == (res.assignment[name] == "bipolar") for t in lm.tiles)
