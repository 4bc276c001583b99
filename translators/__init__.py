"""Pure translators between OpenAI tools/messages and Python code actions.

This package imports nothing from ``proxy``: it is synchronous, pure and usable
as a library on its own. The translators themselves arrive with the
translators-and-grammars work; for now the package holds its public surface.
"""

__all__: list[str] = []
