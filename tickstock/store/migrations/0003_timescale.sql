-- Where TimescaleDB is installed on the server, make ohlcv_1min a hypertable
-- partitioned on minute (its data moved into chunks); elsewhere it stays a
-- plain table and nothing here fails. Enabling TimescaleDB needs it in
-- shared_preload_libraries and a user allowed to create the extension; when
-- that fails, a NOTICE says why and the table stays plain. To convert it
-- later, as a suitable user:
--   CREATE EXTENSION IF NOT EXISTS timescaledb;
--   SELECT create_hypertable('ohlcv_1min', 'minute', if_not_exists => TRUE, migrate_data => TRUE);
DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'timescaledb') THEN
        IF NOT EXISTS (SELECT 1 FROM pg_available_extensions WHERE name = 'timescaledb') THEN
            RETURN;
        END IF;
        BEGIN
            CREATE EXTENSION IF NOT EXISTS timescaledb;
        EXCEPTION WHEN OTHERS THEN
            RAISE NOTICE 'TimescaleDB is available but could not be enabled (%): ohlcv_1min stays a plain table', SQLERRM;
            RETURN;
        END;
    END IF;
    -- The positional form (time column as text) works on every 2.x release;
    -- 2.13 deprecated it in favour of by_range() but still accepts it.
    PERFORM create_hypertable('ohlcv_1min', 'minute', if_not_exists => TRUE, migrate_data => TRUE);
END
$$;
