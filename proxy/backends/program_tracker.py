"""What a model's code action is writing, character by character as it streams: whether it is
inside the python block, in a string literal that is a call's argument (and its text so far),
in a comment, at a keyword argument's value, writing a number or a call's function name, which
call's arguments it is in and which keywords that call has been given, and the calls and
numbers written so far. The copy bias (``proxy.backends.copy_bias``) reads it at every token.
"""

from __future__ import annotations

__all__ = ["FENCE", "ProgramTracker"]

FENCE = "```python"
_OPENERS = "=(,[{:"
_PREFIXES = set("rRbBfFuU")


class ProgramTracker:
    """Fed the model's output as it comes; ``value`` is the text so far of the string literal
    it is inside, when that literal is an argument in the python block (escapes as written)."""

    def __init__(self) -> None:
        self._head = ""  # output before the block's fence
        self._in_block = False
        self._done = False  # the block was closed
        self._quote = ""  # the open literal's quote ('"', "'", '\"\"\"' or "'''"), "" outside one
        self._run = 0  # quote characters in a row inside a triple-quoted literal
        self._escape = False
        self._comment = False
        self._arg = False
        self._value: list[str] = []
        self._last = ""  # the last character outside literals that is not a space
        self._word = ""  # the name being written (a string prefix: f, r, b, u and pairs)
        self._before_word = ""
        self._ticks = 0
        self._empty = ""  # the quote of an empty literal just closed: a third one opens '\"\"\"'
        self._line_start = False  # nothing but spaces since the last newline outside literals
        self.opener = ""  # the name before the last "(" outside literals ("print", a function)
        self.called: list[str] = []  # every name written directly before a "(" (a call)
        self.numbers: list[str] = []  # every number written outside literals, once it ends
        self._number = ""  # the number being written ("" when none)
        self._number_is_value = False  # it began right after "=": a keyword argument's value
        # open brackets outside literals, innermost last: a call's function name and the
        # keywords given to it so far, or "[" / "{" with no keywords
        self._open_brackets: list[tuple[str, list[str]]] = []

    @property
    def _in_code(self) -> bool:
        """Inside the open python block, outside literals and comments."""
        return self._in_block and not self._done and not self._quote and not self._comment

    @property
    def value(self) -> str | None:
        if self._done or len(self._quote) != 1 or not self._arg:
            return None
        return "".join(self._value)

    @property
    def quote(self) -> str:
        """The quote that will close the argument string ``value`` is the text of ("" if none)."""
        return self._quote if self.value is not None else ""

    @property
    def at_value(self) -> bool:
        """Whether the next token is a keyword argument's value (just after ``=``), which may
        open a string. Not after ``(``: ``print(`` goes on with a call as often as a string."""
        return self._in_code and not self._word and self._last == "="

    @property
    def name(self) -> str | None:
        """The name being written where a call's function goes: inside ``print(`` or any
        parentheses that are not a function's own argument list (the caller says which names
        are functions), as far as written ("" just after the parenthesis); None elsewhere."""
        if not self._in_code:
            return None
        if self._word:
            return self._word if self._before_word == "(" and not self._word[0].isdigit() else None
        return "" if self._last == "(" else None

    @property
    def after_value(self) -> bool:
        """Whether the block's code so far ends with a value or a name (a comma may follow)."""
        return self._in_code and bool(self._last) and self._last not in "(,=[{:"

    @property
    def call(self) -> tuple[str, list[str]] | None:
        """The call whose arguments are being written, directly (not inside a list or dict
        argument): its function's name and the keywords given so far, the one being written
        included."""
        if not self._in_block or self._done or self._comment or not self._open_brackets:
            return None
        name, given = self._open_brackets[-1]
        return (name, given) if name not in ("[", "{", "") else None

    @property
    def number(self) -> str | None:
        """The number written so far as a keyword argument's value, if one is being written."""
        if self._done or self._quote or self._comment or not self._number_is_value:
            return None
        return self._number or None

    @property
    def at_line_start(self) -> bool:
        """Whether the next token begins a line of the block (a statement, or its closing fence)."""
        return self._in_code and self._line_start

    def feed(self, text: str) -> None:
        for c in text:
            if self._done:
                return
            if not self._in_block:
                self._head = (self._head + c)[-len(FENCE) :]
                self._in_block = self._head == FENCE
            elif self._quote:
                self._literal(c)
            elif self._comment:
                self._comment = c != "\n"
                self._line_start = not self._comment
            else:
                self._code(c)

    def _code(self, c: str) -> None:
        empty, self._empty = self._empty, ""
        if self._number and (c.isdigit() or c == "."):
            self._number += c
        elif self._number:
            self.numbers.append(self._number)
            self._number, self._number_is_value = "", False
        elif not self._word and (c.isdigit() or c == "-"):
            self._number, self._number_is_value = c, self._last == "="
        if c in "\"'":
            if empty == c:  # '' followed by ': a triple-quoted literal
                self._open(c * 3, arg=False)
                return
            opener = self._last
            if self._word and len(self._word) <= 2 and set(self._word) <= _PREFIXES:
                opener = self._before_word
            self._open(c, arg=bool(opener) and opener in _OPENERS)
            return
        if c == "#":
            self._comment = True
            return
        if c == "(":
            self.opener = self._word
            if self._word:
                self.called.append(self._word)
            self._open_brackets.append((self._word, []))
        elif c in "[{":
            self._open_brackets.append((c, []))
        elif c in ")]}" and self._open_brackets:
            self._open_brackets.pop()
        elif c == "=" and self._word and self._open_brackets and self._last != "=":
            self._open_brackets[-1][1].append(self._word)
        self._line_start = c == "\n" or (self._line_start and c in " \t")
        self._ticks = self._ticks + 1 if c == "`" else 0
        if self._ticks == 3:
            self._done = True
        if c.isalnum() or c == "_":
            if not self._word:
                self._before_word = self._last
            self._word += c
        else:
            self._word = ""
        if not c.isspace():
            self._last = c

    def _open(self, quote: str, arg: bool) -> None:
        self._quote, self._arg, self._value, self._run, self._word = quote, arg, [], 0, ""

    def _close(self) -> None:
        self._empty = self._quote if len(self._quote) == 1 and not self._value else ""
        self._last, self._quote = self._quote[0], ""

    def _literal(self, c: str) -> None:
        if self._escape:
            self._escape = False
        elif c == "\\":
            self._escape = True
        elif len(self._quote) == 1:
            if c == self._quote:
                self._close()
                return
            if c == "\n":  # an unterminated literal ends with its line
                self._quote = ""
                return
        else:
            self._run = self._run + 1 if c == self._quote[0] else 0
            if self._run == 3:
                self._close()
                return
        self._value.append(c)
