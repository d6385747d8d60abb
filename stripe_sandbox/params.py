"""Request parameters as Stripe reads them.

The SDK sends form-encoded bodies (and query strings) in bracket notation:
`metadata[userId]=u1&line_items[0][price]=price_1&expand[0]=customer`. `parse_form` turns them
into nested dicts and lists; `validate` checks them against the SDK's typed params
(`stripe.params.*Params`, generated from Stripe's OpenAPI spec), which list every parameter
Stripe documents for an endpoint: unknown ones get `parameter_unknown`, missing required ones
`parameter_missing`, and values are coerced to their documented types.
"""

from __future__ import annotations

import re
import types
import typing
from collections.abc import Iterable
from functools import cache
from typing import Any, Literal, Union, get_args, get_origin

from typing_extensions import is_typeddict

from stripe_sandbox.errors import parameter_invalid, parameter_missing, parameter_unknown

# Client-side options of the SDK that never travel as request parameters.
REQUEST_OPTION_KEYS = frozenset(
    {
        "api_key",
        "stripe_version",
        "stripe_account",
        "stripe_context",
        "max_network_retries",
        "idempotency_key",
        "content_type",
        "headers",
    }
)
_KEY = re.compile(r"^([^\[\]]+)((?:\[[^\[\]]*\])*)$")


def parse_form(pairs: Iterable[tuple[str, str]]) -> dict[str, Any]:
    """`a[b][0][c]=v` pairs into nested dicts; dicts whose keys are all digits become lists."""
    root: dict[str, Any] = {}
    for raw_key, value in pairs:
        match = _KEY.match(raw_key)
        if match is None:
            raise parameter_invalid(raw_key, f"Invalid parameter name: {raw_key}")
        parts = [match.group(1), *re.findall(r"\[([^\[\]]*)\]", match.group(2))]
        node = root
        for part in parts[:-1]:
            part = part or str(len(node))  # `a[]=x` appends
            child = node.get(part)
            if not isinstance(child, dict):
                child = {}
                node[part] = child
            node = child
        last = parts[-1] or str(len(node))
        node[last] = value
    listed: dict[str, Any] = _listify(root)
    return listed


def _listify(node: Any) -> Any:
    if not isinstance(node, dict):
        return node
    converted = {key: _listify(value) for key, value in node.items()}
    if converted and all(key.isdigit() for key in converted):
        return [converted[key] for key in sorted(converted, key=int)]
    return converted


# A TypedDict's annotations from its bases (the SDK's RequestOptions) are resolved in the
# subclass's module, which lacks their names; give them here.
_BASE_NAMES: dict[str, Any] = {**vars(typing), "StripeContext": object}


@cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls, localns=_BASE_NAMES)


def validate(params_class: type | None, data: dict[str, Any]) -> dict[str, Any]:
    """Check `data` against one of `stripe.params`' TypedDicts and coerce its values."""
    if params_class is None:
        if data:
            raise parameter_unknown(next(iter(data)))
        return {}
    return _typed_dict(params_class, data, prefix="", top=True)


def _name(prefix: str, key: str) -> str:
    return f"{prefix}[{key}]" if prefix else key


def _typed_dict(cls: type, data: Any, *, prefix: str, top: bool = False) -> dict[str, Any]:
    if not isinstance(data, dict):
        raise parameter_invalid(prefix, f"Invalid object for {prefix}: expected a hash")
    hints = _hints(cls)
    required: frozenset[str] = getattr(cls, "__required_keys__", frozenset())
    result: dict[str, Any] = {}
    for key, value in data.items():
        if (top and key in REQUEST_OPTION_KEYS) or key not in hints:
            raise parameter_unknown(_name(prefix, key))
        result[key] = coerce(value, hints[key], _name(prefix, key))
    for key in sorted(required - REQUEST_OPTION_KEYS if top else required):
        if key not in data:
            raise parameter_missing(_name(prefix, key))
    return result


def _is_literal(annotation: Any) -> bool:
    origin: Any = get_origin(annotation)
    return origin is Literal


def coerce(value: Any, annotation: Any, param: str) -> Any:
    origin: Any = get_origin(annotation)
    if annotation in (Any, object):
        return value
    if origin in (Union, types.UnionType):
        # Try the empty-string literal first: `''` unsets a field in Stripe's API.
        alternatives = sorted(get_args(annotation), key=lambda alt: not _is_literal(alt))
        last_error: Exception | None = None
        for alternative in alternatives:
            try:
                return coerce(value, alternative, param)
            except Exception as exc:
                last_error = exc
        assert last_error is not None
        raise last_error
    if origin is Literal:
        for allowed in get_args(annotation):
            if str(allowed) == str(value) if not isinstance(allowed, bool) else value in ("true", "false"):
                return allowed
        choices = ", ".join(repr(allowed) for allowed in get_args(annotation))
        raise parameter_invalid(param, f"Invalid {param}: must be one of {choices}")
    if annotation is str:
        if not isinstance(value, str):
            raise parameter_invalid(param, f"Invalid string: {param}")
        return value
    if annotation is bool:
        if value in ("true", "false"):
            return value == "true"
        raise parameter_invalid(param, f"Invalid boolean: {value!r}", "parameter_invalid_boolean")
    if annotation is int:
        try:
            return int(value)
        except (TypeError, ValueError):
            raise parameter_invalid(
                param, f"Invalid integer: {value!r}", "parameter_invalid_integer"
            ) from None
    if annotation is float:
        try:
            return float(value)
        except (TypeError, ValueError):
            raise parameter_invalid(param, f"Invalid decimal: {value!r}") from None
    if origin in (list, typing.List):  # noqa: UP006
        if isinstance(value, dict) and not value:
            value = []
        if not isinstance(value, list):
            raise parameter_invalid(param, f"Invalid array: {param}")
        (item_type,) = get_args(annotation)
        return [coerce(item, item_type, f"{param}[{index}]") for index, item in enumerate(value)]
    if is_typeddict(annotation):
        return _typed_dict(annotation, value, prefix=param)
    if origin in (dict, typing.Dict) or getattr(origin, "__name__", "") == "UntypedStripeObject":  # noqa: UP006
        if not isinstance(value, dict):
            raise parameter_invalid(param, f"Invalid hash: {param}")
        args = get_args(annotation)
        value_type = args[-1] if args else Any
        return {key: coerce(item, value_type, f"{param}[{key}]") for key, item in value.items()}
    return value
