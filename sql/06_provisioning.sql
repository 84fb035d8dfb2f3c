-- Roles from groups (gprxy.provision = create | sync, PostgreSQL 18): the provisioner's role.
-- Run as a superuser in gprxy.provision_database (default postgres), after CREATE EXTENSION
-- gprxy_validator there. Then in postgresql.conf:
--   gprxy.provision_role = 'gprxy_provisioner'     (restart to start the provisioner)
--   gprxy.provision = 'sync'                       (or per issuer: provision = "sync")
--   gprxy.role_map = 'eng:app_reader,ops:app_writer'
-- and a pg_hba.conf line with delegate_ident_mapping=1.

-- NOLOGIN: nobody logs in as it; the provisioner connects without the LOGIN check. CREATEROLE
-- lets it create roles (and, since PostgreSQL 16, administer only the roles it created).
CREATE ROLE gprxy_provisioner NOLOGIN CREATEROLE;

-- The managed group roles (the role map's targets): ADMIN OPTION lets it grant and revoke
-- membership in them; INHERIT and SET FALSE: it gets none of their privileges.
GRANT app_reader, app_writer TO gprxy_provisioner WITH ADMIN OPTION, INHERIT FALSE, SET FALSE;

-- Its record of what it made.
GRANT USAGE ON SCHEMA gprxy TO gprxy_provisioner;
GRANT SELECT, INSERT, UPDATE ON gprxy.provisioned_roles TO gprxy_provisioner;
