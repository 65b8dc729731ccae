"""The wire protocol: ZeroMQ multipart ``[topic, header, payload?]``.

``topic`` is ``<kind>/<stream>/`` in ASCII (``frame/ws1/``, ``status/*/``): ZeroMQ's
prefix subscription then selects a kind (``frame``), one stream of it (``frame/ws1/``,
the trailing ``/`` keeps ``ws1`` from matching ``ws10``) or a family of streams
(``frame/line2-``). ``header`` is a msgpack map, ``payload`` raw bytes (only ``frame``
has one: the frame's own ``<u2`` bytes in C order). ``docs/protocol.md`` is the
language-neutral contract; this module is its reference implementation.

Everything that comes from outside is bounded here: names (``stream``, ``video``,
``kind``) are 1..64 characters of ``A-Z a-z 0-9 _ . -``, integers lie within int64 and
their field's range (``type`` 1..36, counters and times >= 0), maps and lists are
short. Decoding sits on the monitor's per-frame hot path, so a valid frame is checked
with one C-level field fetch, one tuple of exact types and a few comparisons (names
already seen are looked up in a bounded set), never a schema library.

The implementation is split by concept, all re-exported here (import from this module):
``schema`` (endpoints, bounds, names, routes, field checks, events on the wire:
`to_wire`, `from_wire`, for the typed events of ``lhtstream.io.events``), ``decode``
(with the frame fast path, frame arrays), ``encode`` (any topic, the frame encoders),
``selection`` (stream selection, subscriber sockets, the ``ipc://`` check before
binding).
"""


from __future__ import annotations

from lhtstream.io.decode import (  # noqa: F401  (private names: tests look inside)
    _DTYPE,
    FrameBuffer,
    _FrameLayout,
    _layouts,
    decode,
    frame_array,
)
from lhtstream.io.encode import (  # noqa: F401
    EncodedFrames,
    FrameEncoder,
    _header_template,
    _packer,
    encode,
    encode_frame,
)
from lhtstream.io.schema import (  # noqa: F401
    _FIELDS,
    _INT64,
    _KNOWN_CAP,
    _TOPIC_BYTES,
    ALARM_FIELDS,
    ALL_STREAMS,
    DEFAULT_FRAME_ENDPOINT,
    DEFAULT_PUBLISH_ENDPOINT,
    FRAME_DTYPE,
    INT64_MAX,
    MAX_FRAME_SIDE,
    MAX_HEADER_BYTES,
    MAX_MESSAGE_BYTES,
    MAX_METADATA_ENTRIES,
    MAX_NAME,
    NAME_CHARS,
    SCHEMA_VERSION,
    TOPICS,
    VERDICT_FIELDS,
    Message,
    ProtocolError,
    _routes,
    _valid_names,
    check_name,
    from_wire,
    to_wire,
    topic_bytes,
    valid_name,
)
from lhtstream.io.selection import (  # noqa: F401
    StreamSelection,
    claim_ipc,
    configure_subscriber,
)
