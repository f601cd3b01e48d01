-- Stored events' sequence numbers step by 2^40 (live ticks take the ids in
-- between, see tickstock.events.ID_STRIDE): events.id_seq and the write
-- function's e_seq become bigint. The function is otherwise 0005's.
ALTER TABLE events ALTER COLUMN id_seq TYPE bigint;

DROP FUNCTION IF EXISTS tickstock_write(
    text[], double precision[], text[], double precision[], double precision[],
    double precision[], double precision[], double precision[], double precision[],
    double precision[], integer[], bigint[], integer[], text[], text[], text[], text[],
    text[], double precision[], double precision[], text[]);

CREATE FUNCTION tickstock_write(
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

        INSERT INTO ohlcv_1min AS b (symbol, minute, open, high, low, close, volume)
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
        ON CONFLICT (symbol, minute) DO UPDATE SET
            open = EXCLUDED.open, high = EXCLUDED.high, low = EXCLUDED.low,
            close = EXCLUDED.close, volume = EXCLUDED.volume;
    END IF;

    IF cardinality(e_ms) > 0 THEN
        INSERT INTO events (id_ms, id_seq, topic, channel, event_type, symbol, pattern,
                            confidence, event_time, data)
        SELECT ms, seq, tp, ch, ty, sy, pa, co, ti, d::jsonb
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

-- Only the owner (the daemon's --postgres login) writes through it.
REVOKE EXECUTE ON FUNCTION tickstock_write(
    text[], double precision[], text[], double precision[], double precision[],
    double precision[], double precision[], double precision[], double precision[],
    double precision[], integer[], bigint[], bigint[], text[], text[], text[], text[],
    text[], double precision[], double precision[], text[]) FROM PUBLIC;
