"""The tables and indexes both stores keep, written once and rendered per database.

A migration is a script of ``;``-separated statements; the stores apply the versions
they have not yet applied, in order, at start-up (each store its own way: SQLite one
statement per call inside ``BEGIN IMMEDIATE``, PostgreSQL every version in one
transaction under an advisory lock, so that replicas starting together migrate once).
A version once shipped has built databases that are still in use: its effect never
changes, and a schema change is a new version.

The shared scripts name their types by what the column holds, and each database
spells them its own way (``Dialect``):

- ``{time}``, seconds since the epoch with a fraction: ``REAL`` / ``DOUBLE PRECISION``.
- ``{count}``, a count or size that may pass 2**31 (rows, records, versions, bytes):
  ``INTEGER`` / ``BIGINT``. SQLite's ``INTEGER`` holds 64 bits, PostgreSQL's 32; the
  per-job counters of polls and not-found answers stay small and are ``INTEGER`` on
  both.
- ``{bytes}``, a callback body: ``BLOB`` / ``BYTEA``.
- ``{serial_key}``, a key the database assigns in increasing order, which the
  timeline, the kept and the refused callbacks are read and pruned by: SQLite's
  ``AUTOINCREMENT`` (never reusing the key of a deleted newest row) and PostgreSQL's
  ``BIGSERIAL``.

What only one store has stays beside that store, in its own migration list:

- SQLite's version 3 adds ``kept_size`` on the kept bodies' sizes: SQLite keeps a
  body inside its row, so the count and total of sizes read whenever a callback is
  kept would otherwise read every kept body; with the index they read the sizes
  alone. PostgreSQL moves large bodies out of their rows (TOAST), and its store was
  given no such index.
- SQLite's versions 4 and 5 move a body's digest from the deliveries' unique key to
  the timeline entry the body made, unique per job: a callback then writes one
  B-tree fewer, a page less in every commit of the single writer. PostgreSQL keeps
  the key on deliveries: its round of applies inserts every delivery of the round in
  its first round trip, before any timeline entry, and a body seen before is a
  conflict right there.

What both stores gained after their own versions is one script they each number in
turn, after the versions they already have: ``JOBS_UPSTREAM_ERROR`` is SQLite's
version 6 and PostgreSQL's version 4, ``FAILED_RECORDS`` SQLite's 7 and PostgreSQL's 5,
``DOWNLOADS`` SQLite's 8 and PostgreSQL's 6, ``INSTANCES`` SQLite's 9 and PostgreSQL's 7,
``REJECTION_REPEATS`` SQLite's 10 and PostgreSQL's 8.

``TERMINAL_SQL`` lists the terminal states as the ``jobs.state`` column holds them,
for the statements of both stores that must leave an ended job alone.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from types import MappingProxyType

from service.jobs import TERMINAL, State

__all__ = [
    "DOWNLOADS",
    "FAILED_RECORDS",
    "INSTANCES",
    "JOBS_UPSTREAM_ERROR",
    "MIGRATIONS_TABLE",
    "POSTGRES",
    "REJECTION_REPEATS",
    "SHARED_MIGRATIONS",
    "SQLITE",
    "TERMINAL_SQL",
    "Dialect",
    "migrations",
    "render",
]


@dataclass(frozen=True)
class Dialect:
    """How one database spells the types the shared scripts name."""

    time: str
    count: str
    bytes: str
    serial_key: str


SQLITE = Dialect(
    time="REAL",
    count="INTEGER",
    bytes="BLOB",
    serial_key="INTEGER PRIMARY KEY AUTOINCREMENT",
)
POSTGRES = Dialect(
    time="DOUBLE PRECISION",
    count="BIGINT",
    bytes="BYTEA",
    serial_key="BIGSERIAL PRIMARY KEY",
)

# The versions applied so far; made before anything else, by each store's migrate.
MIGRATIONS_TABLE = (
    "CREATE TABLE IF NOT EXISTS schema_migrations (version INTEGER PRIMARY KEY, at {time})"
)

SHARED_MIGRATIONS: tuple[str, ...] = (
    """
    CREATE TABLE jobs (
        id TEXT PRIMARY KEY,
        upstream_id TEXT,
        hub TEXT NOT NULL,
        object TEXT NOT NULL,
        path TEXT NOT NULL,
        filename TEXT,
        rows {count},
        state TEXT NOT NULL,
        upstream_status TEXT,
        records_count {count},
        records_failed_count {count},
        created_at {time} NOT NULL,
        updated_at {time} NOT NULL,
        last_source TEXT NOT NULL,
        version {count} NOT NULL DEFAULT 0,
        idempotency_key TEXT UNIQUE,
        next_poll_at {time},
        poll_count INTEGER NOT NULL DEFAULT 0,
        not_found_count INTEGER NOT NULL DEFAULT 0,
        lease_owner TEXT,
        lease_until {time}
    );
    CREATE INDEX jobs_state_id ON jobs (state, id);
    CREATE INDEX jobs_due ON jobs (next_poll_at) WHERE next_poll_at IS NOT NULL;
    CREATE INDEX jobs_upstream_id ON jobs (upstream_id) WHERE upstream_id IS NOT NULL;
    CREATE TABLE events (
        seq {serial_key},
        job_id TEXT NOT NULL REFERENCES jobs (id),
        at {time} NOT NULL,
        source TEXT NOT NULL,
        state TEXT NOT NULL,
        detail TEXT NOT NULL
    );
    CREATE INDEX events_job ON events (job_id, seq);
    CREATE TABLE deliveries (
        webhook_id TEXT PRIMARY KEY,
        job_id TEXT,
        received_at {time} NOT NULL
    );
    CREATE TABLE kept_callbacks (
        id {serial_key},
        webhook_id TEXT NOT NULL,
        job_ref TEXT,
        received_at {time} NOT NULL,
        reason TEXT NOT NULL,
        body {bytes} NOT NULL,
        applied_at {time}
    );
    CREATE INDEX kept_pending ON kept_callbacks (job_ref) WHERE applied_at IS NULL;
    """,
    # 2: the dashboard: refused callbacks (never their bodies) and the indexes its
    # live views and callbacks panel read by.
    """
    CREATE TABLE rejected_callbacks (
        id {serial_key},
        received_at {time} NOT NULL,
        reason TEXT NOT NULL,
        detail TEXT NOT NULL,
        job_ref TEXT,
        webhook_id TEXT
    );
    CREATE INDEX rejected_at ON rejected_callbacks (received_at);
    CREATE INDEX rejected_job ON rejected_callbacks (job_ref) WHERE job_ref IS NOT NULL;
    CREATE INDEX deliveries_at ON deliveries (received_at);
    CREATE INDEX kept_webhook ON kept_callbacks (webhook_id);
    CREATE INDEX jobs_updated ON jobs (updated_at, id);
    """,
    # 3: a signed body is about one job. Deliveries are deduplicated by the body's
    # digest per job too (one more unique key on the callback path), refused ones
    # carry their outcome, and kept bodies are deduplicated and bounded by size.
    # One column per ALTER TABLE: SQLite adds no more at once. ``length`` of a BLOB
    # (SQLite) or a BYTEA (PostgreSQL) counts its bytes.
    """
    ALTER TABLE deliveries ADD COLUMN digest TEXT;
    ALTER TABLE deliveries ADD COLUMN outcome TEXT;
    CREATE UNIQUE INDEX deliveries_body ON deliveries (job_id, digest);
    ALTER TABLE kept_callbacks ADD COLUMN digest TEXT;
    ALTER TABLE kept_callbacks ADD COLUMN size {count} NOT NULL DEFAULT 0;
    UPDATE kept_callbacks SET size = length(body);
    CREATE UNIQUE INDEX kept_body ON kept_callbacks (digest, COALESCE(job_ref, ''));
    """,
)

# The upstream's message about a job (why it failed), nullable: jobs from before it
# have none. Plain ``TEXT`` on both: at most ``values.MAX_MESSAGE`` characters.
JOBS_UPSTREAM_ERROR = """
    ALTER TABLE jobs ADD COLUMN upstream_error TEXT;
    """


def _literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


# The states a job never leaves, in the order they are declared, as an SQL list of
# string literals (``state NOT IN TERMINAL_SQL``): rendered from the enum, never from
# anything received, so that a new terminal state reaches the queries by itself.
TERMINAL_SQL = "({})".format(", ".join(_literal(state) for state in State if state in TERMINAL))


# Failed records copied from the upstream, which forgets them three days after a job
# ends, and the copy's bookkeeping: one row per job whose records are to be kept, due
# for a (next) attempt at ``due_at`` and leased like a poll. ``next_page`` is the
# upstream's token for the page after the last one stored, so a copy resumes where it
# stopped. Records are the upstream's JSON, as text, numbered from 1 in its order.
# Both go with their job. The jobs that ended with failed records before this version
# are scheduled at once (``due_at`` 0): the upstream may still have them.
#
# Written after the stores' version numbers parted (SQLite has versions of its own),
# so each store appends it to its own list as its next version.
FAILED_RECORDS = (
    """
    CREATE TABLE failed_copies (
        job_id TEXT PRIMARY KEY REFERENCES jobs (id) ON DELETE CASCADE,
        status TEXT NOT NULL,
        kept {count} NOT NULL DEFAULT 0,
        complete INTEGER NOT NULL DEFAULT 0,
        next_page TEXT,
        attempts INTEGER NOT NULL DEFAULT 0,
        since {time} NOT NULL,
        due_at {time},
        lease_owner TEXT,
        lease_until {time},
        detail TEXT NOT NULL DEFAULT ''
    );
    CREATE INDEX failed_copies_due ON failed_copies (due_at) WHERE due_at IS NOT NULL;
    CREATE TABLE failed_records (
        job_id TEXT NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
        seq {count} NOT NULL,
        record TEXT NOT NULL,
        PRIMARY KEY (job_id, seq)
    );
    INSERT INTO failed_copies (job_id, status, since, due_at)
        SELECT id, 'pending', updated_at, 0 FROM jobs
        WHERE upstream_id IS NOT NULL AND state <> 'SUBMIT_FAILED'
            AND state IN """
    + TERMINAL_SQL
    + """
            AND (records_failed_count > 0
                 OR (records_failed_count IS NULL AND state IN ('ERROR', 'ABORTED')));
    """
)


# Download jobs (bulk queries) and the fetch of each one's result file. Every job has a
# direction (the jobs from before this version are uploads); a download keeps its
# CEQL ``query`` and the result's ``format``. ``result_fetches`` holds one row per
# completed download, written in the transaction that completed it, due for a (next)
# attempt at ``due_at`` and leased like a poll; once stored it says the file's size,
# records and SHA-256 (the file itself is in the results directory). It goes with its
# job. ``GET /jobs?direction=`` pages newest first through (direction, id), as the
# state filter does through (state, id).
#
# Written after the stores' version numbers parted, so each store appends it to its
# own list as its next version.
DOWNLOADS = """
    ALTER TABLE jobs ADD COLUMN direction TEXT NOT NULL DEFAULT 'upload';
    ALTER TABLE jobs ADD COLUMN query TEXT;
    ALTER TABLE jobs ADD COLUMN format TEXT;
    CREATE TABLE result_fetches (
        job_id TEXT PRIMARY KEY REFERENCES jobs (id) ON DELETE CASCADE,
        status TEXT NOT NULL,
        format TEXT NOT NULL,
        bytes {count},
        records {count},
        sha256 TEXT,
        detail TEXT,
        attempts INTEGER NOT NULL DEFAULT 0,
        not_found INTEGER NOT NULL DEFAULT 0,
        since {time} NOT NULL,
        due_at {time},
        lease_owner TEXT,
        lease_until {time}
    );
    CREATE INDEX result_fetches_due ON result_fetches (due_at) WHERE due_at IS NOT NULL;
    CREATE INDEX jobs_direction_id ON jobs (direction, id);
    """


# Several connector instances: every job belongs to one (the jobs from before this
# version to the single instance ``default``), and a kept callback says which
# instance's key verified it, so that it is applied only to a job of that instance.
# ``GET /jobs?instance=`` pages newest first through (instance, id). No type to
# render: the same statements on both stores.
#
# Written after the stores' version numbers parted, so each store appends it to its
# own list as its next version.
INSTANCES = """
    ALTER TABLE jobs ADD COLUMN instance TEXT NOT NULL DEFAULT 'default';
    CREATE INDEX jobs_instance_id ON jobs (instance, id);
    ALTER TABLE kept_callbacks ADD COLUMN instance TEXT NOT NULL DEFAULT 'default';
    DROP INDEX kept_body;
    CREATE UNIQUE INDEX kept_body ON kept_callbacks (instance, digest, COALESCE(job_ref, ''));
    """


# How many refused callbacks a row of ``rejected_callbacks`` stands for: 1 for a refusal
# noted on its own (every row from before this version), more for the summary of those
# past the per-second bound (``callbacks.rejections``), so that counts stay exact while
# the rows written per second are bounded.
#
# Written after the stores' version numbers parted, so each store appends it to its
# own list as its next version.
REJECTION_REPEATS = """
    ALTER TABLE rejected_callbacks ADD COLUMN repeats {count} NOT NULL DEFAULT 1;
    """


def render(script: str, dialect: Dialect) -> str:
    """A shared script with ``dialect``'s spelling of each type."""
    return script.format(**asdict(dialect))


def migrations(dialect: Dialect, own: Mapping[int, str] = MappingProxyType({})) -> tuple[str, ...]:
    """A store's migration scripts, version 1 first: each shared version rendered for
    ``dialect`` and followed by the store's own statements for that version (``own``,
    by version number); the versions after the shared ones are the store's own alone."""
    last = max((len(SHARED_MIGRATIONS), *own))
    scripts = []
    for version in range(1, last + 1):
        shared = SHARED_MIGRATIONS[version - 1] if version <= len(SHARED_MIGRATIONS) else ""
        script = render(shared, dialect) + own.get(version, "")
        if not script.strip():
            raise ValueError(f"migration {version} has no statements")
        scripts.append(script)
    return tuple(scripts)
