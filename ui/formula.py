"""Custom columns from a formula: arithmetic over column names and numbers, nothing else.

The formula is parsed with `ast` and walked here; nothing is ever handed to eval. Only
numbers, known column names, + - * / ** % //, unary minus/plus and parentheses are
accepted: no attribute access, calls, indexing, comparisons, strings or names outside
the table. Numbers are floats, so `9**9**9` overflows to inf instead of running forever.
"""

from __future__ import annotations

import ast
import operator

import numpy as np
import pandas as pd

MAX_LENGTH = 200

_BINARY = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
    ast.Pow: operator.pow,
}
_UNARY = {ast.USub: operator.neg, ast.UAdd: operator.pos}


class FormulaError(ValueError):
    """Why a formula was refused, in words for the user."""


def parse(formula: str, columns: list[str]) -> ast.Expression:
    """Check `formula` against the allowed grammar; returns the parsed tree."""
    if not formula or not formula.strip():
        raise FormulaError("the formula is empty")
    if len(formula) > MAX_LENGTH:
        raise FormulaError(f"the formula is longer than {MAX_LENGTH} characters")
    try:
        tree = ast.parse(formula.strip(), mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        raise FormulaError("not a valid formula") from None
    allowed = set(columns)
    for node in ast.walk(tree):
        if isinstance(node, (ast.Expression, ast.Load)) or type(node) in _BINARY or type(node) in _UNARY:
            continue
        if isinstance(node, ast.BinOp):
            if type(node.op) not in _BINARY:
                raise FormulaError("only + - * / // % ** are allowed")
        elif isinstance(node, ast.UnaryOp):
            if type(node.op) not in _UNARY:
                raise FormulaError("only unary - and + are allowed")
        elif isinstance(node, ast.Constant):
            if isinstance(node.value, bool) or not isinstance(node.value, (int, float)):
                raise FormulaError(f"{node.value!r} is not a number")
        elif isinstance(node, ast.Name):
            if node.id not in allowed:
                raise FormulaError(f"unknown column {node.id!r} (numeric columns: {', '.join(columns)})")
        else:
            raise FormulaError(f"{type(node).__name__} is not allowed: only arithmetic on columns and numbers")
    return tree


def evaluate(formula: str, table: pd.DataFrame) -> pd.Series:
    """The formula's value for every row of `table` (float; empty (NaN) where undefined)."""
    numeric = [c for c in table.columns if pd.api.types.is_numeric_dtype(table[c]) and not pd.api.types.is_bool_dtype(table[c])]
    tree = parse(formula, numeric)

    def walk(node):
        if isinstance(node, ast.Expression):
            return walk(node.body)
        if isinstance(node, ast.Constant):
            return np.float64(node.value)
        if isinstance(node, ast.Name):
            return table[node.id].astype("float64")
        if isinstance(node, ast.UnaryOp):
            return _UNARY[type(node.op)](walk(node.operand))
        return _BINARY[type(node.op)](walk(node.left), walk(node.right))

    with np.errstate(all="ignore"):
        try:
            value = walk(tree)
        except (ZeroDivisionError, OverflowError, RecursionError):
            raise FormulaError("the formula cannot be computed (division by zero or overflow)") from None
    if np.isscalar(value):
        value = pd.Series(float(value), index=table.index)
    value = value.astype("float64")
    # A division by zero (or an overflow) has no value: an empty cell, never inf in a CSV.
    return value.where(np.isfinite(value))
