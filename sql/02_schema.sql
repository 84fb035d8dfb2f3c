-- The design document's multi-tenant schema (PostgreSQL 13 to 18). Row-level security is on;
-- the policies come from one of the 03_rls_*.sql files.
CREATE TABLE IF NOT EXISTS users (
  id         uuid PRIMARY KEY DEFAULT gen_random_uuid(),
  tenant_id  uuid NOT NULL,
  user_id    text NOT NULL,            -- the token's sub
  email      text NOT NULL,
  created_at timestamptz DEFAULT now()
);

CREATE TABLE IF NOT EXISTS posts (
  id         uuid PRIMARY KEY DEFAULT gen_random_uuid(),
  tenant_id  uuid NOT NULL,
  owner_id   text NOT NULL,            -- the token's sub
  title      text NOT NULL,
  content    text,
  visibility text NOT NULL DEFAULT 'private' CHECK (visibility IN ('private', 'public')),
  created_at timestamptz DEFAULT now()
);

GRANT ALL ON users, posts TO app_admin;
GRANT SELECT, INSERT, UPDATE, DELETE ON users, posts TO app_writer;
GRANT SELECT ON users, posts TO app_reader;

ALTER TABLE users ENABLE ROW LEVEL SECURITY;
ALTER TABLE posts ENABLE ROW LEVEL SECURITY;
