"""Regexes from strangers' files, checked and matched in bounded time.

**Regexes are bounded work.** Regexes come from strangers' files (``target_modules``, ``rank_pattern`` keys), and
Python's ``re`` backtracks without a time limit (``"(.*)*Z"`` takes minutes on a module path). So every regex a
rule holds passes :func:`regex_problem` first (rules call it when they are built, so a file's bad regex is an
error naming its field) and is matched through :func:`bounded_regex`:

- at most ``MAX_REGEX_LENGTH`` (1000) characters;
- no back-references (``\\1``, ``(?P=name)``), conditionals (``(?(1)a|b)``), atomic groups or possessive
  quantifiers: constructs a module path never needs (they select nothing a plain regex cannot), which the
  bounded matcher below does not run (back-references make matching NP-hard);
- a cost estimate under ``MAX_REGEX_COST`` (2,000,000): with paths of ``PATH_LENGTH`` (256) characters, a
  repeat (``*``, ``+``, ``{m,n}``) or a lookaround multiplies the cost of what it holds by about 257, so repeats
  and lookarounds nested two deep are fine (``(.*)*Z``, ``(\\w+\\.)*q_proj``, ``^(?!.*lm_head).*``,
  ``(?:(?!lm_head).)*``) and three deep are refused (``((a*)*)*``, ``(?:(?!.*x).)*``).

A pattern whose backtracking cannot exceed ``FAST_REGEX_STEPS`` steps (at most one repeat of a single character
in a row, as in ``.*\\.(q_proj|v_proj)``) runs on ``re`` itself; any other runs on a position-set evaluator over
the parse tree ``re`` makes (each character class and anchor is tested by ``re``), whose time is polynomial in
the path length: the same answers, in at most ``MAX_REGEX_COST`` set operations per path.
"""

from __future__ import annotations

import functools
import re

from fxpeft.errors import RuleError

try:  # the parser ``re`` itself uses, so that the tree checked and run here is the one Python would run
    from re import _parser as sre  # Python >= 3.11
except ImportError:  # pragma: no cover - Python 3.10
    import sre_parse as sre

__all__ = ["MAX_REGEX_LENGTH", "MAX_REGEX_COST", "FAST_REGEX_STEPS", "PATH_LENGTH", "BoundedRegex", "bounded_regex",
           "regex_problem"]

MAX_REGEX_LENGTH = 1000
PATH_LENGTH = 256  # the module-path length the cost estimates assume
MAX_REGEX_COST = 2_000_000  # set operations of the position-set evaluator (each over <= PATH_LENGTH + 1 positions)
FAST_REGEX_STEPS = 100_000  # backtracking steps up to which ``re`` runs a pattern itself
_MAX_NESTING = 50  # groups inside groups
_SATURATED = 10 ** 15
_CHARS = {sre.LITERAL, sre.NOT_LITERAL, sre.ANY, sre.IN}
_REPEATS = {sre.MAX_REPEAT, sre.MIN_REPEAT}  # greedy or lazy: the same set of matches
_LOOKS = {sre.ASSERT, sre.ASSERT_NOT}
_BACKREFS = {sre.GROUPREF, sre.GROUPREF_EXISTS, getattr(sre, "GROUPREF_IGNORE", sre.GROUPREF)}
_ATOMIC = {getattr(sre, "ATOMIC_GROUP", None), getattr(sre, "POSSESSIVE_REPEAT", None)} - {None}
_CATEGORIES = {sre.CATEGORY_DIGIT: r"\d", sre.CATEGORY_NOT_DIGIT: r"\D", sre.CATEGORY_SPACE: r"\s",
               sre.CATEGORY_NOT_SPACE: r"\S", sre.CATEGORY_WORD: r"\w", sre.CATEGORY_NOT_WORD: r"\W"}
_ANCHORS = {sre.AT_BEGINNING: "^", sre.AT_BEGINNING_STRING: r"\A", sre.AT_END: "$", sre.AT_END_STRING: r"\Z",
            sre.AT_BOUNDARY: r"\b", sre.AT_NON_BOUNDARY: r"\B"}
_LEAF_FLAGS = re.IGNORECASE | re.DOTALL | re.MULTILINE | re.ASCII


class _Refused(Exception):
    """A pattern :func:`regex_problem` refuses; the message says why."""


class _CharTest:
    """One character-level item (a literal, ``.``, ``[...]``, ``\\d``) as ``re`` matches it, answers cached."""

    __slots__ = ("pattern", "answers")

    def __init__(self, source: str, flags: int):
        self.pattern = re.compile(source, flags)
        self.answers: dict[str, bool] = {}

    def __call__(self, char: str) -> bool:
        hit = self.answers.get(char)
        if hit is None:
            hit = self.answers[char] = self.pattern.fullmatch(char) is not None
        return hit


def _char_source(op, av) -> str:
    if op is sre.LITERAL:
        return re.escape(chr(av))
    if op is sre.NOT_LITERAL:
        return f"[^{re.escape(chr(av))}]"
    if op is sre.ANY:
        return "."
    parts = []
    for item, value in av:
        if item is sre.NEGATE:
            parts.append("^")
        elif item is sre.LITERAL:
            parts.append(re.escape(chr(value)))
        elif item is sre.RANGE:
            parts.append(f"{re.escape(chr(value[0]))}-{re.escape(chr(value[1]))}")
        elif item is sre.CATEGORY and value in _CATEGORIES:
            parts.append(_CATEGORIES[value])
        else:
            raise _Refused(f"has a character class item fxpeft does not run ({item})")
    return f"[{''.join(parts)}]"


def _build(items, flags: int, depth: int) -> tuple:
    """``re``'s parse tree as nodes: ("char", test) ("at", pattern) ("seq", nodes) ("alt", nodes)
    ("rep", min, max or None, node) ("look", lookbehind width or None, negated, node)."""
    if depth > _MAX_NESTING:
        raise _Refused(f"nests groups more than {_MAX_NESTING} deep")
    nodes = []
    for op, av in items:
        if op in _CHARS:
            nodes.append(("char", _CharTest(_char_source(op, av), flags & _LEAF_FLAGS)))
        elif op is sre.AT and av in _ANCHORS:
            nodes.append(("at", re.compile(_ANCHORS[av], flags & _LEAF_FLAGS)))
        elif op is sre.SUBPATTERN:
            _, add, remove, body = av
            nodes.append(_build(body, (flags | add) & ~remove, depth + 1))
        elif op is sre.BRANCH:
            nodes.append(("alt", tuple(_build(branch, flags, depth + 1) for branch in av[1])))
        elif op in _REPEATS:
            low, high, body = av
            nodes.append(("rep", low, None if high == sre.MAXREPEAT else high, _build(body, flags, depth + 1)))
        elif op in _LOOKS:
            direction, body = av
            width = None if direction == 1 else body.getwidth()[0]
            nodes.append(("look", width, op is sre.ASSERT_NOT, _build(body, flags, depth + 1)))
        elif op in _BACKREFS:
            raise _Refused("refers back to a group (\\1, (?P=name) or (?(1)...|...))")
        elif op in _ATOMIC:
            raise _Refused("has an atomic group (?>...) or a possessive quantifier (*+, ++, ?+)")
        else:
            raise _Refused(f"uses {op}, which fxpeft does not run on module paths")
    return nodes[0] if len(nodes) == 1 else ("seq", tuple(nodes))


def _cost(node) -> tuple[int, int, bool]:
    """Upper bounds for a path of PATH_LENGTH characters: the ways ``node`` can match from one position (what a
    backtracking engine may try), the set operations :func:`_ends` takes; and whether its length varies."""
    kind, positions = node[0], PATH_LENGTH + 1
    if kind in ("char", "at"):
        return 1, 1, False
    if kind in ("seq", "alt"):
        ways, steps, varies = (1 if kind == "seq" else 0), 1, kind == "alt" and len(node[1]) > 1
        for child in node[1]:
            child_ways, child_steps, child_varies = _cost(child)
            ways = min(ways * child_ways if kind == "seq" else ways + child_ways, _SATURATED)
            steps, varies = min(steps + child_steps, _SATURATED), varies or child_varies
        return ways, steps, varies
    if kind == "look":
        ways, steps, _ = _cost(node[3])
        return ways, min(positions * steps, _SATURATED), True
    low, high, body = node[1:]
    body_ways, body_steps, body_varies = _cost(body)
    top = positions if high is None else min(high, positions)
    ways = top - min(low, top) + 1 if body_ways == 1 else \
        min(sum(min(body_ways ** k, _SATURATED) for k in range(min(low, top), top + 1)), _SATURATED)
    loops = min(low, positions) + (positions if high is None or high - low >= PATH_LENGTH else high - low)
    return ways, min(loops * body_steps + 1, _SATURATED), body_varies or high != low


def _ends(node, starts: set[int], run: "_Run") -> set[int]:
    """The positions where ``node`` can end a match begun at one of ``starts``."""
    kind = node[0]
    if kind == "char":
        text, test = run.text, node[1]
        return {p + 1 for p in starts if p < run.size and test(text[p])}
    if kind == "at":
        return {p for p in starts if node[1].match(run.text, p) is not None}
    if kind == "seq":
        for child in node[1]:
            if not starts:
                break
            starts = _ends(child, starts, run)
        return starts
    if kind == "alt":
        found: set[int] = set()
        for child in node[1]:
            found |= _ends(child, starts, run)
        return found
    if kind == "look":
        return {p for p in starts if run.looks(node, p) != node[2]}
    low, high, body = node[1:]
    current = set(starts)
    for _ in range(min(low, run.size + 1)):  # exactly ``low`` times (the sets repeat from size + 1 times on)
        current = _ends(body, current, run)
        if not current:
            return current
    if low > run.size:
        return current
    if high is None or high - low >= run.size:  # every further count: the closure, one frontier at a time
        seen, frontier = set(current), current
        while frontier:
            frontier = _ends(body, frontier, run) - seen
            seen |= frontier
        return seen
    found = set(current)
    for _ in range(high - low):
        following = _ends(body, current, run)
        if not following or following == current:
            break
        found |= following
        current = following
    return found


class _Run:
    """One match: the text, and each lookaround's answer per position (computed once)."""

    __slots__ = ("text", "size", "answers")

    def __init__(self, text: str):
        self.text, self.size, self.answers = text, len(text), {}

    def looks(self, node, position: int) -> bool:
        key = (id(node), position)
        hit = self.answers.get(key)
        if hit is None:
            width, body = node[1], node[3]
            if width is None:
                hit = bool(_ends(body, {position}, self))
            else:
                hit = position >= width and position in _ends(body, {position - width}, self)
            self.answers[key] = hit
        return hit


class BoundedRegex:
    """A regex checked by :func:`regex_problem`, matched in bounded time (the module docstring): by ``re``
    itself when its backtracking is cheap (``fast``), else by the position-set evaluator. Answers are ``re``'s."""

    def __init__(self, pattern: str, compiled: re.Pattern, tree: tuple, fast: bool):
        self.pattern, self.compiled, self.tree, self.fast = pattern, compiled, tree, fast

    def fullmatch(self, text: str) -> bool:
        """``re.fullmatch(pattern, text) is not None``."""
        return self.compiled.fullmatch(text) is not None if self.fast else len(text) in self.ends(text)

    def match(self, text: str) -> bool:
        """``re.match(pattern, text) is not None`` (anchored at the start, any end)."""
        return self.compiled.match(text) is not None if self.fast else bool(self.ends(text))

    def ends(self, text: str) -> set[int]:
        """Where a match of the pattern begun at the start of ``text`` can end, by the position-set evaluator
        (whatever the pattern's cost; what tests compare with ``re``)."""
        return _ends(self.tree, {0}, _Run(text))


@functools.lru_cache(maxsize=4096)
def _analysed(pattern: str, fixed: bool) -> BoundedRegex | str:
    """The pattern ready to match, or why it is refused."""
    if not isinstance(pattern, str):
        return f"is a {type(pattern).__name__}, not a string"
    if len(pattern) > MAX_REGEX_LENGTH:
        return f"is {len(pattern)} characters long; a regex from a rule or file may have at most {MAX_REGEX_LENGTH}"
    try:
        compiled = re.compile(pattern)
        parsed = sre.parse(pattern)
        tree = _build(parsed, parsed.state.flags, 0)
    except re.error as error:
        return f"is not a valid regex ({error})"
    except RecursionError:
        return "nests groups too deeply"
    except (OverflowError, ValueError) as error:
        return f"cannot be compiled ({error})"
    except _Refused as refused:
        return str(refused)
    ways, steps, varies = _cost(tree)
    if fixed and varies:
        return "may only name modules: no repeats (*, +, ?, {m,n}), alternatives or lookarounds"
    fast = fixed or ways * max(len(pattern), 1) <= FAST_REGEX_STEPS
    if not fast and steps > MAX_REGEX_COST:
        return (f"nests repeats (*, +, {{m,n}}) and lookarounds too deeply to match in bounded time (about {steps:.3g} "
                f"steps per module path; the limit is {MAX_REGEX_COST:,}): a repeat may hold a repeat, not a repeat "
                "that holds another")
    return BoundedRegex(pattern, compiled, tree, fast)


def regex_problem(pattern: str, fixed: bool = False) -> str | None:
    """Why ``pattern`` may not be used as a module-path regex (the module docstring's limits), or None.

    ``fixed``: the pattern must match one fixed text (a name such as ``"layers"``, as in ``layers_pattern``,
    which PEFT puts inside a regex of its own)."""
    found = _analysed(pattern, fixed)
    return found if isinstance(found, str) else None


def bounded_regex(pattern: str) -> BoundedRegex:
    """``pattern`` ready to match in bounded time; :class:`RuleError` saying why when it is refused."""
    found = _analysed(pattern, False)
    if isinstance(found, str):
        raise RuleError(f"The regex {pattern[:80]!r} {found}. Write a simpler regex, e.g. '.*\\.(q_proj|v_proj)', "
                        "or list the module names.")
    return found
