import pytest

from backdoorlab.config import from_dict, stable_hash, to_dict
from backdoorlab.errors import BackdoorLabError
from backdoorlab.registry import Registry, split_spec


def test_registry_did_you_mean_and_params():
    reg: Registry = Registry("thing")

    @reg.register("badnets")
    def make(rate: float = 0.1):
        return rate

    assert reg.build("badnets") == 0.1
    assert reg.build({"name": "badnets", "rate": 0.2}) == 0.2
    with pytest.raises(BackdoorLabError, match="did you mean 'badnets'"):
        reg.get("badnet")
    with pytest.raises(BackdoorLabError, match="no parameter 'rat'.*did you mean 'rate'"):
        reg.build({"name": "badnets", "rat": 0.2})
    with pytest.raises(ValueError):
        reg.register("badnets")(make)
    assert split_spec("x") == ("x", {})


def test_stable_hash_is_order_independent_and_typed():
    from dataclasses import dataclass

    @dataclass(frozen=True)
    class C:
        a: int = 1
        b: float = 0.5

    assert stable_hash({"a": 1, "b": 2}) == stable_hash({"b": 2, "a": 1})
    assert stable_hash(C()) == stable_hash({"a": 1, "b": 0.5})
    assert stable_hash(C(a=2)) != stable_hash(C())
    assert from_dict(C, to_dict(C(a=3))) == C(a=3)
    with pytest.raises(BackdoorLabError, match="no setting 'c'"):
        from_dict(C, {"c": 1})
