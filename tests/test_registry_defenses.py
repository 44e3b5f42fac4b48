"""One registry of defenses: the benchmark report, its runner and the command line derive
every list of defenses from it, so a registered defense is known everywhere."""

from __future__ import annotations

import pytest

from ibau.bench import report as bench_report
from ibau.bench.runner import DEFENSE_ORDER
from ibau.defenses import DEFENSES, ROLES, create
from ibau.registry import Registry, UnknownName


def test_every_defense_carries_its_registry_attributes():
    assert isinstance(DEFENSES, Registry)
    orders = []
    for name, cls in DEFENSES.items():
        assert cls.name == name
        assert cls.display_name and cls.short_name, name
        assert cls.role in ROLES, name
        assert cls.data_role in ("clean", "training"), name
        assert isinstance(cls.cost_order, int) and not isinstance(cls.cost_order, bool), name
        orders.append(cls.cost_order)
    assert len(set(orders)) == len(orders)  # a strict order for the runner
    assert [n for n, c in DEFENSES.items() if c.role == "ours"] == ["ibau"]
    assert {c.display_name for c in DEFENSES.values()} >= {"I-BAU", "Neural Cleanse", "Fine-pruning", "DP-SGD"}


def test_unknown_defense_is_an_input_error_and_a_key_error_listing_the_known():
    with pytest.raises(UnknownName, match="unknown defense 'nope'; known: deepinspect"):
        create("nope")
    with pytest.raises(KeyError):
        create("nope")


def test_runner_order_is_no_defense_then_cost_order():
    assert DEFENSE_ORDER[0] == "none" and sorted(DEFENSE_ORDER[1:]) == sorted(DEFENSES)
    costs = [DEFENSES[n].cost_order for n in DEFENSE_ORDER[1:]]
    assert costs == sorted(costs)
    assert DEFENSE_ORDER[1] == "ibau"  # the method under test first: a grid cut short has it everywhere


def _record(defense: str, asr: float, time_to_effect: float | None) -> dict:
    return {"params": {"defense": defense, "model": {"name": "badnets"}, "protocol": {"clean_size": 500}},
            "label": f"Patch/{defense}",
            "result": {"before": {"acc": 0.9, "asr": 1.0}, "after": {"acc": 0.88, "asr": asr},
                       "time_to_effect": time_to_effect, "history": [{"asr": 1.0}, {"asr": asr}]}}


class _Exp:
    """What ``verdicts`` reads of an experiment."""

    def __init__(self, claims: list[str]):
        self.meta = {"evidence_for": claims}
        self.title = "Table"


@pytest.mark.parametrize("name", sorted(DEFENSES))
def test_report_knows_every_registered_defense(name):
    """A cell of any registered defense renders: its column heading comes from the registry
    and the verdicts (which name the baselines) do not fail on it."""
    cls = DEFENSES[name]
    assert bench_report.NAMES[name] == cls.short_name
    assert (name in bench_report.BASELINES) == (cls.role == "baseline")
    recs = [_record("ibau", 0.05, 1.0), _record(name, 0.5, 40.0), _record(name, 0.1, 60.0)]
    exps = {"t": _Exp(["effective", "baselines_fail", "sensitivity", "speed", "stability"])}
    verdicts = bench_report.verdicts({"t": recs}, exps, "cpu")
    evidence = " ".join(e for _, _, e in verdicts)
    if cls.role == "baseline":
        assert f"{cls.short_name}: fails on 1 of 2" in evidence  # claim 2 names it
        # claim 4: the ratio of the fastest baseline that took effect (mean of 40 and 60 s) to I-BAU's 1 s
        assert f"fastest effective baseline {cls.short_name} 50.0 s: 50x" in evidence
