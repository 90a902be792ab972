"""The client raises every public server error back as its own class (one error type, house style 5)."""

from __future__ import annotations

import httpx
import pytest

from client import calls
from server import errors


@pytest.mark.parametrize("cls", sorted(errors.error_types().values(), key=lambda c: c.type), ids=lambda c: c.type)
def test_every_error_type_comes_back_as_its_class(cls: type[errors.TaskservError]) -> None:
    body = cls("what happened").to_dict()
    headers = {"Retry-After": "3"} if cls is errors.Overloaded else {}
    with pytest.raises(cls) as info:
        calls.read(httpx.Response(cls.status, json=body, headers=headers))
    assert info.value.message == "what happened" and info.value.status == cls.status and info.value.type == cls.type
    if cls is errors.Overloaded:
        assert info.value.retry_after == 3.0


def test_the_errors_that_lived_elsewhere_are_public_types() -> None:
    types = errors.error_types()
    for kind in ("corrupt_artifact", "data_error", "asset_error", "cancelled"):
        assert kind in types and issubclass(types[kind], errors.TaskservError)
