"""Path templates: where a delivered document lands in an organization's storage.

A pure module (no I/O, no Prefect, no destination types) so that a template can be checked the
moment a destination is configured, and every destination renders paths the same way.

A template is a relative, `/`-separated path with `{variable}` placeholders drawn from
`VARIABLES`. The rendered file name always ends with the data type's extension (`.xml` for
`ccda`, `.json` for `fhir`): when the template does not end with it, it is appended.
"""

from __future__ import annotations

import functools
import re
import unicodedata
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime

VARIABLES: tuple[str, ...] = (
    "orgId",
    "projectId",
    "healthexPatientId",
    "externalId",
    "dataType",
    "timestamp",
)

DEFAULT_TEMPLATE = "{orgId}/{projectId}/{healthexPatientId}/{dataType}/{timestamp}"
"""Default layout: one folder per patient and data type, one file per delivered version."""

EXTENSIONS: Mapping[str, str] = {"ccda": ".xml", "fhir": ".json"}

TIMESTAMP_FORMAT = "%Y%m%dT%H%M%SZ"
"""UTC, sortable as text, and safe in file names on every platform (no `:`)."""

MAX_VALUE_LENGTH = 200
"""Longest value a variable may take: keeps every rendered segment under common 255-byte limits."""

_PLACEHOLDER = re.compile(r"\{([^{}]*)\}")


@dataclass(frozen=True)
class TemplateKind:
    """What a template of one kind may name and must name, and how its file name ends."""

    name: str
    variables: tuple[str, ...]
    required: tuple[frozenset[str], ...]
    """Each group: at least one of its variables must appear, or the paths would collide."""
    required_why: tuple[str, ...]
    ends_with: str = ""
    """A file name ending the template must have (else the data type's extension is added)."""
    example: str = DEFAULT_TEMPLATE

    @property
    def schema_pattern(self) -> str:
        """The template's rules as a JSON Schema `pattern` (ECMA-262 and Python alike), for
        forms that check what they are given: relative, `/`-separated, no empty, `.` or `..`
        folder, only this kind's `{variable}`s, the required ones present and the required
        ending. Characters are left to `PathTemplate.parse`, which every block runs as well."""
        variable = r"\{(?:" + "|".join(self.variables) + r")\}"
        segment = rf"(?:[^/\\{{}}]|{variable})+"
        no_dot_folder = r"(?!(?:.*/)?\.\.?(?:/|$))"
        required = "".join(
            r"(?=.*\{(?:" + "|".join(sorted(group)) + r")\})" for group in self.required
        )
        ending = rf"(?=.*{re.escape(self.ends_with)}$)" if self.ends_with else ""
        return rf"^{no_dot_folder}{required}{ending}{segment}(?:/{segment})*$"


DOCUMENTS = TemplateKind(
    name="path template",
    variables=VARIABLES,
    required=(frozenset({"healthexPatientId", "externalId"}),),
    required_why=(
        "it names no patient ({healthexPatientId} or {externalId}), so every patient's "
        "document would land at the same path",
    ),
)

MANIFEST_VARIABLES: tuple[str, ...] = ("orgId", "projectId", "timestamp", "runId")

DEFAULT_MANIFEST_TEMPLATE = "{orgId}/{projectId}/_manifests/{timestamp}-{runId}.json"
"""Default manifest layout: one per run and project, beside the project's documents."""

MANIFESTS = TemplateKind(
    name="manifest template",
    variables=MANIFEST_VARIABLES,
    required=(frozenset({"runId"}), frozenset({"projectId"})),
    required_why=(
        "it must hold {runId} (one manifest per run)",
        "it must hold {projectId} (one per project)",
    ),
    ends_with=".json",
    example=DEFAULT_MANIFEST_TEMPLATE,
)


class PathTemplateError(ValueError):
    """A template that can never render a safe path; raised when a destination is configured."""


class PathValueError(ValueError):
    """A value that would escape or reshape the destination folder; fails one delivery only.

    The message names the variable and the rule it broke, never the value itself: values such as
    `externalId` can identify a patient and must not reach logs.
    """

    def __init__(self, variable: str, problem: str) -> None:
        self.variable = variable
        self.problem = problem
        super().__init__(f"path variable {variable!r} {problem}")


def format_timestamp(moment: datetime) -> str:
    """Render an aware datetime as the `timestamp` variable (UTC, e.g. 20261125T134501Z)."""
    if moment.tzinfo is None:
        raise ValueError("timestamp must be timezone-aware")
    return moment.astimezone(UTC).strftime(TIMESTAMP_FORMAT)


@dataclass(frozen=True)
class PathTemplate:
    """A checked template; construct it with `PathTemplate.parse`."""

    text: str
    variables: frozenset[str]
    kind: TemplateKind = DOCUMENTS

    @classmethod
    def parse(cls, text: str, kind: TemplateKind = DOCUMENTS) -> PathTemplate:
        """Check a template and return it, or raise `PathTemplateError` naming every problem.
        The message names the rules broken, never the template's text."""
        example = f"example of a valid template: {kind.example!r}"
        if not text or not text.strip():
            raise PathTemplateError(f"{kind.name} is empty; {example}")
        problems: list[str] = []
        names = _PLACEHOLDER.findall(text)
        unknown = sorted({n for n in names if n not in kind.variables})
        if unknown:
            problems.append(
                f"unknown variable(s) {', '.join('{' + n + '}' for n in unknown)}"
                f" (known: {', '.join(kind.variables)})"
            )
        stray = _PLACEHOLDER.sub("", text)
        if "{" in stray or "}" in stray:
            problems.append("a stray '{' or '}' that is not part of a {variable}")
        if text.startswith("/") or re.match(r"^[A-Za-z]:", text) or text.startswith("\\"):
            problems.append("it is absolute; it must be relative to the destination's root")
        if "\\" in text:
            problems.append("it contains '\\'; use '/' to separate folders")
        segments = text.split("/")
        if any(seg in ("..", ".") for seg in segments):
            problems.append("it contains a '.' or '..' segment")
        if any(seg == "" for seg in segments[1:-1]) or text.endswith("/"):
            problems.append("it contains an empty folder name ('//' or a trailing '/')")
        for group, why in zip(kind.required, kind.required_why, strict=True):
            if not group & set(names):
                problems.append(why)
        if kind.ends_with and not text.endswith(kind.ends_with):
            problems.append(f"it must end with {kind.ends_with}")
        if has_unsafe_character(_PLACEHOLDER.sub("", text)):
            problems.append("it contains a control or invisible formatting character")
        if problems:
            raise PathTemplateError(f"invalid {kind.name}: " + "; ".join(problems) + f"; {example}")
        return cls(text=text, variables=frozenset(names), kind=kind)

    @staticmethod
    @functools.lru_cache(maxsize=256)
    def parse_cached(text: str) -> PathTemplate:
        """`parse`, once per template text: a run renders thousands of paths from one template
        (parsing each time was a quarter of render's cost)."""
        return PathTemplate.parse(text)

    @staticmethod
    @functools.lru_cache(maxsize=256)
    def parse_manifest(text: str) -> PathTemplate:
        """A manifest template, checked once per text."""
        return PathTemplate.parse(text, MANIFESTS)

    @property
    def fixed_prefix(self) -> str:
        """The folders before the first variable (e.g. `inbox/`): where a probe file may go."""
        head = self.text.split("{", 1)[0]
        return head[: head.rfind("/") + 1]

    def fill(self, values: Mapping[str, str]) -> str:
        """The template with every variable replaced by its checked value (`PathValueError`
        names the first that is unsafe); no extension added."""
        for name in self.variables:
            check_value(name, values.get(name))
        return _PLACEHOLDER.sub(lambda m: values[m.group(1)], self.text)

    def render(self, values: Mapping[str, str], data_type: str) -> str:
        """Render a relative path for one delivery.

        Every value is checked, not rewritten: a value that could change the folder structure
        raises `PathValueError` so that one delivery fails with a reason.
        """
        if data_type not in EXTENSIONS:
            raise PathValueError("dataType", f"must be one of {sorted(EXTENSIONS)}")
        path = self.fill(values)
        extension = EXTENSIONS[data_type]
        if not path.lower().endswith(extension):
            path += extension
        return path


def has_unsafe_character(text: str) -> bool:
    """Whether `text` holds a control character (Cc: NUL, newline, ESC...), invisible formatting
    (Cf, such as the right-to-left override, which makes a file name display differently from
    what it is) or a line or paragraph separator (Zl, Zp). Printable ASCII, the usual kind, is
    answered without looking at each character."""
    return not (text.isascii() and text.isprintable()) and any(map(_is_unsafe_char, text))


def _is_unsafe_char(ch: str) -> bool:
    return unicodedata.category(ch) in ("Cc", "Cf", "Zl", "Zp")


def check_value(name: str, value: str | None) -> None:
    """Raise `PathValueError` unless `value` is safe as (part of) one path segment."""
    if value is None or value == "":
        raise PathValueError(name, "is empty")
    if value.strip() != value:
        raise PathValueError(name, "starts or ends with whitespace")
    if "/" in value or "\\" in value:
        raise PathValueError(name, "contains a path separator ('/' or '\\')")
    if ".." in value or value == ".":
        raise PathValueError(name, "contains '..' or is '.'")
    # Printable ASCII has none of those characters: checked in C, the common case skips the
    # per-character lookup.
    if has_unsafe_character(value):
        raise PathValueError(name, "contains a control or invisible formatting character")
    if len(value) > MAX_VALUE_LENGTH:
        raise PathValueError(name, f"is longer than {MAX_VALUE_LENGTH} characters")
