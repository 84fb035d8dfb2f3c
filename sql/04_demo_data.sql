-- Demo rows: two tenants, two users each.
INSERT INTO users (tenant_id, user_id, email) VALUES
  ('11111111-1111-1111-1111-111111111111', 'alice', 'alice@acme.example'),
  ('11111111-1111-1111-1111-111111111111', 'dave',  'dave@acme.example'),
  ('22222222-2222-2222-2222-222222222222', 'bob',   'bob@globex.example'),
  ('22222222-2222-2222-2222-222222222222', 'erin',  'erin@globex.example');
INSERT INTO posts (tenant_id, owner_id, title, visibility) VALUES
  ('11111111-1111-1111-1111-111111111111', 'alice', 'alice private', 'private'),
  ('11111111-1111-1111-1111-111111111111', 'dave',  'acme public',   'public'),
  ('11111111-1111-1111-1111-111111111111', 'dave',  'dave private',  'private'),
  ('22222222-2222-2222-2222-222222222222', 'bob',   'bob private',   'private'),
  ('22222222-2222-2222-2222-222222222222', 'erin',  'globex public', 'public');
