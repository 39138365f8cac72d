"""Read the data in a pickle without unpickling it: nothing in the file is ever imported or called.

CIFAR-10's python files are pickles of a dict holding a numpy array. ``pickle.load`` would import
and call whatever the file names, so a tampered download (or any file a user points us at) could
run code. :func:`read_inert` instead walks the opcodes (``pickletools.genops``, a pure parser) on a
small stack machine that builds only containers and literals; a global becomes a :class:`Global`
record, a call (REDUCE/NEWOBJ) a :class:`Call` record and BUILD a :class:`Built` record, none of
them performed. The caller then checks that the records have the shape it expects (e.g. a numpy
array of uint8) and takes the raw bytes. Python 2 strings come back as ``bytes`` (as
``pickle.load(..., encoding="bytes")`` gives them). Torch-free, numpy-free.
"""

from __future__ import annotations

import pickletools
from dataclasses import dataclass
from typing import Any

MAX_OPS = 50_000_000


@dataclass(frozen=True)
class Global:
    """A reference to ``module.name`` (never imported)."""

    module: str
    name: str


@dataclass(frozen=True)
class Call:
    """``func(*args)`` as the pickle asks for it (never called)."""

    func: Any
    args: Any


@dataclass(frozen=True, eq=False)
class Built:
    """``obj.__setstate__(state)`` as the pickle asks for it (never performed)."""

    obj: Any
    state: Any


class _Mark:
    pass


class InertPickleError(ValueError):
    """The bytes are not a pickle this reader can walk (or use features plain data never needs)."""


_STRINGS = {"STRING", "BINSTRING", "SHORT_BINSTRING"}  # Python 2 str: bytes
_BYTES = {"BINBYTES", "SHORT_BINBYTES", "BINBYTES8", "BYTEARRAY8"}
_UNICODE = {"UNICODE", "BINUNICODE", "SHORT_BINUNICODE", "BINUNICODE8"}
_NUMBERS = {"INT", "BININT", "BININT1", "BININT2", "LONG", "LONG1", "LONG4", "FLOAT", "BINFLOAT"}
_CONSTANTS = {"NONE": None, "NEWTRUE": True, "NEWFALSE": False}
_IGNORED = {"PROTO", "FRAME"}


def _literal_call(func: Any, args: Any) -> Any:
    """The one call plain data needs: Python 3 writes bytes at protocol 2 as
    ``_codecs.encode(text, "latin1")``, a pure function; every other call stays a :class:`Call`."""
    if (
        func == Global("_codecs", "encode")
        and isinstance(args, tuple)
        and len(args) == 2
        and isinstance(args[0], str)
        and args[1] in ("latin1", "latin-1")
    ):
        return args[0].encode("latin-1")
    return Call(func, args)


def read_inert(data: bytes) -> Any:
    """The object tree a pickle describes, with globals, calls and builds as inert records."""
    stack: list[Any] = []
    memo: dict[int, Any] = {}

    def pop_mark() -> list[Any]:
        for i in range(len(stack) - 1, -1, -1):
            if isinstance(stack[i], _Mark):
                items = stack[i + 1 :]
                del stack[i:]
                return items
        raise InertPickleError("MARK missing")

    try:
        for count, (op, arg, _) in enumerate(pickletools.genops(data)):
            name = op.name
            if count > MAX_OPS:
                raise InertPickleError(f"more than {MAX_OPS:,} opcodes")
            if name in _IGNORED:
                continue
            if name == "STOP":
                if len(stack) != 1:
                    raise InertPickleError("the stack does not end with one object")
                return stack[0]
            if name in _STRINGS:
                stack.append(arg.encode("latin-1") if isinstance(arg, str) else bytes(arg))
            elif name in _BYTES or name in _UNICODE or name in _NUMBERS:
                stack.append(bytes(arg) if name in _BYTES else arg)
            elif name in _CONSTANTS:
                stack.append(_CONSTANTS[name])
            elif name == "MARK":
                stack.append(_Mark())
            elif name in ("EMPTY_LIST", "EMPTY_DICT", "EMPTY_TUPLE", "EMPTY_SET"):
                stack.append({"EMPTY_LIST": list, "EMPTY_DICT": dict, "EMPTY_TUPLE": tuple, "EMPTY_SET": set}[name]())
            elif name == "LIST":
                stack.append(pop_mark())
            elif name == "TUPLE":
                stack.append(tuple(pop_mark()))
            elif name in ("TUPLE1", "TUPLE2", "TUPLE3"):
                n = int(name[-1])
                items = tuple(stack[-n:])
                if len(items) != n:
                    raise InertPickleError(f"{name} on a short stack")
                del stack[-n:]
                stack.append(items)
            elif name == "FROZENSET":
                stack.append(frozenset(pop_mark()))
            elif name == "DICT":
                items = pop_mark()
                stack.append(dict(zip(items[::2], items[1::2])))
            elif name in ("APPEND", "APPENDS"):
                items = [stack.pop()] if name == "APPEND" else pop_mark()
                _target(stack, list).extend(items)
            elif name == "ADDITEMS":
                items = pop_mark()
                _target(stack, set).update(items)
            elif name in ("SETITEM", "SETITEMS"):
                items = stack[-2:] if name == "SETITEM" else pop_mark()
                if name == "SETITEM":
                    del stack[-2:]
                _target(stack, dict).update(zip(items[::2], items[1::2]))
            elif name == "POP":
                stack.pop()
            elif name == "POP_MARK":
                pop_mark()
            elif name == "DUP":
                stack.append(stack[-1])
            elif name in ("PUT", "BINPUT", "LONG_BINPUT"):
                memo[int(arg)] = stack[-1]
            elif name == "MEMOIZE":
                memo[len(memo)] = stack[-1]
            elif name in ("GET", "BINGET", "LONG_BINGET"):
                stack.append(memo[int(arg)])
            elif name == "GLOBAL":
                module, _, attr = arg.partition(" ")
                stack.append(Global(module, attr))
            elif name == "STACK_GLOBAL":
                attr, module = stack.pop(), stack.pop()
                stack.append(Global(str(module), str(attr)))
            elif name == "REDUCE":
                args = stack.pop()
                stack.append(_literal_call(stack.pop(), args))
            elif name == "NEWOBJ":
                args = stack.pop()
                stack.append(Call(stack.pop(), args))
            elif name == "NEWOBJ_EX":
                kwargs, args = stack.pop(), stack.pop()
                stack.append(Call(stack.pop(), (args, kwargs)))
            elif name == "BUILD":
                state = stack.pop()
                stack.append(Built(stack.pop(), state))
            else:  # INST, OBJ, PERSID, EXT*, out-of-band buffers: not plain data
                raise InertPickleError(f"opcode {name} is not supported")
    except InertPickleError:
        raise
    except (ValueError, IndexError, KeyError, TypeError, UnicodeError, MemoryError) as exc:
        raise InertPickleError(f"{type(exc).__name__}: {str(exc)[:120]}") from None
    raise InertPickleError("no STOP opcode")


def _target(stack: list[Any], kind: type) -> Any:
    if not stack or not isinstance(stack[-1], kind):
        raise InertPickleError(f"expected a {kind.__name__} to add items to")
    return stack[-1]


__all__ = ["Built", "Call", "Global", "InertPickleError", "read_inert"]
