-- TickStock's tables (docs/contract.md §6). Applied once, in one transaction, by
-- `tickstock-db migrate`; every statement is safe to meet an existing object.

CREATE TABLE IF NOT EXISTS symbols (
    symbol      text PRIMARY KEY CHECK (symbol ~ '^[A-Z0-9.\-]{1,10}$'),
    name        text,
    exchange    text,
    type        text,
    active      boolean NOT NULL DEFAULT true,
    first_seen  timestamptz NOT NULL DEFAULT now(),
    last_seen   timestamptz NOT NULL DEFAULT now()
);

-- 1-minute bars as the UI reads them: recomputed from their parts below on
-- every write, so they are always the combination of every part.
CREATE TABLE IF NOT EXISTS ohlcv_1min (
    symbol  text NOT NULL,
    minute  timestamptz NOT NULL,
    open    double precision NOT NULL,
    high    double precision NOT NULL,
    low     double precision NOT NULL,
    close   double precision NOT NULL,
    volume  double precision NOT NULL,
    PRIMARY KEY (symbol, minute)
);

-- One row per in-memory aggregate (node, run, counter): rewritten whole, so
-- a retried write is harmless, and late ticks or other nodes add parts.
CREATE TABLE IF NOT EXISTS ohlcv_1min_parts (
    symbol    text NOT NULL,
    minute    timestamptz NOT NULL,
    part      text NOT NULL,
    open      double precision NOT NULL,
    high      double precision NOT NULL,
    low       double precision NOT NULL,
    close     double precision NOT NULL,
    volume    double precision NOT NULL,
    open_ts   double precision NOT NULL,
    close_ts  double precision NOT NULL,
    ticks     integer NOT NULL,
    PRIMARY KEY (symbol, minute, part)
);

-- Pattern and market-state events, by TickStock's event id ("ms-seq").
CREATE TABLE IF NOT EXISTS events (
    id_ms        bigint NOT NULL,
    id_seq       integer NOT NULL,
    topic        text NOT NULL,
    channel      text NOT NULL,
    event_type   text NOT NULL,
    symbol       text,
    pattern      text,
    confidence   double precision,
    event_time   double precision,
    data         jsonb NOT NULL,
    stored_at    timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (id_ms, id_seq)
);
CREATE INDEX IF NOT EXISTS events_topic_id ON events (topic, id_ms, id_seq);
CREATE INDEX IF NOT EXISTS events_symbol_id ON events (topic, symbol, id_ms, id_seq);
CREATE INDEX IF NOT EXISTS events_pattern_id ON events (pattern, id_ms, id_seq)
    WHERE topic = 'patterns';

-- Backtest jobs and their final results.
CREATE TABLE IF NOT EXISTS jobs (
    job_id      text PRIMARY KEY,
    user_id     text NOT NULL,
    status      text NOT NULL,
    params      jsonb NOT NULL,
    progress    double precision NOT NULL DEFAULT 0,
    results     jsonb,
    error       text,
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS jobs_user_created ON jobs (user_id, created_at DESC, job_id);

-- The original system's cache table; universes are rows whose type is
-- 'etf_universe' or 'stock_universe', with value = {"symbols": [...], ...}.
CREATE TABLE IF NOT EXISTS cache_entries (
    id                    bigserial PRIMARY KEY,
    type                  text NOT NULL,
    name                  text NOT NULL,
    key                   text NOT NULL,
    value                 jsonb NOT NULL,
    environment           text NOT NULL DEFAULT 'DEFAULT',
    created_at            timestamptz NOT NULL DEFAULT now(),
    updated_at            timestamptz NOT NULL DEFAULT now(),
    universe_category     varchar(50),
    liquidity_filter      jsonb,
    universe_metadata     jsonb,
    last_universe_update  timestamp DEFAULT CURRENT_TIMESTAMP,
    UNIQUE (type, key, environment)
);
CREATE INDEX IF NOT EXISTS idx_cache_entries_category ON cache_entries (universe_category);
CREATE INDEX IF NOT EXISTS idx_cache_entries_updated ON cache_entries (last_universe_update DESC);
