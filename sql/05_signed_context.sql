-- Fallback mode's signed context (gprxy in front of a 13 to 17 server with gprxy_validator):
-- only the service accounts gprxy logs in as may set a session's identity. Needs
-- CREATE EXTENSION gprxy_validator (which revokes EXECUTE on these two from PUBLIC) and, in
-- postgresql.conf (superuser only, reload to apply):
--   gprxy.context_keys  = '<public key>'   -- printed by `gprxy context-key FILE`; two during a rotation
--   gprxy.context_roles = 'app_admin, app_writer, app_reader'
-- EXECUTE is inherited by members of these roles; gprxy.context_roles (checked against
-- session_user) is what keeps a member such as an analyst who logs in by password out.
-- A database where the extension was created by an earlier gprxy (same version number, EXECUTE
-- still granted to PUBLIC) needs the revoke too; repeating it is harmless.
REVOKE EXECUTE ON FUNCTION gprxy.set_context(text), gprxy.reset_context() FROM PUBLIC;
GRANT EXECUTE ON FUNCTION gprxy.set_context(text), gprxy.reset_context() TO app_admin, app_writer, app_reader;
