-- tickstock_reader: the rights of UI queries. It may read every TickStock
-- table and call the reading functions, nothing more; logins are made members
-- of it with `tickstock-db create-reader`. Its default_transaction_read_only
-- is only a soft guard (a session can turn it off, and members do not
-- inherit it): the grants below are the boundary. Later migrations that add
-- tables grant SELECT on them to tickstock_reader themselves.
--
-- Roles belong to the cluster: the role is created by the first database
-- migrated by a user allowed to (CREATEROLE); the grants are per database.
-- Without that right a NOTICE says what was skipped, and the migration
-- still succeeds.
DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'tickstock_reader') THEN
        BEGIN
            CREATE ROLE tickstock_reader NOLOGIN;
        EXCEPTION WHEN insufficient_privilege THEN
            RAISE NOTICE 'role tickstock_reader not created (% lacks CREATEROLE): %',
                current_user, 'no read-only logins until a user with CREATEROLE runs 0004_reader_role.sql';
            RETURN;
        END;
    END IF;

    BEGIN
        EXECUTE format('GRANT USAGE ON SCHEMA %I TO tickstock_reader', current_schema());
    EXCEPTION WHEN insufficient_privilege THEN
        RAISE NOTICE 'USAGE on schema % not granted to tickstock_reader (% may not grant it)', current_schema(), current_user;
    END;
    GRANT SELECT ON symbols, ohlcv_1min, ohlcv_1min_parts, events, jobs, cache_entries,
                    schema_migrations
        TO tickstock_reader;
    GRANT EXECUTE ON FUNCTION get_etf_universe(text), get_etf_universes_summary(),
                              validate_etf_universe_symbols(text[])
        TO tickstock_reader;

    -- Set already when a superuser made the role (docs/deploy.md): an owner
    -- without CREATEROLE then has nothing to skip.
    IF NOT EXISTS (SELECT 1 FROM pg_db_role_setting
                   WHERE setrole = 'tickstock_reader'::regrole AND setdatabase = 0
                     AND 'default_transaction_read_only=on' = ANY (setconfig)) THEN
        BEGIN
            ALTER ROLE tickstock_reader SET default_transaction_read_only = on;
        EXCEPTION WHEN insufficient_privilege THEN
            RAISE NOTICE 'default_transaction_read_only not set on tickstock_reader (% may not alter it)', current_user;
        END;
    END IF;
END
$$;

-- Functions are executable by PUBLIC by default: writing universes is left
-- to the owner (the daemon's and the migrations' user) and whom it grants.
REVOKE EXECUTE ON FUNCTION update_etf_universe(text, text[], text, jsonb) FROM PUBLIC;
