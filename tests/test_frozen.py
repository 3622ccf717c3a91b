"""``fast_init``: the request, decision and step objects are built as their dataclass builds them, and
stay frozen."""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any

import pytest

from pdp.decision import Decision, Step
from pdp.frozen import fast_init
from pdp.request import CheckRequest
from pdp.request_reader import RawRequest, Via

_CLASSES = (Decision, Step, CheckRequest, RawRequest)


def _plain(cls: type) -> Any:
    """The same class as ``dataclasses`` alone makes it (its generated ``__init__``)."""
    fields = [(f.name, f.type, f) for f in dataclasses.fields(cls)]
    return dataclasses.make_dataclass(cls.__name__, fields, frozen=True, slots=True)


@pytest.mark.parametrize("cls", _CLASSES, ids=lambda c: c.__name__)
def test_the_signature_is_the_dataclasses_own(cls: type) -> None:
    ours = inspect.signature(cls).parameters
    theirs = inspect.signature(_plain(cls)).parameters
    assert list(ours) == list(theirs)
    for name, parameter in theirs.items():
        assert (ours[name].default is inspect.Parameter.empty) == (parameter.default is inspect.Parameter.empty)


@pytest.mark.parametrize("cls", _CLASSES, ids=lambda c: c.__name__)
def test_every_field_holds_what_was_given_or_its_default(cls: type) -> None:
    required = {f.name: f"value of {f.name}" for f in dataclasses.fields(cls)
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING}
    if cls is RawRequest:
        required["via"] = Via.DIRECT
    made, plain = cls(**required), _plain(cls)(**required)
    for f in dataclasses.fields(cls):
        assert getattr(made, f.name) == getattr(plain, f.name), f.name
    given = {f.name: f"other {f.name}" for f in dataclasses.fields(cls)}
    made = cls(*given.values())  # positionally, in field order
    assert [getattr(made, n) for n in given] == list(given.values())


def test_default_factories_give_each_object_its_own_value() -> None:
    @fast_init
    @dataclasses.dataclass(frozen=True, slots=True)
    class Holder:
        items: list[int] = dataclasses.field(default_factory=list)
        label: str = "none"

    first, second = Holder(), Holder()
    assert first.items == second.items == [] and first.items is not second.items
    assert first.label == "none" and Holder([1], "x").items == [1]
    assert Holder(items=[]).items is not first.items


@pytest.mark.parametrize("cls", _CLASSES, ids=lambda c: c.__name__)
def test_the_objects_stay_frozen(cls: type) -> None:
    required = {f.name: "x" for f in dataclasses.fields(cls)
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING}
    made = cls(**required)
    name = dataclasses.fields(cls)[0].name
    with pytest.raises(dataclasses.FrozenInstanceError):
        setattr(made, name, "changed")
    assert dataclasses.replace(made, **{name: "replaced"}) == cls(**{**required, name: "replaced"})


def test_fast_init_refuses_classes_it_would_build_wrongly() -> None:
    @dataclasses.dataclass(frozen=True, slots=True)
    class Checked:
        x: int

        def __post_init__(self) -> None:
            raise ValueError("checked")

    @dataclasses.dataclass(slots=True)
    class Mutable:
        x: int

    @dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
    class KeywordOnly:
        x: int

    for cls in (Checked, Mutable, KeywordOnly):
        with pytest.raises(TypeError):
            fast_init(cls)
