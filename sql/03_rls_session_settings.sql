-- Policies for 02_schema.sql on plain session settings (app.user_id, app.tenant_id,
-- app.roles), as gprxy's fallback mode sets them on PostgreSQL 13 to 18 without the extension.
--
-- WARNING: any client can change these with SET or set_config, so these policies trust the
-- client not to. Prefer sql/03_rls_gprxy_claims.sql (gprxy.claim(), which SQL cannot change;
-- in fallback mode gprxy sets it through the signed context) wherever gprxy_validator can be
-- installed. Use one of the two files, not both.
-- current_setting(..., true) is NULL when unset: NULL matches nothing.
DROP POLICY IF EXISTS tenant_isolation ON users;
CREATE POLICY tenant_isolation ON users AS RESTRICTIVE TO app_writer, app_reader
  USING (tenant_id::text = current_setting('app.tenant_id', true))
  WITH CHECK (tenant_id::text = current_setting('app.tenant_id', true));
DROP POLICY IF EXISTS tenant_isolation ON posts;
CREATE POLICY tenant_isolation ON posts AS RESTRICTIVE TO app_writer, app_reader
  USING (tenant_id::text = current_setting('app.tenant_id', true))
  WITH CHECK (tenant_id::text = current_setting('app.tenant_id', true));

DROP POLICY IF EXISTS users_read ON users;
CREATE POLICY users_read ON users FOR SELECT TO app_writer, app_reader USING (true);
DROP POLICY IF EXISTS users_own_data ON users;
CREATE POLICY users_own_data ON users FOR UPDATE TO app_writer
  USING (user_id = current_setting('app.user_id', true))
  WITH CHECK (user_id = current_setting('app.user_id', true));

DROP POLICY IF EXISTS posts_visibility ON posts;
CREATE POLICY posts_visibility ON posts FOR SELECT TO app_writer, app_reader
  USING (owner_id = current_setting('app.user_id', true) OR visibility = 'public');
DROP POLICY IF EXISTS posts_insert ON posts;
CREATE POLICY posts_insert ON posts FOR INSERT TO app_writer
  WITH CHECK (owner_id = current_setting('app.user_id', true));
DROP POLICY IF EXISTS posts_modify ON posts;
CREATE POLICY posts_modify ON posts FOR UPDATE TO app_writer
  USING (owner_id = current_setting('app.user_id', true))
  WITH CHECK (owner_id = current_setting('app.user_id', true));
DROP POLICY IF EXISTS posts_delete ON posts;
CREATE POLICY posts_delete ON posts FOR DELETE TO app_writer
  USING (owner_id = current_setting('app.user_id', true));

DROP POLICY IF EXISTS admin_all ON users;
CREATE POLICY admin_all ON users TO app_admin USING (true) WITH CHECK (true);
DROP POLICY IF EXISTS admin_all ON posts;
CREATE POLICY admin_all ON posts TO app_admin USING (true) WITH CHECK (true);
