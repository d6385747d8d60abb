"""GraphQL abuse limits, checked before any resolver runs, and the production lockdown.

- tokens (`GRAPHQL_MAX_TOKENS`): lexical tokens and comments, counted by graphql-core's parser
  (`max_tokens`), so a flood is never built into a document;
- depth (`GRAPHQL_MAX_DEPTH`): nested fields (`{ plans { id } }` is 2), through fragments,
  introspection fields included;
- aliases (`GRAPHQL_MAX_ALIASES`): aliased fields, each fragment counted as often as it is spread;
- cost (`GRAPHQL_MAX_COST`): every field 1, times the page size of each list above it (its
  `first`, at most 100; 100 for a variable), each fragment counted as often as it is spread.

A query over a limit fails validation with `extensions.code` QUERY_TOO_COMPLEX, `limit` (which
one) and `maximum`. The checks are one linear pass per definition: a fragment's depth, alias count
and cost are computed once, then combined wherever it is spread (Strawberry's
`QueryDepthLimiter` and `MaxAliasesLimiter` expand a fragment every time it is spread, so a
kilobyte of doubling fragments keeps them busy for seconds, and the depth limiter skips
introspection). The limits rule runs first and aborts the validation, so graphql-core's own rules
never walk a document over the limits either. A fragment cycle adds nothing here: graphql-core's
`NoFragmentCyclesRule` reports it.

In production (`ENVIRONMENT=production`) introspection is refused (`__schema`, `__type`;
`__typename` stays), and no error message suggests names ("Did you mean ...?"). Unexpected
errors are masked in every environment (graph.errors). The view applies all of it to every
operation, on every path (graph.view.OperationRules).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING, Any, ClassVar

from graphql import (
    DocumentNode,
    ExecutableDefinitionNode,
    FieldNode,
    FragmentDefinitionNode,
    FragmentSpreadNode,
    GraphQLError,
    GraphQLSyntaxError,
    InlineFragmentNode,
    IntValueNode,
    OperationDefinitionNode,
    SelectionSetNode,
)
from graphql.language import SKIP, VisitorAction
from graphql.validation import ASTValidationRule
from graphql.validation.validate import ValidationAbortedError

if TYPE_CHECKING:
    from billing.settings import Settings

QUERY_TOO_COMPLEX = "QUERY_TOO_COMPLEX"
PAGE_ARGUMENT = "first"
MAX_PAGE = 100  # the largest page a list argument serves (viewer.invoices caps `first` at 100)
SATURATED = 2**31 - 1  # counts stop growing here: "more than" is all a message needs

_TOKEN_FLOOD = re.compile(r"Document contains more than \d+ tokens")
_TOO_DEEP_TO_PARSE = "Document is nested too deeply"
_SUGGESTION = re.compile(r"\s*Did you mean .*$", re.DOTALL)


@dataclass(frozen=True, slots=True)
class QueryLimits:
    max_depth: int = 15  # the standard introspection query is 15 deep (TypeRef: 9 ofType levels)
    max_aliases: int = 30
    max_tokens: int = 1000
    max_cost: int = 5000

    @classmethod
    def from_settings(cls, settings: Settings) -> QueryLimits:
        return cls(
            max_depth=settings.graphql_max_depth,
            max_aliases=settings.graphql_max_aliases,
            max_tokens=settings.graphql_max_tokens,
            max_cost=settings.graphql_max_cost,
        )


@dataclass(frozen=True, slots=True)
class Metrics:
    """What one definition asks for, its fragments expanded (each counted at most `SATURATED`)."""

    depth: int = 0
    aliases: int = 0
    cost: int = 0


# Measuring ---------------------------------------------------------------------------------------


def measure(document: DocumentNode) -> list[tuple[ExecutableDefinitionNode, Metrics]]:
    """The metrics of every operation and fragment definition of `document`.

    Linear in the size of the document: each fragment is measured once (in an order where the
    fragments it spreads come first), and a spread adds the fragment's numbers. A spread that
    closes a cycle adds nothing. Nothing recurses, so no document exhausts the stack.
    """
    definitions = [
        definition
        for definition in document.definitions
        if isinstance(definition, OperationDefinitionNode | FragmentDefinitionNode)
    ]
    # As graphql-core resolves spreads: by name, the last definition of a name wins.
    fragments = {
        definition.name.value: definition
        for definition in definitions
        if isinstance(definition, FragmentDefinitionNode)
    }
    measured: dict[str, Metrics] = {}
    spreads = {name: _spread_names(fragment.selection_set) for name, fragment in fragments.items()}
    for root in fragments:
        if root in measured:
            continue
        path = [(root, iter(spreads[root]))]
        on_path = {root}
        while path:
            name, pending = path[-1]
            for spread in pending:
                if spread in fragments and spread not in measured and spread not in on_path:
                    path.append((spread, iter(spreads[spread])))
                    on_path.add(spread)
                    break
            else:
                path.pop()
                on_path.discard(name)
                measured[name] = _measure_selections(fragments[name].selection_set, measured)
    results: list[tuple[ExecutableDefinitionNode, Metrics]] = []
    for definition in definitions:
        if isinstance(definition, FragmentDefinitionNode) and fragments[definition.name.value] is definition:
            results.append((definition, measured[definition.name.value]))
        else:  # an operation, or a fragment shadowed by another of its name (still an invalid document)
            results.append((definition, _measure_selections(definition.selection_set, measured)))
    return results


def _spread_names(selection_set: SelectionSetNode) -> list[str]:
    names: list[str] = []
    stack = [selection_set]
    while stack:
        for selection in stack.pop().selections:
            if isinstance(selection, FragmentSpreadNode):
                names.append(selection.name.value)
            else:
                nested = selection.selection_set  # type: ignore[attr-defined]
                if nested is not None:
                    stack.append(nested)
    return names


def _measure_selections(selection_set: SelectionSetNode, fragments: dict[str, Metrics]) -> Metrics:
    """One selection set, with the metrics of the fragments measured so far (others add nothing)."""
    depth = aliases = cost = 0
    stack: list[tuple[SelectionSetNode, int, int]] = [(selection_set, 0, 1)]  # (set, level, multiplier)
    while stack:
        current, level, multiplier = stack.pop()
        for selection in current.selections:
            if isinstance(selection, FieldNode):
                depth = max(depth, level + 1)
                cost += multiplier
                if selection.alias is not None:
                    aliases += 1
                if selection.selection_set is not None:
                    inner = min(multiplier * _page_size(selection), SATURATED)
                    stack.append((selection.selection_set, level + 1, inner))
            elif isinstance(selection, InlineFragmentNode):
                stack.append((selection.selection_set, level, multiplier))
            elif isinstance(selection, FragmentSpreadNode):
                spread = fragments.get(selection.name.value)
                if spread is not None:
                    depth = max(depth, level + spread.depth)
                    aliases += spread.aliases
                    cost += multiplier * spread.cost
        aliases, cost = min(aliases, SATURATED), min(cost, SATURATED)
    return Metrics(depth=min(depth, SATURATED), aliases=aliases, cost=cost)


def _page_size(field: FieldNode) -> int:
    """How many items a list field may return: its `first` argument, at most `MAX_PAGE`."""
    for argument in field.arguments or ():
        if argument.name.value != PAGE_ARGUMENT:
            continue
        value = argument.value
        if isinstance(value, IntValueNode):
            try:
                return max(1, min(int(value.value), MAX_PAGE))
            except ValueError:
                return MAX_PAGE
        return MAX_PAGE  # a variable: the largest page
    return 1


# Refusing -----------------------------------------------------------------------------------------


class QueryTooComplex(ValidationAbortedError):
    """A limit is exceeded: validation stops here, before any other rule walks the document."""


def too_complex(message: str, limit: str, maximum: int, nodes: Any = None) -> GraphQLError:
    return GraphQLError(
        message, nodes, extensions={"code": QUERY_TOO_COMPLEX, "limit": limit, "maximum": maximum}
    )


def _amount(value: int) -> str:
    return f"more than {SATURATED:,}" if value >= SATURATED else f"{value:,}"


def violations(document: DocumentNode, limits: QueryLimits) -> list[GraphQLError]:
    """One error per exceeded limit, for the first definition exceeding it."""
    found: dict[str, GraphQLError] = {}
    for definition, metrics in measure(document):
        if "depth" not in found and metrics.depth > limits.max_depth:
            found["depth"] = too_complex(
                f"The query is nested {_amount(metrics.depth)} levels deep (fragments included); "
                f"at most {limits.max_depth} are allowed.",
                "depth",
                limits.max_depth,
                definition,
            )
        if "aliases" not in found and metrics.aliases > limits.max_aliases:
            found["aliases"] = too_complex(
                f"The query uses {_amount(metrics.aliases)} aliases (each fragment counted as often "
                f"as it is spread); at most {limits.max_aliases} are allowed.",
                "aliases",
                limits.max_aliases,
                definition,
            )
        if "cost" not in found and metrics.cost > limits.max_cost:
            found["cost"] = too_complex(
                f"The query costs {_amount(metrics.cost)} (each field 1, times the page size of the "
                f"lists above it; fragments counted as often as they are spread); at most "
                f"{limits.max_cost} is allowed.",
                "cost",
                limits.max_cost,
                definition,
            )
    return list(found.values())


class _QueryLimitsRule(ASTValidationRule):
    limits: ClassVar[QueryLimits]

    def enter_document(self, node: DocumentNode, *_args: Any) -> VisitorAction:
        errors = violations(node, self.limits)
        if errors:
            *others, last = errors
            for error in others:
                self.report_error(error)
            raise QueryTooComplex(last.message, last.nodes, extensions=last.extensions, original_error=None)
        return SKIP


@lru_cache(maxsize=32)
def limits_rule(limits: QueryLimits) -> type[ASTValidationRule]:
    """The validation rule enforcing `limits` (one class per configuration)."""
    return type("QueryLimitsRule", (_QueryLimitsRule,), {"limits": limits})


def polish_errors(errors: list[GraphQLError], limits: QueryLimits, *, production: bool) -> list[GraphQLError]:
    return [polished(error, limits, production=production) for error in errors]


def polished(error: GraphQLError, limits: QueryLimits, *, production: bool) -> GraphQLError:
    """A parser's refusal as QUERY_TOO_COMPLEX; in production, no "Did you mean ...?"."""
    if isinstance(error, GraphQLSyntaxError):
        if _TOKEN_FLOOD.search(error.message):
            maximum = limits.max_tokens
            return too_complex(
                f"The query has more than {maximum} tokens; at most {maximum} are allowed.",
                "tokens",
                maximum,
            )
        if _TOO_DEEP_TO_PARSE in error.message:
            maximum = limits.max_depth
            return too_complex(
                f"The query is nested too deeply to parse; at most {maximum} levels are allowed.",
                "depth",
                maximum,
            )
        return error
    if production and "Did you mean" in error.message:
        return GraphQLError(
            _SUGGESTION.sub("", error.message),
            nodes=error.nodes,
            source=error.source,
            positions=error.positions,
            path=error.path,
            original_error=error.original_error,
            extensions=error.extensions,
        )
    return error
