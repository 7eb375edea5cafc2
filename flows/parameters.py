"""How flow parameters look in Prefect's deployment forms.

An optional parameter typed `str | None` shows in the form as a choice between "string" and
"null"; typed `str | NotGiven`, it shows as a plain text field (a date picker for a datetime, a
multi-select for a list of an enum) that is left empty when not given. The flow still accepts
None, its default.
"""

from __future__ import annotations

from pydantic.json_schema import SkipJsonSchema

NotGiven = SkipJsonSchema[None]
"""Use as `X | NotGiven = None`: the form shows X alone; left empty, the parameter is None."""
