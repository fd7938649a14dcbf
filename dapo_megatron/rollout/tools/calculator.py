"""`calculator`: arithmetic on numbers only, by walking the expression's syntax tree (no eval, no names)."""
import ast
import operator

from . import ToolError, ToolLimits, register_tool

_BIN = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
        ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow}
_UNARY = {ast.UAdd: operator.pos, ast.USub: operator.neg}
_MAX_CHARS = 500
_MAX_EXPONENT = 1000  # 9 ** 10 ** 10 would hang the worker: bounded before it is computed
_MAX_MAGNITUDE = 10 ** 100


def evaluate(expression: str):
    if len(expression) > _MAX_CHARS:
        raise ToolError(f"expression longer than {_MAX_CHARS} characters")
    try:
        tree = ast.parse(expression.strip(), mode="eval")
    except SyntaxError:
        raise ToolError(f"not an arithmetic expression: {expression.strip()[:80]!r}") from None
    return _eval(tree.body)


def _eval(node):
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        return node.value
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        return _UNARY[type(node.op)](_eval(node.operand))
    if isinstance(node, ast.BinOp) and type(node.op) in _BIN:
        left, right = _eval(node.left), _eval(node.right)
        if isinstance(node.op, ast.Pow) and abs(right) > _MAX_EXPONENT:
            raise ToolError(f"exponent {right} is larger than {_MAX_EXPONENT}")
        try:
            value = _BIN[type(node.op)](left, right)
        except ZeroDivisionError:
            raise ToolError("division by zero") from None
        if isinstance(value, complex) or abs(value) > _MAX_MAGNITUDE:
            raise ToolError("result out of range")
        return value
    raise ToolError(f"only numbers and + - * / // % ** ( ) are allowed, not {type(node).__name__}")


def format_number(value) -> str:
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e16:
        return str(int(value))
    return repr(value)


@register_tool("calculator", arg="expression",
               description="Evaluate an arithmetic expression of numbers and + - * / // % ** ( ).")
def calculator(args: dict, limits: ToolLimits) -> str:
    expression = args.get("expression")
    if not isinstance(expression, str):
        raise ToolError('calculator takes {"expression": "<arithmetic>"}')
    return format_number(evaluate(expression))
