-- Policies for 02_schema.sql on gprxy's claim functions
-- (the recommended style): gprxy.claim()/gprxy.identity() return what the validated token said,
-- and no SET, set_config or RESET can change them. Requires CREATE EXTENSION gprxy_validator:
-- on 18 the validator sets them at login; on older servers gprxy's fallback mode sets them through
-- the signed context (gprxy.set_context).
--
-- Tokens carry: sub (the user), tenant_id (a UUID claim), roles.
-- Rows are owned by gprxy.identity(): the identity claim as the issuer's entry forms it (issuer-
-- qualified, <iss>#<sub>, with issuer_qualified = true). Two issuers can both say sub = alice;
-- gprxy.identity() is the bare claim and would make them one person to these policies.
-- Tenant isolation is RESTRICTIVE: no permissive policy can widen it for writers and readers.
-- A session without a token has no tenant_id claim: NULL matches nothing.
DROP POLICY IF EXISTS tenant_isolation ON users;
CREATE POLICY tenant_isolation ON users AS RESTRICTIVE TO app_writer, app_reader
  USING (tenant_id::text = gprxy.claim('tenant_id'))
  WITH CHECK (tenant_id::text = gprxy.claim('tenant_id'));
DROP POLICY IF EXISTS tenant_isolation ON posts;
CREATE POLICY tenant_isolation ON posts AS RESTRICTIVE TO app_writer, app_reader
  USING (tenant_id::text = gprxy.claim('tenant_id'))
  WITH CHECK (tenant_id::text = gprxy.claim('tenant_id'));

-- Inside the tenant: everyone sees the tenant's users; each user updates only their own row.
DROP POLICY IF EXISTS users_read ON users;
CREATE POLICY users_read ON users FOR SELECT TO app_writer, app_reader USING (true);
DROP POLICY IF EXISTS users_own_data ON users;
CREATE POLICY users_own_data ON users FOR UPDATE TO app_writer
  USING (user_id = gprxy.identity()) WITH CHECK (user_id = gprxy.identity());

-- Posts: your own and the tenant's public ones; writers change only their own.
DROP POLICY IF EXISTS posts_visibility ON posts;
CREATE POLICY posts_visibility ON posts FOR SELECT TO app_writer, app_reader
  USING (owner_id = gprxy.identity() OR visibility = 'public');
DROP POLICY IF EXISTS posts_insert ON posts;
CREATE POLICY posts_insert ON posts FOR INSERT TO app_writer WITH CHECK (owner_id = gprxy.identity());
DROP POLICY IF EXISTS posts_modify ON posts;
CREATE POLICY posts_modify ON posts FOR UPDATE TO app_writer
  USING (owner_id = gprxy.identity()) WITH CHECK (owner_id = gprxy.identity());
DROP POLICY IF EXISTS posts_delete ON posts;
CREATE POLICY posts_delete ON posts FOR DELETE TO app_writer USING (owner_id = gprxy.identity());

-- Admins: an explicit policy for the role (ALTER ROLE ... NOINHERIT does not do this).
DROP POLICY IF EXISTS admin_all ON users;
CREATE POLICY admin_all ON users TO app_admin USING (true) WITH CHECK (true);
DROP POLICY IF EXISTS admin_all ON posts;
CREATE POLICY admin_all ON posts TO app_admin USING (true) WITH CHECK (true);
