"""Session bookkeeping: ids, expiry, LRU order, bytes held per memory tier. No tensors live here.

"No room" is returned as a value (``None``) and acted on by the caller.
Torch-free, so the protocol layer can mint ids without importing torch.
"""

from __future__ import annotations

import hmac
import secrets
from collections import OrderedDict
from dataclasses import dataclass

# The id rule itself is the wire's (llava_sessions/wire.py); the ids minted here satisfy it.


def new_session_id() -> str:
    """128 random bits (more than a uuid4's 122), in SageMaker's id alphabet (wire.is_valid_session_id)."""
    return "sess-" + secrets.token_hex(16)


@dataclass
class SessionRecord:
    session_id: str
    created_at: float
    expires_at: float
    last_used: float
    busy: bool = False
    # Bytes per memory tier (see memory_budget.py): KV and features on the device, KV and
    # features on host.
    device_kv_bytes: int = 0
    device_feature_bytes: int = 0
    host_feature_bytes: int = 0
    host_kv_bytes: int = 0

    @property
    def device_bytes(self) -> int:
        return self.device_kv_bytes + self.device_feature_bytes

    @property
    def host_bytes(self) -> int:
        return self.host_kv_bytes + self.host_feature_bytes

    @property
    def bytes_held(self) -> int:
        return self.device_bytes + self.host_bytes


class SessionStore:
    def __init__(self, capacity: int):
        self.capacity = capacity
        self._records: OrderedDict[str, SessionRecord] = OrderedDict()  # LRU first

    def __len__(self) -> int:
        return len(self._records)

    def __contains__(self, session_id: str) -> bool:
        return self.lookup(session_id) is not None

    def reserve(self, session_id: str, now: float, ttl_s: float, over_capacity: bool = False) -> SessionRecord | None:
        """Add a session, or None when the store is full (``over_capacity``: added all the same)."""
        if len(self._records) >= self.capacity and not over_capacity:
            return None
        record = SessionRecord(session_id, created_at=now, expires_at=now + ttl_s, last_used=now)
        self._records[session_id] = record
        return record

    def lookup(self, session_id: str) -> SessionRecord | None:
        record = self._records.get(session_id)
        # The dict finds the candidate by hash; confirm in constant time.
        if record is None or not hmac.compare_digest(record.session_id, session_id):
            return None
        return record

    def touch(self, record: SessionRecord, now: float) -> None:
        record.last_used = now
        self._records.move_to_end(record.session_id)

    def remove(self, session_id: str) -> SessionRecord | None:
        return self._records.pop(session_id, None)

    def expired(self, now: float) -> list[str]:
        return [r.session_id for r in self._records.values() if r.expires_at <= now]

    def total_bytes(self) -> int:
        return sum(r.bytes_held for r in self._records.values())

    def device_bytes(self) -> int:
        return sum(r.device_bytes for r in self._records.values())

    def host_bytes(self) -> int:
        return sum(r.host_bytes for r in self._records.values())

    def lru_order(self) -> list[str]:
        return list(self._records)

    def lru_records(self) -> list[SessionRecord]:
        """Every record, least recently used first."""
        return list(self._records.values())
