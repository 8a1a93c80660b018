"""What tdask uses from Python 3.11 that 3.10 spells otherwise.

On 3.10, ``asyncio`` timeouts raise ``asyncio.TimeoutError``, which is neither the builtin ``TimeoutError`` nor an
``OSError`` (3.11 made them one): catch :data:`TimeoutErrors` where a wait may time out.
"""

from __future__ import annotations

import asyncio
import sys

if sys.version_info >= (3, 11):
    from asyncio import timeout
else:  # the backport of asyncio.timeout, with the same semantics
    from async_timeout import timeout

TimeoutErrors = (TimeoutError, asyncio.TimeoutError)  # one class on 3.11+, two on 3.10

__all__ = ["TimeoutErrors", "timeout"]
