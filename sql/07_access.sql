-- Access control: rules that open keys to end users, end-user token keys,
-- and the binding of database roles to apps.
--
-- Two checks guard every key operation, inside the same function call:
-- 1. kvapi_data.check_caller(): which apps the database session may
--    touch at all. Superusers and members of kvapi_api (the HTTP layer's
--    role) may touch every app; a role bound with `kvapi apps grant-role`
--    only its own app. The check uses session_user (the login role), because
--    the public functions are SECURITY DEFINER and cannot see their caller's
--    current_user. A session that SET ROLEs keeps its login role's scope.
-- 2. kvapi_data.check_access(): for end-user requests (p_requester not
--    NULL), the rule that decides for the key must grant the requester.
--    p_requester is NULL for trusted callers (service keys and bound roles),
--    '{}' for an anonymous request and {"id": ..., "role": ...} for a user.

CREATE TABLE kvapi_data.rules (
    app_id         text NOT NULL REFERENCES kvapi_data.apps ON DELETE CASCADE,
    pattern        text COLLATE "C" NOT NULL,
    read_role      text NOT NULL CHECK (read_role IN ('deny', 'public', 'authed', 'owner')),
    write_role     text NOT NULL CHECK (write_role IN ('deny', 'public', 'authed', 'owner')),
    -- Creation rank, rising; ties in precedence go to the lower order.
    rule_order     bigint GENERATED ALWAYS AS IDENTITY,
    -- Text before the first *, ** or {: the longest one decides.
    literal_prefix text COLLATE "C" NOT NULL,
    -- Anchored POSIX regular expression compiled from the pattern, with one
    -- capture group per placeholder, in the order of placeholder_kinds.
    matcher        text NOT NULL,
    placeholder_kinds text[] NOT NULL,
    PRIMARY KEY (app_id, pattern)
);

-- Public keys (RS256, ES256) registered for an app's end-user tokens. HS256
-- tokens use kvapi_data.apps.jwt_secret.
CREATE TABLE kvapi_data.jwt_keys (
    key_id     bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    app_id     text NOT NULL REFERENCES kvapi_data.apps ON DELETE CASCADE,
    algorithm  text NOT NULL CHECK (algorithm IN ('RS256', 'ES256')),
    public_key text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    UNIQUE (app_id, public_key)
);

-- Database roles bound to one app each.
CREATE TABLE kvapi_data.role_bindings (
    role_name name PRIMARY KEY,
    app_id    text NOT NULL REFERENCES kvapi_data.apps ON DELETE CASCADE
);

-- Whether the session may touch every app: superusers (members of every
-- role) and members of kvapi_api. It is a LANGUAGE sql function without
-- SET clauses or subqueries, so the planner inlines it into the statements
-- of the hot paths. Those call check_caller only when it is false.
CREATE FUNCTION kvapi_data.caller_sees_all_apps() RETURNS boolean
LANGUAGE sql STABLE
RETURN pg_has_role(session_user, 'kvapi_api', 'MEMBER');

-- Raise KVFOR unless the session may touch p_app_id (see the header).
CREATE FUNCTION kvapi_data.check_caller(p_app_id text) RETURNS void
LANGUAGE plpgsql STABLE
AS $$
BEGIN
    IF kvapi_data.caller_sees_all_apps()
       OR EXISTS (SELECT FROM kvapi_data.role_bindings b WHERE b.role_name = session_user AND b.app_id = p_app_id) THEN
        RETURN;
    END IF;
    RAISE EXCEPTION USING ERRCODE = 'KVFOR',
        MESSAGE = format('database role %I is not bound to app %L', session_user, p_app_id),
        HINT = 'Bind the role with: kvapi apps grant-role APP ROLE';
END
$$;

-- Compile a rule pattern. Segments are separated by ':'; '*' matches text
-- without ':' (possibly empty), '**' any text, '{user.id}' and '{user.role}'
-- any non-empty text without ':'. Every other character is literal.
-- Raises KVINV for an empty or oversized pattern, '***', or an unknown '{...}'.
CREATE FUNCTION kvapi_data.compile_pattern(p_pattern text,
    OUT literal_prefix text, OUT matcher text, OUT placeholder_kinds text[])
LANGUAGE plpgsql IMMUTABLE
AS $$
DECLARE
    v_position integer := 1;
    v_length integer := length(p_pattern);
    v_char text;
BEGIN
    IF p_pattern IS NULL OR p_pattern = '' OR octet_length(p_pattern) > 1024 THEN
        RAISE EXCEPTION USING ERRCODE = 'KVINV',
            MESSAGE = format('invalid pattern %L: a pattern is 1 to 1024 UTF-8 bytes', left(p_pattern, 64)),
            HINT = 'Send a pattern such as profile:{user.id} or public:**.';
    END IF;
    matcher := '^';
    placeholder_kinds := '{}';

    WHILE v_position <= v_length LOOP
        v_char := substr(p_pattern, v_position, 1);
        IF substr(p_pattern, v_position, 3) = '***' THEN
            RAISE EXCEPTION USING ERRCODE = 'KVINV',
                MESSAGE = format('invalid pattern %L: three or more * in a row', p_pattern),
                HINT = 'Use * for one segment or ** for any text.';
        ELSIF substr(p_pattern, v_position, 2) = '**' THEN
            literal_prefix := coalesce(literal_prefix, left(p_pattern, v_position - 1));
            matcher := matcher || '.*';
            v_position := v_position + 2;
        ELSIF v_char = '*' THEN
            literal_prefix := coalesce(literal_prefix, left(p_pattern, v_position - 1));
            matcher := matcher || '[^:]*';
            v_position := v_position + 1;
        ELSIF v_char = '{' THEN
            literal_prefix := coalesce(literal_prefix, left(p_pattern, v_position - 1));
            IF substr(p_pattern, v_position, 9) = '{user.id}' THEN
                placeholder_kinds := placeholder_kinds || 'id'::text;
                v_position := v_position + 9;
            ELSIF substr(p_pattern, v_position, 11) = '{user.role}' THEN
                placeholder_kinds := placeholder_kinds || 'role'::text;
                v_position := v_position + 11;
            ELSE
                RAISE EXCEPTION USING ERRCODE = 'KVINV',
                    MESSAGE = format('invalid pattern %L: unknown placeholder at character %s', p_pattern, v_position),
                    HINT = 'The placeholders are {user.id} and {user.role}.';
            END IF;
            matcher := matcher || '([^:]+)';
        ELSE
            -- Backslash makes ASCII punctuation literal; letters, digits and
            -- non-ASCII characters are never special in a regular expression.
            IF v_char ~ '[A-Za-z0-9]' OR ascii(v_char) > 127 THEN
                matcher := matcher || v_char;
            ELSE
                matcher := matcher || '\' || v_char;
            END IF;
            v_position := v_position + 1;
        END IF;
    END LOOP;

    literal_prefix := coalesce(literal_prefix, p_pattern);
    matcher := matcher || '$';
END
$$;

-- The rule that decides for p_key: of the matching rules, the one with the
-- longest literal prefix, then the lowest order. No row when none matches.
CREATE FUNCTION kvapi_data.deciding_rule(p_app_id text, p_key text)
RETURNS SETOF kvapi_data.rules
LANGUAGE sql STABLE
AS $$
    SELECT r.* FROM kvapi_data.rules r
    WHERE r.app_id = p_app_id
      AND starts_with(p_key, r.literal_prefix)
      AND p_key ~ r.matcher
    ORDER BY length(r.literal_prefix) DESC, r.rule_order
    LIMIT 1
$$;

-- Whether p_role of p_rule grants p_requester access to p_key. Ids and roles
-- compare as literal text with the placeholders' captured segments.
CREATE FUNCTION kvapi_data.rule_grants(p_rule kvapi_data.rules, p_role text, p_key text, p_requester jsonb)
RETURNS boolean
LANGUAGE plpgsql IMMUTABLE
AS $$
DECLARE
    v_captures text[];
    v_user_id text := p_requester ->> 'id';
    v_user_role text := coalesce(p_requester ->> 'role', CASE WHEN v_user_id IS NOT NULL THEN 'authenticated' END);
BEGIN
    IF p_rule IS NULL OR p_role = 'deny' THEN
        RETURN false;
    END IF;
    IF cardinality(p_rule.placeholder_kinds) > 0 THEN
        v_captures := regexp_match(p_key, p_rule.matcher);
    END IF;
    FOR v_index IN 1..cardinality(p_rule.placeholder_kinds) LOOP
        IF p_rule.placeholder_kinds[v_index] = 'role' AND v_captures[v_index] IS DISTINCT FROM v_user_role THEN
            RETURN false;
        END IF;
    END LOOP;
    IF p_role = 'public' THEN
        RETURN true;
    END IF;
    IF v_user_id IS NULL THEN
        RETURN false;
    END IF;
    IF p_role = 'authed' THEN
        RETURN true;
    END IF;
    -- owner: every {user.id} segment must be the requester's id.
    FOR v_index IN 1..cardinality(p_rule.placeholder_kinds) LOOP
        IF p_rule.placeholder_kinds[v_index] = 'id' AND v_captures[v_index] IS DISTINCT FROM v_user_id THEN
            RETURN false;
        END IF;
    END LOOP;
    RETURN 'id' = ANY (p_rule.placeholder_kinds);
END
$$;

-- Raise KVINV unless p_requester is NULL, {} or {"id": non-empty string,
-- "role"?: string}.
CREATE FUNCTION kvapi_data.check_requester(p_requester jsonb) RETURNS void
LANGUAGE plpgsql IMMUTABLE
AS $$
BEGIN
    IF p_requester IS NULL OR p_requester = '{}'::jsonb THEN
        RETURN;
    END IF;
    IF jsonb_typeof(p_requester) = 'object'
       AND jsonb_typeof(p_requester -> 'id') = 'string' AND p_requester ->> 'id' <> ''
       AND coalesce(jsonb_typeof(p_requester -> 'role'), 'string') = 'string'
       AND p_requester - 'id' - 'role' = '{}'::jsonb THEN
        RETURN;
    END IF;
    RAISE EXCEPTION USING ERRCODE = 'KVINV',
        MESSAGE = format('invalid requester %s', left(p_requester::text, 200)),
        HINT = 'Pass NULL for a trusted caller, {} for anonymous, or {"id": "...", "role": "..."}.';
END
$$;

-- Raise KVFOR unless the session may touch p_app_id and, for an end-user
-- request, the deciding rule grants p_mode ('read' or 'write') on p_key.
-- A denied request gets KVFOR whether or not the key exists.
CREATE FUNCTION kvapi_data.check_access(p_app_id text, p_key text, p_requester jsonb, p_mode text)
RETURNS void
LANGUAGE plpgsql STABLE
AS $$
BEGIN
    PERFORM kvapi_data.check_caller(p_app_id);
    PERFORM kvapi_data.check_rules(p_app_id, p_key, p_requester, p_mode);
END
$$;

-- The second half of check_access, for callers that have checked the
-- session's scope already: raise KVFOR unless p_requester is NULL or the
-- deciding rule grants it p_mode on p_key.
CREATE FUNCTION kvapi_data.check_rules(p_app_id text, p_key text, p_requester jsonb, p_mode text)
RETURNS void
LANGUAGE plpgsql STABLE
AS $$
DECLARE
    v_rule kvapi_data.rules;
    v_role text;
BEGIN
    IF p_requester IS NULL THEN
        RETURN;
    END IF;
    -- The usual requesters pass this test without a function call.
    IF NOT coalesce(p_requester = '{}'::jsonb
                    OR (jsonb_typeof(p_requester -> 'id') = 'string' AND jsonb_typeof(p_requester -> 'role') = 'string'
                        AND p_requester - 'id' - 'role' = '{}'::jsonb AND p_requester ->> 'id' <> ''), false) THEN
        PERFORM kvapi_data.check_requester(p_requester);
    END IF;
    SELECT * INTO v_rule FROM kvapi_data.deciding_rule(p_app_id, p_key);
    v_role := CASE p_mode WHEN 'read' THEN v_rule.read_role ELSE v_rule.write_role END;
    -- The common rules need no regular expression to grant: public, and
    -- authed without a {user.role} segment. rule_grants handles the rest.
    IF v_role = 'public' AND NOT 'role' = ANY (v_rule.placeholder_kinds) THEN
        RETURN;
    END IF;
    IF v_role = 'authed' AND p_requester ? 'id' AND NOT 'role' = ANY (v_rule.placeholder_kinds) THEN
        RETURN;
    END IF;
    IF kvapi_data.rule_grants(v_rule, v_role, p_key, p_requester) THEN
        RETURN;
    END IF;
    -- An unknown app is KVAPP, not KVFOR, for every requester.
    PERFORM kvapi_data.app_plan(p_app_id);
    RAISE EXCEPTION USING ERRCODE = 'KVFOR',
        MESSAGE = format('%s access to key %L denied for %s', p_mode, left(p_key, 64),
                         CASE WHEN p_requester ? 'id' THEN format('user %L', p_requester ->> 'id') ELSE 'anonymous requests' END),
        HINT = CASE WHEN v_rule.pattern IS NULL
                    THEN 'No rule matches this key; open it with expose.'
                    ELSE format('The deciding rule is %L (read: %s, write: %s).', v_rule.pattern, v_rule.read_role, v_rule.write_role) END;
END
$$;

-- Open keys matching p_pattern to end users. Re-exposing a pattern with the
-- same roles changes nothing; with other roles it raises KVEXP. 'owner'
-- needs a {user.id} placeholder (KVINV otherwise).
CREATE FUNCTION kvapi.kv_expose(p_app_id text, p_pattern text, p_read text, p_write text)
RETURNS void
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_compiled record;
    v_existing kvapi_data.rules;
BEGIN
    PERFORM kvapi_data.check_caller(p_app_id);
    PERFORM kvapi_data.app_plan(p_app_id);
    IF p_read IS NULL OR p_read NOT IN ('deny', 'public', 'authed', 'owner')
       OR p_write IS NULL OR p_write NOT IN ('deny', 'public', 'authed', 'owner') THEN
        RAISE EXCEPTION USING ERRCODE = 'KVINV',
            MESSAGE = format('invalid role read=%s write=%s', coalesce(p_read, 'NULL'), coalesce(p_write, 'NULL')),
            HINT = 'Roles are deny, public, authed and owner.';
    END IF;
    SELECT * INTO v_compiled FROM kvapi_data.compile_pattern(p_pattern);
    IF 'owner' IN (p_read, p_write) AND NOT 'id' = ANY (v_compiled.placeholder_kinds) THEN
        RAISE EXCEPTION USING ERRCODE = 'KVINV',
            MESSAGE = format('invalid pattern %L for role owner: the pattern has no {user.id}', p_pattern),
            HINT = 'Add a {user.id} segment, such as profile:{user.id}, or use another role.';
    END IF;

    -- Serialise exposes of one pattern so that the conflict check is exact.
    PERFORM kvapi_data.lock_key(p_app_id, E'\\rule:' || p_pattern);
    SELECT * INTO v_existing FROM kvapi_data.rules r WHERE r.app_id = p_app_id AND r.pattern = p_pattern;
    IF FOUND THEN
        IF v_existing.read_role = p_read AND v_existing.write_role = p_write THEN
            RETURN;
        END IF;
        RAISE EXCEPTION USING ERRCODE = 'KVEXP',
            MESSAGE = format('pattern %L is already exposed with read %s, write %s', p_pattern,
                             v_existing.read_role, v_existing.write_role),
            HINT = 'Unexpose the pattern first to change its roles.';
    END IF;
    INSERT INTO kvapi_data.rules (app_id, pattern, read_role, write_role, literal_prefix, matcher, placeholder_kinds)
    VALUES (p_app_id, p_pattern, p_read, p_write, v_compiled.literal_prefix, v_compiled.matcher,
            v_compiled.placeholder_kinds);
END
$$;

-- Remove the rule of p_pattern; return whether there was one.
CREATE FUNCTION kvapi.kv_unexpose(p_app_id text, p_pattern text) RETURNS boolean
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    PERFORM kvapi_data.check_caller(p_app_id);
    PERFORM kvapi_data.app_plan(p_app_id);
    DELETE FROM kvapi_data.rules r WHERE r.app_id = p_app_id AND r.pattern = p_pattern;
    RETURN FOUND;
END
$$;

-- The app's rules as [{"pattern", "read", "write", "order"}] in creation order.
CREATE FUNCTION kvapi.kv_list_rules(p_app_id text) RETURNS jsonb
LANGUAGE plpgsql STABLE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    PERFORM kvapi_data.check_caller(p_app_id);
    PERFORM kvapi_data.app_plan(p_app_id);
    RETURN (
        SELECT coalesce(jsonb_agg(jsonb_build_object('pattern', r.pattern, 'read', r.read_role,
                                                     'write', r.write_role, 'order', r.rule_order)
                                  ORDER BY r.rule_order), '[]'::jsonb)
        FROM kvapi_data.rules r WHERE r.app_id = p_app_id);
END
$$;

-- Which rule decides for p_key and what it grants p_requester ('{}' for
-- anonymous, {"id", "role"?} for a user):
-- {"key", "rule": {"pattern", "read", "write", "order"} or null, "read", "write"}.
CREATE FUNCTION kvapi.kv_explain(p_app_id text, p_key text, p_requester jsonb DEFAULT '{}')
RETURNS jsonb
LANGUAGE plpgsql STABLE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_rule kvapi_data.rules;
BEGIN
    PERFORM kvapi_data.check_caller(p_app_id);
    PERFORM kvapi_data.check_key(p_key);
    PERFORM kvapi_data.check_requester(coalesce(p_requester, '{}'));
    PERFORM kvapi_data.app_plan(p_app_id);
    SELECT * INTO v_rule FROM kvapi_data.deciding_rule(p_app_id, p_key);
    RETURN jsonb_build_object(
        'key', p_key,
        'rule', CASE WHEN v_rule.pattern IS NOT NULL THEN
                    jsonb_build_object('pattern', v_rule.pattern, 'read', v_rule.read_role,
                                       'write', v_rule.write_role, 'order', v_rule.rule_order) END,
        'read', kvapi_data.rule_grants(v_rule, v_rule.read_role, p_key, coalesce(p_requester, '{}')),
        'write', kvapi_data.rule_grants(v_rule, v_rule.write_role, p_key, coalesce(p_requester, '{}')));
END
$$;

-- Register a public key for RS256 or ES256 end-user tokens.
CREATE FUNCTION kvapi.app_add_jwt_key(p_app_id text, p_algorithm text, p_public_key text) RETURNS bigint
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_key_id bigint;
BEGIN
    PERFORM kvapi_data.check_caller(p_app_id);
    PERFORM kvapi_data.app_plan(p_app_id);
    IF p_algorithm IS NULL OR p_algorithm NOT IN ('RS256', 'ES256') THEN
        RAISE EXCEPTION USING ERRCODE = 'KVINV',
            MESSAGE = format('invalid algorithm %L', p_algorithm),
            HINT = 'Public keys are for RS256 or ES256; HS256 uses the app secret.';
    END IF;
    INSERT INTO kvapi_data.jwt_keys (app_id, algorithm, public_key)
    VALUES (p_app_id, p_algorithm, p_public_key)
    ON CONFLICT (app_id, public_key) DO UPDATE SET algorithm = excluded.algorithm
    RETURNING key_id INTO v_key_id;
    RETURN v_key_id;
END
$$;

-- Keys that verify the app's end-user tokens:
-- [{"algorithm": "HS256", "key": secret}, {"algorithm": "RS256", "key": pem}, ...].
-- Only for the HTTP layer (kvapi_api), which verifies tokens.
CREATE FUNCTION kvapi.app_jwt_keys(p_app_id text) RETURNS jsonb
LANGUAGE plpgsql STABLE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    PERFORM kvapi_data.check_caller(p_app_id);
    PERFORM kvapi_data.app_plan(p_app_id);
    RETURN (
        SELECT jsonb_build_array(jsonb_build_object('algorithm', 'HS256', 'key', a.jwt_secret))
               || coalesce((SELECT jsonb_agg(jsonb_build_object('algorithm', k.algorithm, 'key', k.public_key)
                                             ORDER BY k.key_id)
                            FROM kvapi_data.jwt_keys k WHERE k.app_id = p_app_id), '[]'::jsonb)
        FROM kvapi_data.apps a WHERE a.app_id = p_app_id);
END
$$;

-- Bind an existing database role to one app: it may then call the kvapi
-- functions for that app only, and never read the tables.
CREATE FUNCTION kvapi.app_grant_role(p_app_id text, p_role name) RETURNS void
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    PERFORM kvapi_data.app_plan(p_app_id);
    IF NOT EXISTS (SELECT 1 FROM pg_roles r WHERE r.rolname = p_role) THEN
        RAISE EXCEPTION USING ERRCODE = 'KVINV',
            MESSAGE = format('role %I not found', p_role),
            HINT = 'Create the role first with CREATE ROLE.';
    END IF;
    INSERT INTO kvapi_data.role_bindings (role_name, app_id) VALUES (p_role, p_app_id)
    ON CONFLICT (role_name) DO UPDATE SET app_id = excluded.app_id;
    EXECUTE format('GRANT kvapi_client TO %I', p_role);
END
$$;
