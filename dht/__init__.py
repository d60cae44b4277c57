"""Cascade directory: signed, expiring node and room records on a Kademlia DHT."""

from dht.cli import keygen_main, parse_bootstrap
from dht.directory import Directory
from dht.identity import (
    IdentityError,
    NodeIdentity,
    check_certificate,
    issue_certificate,
    node_id_from_public_key,
    verify_signature,
)
from dht.records import (
    DEFAULT_TTL,
    MAX_TTL,
    Load,
    Member,
    NodeRecord,
    Producer,
    RecordRejected,
    RejectReason,
    RoomEntry,
    SignedRecord,
    ValidationPolicy,
    sign_record,
    verify_record,
)
from dht.server import DhtConfig, DirectoryServer, Lookup
from dht.storage import RecordStorage

__all__ = [
    "DEFAULT_TTL",
    "MAX_TTL",
    "DhtConfig",
    "Directory",
    "DirectoryServer",
    "IdentityError",
    "Load",
    "Lookup",
    "Member",
    "NodeIdentity",
    "NodeRecord",
    "Producer",
    "RecordRejected",
    "RecordStorage",
    "RejectReason",
    "RoomEntry",
    "SignedRecord",
    "ValidationPolicy",
    "check_certificate",
    "issue_certificate",
    "keygen_main",
    "node_id_from_public_key",
    "parse_bootstrap",
    "sign_record",
    "verify_record",
    "verify_signature",
]
