"""JSON Schema to GBNF, for the subset whose every match the grammar can guarantee.

Converting a schema is also checking it: a keyword outside the subset is a 400
`unsupported_schema` whose `param` is the keyword's JSON path in the request, so the
client learns exactly which feature to drop. The grammar only ever produces documents
that validate: properties come in their declared order (optional ones may be left out,
additional ones are never written, which every schema allows unless it requires them),
`oneOf` is accepted only when its alternatives cannot both match, and `enum`/`const` only
next to `type`, so the listed values are all the model may write.

Supported: `type` (one or a list), `properties`, `required`, `additionalProperties`
(a schema is used for maps, objects without `properties`), `items`, `minItems`,
`maxItems`, `enum`, `const`, `anyOf`, `oneOf` (disjoint), `allOf` of one schema, `$ref`
to any `#/...` pointer of the same document (recursion included, as long as it nests
inside an object or array), string `minLength`/`maxLength`, `pattern` (see pattern.py)
and `format` (date, time, date-time, uuid), integer `minimum`/`maximum`/
`exclusiveMinimum`/`exclusiveMaximum`, number `minimum`/`maximum` (whole numbers), and
the annotations (`title`, `description`, `default`, `examples`, ...).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from appliance._private.engines.structured.grammar import (
    Grammar,
    integer_range,
    json_literal,
    number_range,
    repeat,
    separated,
)
from appliance._private.engines.structured.pattern import pattern_expression
from federation import InvalidRequestError

UNSUPPORTED = "unsupported_schema"

FORMATS = ("date", "time", "date-time", "uuid")

_ANNOTATIONS = frozenset(
    {
        "title",
        "description",
        "default",
        "examples",
        "$schema",
        "$id",
        "$comment",
        "$defs",
        "definitions",
        "deprecated",
        "readOnly",
        "writeOnly",
        "discriminator",  # OpenAPI's hint for a tagged oneOf; jsonschema ignores it
    }
)
_OBJECT_KEYS = frozenset({"properties", "required", "additionalProperties"})
_ARRAY_KEYS = frozenset({"items", "minItems", "maxItems"})
_STRING_KEYS = frozenset({"minLength", "maxLength", "format", "pattern"})
_INTEGER_KEYS = frozenset({"minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"})
_COMBINATORS = frozenset({"anyOf", "oneOf", "allOf", "$ref"})
_KNOWN = (
    _ANNOTATIONS | _OBJECT_KEYS | _ARRAY_KEYS | _STRING_KEYS | _INTEGER_KEYS | _COMBINATORS
) | {"type", "enum", "const"}
_TYPES = ("object", "array", "string", "integer", "number", "boolean", "null")
# What a value of each type is, for telling `oneOf` alternatives apart.
_KIND = {"integer": "number"} | {name: name for name in _TYPES if name != "integer"}


def unsupported(message: str, param: str) -> InvalidRequestError:
    return InvalidRequestError(message, code=UNSUPPORTED, param=param)


def schema_rule(grammar: Grammar, schema: Any, param: str, hint: str = "value") -> str:
    """Add the rules for `schema` (a document: its `$ref`s resolve within it) to
    `grammar`; returns the expression matching it. `param` is the schema's JSON path in
    the request, for errors."""
    return _Converter(grammar, schema, param).convert(schema, param, hint)


class _Converter:
    def __init__(self, grammar: Grammar, document: Any, param: str) -> None:
        self._grammar = grammar
        self._document = document
        self._param = param
        self._refs: dict[str, str] = {}  # pointer -> rule name
        # References entered since the output last nested into an object or array: one
        # of them again would make a rule that matches itself before any text.
        self._unguarded: set[str] = set()

    def convert(self, schema: Any, path: str, hint: str) -> str:
        if schema is True or schema == {}:
            return self._grammar.primitive("value")
        if not isinstance(schema, dict):
            if schema is False:
                raise unsupported("A `false` schema matches nothing.", path)
            raise InvalidRequestError(
                "A JSON schema must be an object or a boolean.", code=UNSUPPORTED, param=path
            )
        for key in schema:
            if key not in _KNOWN:
                raise unsupported(_unknown_keyword(key), f"{path}.{key}")
        if "$ref" in schema:
            return self._reference(schema, path)
        if "allOf" in schema:
            return self._all_of(schema, path, hint)
        if "anyOf" in schema or "oneOf" in schema:
            return self._alternatives(schema, path, hint)
        if "const" in schema or "enum" in schema:
            return self._literals(schema, path, hint)
        return self._typed(schema, path, hint)

    # --- combinators ---------------------------------------------------------------------

    def _reference(self, schema: dict[str, Any], path: str) -> str:
        _only_annotations(schema, "$ref", path)
        pointer = schema["$ref"]
        if not isinstance(pointer, str) or not (pointer == "#" or pointer.startswith("#/")):
            raise unsupported(
                "Only `$ref`s within the schema (`#/$defs/Name`) are supported.", f"{path}.$ref"
            )
        if pointer in self._unguarded:
            raise unsupported(
                f"`{pointer}` refers to itself without nesting inside an object or array, "
                "so no finite document matches it.",
                f"{path}.$ref",
            )
        name = self._refs.get(pointer)
        if name is not None:
            return name
        target, target_path = self._resolve(pointer, path)
        name = self._refs[pointer] = self._grammar.reserve(pointer.rsplit("/", 1)[-1] or "root")
        self._unguarded.add(pointer)
        try:
            self._grammar.define(name, self.convert(target, target_path, name))
        finally:
            self._unguarded.discard(pointer)
        return name

    def _resolve(self, pointer: str, path: str) -> tuple[Any, str]:
        target, target_path = self._document, self._param
        for raw in pointer[2:].split("/") if pointer != "#" else ():
            part = raw.replace("~1", "/").replace("~0", "~")
            if isinstance(target, dict) and part in target:
                target = target[part]
            elif isinstance(target, list) and part.isdigit() and int(part) < len(target):
                target = target[int(part)]
            else:
                raise InvalidRequestError(
                    f"`$ref` {pointer!r} points at nothing in the schema.",
                    code=UNSUPPORTED,
                    param=f"{path}.$ref",
                )
            target_path += f".{part}"
        return target, target_path

    def _all_of(self, schema: dict[str, Any], path: str, hint: str) -> str:
        _only_annotations(schema, "allOf", path)
        parts = schema["allOf"]
        if not isinstance(parts, list) or len(parts) != 1:
            raise unsupported(
                "`allOf` is supported with exactly one schema; merge the others into it.",
                f"{path}.allOf",
            )
        return self.convert(parts[0], f"{path}.allOf[0]", hint)

    def _alternatives(self, schema: dict[str, Any], path: str, hint: str) -> str:
        keyword = "oneOf" if "oneOf" in schema else "anyOf"
        _only_annotations(schema, keyword, path)
        options = schema[keyword]
        if not isinstance(options, list) or not options:
            raise unsupported(
                f"`{keyword}` needs a non-empty list of schemas.", f"{path}.{keyword}"
            )
        rules = [
            self.convert(option, f"{path}.{keyword}[{index}]", f"{hint}-{index}")
            for index, option in enumerate(options)
        ]
        if keyword == "oneOf":
            self._check_disjoint(options, f"{path}.oneOf")
        return self._grammar.rule(hint, " | ".join(dict.fromkeys(rules)))

    def _check_disjoint(self, options: list[Any], path: str) -> None:
        """`oneOf` means exactly one alternative matches: refuse overlapping ones rather
        than generate a value that matches two (and so fails validation)."""
        shapes = [_Shape.of(self._follow(option)) for option in options]
        for later, shape in enumerate(shapes):
            for earlier in range(later):
                if not shape.disjoint(shapes[earlier]):
                    raise unsupported(
                        f"`oneOf` alternatives {earlier} and {later} can match the same value "
                        "(a value must match exactly one); use `anyOf`, or tell objects apart "
                        "with a required property whose `const` differs.",
                        path,
                    )

    def _follow(self, schema: Any) -> Any:
        """A schema with its `$ref`s and one-schema `allOf`s followed (for shape checks)."""
        for _ in range(32):  # a cycle of bare references was refused when converting
            if isinstance(schema, dict) and isinstance(schema.get("$ref"), str):
                schema = self._resolve(schema["$ref"], self._param)[0]
            elif isinstance(schema, dict) and len(schema.get("allOf") or ()) == 1:
                schema = schema["allOf"][0]
            else:
                break
        return schema

    # --- literal values ------------------------------------------------------------------

    def _literals(self, schema: dict[str, Any], path: str, hint: str) -> str:
        keyword = "const" if "const" in schema else "enum"
        for key in schema:
            if key not in _ANNOTATIONS and key not in {"type", "const", "enum"}:
                raise unsupported(
                    f"`{keyword}` can only be combined with `type`; list just the values that "
                    f"meet `{key}`.",
                    f"{path}.{key}",
                )
        values = [schema["const"]] if keyword == "const" else schema["enum"]
        if not isinstance(values, list) or not values:
            raise unsupported("`enum` needs a non-empty list of values.", f"{path}.enum")
        for value in values:
            _check_finite(value, f"{path}.{keyword}")
        allowed = _types_of(schema, path)
        kept = [value for value in values if allowed is None or _type_of(value) & allowed]
        if not kept:
            raise unsupported(f"No value of `{keyword}` has the schema's `type`.", f"{path}.type")
        alternatives = dict.fromkeys(json_literal(value) for value in kept)
        return self._grammar.rule(hint, " | ".join(alternatives))

    # --- typed values --------------------------------------------------------------------

    def _typed(self, schema: dict[str, Any], path: str, hint: str) -> str:
        types = _types_of(schema, path)
        if types is None:
            types = _implied_types(schema)
        if types is None:
            return self._grammar.primitive("value")
        rules = [self._one_type(name, schema, path, hint) for name in _TYPES if name in types]
        if len(rules) == 1:
            return rules[0]
        return self._grammar.rule(hint, " | ".join(dict.fromkeys(rules)))

    def _one_type(self, name: str, schema: dict[str, Any], path: str, hint: str) -> str:
        if name == "object":
            return self._object(schema, path, hint)
        if name == "array":
            return self._array(schema, path, hint)
        if name == "string":
            return self._string(schema, path, hint)
        if name == "integer":
            return self._integer(schema, path, hint)
        if name == "number" and _INTEGER_KEYS & schema.keys():
            return self._number(schema, path, hint)
        return self._grammar.primitive(name)

    def _object(self, schema: dict[str, Any], path: str, hint: str) -> str:
        properties = schema.get("properties", {})
        if not isinstance(properties, dict):
            raise unsupported("`properties` must be an object.", f"{path}.properties")
        extra = schema.get("additionalProperties", True)
        required = _required(schema, path)
        for name in required:
            if name not in properties and extra is False:
                raise unsupported(
                    f"`required` names {name!r}, which `additionalProperties: false` forbids.",
                    f"{path}.required",
                )
        if not properties and not required:
            return self._map(extra, path, hint)
        if not isinstance(extra, bool):  # checked, though only declared members are written
            checker = _Converter(Grammar(), self._document, self._param)
            checker.convert(extra, f"{path}.additionalProperties", hint)
        members: list[tuple[str, bool]] = []
        with self._nested():
            for name, member in properties.items():
                member_path = f"{path}.properties.{name}"
                if member is False:
                    if name in required:
                        raise unsupported(f"Required {name!r} has a `false` schema.", member_path)
                    continue
                value = self.convert(member, member_path, f"{hint}-{name}")
                members.append((self._member(name, value, hint), name in required))
            members += [
                (self._member(name, self._grammar.primitive("value"), hint), True)
                for name in required
                if name not in properties
            ]
        return self._grammar.rule(hint, f'"{{" ws {self._members(members, hint)} "}}"'.strip())

    def _member(self, name: str, value: str, hint: str) -> str:
        return self._grammar.rule(f"{hint}-{name}-kv", f'{json_literal(name)} ws ":" ws {value}')

    def _members(self, members: list[tuple[str, bool]], hint: str) -> str:
        """Members in order, each required one present, optional ones maybe, with commas
        between: one rule per (position, whether one was written already), so the grammar
        grows linearly with the number of properties."""
        if not members:
            return ""
        first, after = "", ""  # what may follow the last member: nothing
        for index in range(len(members) - 1, -1, -1):
            member, is_required = members[index]
            take_first = f"{member} {after}".strip()
            take_after = f'"," ws {member} {after}'.strip()
            if is_required:
                bodies = (take_first, take_after)
            else:
                bodies = (_either(take_first, first), _either(take_after, after))
            first = self._grammar.rule(f"{hint}-{index}", bodies[0])
            after = self._grammar.rule(f"{hint}-{index}-more", bodies[1])
        return f"{first} ws"

    def _map(self, extra: Any, path: str, hint: str) -> str:
        """An object without declared properties: any keys, values of
        `additionalProperties` (any value when absent or true, none when false)."""
        if extra is False:
            return self._grammar.rule(hint, '"{" ws "}"')
        if extra is True:
            return self._grammar.primitive("object")
        with self._nested():
            value = self.convert(extra, f"{path}.additionalProperties", f"{hint}-value")
        string = self._grammar.primitive("string")
        member = self._grammar.rule(f"{hint}-kv", f'{string} ws ":" ws {value}')
        return self._grammar.rule(hint, f'"{{" ws {separated(member, 0, None)} "}}"')

    def _array(self, schema: dict[str, Any], path: str, hint: str) -> str:
        least = _count(schema, "minItems", path) or 0
        most = _count(schema, "maxItems", path)
        if most is not None and most < least:
            raise unsupported("`maxItems` is less than `minItems`.", f"{path}.maxItems")
        items = schema.get("items", True)
        if isinstance(items, list):
            raise unsupported(
                "`items` as a list (tuples) is not supported; give one schema.", f"{path}.items"
            )
        with self._nested():
            item = self.convert(items, f"{path}.items", f"{hint}-item")
        return self._grammar.rule(hint, f'"[" ws {separated(item, least, most)} "]"')

    def _string(self, schema: dict[str, Any], path: str, hint: str) -> str:
        least = _count(schema, "minLength", path) or 0
        most = _count(schema, "maxLength", path)
        if most is not None and most < least:
            raise unsupported("`maxLength` is less than `minLength`.", f"{path}.maxLength")
        if "format" in schema:
            return self._formatted(schema, path, hint)
        if "pattern" in schema:
            return self._patterned(schema, path, hint)
        if least == 0 and most is None:
            return self._grammar.primitive("string")
        char = self._grammar.primitive("char")
        return self._grammar.rule(hint, rf'"\"" {repeat(char, least, most)} "\""')

    def _formatted(self, schema: dict[str, Any], path: str, hint: str) -> str:
        name = schema["format"]
        if name not in FORMATS:
            raise unsupported(
                f"String format {name!r} is not supported (supported: {', '.join(FORMATS)}).",
                f"{path}.format",
            )
        for key in ("minLength", "maxLength", "pattern"):
            if key in schema:
                raise unsupported(f"`{key}` cannot be combined with `format`.", f"{path}.{key}")
        return self._grammar.rule(hint, rf'"\"" {self._grammar.primitive(name)} "\""')

    def _patterned(self, schema: dict[str, Any], path: str, hint: str) -> str:
        for key in ("minLength", "maxLength"):
            if key in schema:
                raise unsupported(
                    f"`{key}` cannot be combined with `pattern`; bound the pattern's own "
                    "repetitions instead ({m,n}).",
                    f"{path}.{key}",
                )
        pattern = schema["pattern"]
        if not isinstance(pattern, str):
            raise unsupported("`pattern` must be a string.", f"{path}.pattern")
        content = pattern_expression(pattern, f"{path}.pattern")
        return self._grammar.rule(hint, rf'"\"" {content} "\""')

    def _integer(self, schema: dict[str, Any], path: str, hint: str) -> str:
        if not _INTEGER_KEYS & schema.keys():
            return self._grammar.primitive("integer")
        least = _bound(schema, "minimum", path, math.ceil)
        most = _bound(schema, "maximum", path, math.floor)
        above = _bound(schema, "exclusiveMinimum", path, math.floor)
        below = _bound(schema, "exclusiveMaximum", path, math.ceil)
        if above is not None:
            least = above + 1 if least is None else max(least, above + 1)
        if below is not None:
            most = below - 1 if most is None else min(most, below - 1)
        if least is not None and most is not None and least > most:
            raise unsupported("No integer lies within these bounds.", f"{path}.maximum")
        return self._grammar.rule(hint, integer_range(least, most))

    def _number(self, schema: dict[str, Any], path: str, hint: str) -> str:
        """Numbers within whole-number `minimum`/`maximum` (as `Field(ge=0, le=1)`)."""
        for key in ("exclusiveMinimum", "exclusiveMaximum"):
            if key in schema:
                raise unsupported(f"`{key}` is supported for integers only.", f"{path}.{key}")
        least = _bound(schema, "minimum", path, math.ceil)
        most = _bound(schema, "maximum", path, math.floor)
        for key, bound in (("minimum", least), ("maximum", most)):
            if bound is not None and bound != schema[key]:
                raise unsupported(
                    f"`{key}` of a number must be a whole number here.", f"{path}.{key}"
                )
        if least is not None and most is not None and least > most:
            raise unsupported("No number lies within these bounds.", f"{path}.maximum")
        return self._grammar.rule(hint, number_range(least, most))

    @contextmanager
    def _nested(self) -> Iterator[None]:
        """Inside an object or array, references may recur: output has moved on."""
        saved, self._unguarded = self._unguarded, set()
        try:
            yield
        finally:
            self._unguarded = saved


def _either(taken: str, skipped: str) -> str:
    """`taken` or `skipped`, the latter possibly empty (GBNF has no empty alternative at
    the end of a rule: the parser would read on into the next line)."""
    return f"{taken} | {skipped}" if skipped else f"( {taken} )?"


# --- keyword checks ----------------------------------------------------------------------


def _unknown_keyword(key: str) -> str:
    return (
        f"The JSON schema keyword `{key}` is not supported for structured output. Supported: "
        "type, properties, required, additionalProperties, items, minItems, maxItems, enum, "
        "const, anyOf, oneOf (disjoint), allOf (one schema), $ref, minLength, maxLength, "
        f"pattern, format ({', '.join(FORMATS)}), minimum/maximum (whole numbers for a number) "
        "and exclusiveMinimum/exclusiveMaximum for integers."
    )


def _only_annotations(schema: dict[str, Any], keyword: str, path: str) -> None:
    for key in schema:
        if key != keyword and key not in _ANNOTATIONS:
            raise unsupported(
                f"`{key}` next to `{keyword}` is not supported; move it into the referenced "
                "or listed schemas.",
                f"{path}.{key}",
            )


def _types_of(schema: dict[str, Any], path: str) -> frozenset[str] | None:
    if "type" not in schema:
        return None
    declared = schema["type"]
    names = declared if isinstance(declared, list) else [declared]
    if not names or any(name not in _TYPES for name in names):
        raise unsupported(f"`type` must be one or more of {', '.join(_TYPES)}.", f"{path}.type")
    return frozenset(names)


def _implied_types(schema: dict[str, Any]) -> frozenset[str] | None:
    """The type a schema without `type` is about, from its keywords (None: any value)."""
    for keys, name in (
        (_OBJECT_KEYS, "object"),
        (_ARRAY_KEYS, "array"),
        (_STRING_KEYS, "string"),
        (_INTEGER_KEYS, "integer"),
    ):
        if keys & schema.keys():
            return frozenset({name})
    return None


def _type_of(value: Any) -> frozenset[str]:
    """The schema types a JSON value has."""
    if value is None:
        return frozenset({"null"})
    if isinstance(value, bool):
        return frozenset({"boolean"})
    if isinstance(value, int) or (isinstance(value, float) and value.is_integer()):
        return frozenset({"integer", "number"})
    if isinstance(value, float):
        return frozenset({"number"})
    if isinstance(value, str):
        return frozenset({"string"})
    return frozenset({"array"}) if isinstance(value, list) else frozenset({"object"})


def _check_finite(value: Any, path: str) -> None:
    if isinstance(value, float) and not math.isfinite(value):
        raise unsupported("Values must be finite numbers.", path)
    if isinstance(value, list):
        for item in value:
            _check_finite(item, path)
    elif isinstance(value, dict):
        for item in value.values():
            _check_finite(item, path)


def _required(schema: dict[str, Any], path: str) -> list[str]:
    required = schema.get("required", [])
    if not isinstance(required, list) or not all(isinstance(name, str) for name in required):
        raise unsupported("`required` must be a list of property names.", f"{path}.required")
    return list(dict.fromkeys(required))


def _count(schema: dict[str, Any], key: str, path: str) -> int | None:
    value = schema.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
        raise unsupported(f"`{key}` must be a non-negative integer.", f"{path}.{key}")
    if isinstance(value, float) and not value.is_integer():
        raise unsupported(f"`{key}` must be a non-negative integer.", f"{path}.{key}")
    return int(value)


def _bound(schema: dict[str, Any], key: str, path: str, to_int: Any) -> int | None:
    value = schema.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise unsupported(f"`{key}` must be a number.", f"{path}.{key}")
    bound: int = to_int(value)
    return bound


# --- telling oneOf alternatives apart ---------------------------------------------------


class _Shape:
    """What values a schema can match, coarsely: their kinds, the exact values of an
    enum/const, and the values of required const/enum properties (discriminators)."""

    __slots__ = ("kinds", "tags", "values")

    def __init__(
        self,
        kinds: frozenset[str],
        values: frozenset[str] | None,
        tags: dict[str, frozenset[str]],
    ) -> None:
        self.kinds = kinds
        self.values = values
        self.tags = tags

    @classmethod
    def of(cls, schema: Any) -> _Shape:
        everything = frozenset(_KIND.values())
        if not isinstance(schema, dict):
            return cls(everything, None, {})
        literal = _literal_values(schema)
        if literal is not None:
            kinds = frozenset(_kind_of(json.loads(value)) for value in literal)
            return cls(kinds, literal, {})
        types = _types_of(schema, "") if "type" in schema else _implied_types(schema)
        if types is None or _COMBINATORS & schema.keys():
            return cls(everything, None, {})
        kinds = frozenset(_KIND[name] for name in types)
        return cls(kinds, None, _discriminators(schema) if kinds == {"object"} else {})

    def disjoint(self, other: _Shape) -> bool:
        if not self.kinds & other.kinds:
            return True
        if self.values is not None and other.values is not None:
            return not self.values & other.values
        if self.values is not None or other.values is not None:
            return False
        shared = self.tags.keys() & other.tags.keys()
        return any(not self.tags[name] & other.tags[name] for name in shared)


def _literal_values(schema: dict[str, Any]) -> frozenset[str] | None:
    if "const" in schema:
        return frozenset({_canonical(schema["const"])})
    if isinstance(schema.get("enum"), list):
        return frozenset(_canonical(value) for value in schema["enum"])
    return None


def _discriminators(schema: dict[str, Any]) -> dict[str, frozenset[str]]:
    properties = schema.get("properties")
    required = schema.get("required")
    if not isinstance(properties, dict) or not isinstance(required, list):
        return {}
    tags = {}
    for name in required:
        member = properties.get(name) if isinstance(name, str) else None
        values = _literal_values(member) if isinstance(member, dict) else None
        if values is not None:
            tags[name] = values
    return tags


def _canonical(value: Any) -> str:
    """Equal JSON values (as `jsonschema` compares them: 1 == 1.0) give equal text."""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return json.dumps(value, sort_keys=True)


def _kind_of(value: Any) -> str:
    (kind,) = {_KIND[name] for name in _type_of(value)}
    return kind
