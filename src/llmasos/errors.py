"""The root of the LLMasOS exception tree.

Every exception that LLMasOS raises for an expected failure derives from
`LLMasOSError`, so a caller can catch them all in one place.
"""


class LLMasOSError(Exception):
    """Base class of every expected failure that LLMasOS reports."""
