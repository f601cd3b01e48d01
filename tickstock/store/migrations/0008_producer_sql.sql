-- The producer's own SQL (docs/database.md, "The shared
-- database"): the original system's column names, and defaults that make a
-- row a producer inserts straight into events a pattern event TickStock
-- shows in /api/patterns and delivers live.
--
-- One truth, not synced copies: where a TickStock column meant the same as
-- the original one it is renamed (ohlcv_1min.minute -> "timestamp",
-- events.event_time -> "timestamp" as timestamptz, events.data -> details,
-- events.stored_at -> created_at). TickStock's own columns get defaults that
-- describe a producer's row: its channel is 'tickstock.db.events', which is
-- how triggers and readers tell it from rows TickStock wrote.

ALTER TABLE ohlcv_1min RENAME COLUMN minute TO "timestamp";

ALTER TABLE events RENAME COLUMN event_time TO "timestamp";
ALTER TABLE events ALTER COLUMN "timestamp" TYPE timestamptz USING to_timestamp("timestamp");
ALTER TABLE events RENAME COLUMN data TO details;
ALTER TABLE events RENAME COLUMN stored_at TO created_at;
ALTER TABLE events
    ALTER COLUMN "timestamp" SET DEFAULT now(),
    ALTER COLUMN details SET DEFAULT '{}',
    ALTER COLUMN topic SET DEFAULT 'patterns',
    ALTER COLUMN channel SET DEFAULT 'tickstock.db.events',
    ALTER COLUMN event_type SET DEFAULT 'pattern_detected';

-- The seed's reads order by "timestamp"; the listener finds producer rows by id.
CREATE INDEX IF NOT EXISTS events_timestamp ON events ("timestamp");
CREATE INDEX IF NOT EXISTS events_producer_id ON events (id_ms, id_seq)
    WHERE channel = 'tickstock.db.events';

-- A producer row's id sequence number: 1 .. 2^40-1, never a multiple of
-- 2^40 like TickStock's own (tickstock.events.ID_STRIDE), so the ids never
-- collide; id_ms is the insert time, so they order by time with TickStock's.
CREATE SEQUENCE IF NOT EXISTS events_producer_seq
    AS bigint MINVALUE 1 MAXVALUE 1099511627775 CYCLE;

-- The flat producer-style pattern message of a producer row: what the
-- listener (tickstock/store/listen.py) delivers on channel
-- tickstock.db.events, and what /api/patterns and catch-up show as its
-- data. Its event_id "pg:<id>" is the same in every daemon that LISTENs.
CREATE OR REPLACE FUNCTION tickstock_producer_message(e events)
RETURNS jsonb LANGUAGE sql STABLE AS $$
    SELECT e.details || jsonb_build_object(
        'event_type', e.event_type,
        'event_id', 'pg:' || e.id_ms || '-' || e.id_seq,
        'symbol', e.symbol,
        'pattern', e.pattern,
        'confidence', e.confidence,
        'timestamp', extract(epoch FROM e."timestamp"),
        'source', 'postgres')
$$;

-- Completes and checks a producer's row: id, symbol (uppercased), pattern,
-- confidence (from details when the column is not given), the symbol in
-- symbols. SECURITY DEFINER: the producer needs INSERT on events only, not
-- the sequence or symbols.
CREATE OR REPLACE FUNCTION tickstock_producer_row() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER AS $$
BEGIN
    IF NEW.topic IS DISTINCT FROM 'patterns' THEN
        RAISE EXCEPTION 'events: a row inserted without a channel is a pattern event (topic ''patterns''), not %', COALESCE(quote_literal(NEW.topic), 'NULL')
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    NEW.symbol := upper(NEW.symbol);
    IF NEW.symbol IS NULL OR NEW.symbol !~ '^[A-Z0-9.\-]{1,10}$' THEN
        RAISE EXCEPTION 'events: symbol % is not a ticker', COALESCE(quote_literal(NEW.symbol), 'NULL')
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'Symbols are 1-10 of A-Z, 0-9, "." and "-".';
    END IF;
    IF NEW.pattern IS NULL OR btrim(NEW.pattern) = '' OR length(NEW.pattern) > 256 THEN
        RAISE EXCEPTION 'events: pattern must be a name of 1-256 characters'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF jsonb_typeof(NEW.details) IS DISTINCT FROM 'object' THEN
        RAISE EXCEPTION 'events: details must be a JSON object, not %', COALESCE(jsonb_typeof(NEW.details), 'NULL')
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF NEW.confidence IS NULL AND NEW.details ? 'confidence' THEN
        IF jsonb_typeof(NEW.details->'confidence') <> 'number' THEN
            RAISE EXCEPTION 'events: details.confidence must be a number, not %', NEW.details->'confidence'
                USING ERRCODE = 'invalid_parameter_value';
        END IF;
        NEW.confidence := (NEW.details->>'confidence')::double precision;
    END IF;
    IF NEW.confidence IS NULL OR NOT NEW.confidence BETWEEN 0 AND 1 THEN
        RAISE EXCEPTION 'events: confidence must be a number from 0 to 1 (the column or details.confidence), not %', COALESCE(NEW.confidence::text, 'NULL')
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    NEW."timestamp" := COALESCE(NEW."timestamp", now());
    NEW.id_ms := COALESCE(NEW.id_ms, floor(extract(epoch FROM clock_timestamp()) * 1000)::bigint);
    NEW.id_seq := COALESCE(NEW.id_seq, nextval('events_producer_seq'));
    INSERT INTO symbols AS x (symbol) VALUES (NEW.symbol)
    ON CONFLICT (symbol) DO UPDATE SET last_seen = now()
        WHERE x.last_seen < now() - interval '1 minute';
    RETURN NEW;
END
$$;

-- NOTIFY is sent at commit, in commit order. The payload is only the row's
-- id: anyone who may connect may NOTIFY, so the listener trusts nothing but
-- the row it then reads from events.
CREATE OR REPLACE FUNCTION tickstock_notify_producer_row() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('tickstock_events', NEW.id_ms || '-' || NEW.id_seq);
    RETURN NULL;
END
$$;

-- The row function finds the schema's objects whatever the producer's
-- search_path; pg_temp last, so a caller's temporary objects cannot stand
-- in for them.
DO $$
BEGIN
    EXECUTE format('ALTER FUNCTION tickstock_producer_row() SET search_path = pg_catalog, %I, pg_temp',
                   current_schema());
END
$$;
-- Trigger functions are not callable, but a SECURITY DEFINER one that
-- PUBLIC may EXECUTE looks writable to `tickstock-db create-reader`.
REVOKE EXECUTE ON FUNCTION tickstock_producer_row() FROM PUBLIC;

-- Only rows with the producer's channel: TickStock's own writes (which name
-- their channel) neither run these nor notify.
DROP TRIGGER IF EXISTS events_producer_row ON events;
CREATE TRIGGER events_producer_row BEFORE INSERT ON events FOR EACH ROW
    WHEN (NEW.channel = 'tickstock.db.events') EXECUTE FUNCTION tickstock_producer_row();
DROP TRIGGER IF EXISTS events_producer_notify ON events;
CREATE TRIGGER events_producer_notify AFTER INSERT ON events FOR EACH ROW
    WHEN (NEW.channel = 'tickstock.db.events') EXECUTE FUNCTION tickstock_notify_producer_row();

-- 0007's function with the renamed columns (same signature, so its grants stay).
CREATE OR REPLACE FUNCTION tickstock_write(
    b_symbol text[], b_minute double precision[], b_part text[],
    b_open double precision[], b_high double precision[], b_low double precision[],
    b_close double precision[], b_volume double precision[],
    b_open_ts double precision[], b_close_ts double precision[], b_ticks integer[],
    e_ms bigint[], e_seq bigint[], e_topic text[], e_channel text[], e_type text[],
    e_symbol text[], e_pattern text[], e_confidence double precision[],
    e_time double precision[], e_data text[]
) RETURNS void LANGUAGE plpgsql AS $$
BEGIN
    IF cardinality(b_symbol) > 0 THEN
        -- Bars are recomputed from their parts: writers take turns, so each
        -- sees every part another has committed.
        PERFORM pg_advisory_xact_lock(hashtext('tickstock_write_bars'));
        INSERT INTO ohlcv_1min_parts AS p
            (symbol, minute, part, open, high, low, close, volume, open_ts, close_ts, ticks)
        SELECT s, to_timestamp(m), pt, o, h, l, c, v, ots, cts, n
        FROM unnest(b_symbol, b_minute, b_part, b_open, b_high, b_low, b_close, b_volume,
                    b_open_ts, b_close_ts, b_ticks) AS t(s, m, pt, o, h, l, c, v, ots, cts, n)
        ON CONFLICT (symbol, minute, part) DO UPDATE SET
            open = EXCLUDED.open, high = EXCLUDED.high, low = EXCLUDED.low,
            close = EXCLUDED.close, volume = EXCLUDED.volume, open_ts = EXCLUDED.open_ts,
            close_ts = EXCLUDED.close_ts, ticks = EXCLUDED.ticks
        -- A part only grows: an older version written late (a retry) loses.
        WHERE p.ticks <= EXCLUDED.ticks;

        INSERT INTO ohlcv_1min AS b (symbol, "timestamp", open, high, low, close, volume)
        SELECT p.symbol, p.minute,
               (array_agg(p.open ORDER BY p.open_ts, p.part))[1],
               max(p.high), min(p.low),
               (array_agg(p.close ORDER BY p.close_ts DESC, p.part DESC))[1],
               sum(p.volume)
        FROM ohlcv_1min_parts p
        JOIN (SELECT DISTINCT s, to_timestamp(m) AS minute
              FROM unnest(b_symbol, b_minute) AS k(s, m)) k
          ON p.symbol = k.s AND p.minute = k.minute
        GROUP BY p.symbol, p.minute
        ON CONFLICT (symbol, "timestamp") DO UPDATE SET
            open = EXCLUDED.open, high = EXCLUDED.high, low = EXCLUDED.low,
            close = EXCLUDED.close, volume = EXCLUDED.volume;
    END IF;

    IF cardinality(e_ms) > 0 THEN
        INSERT INTO events (id_ms, id_seq, topic, channel, event_type, symbol, pattern,
                            confidence, "timestamp", details)
        SELECT ms, seq, tp, ch, ty, sy, pa, co, to_timestamp(ti), d::jsonb
        FROM unnest(e_ms, e_seq, e_topic, e_channel, e_type, e_symbol, e_pattern,
                    e_confidence, e_time, e_data) AS t(ms, seq, tp, ch, ty, sy, pa, co, ti, d)
        ON CONFLICT (id_ms, id_seq) DO NOTHING;
    END IF;

    INSERT INTO symbols AS x (symbol)
    SELECT DISTINCT s FROM unnest(b_symbol || e_symbol) AS u(s) WHERE s IS NOT NULL
    ON CONFLICT (symbol) DO UPDATE SET last_seen = now()
        WHERE x.last_seen < now() - interval '1 minute';
END
$$;
