"""Content encodings of target responses: which ones this installation can decode.

urllib3 decodes gzip and deflate always, ``br`` and ``zstd`` with the optional
extras; a body in any other coding is refused before it is read.
"""

from __future__ import annotations

from typing import Optional

import urllib3.response

#: the optional extra that makes urllib3 decode an encoding (see pyproject.toml)
_ENCODING_EXTRAS = {"br": "brotli", "zstd": "zstd"}


def undecodable_encoding(header: str) -> Optional[str]:
    """The first coding in a ``Content-Encoding`` value urllib3 cannot decode here, or None."""
    decodable = {c.lower() for c in urllib3.response.HTTPResponse.CONTENT_DECODERS}
    decodable.add("identity")
    for coding in header.split(","):
        name = coding.strip().lower()
        if name and name not in decodable:
            return name[:40]
    return None


def encoding_reason(coding: str) -> str:
    """The error result's reason for a coding urllib3 cannot decode: which extra would."""
    extra = _ENCODING_EXTRAS.get(coding)
    reason = f"unsupported Content-Encoding: {coding}"
    if extra:
        reason += f" (install acagent[{extra}] to decode it)"
    return reason
