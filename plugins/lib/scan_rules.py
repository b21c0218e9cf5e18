"""The ``tool-scan`` rules: patterns that flag a poisoned tool definition. Rules are data.

Data flow::

    DEFAULT_RULES (below) + the stage config's ``rules`` minus its ``disabledRules``
        ──compile_rules──▶ [Rule(name, compiled pattern)]
    a tool definition (plugins.lib.fingerprints.definition)
        ──texts──▶ every string in it, with where it is: ``description``,
                   ``inputSchema.properties.path.description``, a property's name, …
        ──scan──▶ [Finding(rule, field, offset, excerpt)]: every match of every rule, and
                  ``description-too-long`` past the size limit; ``offset`` counts code points
                  from the start of that field's text

An operator adds a rule as ``{name, pattern, ignoreCase}`` (a Python regular expression;
``\\uXXXX`` and ``\\UXXXXXXXX`` escapes name invisible characters) in the stage config.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

__all__ = ["DEFAULT_RULES", "TOO_LONG", "Finding", "Rule", "compile_rules", "scan", "texts"]

DEFAULT_RULES: Final[tuple[Mapping[str, Any], ...]] = (
    # Invisible or reordering Unicode: text the model reads and the user never sees.
    {"name": "unicode-tag-characters", "pattern": r"[\U000E0000-\U000E007F]+"},
    {"name": "zero-width-characters", "pattern": r"[\u200B-\u200D\u2060-\u2064\uFEFF\u180E]+"},
    {"name": "bidi-controls", "pattern": r"[\u202A-\u202E\u2066-\u2069\u200E\u200F\u061C]+"},
    # Text addressed to the model rather than describing the tool.
    {
        "name": "model-addressed-tag",
        "pattern": r"<\s*/?\s*(important|system|instructions?|critical|secret|hidden|admin)\b[^>]*>",
        "ignoreCase": True,
    },
    {
        "name": "ignore-instructions",
        "pattern": r"\b(ignore|disregard|forget|override)\s+(all\s+|any\s+)?(the\s+|your\s+)?"
        r"(previous|prior|above|earlier|preceding|other)\s+(instructions|prompts?|rules|directions)",
        "ignoreCase": True,
    },
    {
        "name": "conceal-from-user",
        "pattern": r"\b(do\s+not|don'?t|never|without)\s+(tell|telling|inform|informing|mention|mentioning|"
        r"reveal|revealing|show|showing|notify|notifying|alert|alerting)\b.{0,40}?\buser\b",
        "ignoreCase": True,
    },
    # Credentials and home-directory secrets.
    {
        "name": "home-directory-secrets",
        "pattern": r"(~|\$HOME|%USERPROFILE%|/home/[^/\s]+|/root|/Users/[^/\s]+)[/\\]\.(ssh|aws|gnupg|kube|docker|"
        r"azure|netrc|npmrc|pypirc|git-credentials|config/gcloud|env)\b|\bid_(rsa|dsa|ecdsa|ed25519)\b",
        "ignoreCase": True,
    },
    {
        "name": "credential-request",
        "pattern": r"\b(read|send|include|pass|forward|upload|attach|share|paste|exfiltrate)\b.{0,40}?"
        r"\b(api[\s_-]?keys?|credentials|private[\s_-]?keys?|access[\s_-]?tokens?|passwords|ssh[\s_-]?keys?)\b",
        "ignoreCase": True,
    },
)
"""The built-in rules, each ``{name, pattern, ignoreCase?}``."""

TOO_LONG: Final = "description-too-long"
"""The rule a description past the size limit is flagged by (its offset: the limit)."""
_EXCERPT: Final = 40
_MAX_FINDINGS: Final = 32


@dataclass(frozen=True, slots=True)
class Rule:
    """A compiled rule."""

    name: str
    pattern: re.Pattern[str]


@dataclass(frozen=True, slots=True)
class Finding:
    """One match: the rule, the field it is in, the offset (code points) and what is there, escaped."""

    rule: str
    field: str
    offset: int
    excerpt: str

    def describe(self) -> str:
        """``rule at field offset N``, for messages."""
        return f"{self.rule} at {self.field} offset {self.offset}"


def compile_rules(rules: Sequence[Mapping[str, Any]], disabled: Sequence[str] = ()) -> list[Rule]:
    """The rules, compiled, without those named in ``disabled``.

    Raises:
        ValueError: a pattern does not compile (naming the rule).
    """
    compiled = []
    for rule in rules:
        if rule["name"] in disabled:
            continue
        flags = re.IGNORECASE if rule.get("ignoreCase") else 0
        try:
            compiled.append(Rule(rule["name"], re.compile(rule["pattern"], flags | re.DOTALL)))
        except re.error as exc:
            raise ValueError(f"rule {rule['name']!r}: the pattern does not compile: {exc}") from None
    return compiled


def texts(value: Any, where: str = "") -> Iterator[tuple[str, str]]:
    """Every string in ``value`` (keys too), as (where, text)."""
    if isinstance(value, str):
        yield where, value
    elif isinstance(value, Mapping):
        for key, item in value.items():
            path = f"{where}.{key}" if where else str(key)
            if isinstance(key, str) and where:
                yield f"{path} (name)", key
            yield from texts(item, path)
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from texts(item, f"{where}[{index}]")


def _escaped(text: str) -> str:
    """``text`` with every character that is not printable ASCII written as an escape."""
    return text.encode("ascii", "backslashreplace").decode("ascii").replace("\n", "\\n")


def scan(definition: Mapping[str, Any], rules: Sequence[Rule], max_description_chars: int) -> list[Finding]:
    """What ``rules`` find in ``definition`` (at most 32 findings), and a description past the limit."""
    found: list[Finding] = []
    description = definition.get("description")
    if isinstance(description, str) and len(description) > max_description_chars:
        excerpt = _escaped(description[max_description_chars : max_description_chars + _EXCERPT])
        found.append(Finding(TOO_LONG, "description", max_description_chars, excerpt))
    for field, text in texts(definition):
        for rule in rules:
            for match in rule.pattern.finditer(text):
                found.append(Finding(rule.name, field, match.start(), _escaped(match.group()[:_EXCERPT])))
                if len(found) >= _MAX_FINDINGS:
                    return found
    return found
