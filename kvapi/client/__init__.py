"""Python clients of kvapi.

KV (sync) and AsyncKV (async) talk to a kvapi server over HTTP; SqlKV
(kvapi.client.sql) calls the SQL functions over a psycopg connection inside
the caller's transaction. All three raise the KvError subclasses below,
which are generated from kvapi.errors.REGISTRY.

    from kvapi.client import KV

    with KV("http://127.0.0.1:8080", "demo", "kvs_...") as kv:
        kv.set("greeting", "hello", ttl=60)
        kv.get("greeting")
"""

from kvapi.client import errors
from kvapi.client._clients import KV, AsyncKV
from kvapi.client._operations import UNSET, Entry, Explanation, KeyInfo, Page, Rule, Ttl
from kvapi.client.errors import *  # noqa: F403 (the generated exception classes)
from kvapi.client.sql import SqlKV

__all__ = ["KV", "AsyncKV", "SqlKV", "UNSET", "Ttl", "Entry", "Explanation", "KeyInfo", "Page", "Rule", *errors.__all__]
