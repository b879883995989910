-- Internal helpers shared by the public functions in 04_operations.sql.
--
-- Helpers in kvapi_data have no SET search_path clause. Only kvapi's own
-- functions can call them (no other role has USAGE on the schema), and each
-- of those pins search_path, which stays in force during nested calls. A
-- SET clause would stop PostgreSQL from inlining the SQL helpers, so it
-- would plan their bodies again on every call, and it costs a settings
-- save and restore per call.
--
-- Error codes are SQLSTATEs of class KV; kvapi/errors.py maps each one to
-- its API code and HTTP status:
--   KVINV invalid request      KVAPP app not found     KVVER version mismatch
--   KVNAC not a counter        KVOVF counter overflow  KVBIG value too large

-- Raise KVINV unless p_key is 1 to 1024 UTF-8 bytes. PostgreSQL text cannot
-- hold U+0000, so that case never reaches SQL.
CREATE FUNCTION kvapi_data.check_key(p_key text) RETURNS void
LANGUAGE plpgsql IMMUTABLE
AS $$
BEGIN
    IF p_key IS NULL OR p_key = '' THEN
        RAISE EXCEPTION USING ERRCODE = 'KVINV',
            MESSAGE = 'invalid key: the key is empty',
            HINT = 'Send a key of 1 to 1024 UTF-8 bytes.';
    END IF;
    IF octet_length(p_key) > 1024 THEN
        RAISE EXCEPTION USING ERRCODE = 'KVINV',
            MESSAGE = format('invalid key %L...: the key is %s UTF-8 bytes long',
                             left(p_key, 64), octet_length(p_key)),
            HINT = 'Shorten the key to at most 1024 UTF-8 bytes.';
    END IF;
END
$$;

-- Return the plan of p_app_id, or raise KVAPP when the app does not exist.
CREATE FUNCTION kvapi_data.app_plan(p_app_id text) RETURNS kvapi_data.plans
LANGUAGE plpgsql STABLE
AS $$
DECLARE
    v_plan kvapi_data.plans;
BEGIN
    SELECT p.* INTO v_plan
    FROM kvapi_data.apps a
    JOIN kvapi_data.plans p ON p.plan_id = a.plan_id
    WHERE a.app_id = p_app_id;

    IF NOT FOUND THEN
        RAISE EXCEPTION USING ERRCODE = 'KVAPP',
            MESSAGE = format('app %L not found', p_app_id),
            HINT = 'Create the app first with: kvapi apps create NAME';
    END IF;
    RETURN v_plan;
END
$$;

-- Convert a JSON TTL to seconds. JSON null returns NULL (no expiry); the
-- caller decides what SQL NULL (an omitted TTL) means. Anything but a JSON
-- integer from 1 to 2147483647 raises KVINV. jsonb keeps "1.0" as written,
-- so fractions are caught here. An exponent ("1e2") is normalised by the
-- jsonb parser, so the caller that parses the raw JSON must reject it.
CREATE FUNCTION kvapi_data.ttl_seconds(p_ttl jsonb, p_argument text DEFAULT 'ttl')
RETURNS bigint
LANGUAGE plpgsql IMMUTABLE
AS $$
DECLARE
    v_text text := p_ttl::text;
BEGIN
    IF jsonb_typeof(p_ttl) = 'null' THEN
        RETURN NULL;
    END IF;
    IF jsonb_typeof(p_ttl) = 'number' AND v_text ~ '^[0-9]{1,10}$' THEN
        IF v_text::bigint BETWEEN 1 AND 2147483647 THEN
            RETURN v_text::bigint;
        END IF;
    END IF;
    RAISE EXCEPTION USING ERRCODE = 'KVINV',
        MESSAGE = format('invalid %s %s: expected a whole number of seconds from 1 to 2147483647, or null for no expiry',
                         p_argument, left(coalesce(v_text, 'NULL'), 100)),
        HINT = format('Send %s as a JSON integer such as 60.', p_argument);
END
$$;

-- Seconds left until p_expires_at, rounded up so that a live key never
-- reports 0. NULL when the key never expires.
CREATE FUNCTION kvapi_data.ttl_remaining(p_expires_at timestamptz, p_now timestamptz)
RETURNS bigint
LANGUAGE sql IMMUTABLE
RETURN ceil(extract(epoch FROM p_expires_at - p_now))::bigint;

-- Expiry time for a TTL in seconds; NULL seconds means no expiry. STABLE,
-- not IMMUTABLE: timestamptz + interval depends on the TimeZone setting, and
-- PostgreSQL inlines a SQL function only when its body is no more volatile
-- than declared (called instead, it is planned again on every call).
CREATE FUNCTION kvapi_data.expiry_after(p_now timestamptz, p_seconds bigint)
RETURNS timestamptz
LANGUAGE sql STABLE
RETURN p_now + make_interval(secs => p_seconds);

-- Raise KVINV for a NULL or JSON null value and KVBIG for one whose stored
-- JSON text exceeds the plan's limit.
CREATE FUNCTION kvapi_data.check_value(p_value jsonb, p_key text, p_plan kvapi_data.plans)
RETURNS void
LANGUAGE plpgsql IMMUTABLE
AS $$
DECLARE
    v_bytes bigint;
BEGIN
    IF p_value IS NULL OR jsonb_typeof(p_value) = 'null' THEN
        RAISE EXCEPTION USING ERRCODE = 'KVINV',
            MESSAGE = format('invalid value for key %L: null is not a storable value', left(p_key, 64)),
            HINT = 'Delete the key instead of storing null.';
    END IF;
    v_bytes := octet_length(p_value::text);
    IF v_bytes > p_plan.max_value_bytes THEN
        RAISE EXCEPTION USING ERRCODE = 'KVBIG',
            MESSAGE = format('value for key %L is %s bytes, over the plan limit of %s bytes',
                             left(p_key, 64), v_bytes, p_plan.max_value_bytes),
            DETAIL = json_build_object('limit', p_plan.max_value_bytes, 'actual', v_bytes)::text,
            HINT = 'Store a smaller value or move the app to a plan with a larger limit.';
    END IF;
END
$$;

-- Serialise kvapi writers of one key for the rest of the transaction.
-- A key may live in either tier, and no unique index spans both tables, so
-- this transaction-level advisory lock is what keeps a key in exactly one
-- tier and makes read-modify-write operations atomic. The two-integer lock
-- space never overlaps the single bigint one that applications tend to use.
-- Hash collisions only make unrelated keys wait for each other.
CREATE FUNCTION kvapi_data.lock_key(p_app_id text, p_key text) RETURNS void
LANGUAGE sql VOLATILE
BEGIN ATOMIC
    SELECT pg_advisory_xact_lock(1803120993, hashtext(p_app_id || '/' || p_key));
END;

-- The live (unexpired) row of a key from either tier, or no row.
CREATE FUNCTION kvapi_data.find_live(p_app_id text, p_key text, p_now timestamptz,
    OUT value jsonb, OUT version bigint, OUT expires_at timestamptz, OUT ephemeral boolean,
    OUT size_bytes integer)
RETURNS SETOF record
LANGUAGE sql STABLE
AS $$
    SELECT d.value, d.version, d.expires_at, false, d.size_bytes
    FROM kvapi_data.entries d
    WHERE d.app_id = p_app_id AND d.key = p_key
      AND (d.expires_at IS NULL OR d.expires_at > p_now)
    UNION ALL
    SELECT e.value, e.version, e.expires_at, true, e.size_bytes
    FROM kvapi_data.ephemeral_entries e
    WHERE e.app_id = p_app_id AND e.key = p_key
      AND (e.expires_at IS NULL OR e.expires_at > p_now)
    LIMIT 1
$$;

-- Storage a key and value count against the plan.
CREATE FUNCTION kvapi_data.entry_size(p_key text, p_value jsonb) RETURNS integer
LANGUAGE sql IMMUTABLE
RETURN octet_length(p_key) + octet_length(p_value::text);

-- Write a key into one tier with a new version and return that version.
-- p_live_ephemeral is the tier of the key's live row (NULL when absent):
-- a live row in the other tier is deleted, so the key moves. An expired row
-- left in the other tier is invisible and the purge removes it.
-- p_live_size is the live row's size_bytes, or NULL when the caller did not
-- read it. The caller must hold lock_key for the key and has checked the
-- quota.
CREATE FUNCTION kvapi_data.write_entry(p_app_id text, p_key text, p_value jsonb,
    p_expires_at timestamptz, p_ephemeral boolean, p_live_ephemeral boolean,
    p_live_size integer DEFAULT NULL)
RETURNS bigint
LANGUAGE plpgsql VOLATILE
AS $$
DECLARE
    v_version bigint := nextval('kvapi_data.version_seq');
    v_size integer := kvapi_data.entry_size(p_key, p_value);
    v_old_size integer;
    v_existed boolean;
BEGIN
    -- Overwriting a live key in its own tier, the common case, is one
    -- UPDATE: the caller read the row's size under the key lock, so the
    -- usage change is known. The UPDATE finds no row only when the purge
    -- removed it meanwhile (its clock may be ahead of statement_timestamp),
    -- and then the general path below inserts it again.
    IF p_live_ephemeral = p_ephemeral AND p_live_size IS NOT NULL THEN
        IF p_ephemeral THEN
            UPDATE kvapi_data.ephemeral_entries t
            SET value = p_value, version = v_version, expires_at = p_expires_at, size_bytes = v_size
            WHERE t.app_id = p_app_id AND t.key = p_key;
        ELSE
            UPDATE kvapi_data.entries t
            SET value = p_value, version = v_version, expires_at = p_expires_at, size_bytes = v_size
            WHERE t.app_id = p_app_id AND t.key = p_key;
        END IF;
        IF FOUND THEN
            IF v_size <> p_live_size THEN
                PERFORM kvapi_data.add_usage(p_app_id, p_ephemeral, 0, v_size - p_live_size);
            END IF;
            RETURN v_version;
        END IF;
    END IF;

    IF p_live_ephemeral IS DISTINCT FROM p_ephemeral AND p_live_ephemeral IS NOT NULL THEN
        PERFORM kvapi_data.delete_entry(p_app_id, p_key, p_live_ephemeral);
    END IF;

    -- The row in the target tier may exist even when the key is absent
    -- (expired, not yet purged). The usage counters count rows, so they
    -- need its size. FOR UPDATE keeps the purge (SKIP LOCKED) away from it.
    IF p_ephemeral THEN
        SELECT t.size_bytes INTO v_old_size FROM kvapi_data.ephemeral_entries t
        WHERE t.app_id = p_app_id AND t.key = p_key FOR UPDATE;
        v_existed := FOUND;
        INSERT INTO kvapi_data.ephemeral_entries AS t (app_id, key, value, version, expires_at, size_bytes)
        VALUES (p_app_id, p_key, p_value, v_version, p_expires_at, v_size)
        ON CONFLICT (app_id, key) DO UPDATE
        SET value = excluded.value, version = excluded.version, expires_at = excluded.expires_at,
            size_bytes = excluded.size_bytes;
    ELSE
        SELECT t.size_bytes INTO v_old_size FROM kvapi_data.entries t
        WHERE t.app_id = p_app_id AND t.key = p_key FOR UPDATE;
        v_existed := FOUND;
        INSERT INTO kvapi_data.entries AS t (app_id, key, value, version, expires_at, size_bytes)
        VALUES (p_app_id, p_key, p_value, v_version, p_expires_at, v_size)
        ON CONFLICT (app_id, key) DO UPDATE
        SET value = excluded.value, version = excluded.version, expires_at = excluded.expires_at,
            size_bytes = excluded.size_bytes;
    END IF;

    PERFORM kvapi_data.add_usage(p_app_id, p_ephemeral, CASE WHEN v_existed THEN 0 ELSE 1 END,
                                 v_size - coalesce(v_old_size, 0));
    RETURN v_version;
END
$$;

-- Delete a key's row from one tier; return whether a row was there. The row
-- may be expired: callers decide whether that counts as a delete.
CREATE FUNCTION kvapi_data.delete_entry(p_app_id text, p_key text, p_ephemeral boolean)
RETURNS boolean
LANGUAGE plpgsql VOLATILE
AS $$
DECLARE
    v_size integer;
BEGIN
    IF p_ephemeral THEN
        DELETE FROM kvapi_data.ephemeral_entries t WHERE t.app_id = p_app_id AND t.key = p_key
        RETURNING t.size_bytes INTO v_size;
    ELSE
        DELETE FROM kvapi_data.entries t WHERE t.app_id = p_app_id AND t.key = p_key
        RETURNING t.size_bytes INTO v_size;
    END IF;
    IF v_size IS NULL THEN
        RETURN false;
    END IF;
    PERFORM kvapi_data.add_usage(p_app_id, p_ephemeral, -1, -v_size);
    RETURN true;
END
$$;

-- Change the expiry of a key's row in one tier, giving it a new version.
CREATE FUNCTION kvapi_data.set_expiry(p_app_id text, p_key text, p_ephemeral boolean,
    p_expires_at timestamptz)
RETURNS bigint
LANGUAGE plpgsql VOLATILE
AS $$
DECLARE
    v_version bigint := nextval('kvapi_data.version_seq');
BEGIN
    IF p_ephemeral THEN
        UPDATE kvapi_data.ephemeral_entries t SET expires_at = p_expires_at, version = v_version
        WHERE t.app_id = p_app_id AND t.key = p_key;
    ELSE
        UPDATE kvapi_data.entries t SET expires_at = p_expires_at, version = v_version
        WHERE t.app_id = p_app_id AND t.key = p_key;
    END IF;
    RETURN v_version;
END
$$;

-- Smallest string greater than every string that starts with p_prefix, in
-- code point order (the "C" collation on UTF-8); NULL when there is none.
CREATE FUNCTION kvapi_data.prefix_upper_bound(p_prefix text) RETURNS text
LANGUAGE plpgsql IMMUTABLE
AS $$
DECLARE
    v_rest text := p_prefix;
    v_code integer;
BEGIN
    WHILE v_rest <> '' LOOP
        v_code := ascii(right(v_rest, 1));
        IF v_code < 1114111 THEN
            v_code := v_code + 1;
            -- Skip the UTF-16 surrogate range, which UTF-8 text cannot hold.
            IF v_code = 55296 THEN
                v_code := 57344;
            END IF;
            RETURN left(v_rest, -1) || chr(v_code);
        END IF;
        v_rest := left(v_rest, -1);
    END LOOP;
    RETURN NULL;
END
$$;

-- Decode a list cursor (base64url of the last key returned) or raise KVINV.
CREATE FUNCTION kvapi_data.decode_cursor(p_cursor text) RETURNS text
LANGUAGE plpgsql IMMUTABLE
AS $$
DECLARE
    v_base64 text := translate(p_cursor, '-_', '+/');
BEGIN
    v_base64 := v_base64 || repeat('=', (4 - length(v_base64) % 4) % 4);
    RETURN convert_from(decode(v_base64, 'base64'), 'UTF8');
EXCEPTION
    WHEN invalid_parameter_value OR character_not_in_repertoire OR untranslatable_character THEN
        RAISE EXCEPTION USING ERRCODE = 'KVINV',
            MESSAGE = format('invalid cursor %L', left(p_cursor, 100)),
            HINT = 'Pass the cursor exactly as the previous page returned it, or omit it to start over.';
END
$$;

CREATE FUNCTION kvapi_data.encode_cursor(p_key text) RETURNS text
LANGUAGE sql IMMUTABLE
RETURN rtrim(translate(encode(convert_to(p_key, 'UTF8'), 'base64'), E'+/\n', '-_'), '=');
